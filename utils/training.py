"""The pieces of a training run that train.py strings together: loss, optimizers, one step, validation, RNG state.

Everything here works on a plain model, a DistributedDataParallel-wrapped one or a compiled one; ``distributed``
arguments add the collective operations a multi-process run needs (a shared skip decision, summed metrics).
"""

import math
import os
import random
from dataclasses import fields

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from models import CheckpointError, CSMConfig, architecture, checkpoint_arch, unwrap_model
from models.checkpoint import load_state_dict_checked, state_dict_for
from utils.allocator import keep_freed_memory  # noqa: F401 -- re-exported: train.py, scripts/bench_train.py
from utils.metrics import MS_SSIM_MIN_SIDE, bpp_from_likelihoods, ms_ssim, mse, psnr

METRICS = ("mse", "ms-ssim")
AMP_DTYPES = {"none": None, "bf16": torch.bfloat16}


class RateDistortionLoss(nn.Module):
    """``lambda * 255^2 * MSE + bpp`` (``metric="mse"``) or ``lambda * (1 - MS-SSIM) + bpp`` (``"ms-ssim"``).

    ``forward(output, target)``: the model's forward dict and the BxCxHxW input in [0, 1] -> dict of scalar
    float32 tensors ``loss``, ``bpp_loss``, ``mse_loss``, ``psnr`` (mean over the images, no gradient), and
    ``ms_ssim`` when the images are large enough (at least 161 pixels a side; required by the MS-SSIM metric).
    Computed in float32 whatever dtype autocast gave the model's outputs.
    """

    def __init__(self, lmbda=0.0025, metric="mse"):
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"metric must be one of {METRICS}; got {metric!r}")
        self.lmbda = float(lmbda)
        self.metric = metric

    def forward(self, output, target):
        height, width = target.shape[-2:]
        likelihoods = {k: v.float() for k, v in output["likelihoods"].items()}
        x_hat = output["x_hat"].float()
        result = {
            "bpp_loss": bpp_from_likelihoods(likelihoods, target.shape[0] * height * width),
            "mse_loss": mse(x_hat, target).mean().float(),
            "psnr": psnr(x_hat.detach(), target).mean().float(),
        }
        if min(height, width) >= MS_SSIM_MIN_SIDE:
            # Only the MS-SSIM loss backpropagates through it; for MSE training it is a logged measure.
            result["ms_ssim"] = ms_ssim(x_hat if self.metric == "ms-ssim" else x_hat.detach(), target).mean()
        elif self.metric == "ms-ssim":
            raise ValueError(f"MS-SSIM needs images of at least {MS_SSIM_MIN_SIDE}x{MS_SSIM_MIN_SIDE}")
        if self.metric == "mse":
            distortion = 255**2 * result["mse_loss"]
        else:
            distortion = 1 - result["ms_ssim"]
        result["loss"] = self.lmbda * distortion + result["bpp_loss"]
        return result


def is_aux_parameter(name):
    """CompressAI's convention: parameters named ``*.quantiles`` (the entropy bottlenecks') are auxiliary."""
    return name.endswith(".quantiles")


def split_parameters(model):
    """(main, aux) parameter lists (``is_aux_parameter``)."""
    main, aux = [], []
    for name, param in unwrap_model(model).named_parameters():
        if param.requires_grad:
            (aux if is_aux_parameter(name) else main).append(param)
    if not aux:
        raise ValueError("the model has no '.quantiles' parameters for the auxiliary optimizer")
    return main, aux


def configure_optimizers(model, lr=1e-4, aux_lr=1e-3, fused=True):
    """Adam on the main parameters and Adam on the entropy bottleneck's quantiles (the aux loss).

    ``fused`` (default) takes torch's fused Adam (one kernel over all parameters, CPU and CUDA: 3.6x faster than
    the per-tensor loops for csm-small on 2 CPU cores; the same update up to float rounding), which can also skip a
    step on a device-side flag, so that ``train_step`` needs no host synchronisation."""
    main, aux = split_parameters(model)
    return torch.optim.Adam(main, lr=lr, fused=fused), torch.optim.Adam(aux, lr=aux_lr, fused=fused)


def load_optimizer_state(optimizer, state):
    """``optimizer.load_state_dict(state)``, keeping this optimizer's fused / foreach choice (a saved state carries
    the choice of the run that wrote it) and putting the step counters where the chosen implementation keeps them
    (a float32 tensor on the parameter's device for fused Adam)."""
    modes = [(group.get("fused"), group.get("foreach")) for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, (fused, foreach) in zip(optimizer.param_groups, modes):
        group["fused"], group["foreach"] = fused, foreach
        for param in group["params"]:
            entry = optimizer.state.get(param, {})
            if "step" in entry and fused:
                entry["step"] = torch.as_tensor(entry["step"], dtype=torch.float32).to(param.device)
            elif "step" in entry:
                entry["step"] = torch.as_tensor(entry["step"], dtype=torch.float32).cpu()


def available_cores():
    """CPU cores this process may run on (its affinity mask where the OS has one, e.g. under taskset or a cgroup)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def bf16_native(device):
    """Whether ``device`` computes bfloat16 natively: a CUDA GPU with bfloat16, or a CPU with AVX512-BF16 or AMX
    (oneDNN's bfloat16 kernels). Elsewhere bfloat16 is emulated and slower than float32."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(torch.cpu, name, lambda: False)() for name in checks)
    return False


def autocast(device, amp="none"):
    """The autocast context of ``--amp`` on ``device`` (a no-op context for ``amp="none"``)."""
    dtype = AMP_DTYPES[amp]
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def _step_unless(optimizer, skip):
    """``optimizer.step()`` unless the 0-dim float tensor ``skip`` is 1: fused Adam reads the flag on the device
    (its ``found_inf``: no parameter, moment or step counter changes), any other optimizer after one host sync."""
    if all(group.get("fused") for group in optimizer.param_groups):
        optimizer.found_inf = skip
        try:
            optimizer.step()
        finally:
            del optimizer.found_inf
    elif skip.item() == 0.0:
        optimizer.step()


def train_step(model, x, criterion, optimizer, aux_optimizer, clip_max_norm=1.0, amp="none", distributed=False):
    """One step on batch ``x``: main loss backward, gradient clipping, aux loss backward, both optimizer steps.

    A step whose loss, aux loss or gradient norm is not finite on any process changes no parameter (both
    optimizer steps are skipped on every process). Returns a dict of 0-dim tensors on ``x``'s device, read without
    waiting for the device: ``loss``, ``bpp_loss``, ``mse_loss``, ``psnr`` (``ms_ssim``), ``aux_loss``,
    ``grad_norm`` and ``finite`` (bool); ``step_values`` turns it into Python numbers. With fused optimizers
    (``configure_optimizers``' default) the step never synchronises with the device.
    """
    optimizer.zero_grad(set_to_none=True)
    aux_optimizer.zero_grad(set_to_none=True)
    with autocast(x.device, amp):
        output = model(x)
    losses = criterion(output, x)
    losses["loss"].backward()
    main_params = [p for group in optimizer.param_groups for p in group["params"]]
    # max_norm=inf still returns the norm, so that every step checks its gradients.
    grad_norm = torch.nn.utils.clip_grad_norm_(main_params, clip_max_norm if clip_max_norm > 0 else math.inf)
    # The aux loss only involves the quantiles; called on the unwrapped model, outside DDP's gradient hooks.
    aux_loss = unwrap_model(model).aux_loss()
    aux_loss.backward()
    if distributed:
        world = dist.get_world_size()
        for group in aux_optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    dist.all_reduce(p.grad)
                    p.grad /= world
    values = {k: v.detach() for k, v in losses.items()}
    values["aux_loss"] = aux_loss.detach()
    values["grad_norm"] = grad_norm.detach()
    bad = ~(torch.isfinite(values["loss"]) & torch.isfinite(values["aux_loss"]) & torch.isfinite(values["grad_norm"]))
    skip = bad.float().reshape(())
    if distributed:  # skipped on every process when it is bad on any
        dist.all_reduce(skip, op=dist.ReduceOp.MAX)
    _step_unless(optimizer, skip)
    _step_unless(aux_optimizer, skip)
    values["finite"] = skip == 0
    return values


def step_values(result):
    """A ``train_step`` result as Python numbers (``finite`` a bool); waits for the device."""
    return {k: bool(v) if k == "finite" else float(v) for k, v in result.items()}


@torch.no_grad()
def evaluate(model, loader, criterion, device, amp="none", distributed=False, keep_images=0):
    """Mean validation metrics over every image of ``loader`` (summed over processes when ``distributed``).

    Runs the unwrapped model in eval mode (rounded latents, as at test time) and puts it back in training mode.
    Returns (metrics, images): metrics has ``loss``, ``bpp_loss``, ``mse_loss``, ``psnr``, ``aux_loss`` (and
    ``ms_ssim`` when the patches are large enough); images is a list of up to ``keep_images`` (x, x_hat) pairs
    of 3xHxW tensors from this process's share.
    """
    net = unwrap_model(model)
    was_training = net.training
    net.eval()
    names = ["loss", "bpp_loss", "mse_loss", "psnr"]
    if min(loader.dataset.patch_size) >= MS_SSIM_MIN_SIDE:
        names.append("ms_ssim")
    sums = torch.zeros(len(names) + 1, dtype=torch.float64, device=device)  # last entry: image count
    images = []
    for x in loader:
        x = x.to(device, non_blocking=True)
        with autocast(device, amp):
            output = net(x)
        losses = criterion(output, x)
        batch = x.shape[0]
        sums += torch.stack([losses[name].double() * batch for name in names] + [sums.new_tensor(batch)])
        for i in range(min(keep_images - len(images), batch)):
            images.append((x[i].cpu(), output["x_hat"][i].float().clamp(0, 1).cpu()))
    if distributed:
        dist.all_reduce(sums)
    count = max(sums[-1].item(), 1)
    metrics = {name: sums[i].item() / count for i, name in enumerate(names)}
    metrics["aux_loss"] = float(net.aux_loss())
    net.train(was_training)
    return metrics, images


# --- checkpoints --------------------------------------------------------------------------------------------------
def config_differences(a, b):
    """``["N: 128 vs 64", ...]``: the fields in which two CSMConfigs differ (empty when equal)."""
    return [f"{f.name}: {getattr(a, f.name)!r} vs {getattr(b, f.name)!r}" for f in fields(CSMConfig)
            if getattr(a, f.name) != getattr(b, f.name)]


def load_weights(model, data, source):
    """Load the weights of checkpoint dict ``data`` into ``model``, which must be the model the file describes.

    Our own files name their architecture, which must be the model's, and carry its config (CSM) or constructor
    arguments (CompressAI architectures), which must equal the model's (else a one-line CheckpointError naming the
    differences); other files (released / CompressAI-style) must match key for key and shape for shape.
    """
    net = unwrap_model(model)
    stored_arch = checkpoint_arch(data)
    if stored_arch is not None:
        own = architecture(net)
        if stored_arch != own["arch"]:
            stored_name = data.get("preset") or stored_arch
            raise CheckpointError(
                f"{source} holds a {stored_name!r} model, this run builds {net.preset or own['arch']!r}: pass "
                f"-m {stored_name} and the overrides of the run that wrote it"
            )
        if "config" in own:
            try:
                stored = CSMConfig.from_dict(data["config"])
            except (KeyError, TypeError, ValueError) as exc:
                raise CheckpointError(f"{source}: invalid model config ({exc})") from exc
            diff = config_differences(stored, net.config)
        else:
            stored_args = data.get("arch_args") or {}
            diff = [f"{k}: {stored_args.get(k)!r} vs {own['arch_args'].get(k)!r}"
                    for k in sorted(set(stored_args) | set(own["arch_args"]))
                    if stored_args.get(k) != own["arch_args"].get(k)]
        if diff:
            raise CheckpointError(
                f"{source} holds a different model ({data.get('preset') or stored_arch!r}; checkpoint vs this run: "
                f"{'; '.join(diff)}); pass the same --model and overrides as the run that wrote it"
            )
    return load_state_dict_checked(net, state_dict_for(net, data), source)


def capture_rng_state():
    """The torch, CUDA (current device), numpy and python RNG states as tensors and plain types."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() and torch.cuda.is_initialized() else None,
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64), "gauss_next": gauss_next},
    }


def restore_rng_state(state):
    """Inverse of ``capture_rng_state``."""
    torch.set_rng_state(state["torch"].cpu())
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"].cpu())
    numpy_state = state["numpy"]
    np.random.set_state(("MT19937", numpy_state["keys"].numpy().astype(np.uint32), numpy_state["pos"],
                         numpy_state["has_gauss"], numpy_state["cached_gaussian"]))
    python_state = state["python"]
    random.setstate((python_state["version"], tuple(python_state["state"].tolist()), python_state["gauss_next"]))


def seed_everything(seed):
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def exclude_aux_from_ddp(model):
    """Make DistributedDataParallel leave the aux parameters alone (call on the model before wrapping it):
    ``train_step`` averages their gradients itself, after the aux loss's backward. That backward runs once DDP's
    iteration has ended, and a parameter that only the aux loss reaches (the quantiles of CompressAI's
    architectures, whose forward does not use them) would be found used there, which DDP refuses at the next step.
    DDP then does not broadcast them either: every process starts from the same values (the entropy bottleneck's
    fixed initialisation, or the checkpoint's)."""
    names = [name for name, _ in model.named_parameters() if is_aux_parameter(name)]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


def has_unused_parameters(model, device, size=64):
    """Whether a forward/backward on a random ``size`` x ``size`` image leaves a trainable parameter other than the
    aux ones (``exclude_aux_from_ddp``) without a gradient (DDP then needs ``find_unused_parameters``). Leaves RNG
    states and gradients as they were."""
    device = torch.device(device)
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        output = model(torch.rand(1, 3, size, size, device=device))
        total = output["x_hat"].float().mean() + sum(v.float().log().sum() for v in output["likelihoods"].values())
        total.backward()
    unused = [name for name, p in model.named_parameters()
              if p.requires_grad and p.grad is None and not is_aux_parameter(name)]
    model.zero_grad(set_to_none=True)
    return bool(unused)
