"""Tiled coding: an image of any size through a CSM model in memory bounded by the tile size.

The padded image (sides multiples of 64) is cut into a grid of ``tile`` x ``tile`` squares (``bitstream.tile_grid``:
row-major from the top left, the last row and column narrower). Each tile's latent is entropy-coded on its own, with
its own hyper-latent, into its own y and z strings, so the entropy model never sees more than one tile. Nothing is
coded twice: ``overlap`` is context, not extra rate. The analysis transform sees each tile with ``overlap`` pixels
of the image around it (clipped at the image's edges) and keeps the latent of the tile alone; the synthesis
transform sees each tile's latent with ``overlap / 16`` latent positions of its neighbours around it (the decoder
has every tile's latent by then) and keeps the pixels of the tile alone. So a tile's edges are transformed with the
image around them, as without tiles, and the seams stay invisible at a moderate overlap (the README measures it).

Decoding is as deterministic as untiled coding: each tile's latents are rebuilt bit for bit (``CSM.deterministic``),
on any thread count, scan backend or device. ``TiledCoder`` has the model interface that ``utils.evaluation``
measures (``forward``, ``compress``, ``decompress``), so eval.py scores tiled coding like any model.
"""

import torch

from utils.bitstream import MIN_TILE, OVERLAP_MULTIPLE, TILE_MULTIPLE, check_tiling, tile_grid

DEFAULT_TILE = 512  # pixels: a window of 640 x 640 with the default overlap (csm N=128: about 2.5 GB)
DEFAULT_OVERLAP = 64  # pixels of context around each tile (4 latent positions)
LATENT_STRIDE = 16  # pixels per position of y


def check_arguments(tile, overlap):
    """Raise ValueError (one line) unless ``tile`` (> 0) and ``overlap`` are what the format holds."""
    problem = check_tiling(tile, overlap) if tile else f"tile side {tile} is not a positive multiple of {TILE_MULTIPLE}"
    if problem:
        raise ValueError(problem)


def window(tile_box, overlap, size):
    """The window (top, left, height, width) of ``tile_box`` (top, left, height, width) grown by ``overlap`` on each
    side and clipped to ``size`` (H, W); all in the same unit."""
    top, left, height, width = tile_box
    top0, left0 = max(top - overlap, 0), max(left - overlap, 0)
    bottom, right = min(top + height + overlap, size[0]), min(left + width + overlap, size[1])
    return top0, left0, bottom - top0, right - left0


def _crop(t, box):
    top, left, height, width = box
    return t[..., top : top + height, left : left + width]


def _scaled(box, factor):
    return tuple(v // factor for v in box)


class TiledCoder:
    """A CSM model coding images tile by tile (see the module docstring); ``progress(done, total)`` is called after
    each tile of ``compress`` / ``decompress`` (a progress bar's hook)."""

    def __init__(self, model, tile=DEFAULT_TILE, overlap=DEFAULT_OVERLAP, progress=None):
        check_arguments(tile, overlap)
        self.model, self.tile, self.overlap, self.progress = model, tile, overlap, progress

    # the model interface of utils.evaluation
    def eval(self):
        self.model.eval()
        return self

    def parameters(self):
        return self.model.parameters()

    def tiles(self, padded_size):
        return tile_grid(padded_size, self.tile)

    def _report(self, done, total):
        if self.progress is not None:
            self.progress(done, total)

    def analysis(self, x):
        """y of a padded image x (1, 3, H, W): each tile's latent from ``g_a`` over the tile and its context."""
        size = tuple(x.shape[-2:])
        y = None
        for box in self.tiles(size):
            win = window(box, self.overlap, size)
            y_win = self.model.g_a(_crop(x, win))
            if y is None:
                y = y_win.new_empty(*y_win.shape[:2], size[0] // LATENT_STRIDE, size[1] // LATENT_STRIDE)
            inner = (box[0] - win[0], box[1] - win[1], box[2], box[3])  # the tile within its window
            _crop(y, _scaled(box, LATENT_STRIDE)).copy_(_crop(y_win, _scaled(inner, LATENT_STRIDE)))
        return y

    def synthesis(self, y_hat):
        """x_hat (1, 3, H, W), not clamped, of the whole latent: each tile from ``g_s`` over its latent and the
        latent around it."""
        size = tuple(s * LATENT_STRIDE for s in y_hat.shape[-2:])
        x_hat = None
        for box in self.tiles(size):
            win = _scaled(window(box, self.overlap, size), LATENT_STRIDE)
            x_win = self.model.g_s(_crop(y_hat, win))
            if x_hat is None:
                x_hat = x_win.new_empty(*x_win.shape[:2], *size)
            inner = (box[0] - win[0] * LATENT_STRIDE, box[1] - win[1] * LATENT_STRIDE, box[2], box[3])
            _crop(x_hat, box).copy_(_crop(x_win, inner))
        return x_hat

    def _latent_boxes(self, y):
        size = tuple(s * LATENT_STRIDE for s in y.shape[-2:])
        return [_scaled(box, LATENT_STRIDE) for box in self.tiles(size)]

    @torch.no_grad()
    def forward(self, x):
        """The eval-mode forward pass, tile by tile: ``{"x_hat", "likelihoods": {"y0", "z0", "y1", ...}}``
        (``bpp_from_likelihoods`` sums them all)."""
        y = self.analysis(x)
        y_hat, likelihoods = torch.empty_like(y), {}
        for i, box in enumerate(self._latent_boxes(y)):
            tile_hat, tile_likelihoods = self.model.forward_latent(_crop(y, box))
            _crop(y_hat, box).copy_(tile_hat)
            likelihoods.update({f"{name}{i}": value for name, value in tile_likelihoods.items()})
        return {"x_hat": self.synthesis(y_hat), "likelihoods": likelihoods}

    __call__ = forward

    @torch.no_grad()
    def compress(self, x):
        """``{"strings": [y strings, z strings] (one per tile each), "shape": padded (H, W), "y_hat", "z_shapes"}``
        of a padded image x (1, 3, H, W)."""
        y = self.analysis(x)
        y_hat, y_strings, z_strings, z_shapes = torch.empty_like(y), [], [], []
        boxes = self._latent_boxes(y)
        for i, box in enumerate(boxes):
            out = self.model.compress_latent(_crop(y, box).contiguous())
            _crop(y_hat, box).copy_(out["y_hat"])
            (y_string,), (z_string,) = out["strings"]
            y_strings.append(y_string)
            z_strings.append(z_string)
            z_shapes.append(out["shape"])
            self._report(i + 1, len(boxes))
        return {"strings": [y_strings, z_strings], "shape": tuple(x.shape[-2:]), "y_hat": y_hat, "z_shapes": z_shapes}

    @torch.no_grad()
    def decompress(self, strings, shape):
        """``{"x_hat" (clamped to [0, 1]), "y_hat"}`` of ``compress``'s strings and the padded image size."""
        y_strings, z_strings = strings
        boxes = [_scaled(box, LATENT_STRIDE) for box in self.tiles(tuple(shape))]
        if len(y_strings) != len(boxes) or len(z_strings) != len(boxes):
            raise ValueError(f"{len(y_strings)} y and {len(z_strings)} z strings for {len(boxes)} tiles")
        y_hat = None
        for i, box in enumerate(boxes):
            z_shape = (box[2] * LATENT_STRIDE // TILE_MULTIPLE, box[3] * LATENT_STRIDE // TILE_MULTIPLE)
            tile_hat = self.model.decompress_latent([[y_strings[i]], [z_strings[i]]], z_shape)
            if y_hat is None:
                height, width = (s // LATENT_STRIDE for s in shape)
                y_hat = tile_hat.new_empty(*tile_hat.shape[:2], height, width)
            _crop(y_hat, box).copy_(tile_hat)
            self._report(i + 1, len(boxes))
        return {"x_hat": self.synthesis(y_hat).clamp_(0, 1), "y_hat": y_hat}


__all__ = ["DEFAULT_OVERLAP", "DEFAULT_TILE", "MIN_TILE", "OVERLAP_MULTIPLE", "TILE_MULTIPLE", "TiledCoder",
           "check_arguments", "window"]
