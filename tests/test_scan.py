"""The selective scan's backends against the float64 reference, backend selection, and SS2D (layers/scan, ss2d.py).

Every case is computed once with ``selective_scan_ref`` (module-level cache) and compared with each backend in the
output and in the gradient of every input. Error metric: max |a - b| / max |b| (b the reference) <= 1e-5.
"""

import functools
import math
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from layers.scan import ENV_VAR, ScanBackendError, resolve_backend, selective_scan, selective_scan_ref
from layers.scan.torch_impl import SelectiveScanTorch
from layers.ss2d import SS2D, VSSBlock, cross_merge, cross_scan
from tests.helpers import torch_threads

TOL = 1e-5
NAMES = ("u", "delta", "A", "B", "C", "D", "delta_bias")
HAS_CUDA = torch.cuda.is_available()


@dataclass(frozen=True)
class Case:
    """One scan problem: sizes (per_group channels per B/C group), optional inputs, and the input regime."""

    batch: int
    groups: int
    per_group: int
    n_state: int
    length: int
    D: bool = True
    bias: bool = True
    softplus: bool = True
    regime: str = "normal"  # "normal", "extreme_dt" (dt from 1e-4 to 10) or "large" (u ~ 100)


# L: 1, 7, 64, 257 (not multiples of the cpu CHUNK of 64 or the torch inner chunk of 32) and 600 (> the torch
# BLOCK_LEN of 512); channels per group 3 and 20 (not multiples of the cpu's 16 lanes), 16 and 32 (multiples).
CASES = {
    "L1": Case(2, 4, 3, 16, 1),
    "L7-N1": Case(1, 2, 20, 1, 7, bias=False),
    "L64-K1-noD": Case(1, 1, 16, 16, 64, D=False),
    "L257-K4": Case(2, 4, 20, 16, 257),
    "L600-K2": Case(1, 2, 32, 16, 600),
    "no-softplus": Case(1, 4, 3, 16, 257, softplus=False),
    "no-softplus-N1-bare": Case(1, 1, 3, 1, 7, D=False, bias=False, softplus=False),
    "no-D-no-bias": Case(2, 2, 16, 16, 64, D=False, bias=False),
    "extreme-dt": Case(1, 4, 20, 16, 257, regime="extreme_dt"),
    "large-inputs": Case(1, 2, 32, 16, 257, regime="large"),
}


def make_inputs(case, seed=0):
    """Float32 inputs (u, delta, A, B, C, D, delta_bias) of a case, D and delta_bias None when absent."""
    g = torch.Generator().manual_seed(seed)
    channels = case.groups * case.per_group
    shape = (case.batch, channels, case.length)
    u = torch.randn(shape, generator=g)
    A = -torch.exp(0.5 * torch.randn(channels, case.n_state, generator=g)) * torch.arange(1, case.n_state + 1)
    B = torch.randn(case.batch, case.groups, case.n_state, case.length, generator=g)
    C = torch.randn(case.batch, case.groups, case.n_state, case.length, generator=g)
    D = torch.randn(channels, generator=g) if case.D else None
    if case.softplus:  # mamba's dt init: softplus^-1 of dt log-uniform in [1e-3, 0.1]
        dt_bias = torch.exp(torch.empty(channels).uniform_(math.log(1e-3), math.log(0.1), generator=g))
        bias = dt_bias + torch.log(-torch.expm1(-dt_bias)) if case.bias else None
        delta = 0.5 * torch.randn(shape, generator=g)
    else:  # no softplus: dt = delta + bias must stay positive
        bias = 0.1 * torch.rand(channels, generator=g) if case.bias else None
        delta = 0.01 + 0.5 * torch.rand(shape, generator=g)
    if case.regime == "extreme_dt":  # delta such that softplus(delta + bias) is log-uniform in [1e-4, 10]
        dt = torch.exp(torch.empty(shape).uniform_(math.log(1e-4), math.log(10.0), generator=g)).double()
        delta = (torch.log(torch.expm1(dt)) - (0 if bias is None else bias.double()[:, None])).float()
    if case.regime == "large":
        u = 100 * u
        B, C = 10 * B, 10 * C
    return [u, delta, A, B, C, D, bias]


def one_thread():
    """Tiny tensor ops on one thread (``torch_threads``): the reference loop and small models gain nothing from a
    second one."""
    return torch_threads(1)


def run_scan(inputs, grad_out, softplus, backend, device="cpu"):
    """Output and the gradient of every present input of ``selective_scan`` for upstream gradient grad_out."""
    leaves = [None if t is None else t.detach().to(device).requires_grad_() for t in inputs]
    y = selective_scan(*leaves, delta_softplus=softplus, backend=backend)
    y.backward(grad_out.to(device=device, dtype=y.dtype))
    grads = {name: t.grad.cpu() for name, t in zip(NAMES, leaves) if t is not None}
    return y.detach().cpu(), grads


@functools.lru_cache(maxsize=None)
def reference(name):
    """(inputs, upstream gradient, ref output, ref gradients) of a case, computed once per test session."""
    case = CASES[name]
    inputs = make_inputs(case)
    grad_out = torch.randn(inputs[0].shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    with one_thread():
        y, grads = run_scan(inputs, grad_out, case.softplus, "ref")
    return inputs, grad_out, y, grads


def rel_err(actual, expected):
    return ((actual.double() - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


def assert_matches(actual, expected, tol=TOL, label=""):
    if expected.abs().max() == 0:  # e.g. dL/dA at L = 1, where the state before the first step is 0
        assert actual.abs().max().item() <= 1e-6, f"{label}: expected 0, got max |.| {actual.abs().max():.3g}"
        return
    err = rel_err(actual, expected)
    assert err <= tol, f"{label}: max rel error {err:.3g} > {tol:g}"


@pytest.mark.parametrize("backend", ["torch", "cpu"])
@pytest.mark.parametrize("name", list(CASES))
def test_backend_matches_reference(name, backend):
    inputs, grad_out, y_ref, grads_ref = reference(name)
    y, grads = run_scan(inputs, grad_out, CASES[name].softplus, backend)
    assert y.dtype == torch.float32 and y.shape == y_ref.shape
    assert_matches(y, y_ref, label=f"{backend} y")
    assert grads.keys() == grads_ref.keys()
    for key in grads_ref:
        assert grads[key].shape == grads_ref[key].shape
        assert_matches(grads[key], grads_ref[key], label=f"{backend} d{key}")


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU (and mamba-ssm's kernel)")
@pytest.mark.parametrize("name", ["L7-N1", "L257-K4", "L600-K2", "no-softplus", "extreme-dt", "large-inputs"])
def test_cuda_matches_torch_on_gpu(name):
    # mamba-ssm's kernel is not exact to 1e-5 (fast exp, atomic adds): its own test's float32 tolerances
    inputs, grad_out, _, _ = reference(name)
    softplus = CASES[name].softplus
    y, grads = run_scan(inputs, grad_out.float(), softplus, "cuda", device="cuda")
    y_torch, grads_torch = run_scan(inputs, grad_out.float(), softplus, "torch", device="cuda")
    torch.testing.assert_close(y, y_torch, rtol=6e-4, atol=2e-3)
    for key in grads_torch:
        torch.testing.assert_close(grads[key], grads_torch[key], rtol=5e-3, atol=1e-2, msg=f"d{key}")


def tiny_float64_inputs(softplus):
    """A tiny problem in float64 for gradcheck: 2 groups of 2 channels, N = 2, L = 5."""
    inputs = make_inputs(Case(1, 2, 2, 2, 5, softplus=softplus))
    return tuple(t.double().requires_grad_() for t in inputs)


@pytest.mark.parametrize("softplus", [True, False])
def test_reference_gradcheck(softplus):
    inputs = tiny_float64_inputs(softplus)
    assert torch.autograd.gradcheck(lambda *x: selective_scan_ref(*x, delta_softplus=softplus), inputs)


@pytest.mark.parametrize("softplus", [True, False])
def test_torch_backend_gradcheck_float64(softplus):
    # the Function computes in its inputs' dtype (selective_scan casts to float32 before calling it)
    inputs = tiny_float64_inputs(softplus)
    assert SelectiveScanTorch.apply(*inputs, softplus).dtype == torch.float64
    assert torch.autograd.gradcheck(lambda *x: SelectiveScanTorch.apply(*x, softplus), inputs)


def test_auto_picks_cpu_for_cpu_tensors(monkeypatch):
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_backend("cpu") == "cpu"


def test_env_var_forces_backend(monkeypatch):
    inputs = make_inputs(CASES["L7-N1"])
    monkeypatch.setenv(ENV_VAR, "ref")
    assert resolve_backend("cpu") == "ref"
    assert selective_scan(*inputs).dtype == torch.float64  # only ref returns float64
    monkeypatch.setenv(ENV_VAR, "torch")
    assert resolve_backend("cpu") == "torch"
    assert torch.equal(selective_scan(*inputs), selective_scan(*inputs, backend="torch"))


def test_forcing_cuda_without_its_kernel_says_how_to_install(monkeypatch):
    try:
        import selective_scan_cuda  # noqa: F401
    except Exception:
        pass
    else:
        pytest.skip("mamba-ssm's kernel is installed")
    monkeypatch.setenv(ENV_VAR, "cuda")
    with pytest.raises(ScanBackendError, match="pip install"):
        selective_scan(*make_inputs(CASES["L7-N1"]))


@pytest.mark.parametrize(
    "index, bad, message",
    [
        (2, torch.zeros(5, 1), "A must be"),  # A for the wrong number of channels
        (3, torch.zeros(1, 2, 1, 6), "B must be"),  # B one step short
        (4, torch.zeros(1, 3, 1, 7), "3 groups"),  # 3 groups do not divide 40 channels
        (5, torch.zeros(3), "D must be"),
    ],
)
def test_bad_shape_raises_value_error(index, bad, message):
    inputs = make_inputs(CASES["L7-N1"])
    inputs[index] = bad
    with pytest.raises(ValueError, match=message):
        selective_scan(*inputs, backend="cpu")


def assert_same_on_any_thread_count(fn):
    """fn() gives bit-identical results with 1, 2 and 3 threads (what decoding on another machine needs)."""
    outputs = []
    for n in (1, 2, 3):
        with torch_threads(n), torch.no_grad():
            outputs.append(fn())
    assert all(torch.equal(outputs[0], y) for y in outputs[1:])


def test_cpu_forward_is_identical_across_thread_counts():
    inputs = make_inputs(Case(2, 4, 20, 16, 300))
    assert_same_on_any_thread_count(lambda: selective_scan(*inputs, backend="cpu"))


@pytest.mark.parametrize("backend", ["torch", "cpu"])
def test_bf16_autocast_scans_in_float32(backend):
    inputs = make_inputs(CASES["L257-K4"])
    with torch.no_grad():
        expected = selective_scan(*inputs, backend=backend)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = selective_scan(*inputs, backend=backend)
    assert y.dtype == torch.float32
    assert torch.equal(y, expected)


# ---------------------------------------------------------------------------------------------------------------
# SS2D


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_cross_merge_is_the_adjoint_of_cross_scan(directions):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    y = torch.randn(2, directions, 3, 20, generator=g, dtype=torch.float64)
    lhs = (cross_scan(x, directions) * y).sum()
    rhs = (x * cross_merge(y, 4, 5)).sum()
    torch.testing.assert_close(lhs, rhs, rtol=1e-12, atol=0)


def direction_orders(height, width, directions):
    """For each direction, the flat (row-major) pixel index visited at each step: rows, columns, both reversed."""
    rows = [r * width + c for r in range(height) for c in range(width)]
    cols = [r * width + c for c in range(width) for r in range(height)]
    return [rows, cols, rows[::-1], cols[::-1]][:directions]


def naive_ss2d_scan(module, x):
    """SS2D.scan written out: one reference scan per direction with that direction's parameters, summed back."""
    batch, d_inner, height, width = x.shape
    n, r = module.d_state, module.dt_rank
    flat = x.flatten(2).double()
    out = torch.zeros_like(flat)
    for k, order in enumerate(direction_orders(height, width, module.directions)):
        seq = flat[:, :, order]  # (batch, d_inner, L)
        dbl = torch.einsum("cd,bdl->bcl", module.x_proj_weight[k].double(), seq)
        dts, Bs, Cs = dbl[:, :r], dbl[:, r : r + n], dbl[:, r + n :]
        delta = torch.einsum("dr,brl->bdl", module.dt_projs_weight[k].double(), dts)
        channels = slice(k * d_inner, (k + 1) * d_inner)
        y = selective_scan_ref(
            seq,
            delta,
            -torch.exp(module.A_logs[channels].double()),
            Bs[:, None],
            Cs[:, None],
            module.Ds[channels].double(),
            module.dt_projs_bias[k].double(),
            delta_softplus=True,
        )
        out[:, :, order] += y
    return out.view(batch, d_inner, height, width)


@pytest.mark.parametrize("directions", [1, 2, 4])
def test_ss2d_scan_equals_per_direction_scans(directions):
    torch.manual_seed(0)
    module = SS2D(d_model=6, d_state=4, ssm_ratio=2.0, scan_directions=directions, scan_backend="cpu")
    x = torch.randn(2, module.d_inner, 3, 5)  # H != W, so rows and columns differ
    with torch.no_grad(), one_thread():
        actual = module.scan(x)
        expected = naive_ss2d_scan(module, x)
    assert_matches(actual, expected, label=f"SS2D K={directions}")


@pytest.mark.parametrize("directions", [1, 2, 4])
@pytest.mark.parametrize("size", [(2, 3, 5), (1, 1, 13), (1, 9, 11)], ids=["3x5", "1x13", "9x11"])
@pytest.mark.parametrize("d_state", [4, 16])
def test_fused_ss2d_scan_equals_per_direction_scans(directions, size, d_state):
    """The inference kernel (directions read in place, dt formed inside, merge by addition), channels last out;
    d_inner = 20 is one full block of 16 lanes and a partial one, 9 x 11 spans two chunks of 64 steps; 16 states
    take the kernel's register path, 4 its general one."""
    torch.manual_seed(0)
    module = SS2D(d_model=10, d_state=d_state, scan_directions=directions, scan_backend="cpu")
    batch, height, width = size
    x = torch.randn(batch, module.d_inner, height, width)
    with torch.no_grad(), one_thread():
        module.dt_projs_bias.add_(torch.randn_like(module.dt_projs_bias))  # a spread of decays
        actual = module.fused_scan(x)
        from_channels_last = module.fused_scan(x.contiguous(memory_format=torch.channels_last))
        expected = naive_ss2d_scan(module, x)
    assert actual.shape == (batch, height, width, module.d_inner)
    assert_matches(actual.permute(0, 3, 1, 2), expected, label=f"fused SS2D K={directions} {size}")
    assert torch.equal(actual, from_channels_last)


def test_ss2d_inference_runs_the_fused_kernel_and_agrees(monkeypatch):
    torch.manual_seed(0)
    module = SS2D(d_model=8, d_state=4, scan_backend="cpu").eval()
    x = torch.randn(2, 6, 7, 8)  # (B, H, W, C)
    calls = []
    fused = SS2D._forward_fused
    monkeypatch.setattr(SS2D, "_forward_fused", lambda self, t: calls.append(t.shape) or fused(self, t))
    with one_thread():
        expected = module(x)  # parameters need gradients: the autograd path
        assert not calls
        with torch.no_grad():
            actual = module(x)
        assert calls == [(2, 6, 7, 8)]
        torch.testing.assert_close(actual, expected.detach(), rtol=1e-5, atol=1e-6)
        module.scan_backend = "torch"
        with torch.no_grad():
            module(x)
    assert len(calls) == 1  # only the cpu backend has the fused kernel


def ss2d_outputs_and_gradients(module, x, grad_out, fused):
    """SS2D's output and the gradients of its input and every parameter, with the C++ kernel's whole-scan path
    (``fused``) or the per-direction scans of ``SS2D.scan``."""
    module.zero_grad(set_to_none=True)
    leaf = x.detach().requires_grad_()
    previous, SS2D.use_fused_kernel = SS2D.use_fused_kernel, fused
    try:
        y = module(leaf)
    finally:
        SS2D.use_fused_kernel = previous
    y.backward(grad_out)
    return {"y": y.detach(), "x": leaf.grad, **{name: p.grad for name, p in module.named_parameters()}}


@pytest.mark.parametrize("directions", [1, 2, 4])
@pytest.mark.parametrize("size", [(2, 3, 5), (1, 9, 11)], ids=["3x5", "9x11"])
@pytest.mark.parametrize("d_state", [3, 16])
def test_ss2d_training_kernel_matches_the_per_direction_scans(directions, size, d_state):
    """Training on the CPU runs the whole 2-D scan and its backward in the C++ kernel (``ss2d_scan_cpu``): output
    and every gradient (input, x_proj, dt_proj, A, D, delta bias, projections) within float32 rounding (1e-5 of the
    largest value) of the path through ``cross_scan``, four ``selective_scan`` calls and ``cross_merge``. d_inner 20
    is a full block of 16 lanes and a partial one, 9 x 11 spans two chunks; 3 states take the kernel's odd rows."""
    torch.manual_seed(0)
    module = SS2D(d_model=10, d_state=d_state, scan_directions=directions, scan_backend="cpu")
    with torch.no_grad():
        module.dt_projs_bias.add_(torch.randn_like(module.dt_projs_bias))  # a spread of decays
    batch, height, width = size
    x = torch.randn(batch, height, width, 10)
    grad_out = torch.randn(batch, height, width, 10)
    with one_thread():
        fused = ss2d_outputs_and_gradients(module, x, grad_out, True)
        reference_ = ss2d_outputs_and_gradients(module, x, grad_out, False)
    assert fused.keys() == reference_.keys() and all(g is not None for g in fused.values())
    for name in reference_:
        assert_matches(fused[name], reference_[name].double(), label=f"K={directions} {size} N={d_state} d{name}")


def test_ss2d_training_runs_the_whole_scan_kernel(monkeypatch):
    """With gradients, the cpu backend takes the kernel's autograd path once per call (never the per-direction
    scans); the torch backend keeps the per-direction path."""
    from layers.scan import cpu

    torch.manual_seed(0)
    module = SS2D(d_model=8, d_state=4, scan_backend="cpu")
    calls = []
    kernel = cpu.ss2d_scan_cpu
    monkeypatch.setattr(cpu, "ss2d_scan_cpu", lambda *args: calls.append(args[0].shape) or kernel(*args))
    x = torch.randn(2, 6, 7, 8)
    with one_thread():
        module(x).sum().backward()
        assert calls == [(2, 42, module.d_inner)]
        module.scan_backend = "torch"
        module(x).sum().backward()
    assert len(calls) == 1


def test_ss2d_training_kernel_under_bf16_autocast_scans_in_float32():
    """Under CPU autocast the projections run in bfloat16 and the kernel casts its inputs to float32: the output is
    close to the float32 path's (bfloat16 rounding of the projections) and every gradient is finite."""
    torch.manual_seed(0)
    module = SS2D(d_model=16, d_state=16, scan_backend="cpu")
    x = torch.randn(2, 8, 8, 16)
    with one_thread():
        expected = module(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            actual = module(x)
        actual.float().square().sum().backward()
    assert actual.dtype == torch.bfloat16
    assert (actual.float() - expected).abs().max() < 0.05 * expected.abs().max()
    assert all(torch.isfinite(p.grad).all() for p in module.parameters())


def test_fused_ss2d_scan_is_identical_across_thread_counts():
    torch.manual_seed(0)
    module = SS2D(d_model=24, d_state=16, scan_backend="cpu")
    x = torch.randn(1, module.d_inner, 12, 20)
    assert_same_on_any_thread_count(lambda: module.fused_scan(x))


def test_vss_block_trains():
    torch.manual_seed(0)
    block = VSSBlock(hidden_dim=8, d_state=4, mlp_ratio=0.0, scan_backend="cpu")
    x = torch.randn(4, 8, 6, 6)
    target = torch.tanh(torch.roll(x, shifts=(1, 2), dims=(2, 3)))  # a fixed nonlocal function of x
    opt = torch.optim.Adam(block.parameters(), lr=1e-2)
    losses = []
    with one_thread():
        for _ in range(30):
            loss = F.mse_loss(block(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(p.grad is not None for p in block.parameters())
