"""The bundled checkpoints in ``checkpoints/``: the quality levels of ``codec.py --quality`` and ``demo.py --quality``.

CompressAI's zoo convention: a higher quality is a higher rate and PSNR; the middle one is the default. Each entry
records the model id that ``.csm`` files name (``utils.codec_io.model_id``), so a decoder given neither
``--checkpoint`` nor ``--quality`` finds the bundled checkpoint that encoded a file without loading all of them.
Torch-free, so that the command line resolves a path before torch is imported. How each was trained:
``checkpoints/README.md``.
"""

from dataclasses import dataclass
from pathlib import Path

FOLDER = Path(__file__).resolve().parents[1] / "checkpoints"


@dataclass(frozen=True)
class Bundled:
    quality: int
    file: str
    lmbda: float
    model_id: str  # hex, as codec_io.model_id(model).hex()

    @property
    def path(self):
        return FOLDER / self.file


BUNDLED = {
    entry.quality: entry
    for entry in (
        Bundled(2, "csm-small.pth.tar", 0.013, "29a6264979daeb34638be9c64bfc8833"),
    )
}
DEFAULT_QUALITY = 2
QUALITIES = tuple(sorted(BUNDLED))


def by_quality(quality):
    """The checkpoint path of a quality level; a missing file is a ``FileNotFoundError`` that says what to do."""
    entry = BUNDLED[quality]
    if not entry.path.is_file():
        raise FileNotFoundError(
            f"the bundled checkpoint of quality {quality}, {entry.path}, does not exist: pass --checkpoint PATH, or "
            "train one with train.py (checkpoints/README.md has the commands)"
        )
    return entry.path


def by_model_id(model_id):
    """The quality level whose bundled checkpoint has ``model_id`` (bytes), or None."""
    return next((q for q, entry in BUNDLED.items() if entry.model_id == model_id.hex()), None)
