"""The assembled CSM models: forward, gradients, exact compress/decompress, presets, checkpoints; CompressAI's
architectures by name."""

import json
import subprocess
import sys

import compressai.zoo
import pytest
import torch
from compressai.models import MeanScaleHyperprior

from models import (
    COMPRESSAI_PREFIX,
    PRESETS,
    CheckpointError,
    ModelNotUpdatedError,
    architecture,
    build_model,
    compressai_arguments,
    list_models,
    load_checkpoint,
    pad_multiple,
    save_checkpoint,
)
from models.checkpoint import ENTROPY_MODEL_KEYS
from models.registry import SMALL
from scripts import export_checkpoint
from tests.helpers import REPO, shared_data, tiny_overrides
from utils.image import load_image, pad_center
from utils.metrics import bpp_from_likelihoods, bpp_from_strings
from utils.training import has_unused_parameters

CODED_PRESETS = ["csm", "csm-ref", "tcm"]


def tiny(preset, **extra):
    torch.manual_seed(0)
    return build_model(preset, **{**tiny_overrides(preset), **extra})


@pytest.mark.parametrize("preset", CODED_PRESETS)
def test_forward_shapes_likelihoods_and_rate(preset):
    model = tiny(preset).train()
    x = torch.rand(2, 3, 64, 128)
    out = model(x)
    assert out["x_hat"].shape == x.shape
    y, z = out["likelihoods"]["y"], out["likelihoods"]["z"]
    assert y.shape == (2, 40, 4, 8) and z.shape == (2, 16, 1, 2)
    for lik in (y, z):
        assert torch.all(lik > 0) and torch.all(lik <= 1)
    bpp = bpp_from_likelihoods(out["likelihoods"], 64 * 128)
    assert torch.isfinite(bpp).all() and bpp.item() > 0


@pytest.mark.parametrize("preset", ["csm", "csm-ref", "tcm"])
def test_gradients_reach_every_trainable_parameter(preset):
    model = tiny(preset).train()
    with torch.no_grad():  # an untrained h_a gives z ~ 0, so z_hat = 0 and h_s's first weights see no signal
        model.h_a[-1].weight.mul_(50)
    x = torch.rand(2, 3, 64, 64)
    out = model(x)
    loss = 0.01 * 255**2 * (out["x_hat"] - x).pow(2).mean() + bpp_from_likelihoods(out["likelihoods"], 64 * 64)
    loss.backward()
    dead = [
        name
        for name, p in model.named_parameters()
        if not name.endswith(".quantiles") and (p.grad is None or p.grad.abs().sum() == 0)
    ]
    assert dead == []
    if preset == "csm":  # the ACP scorer of every SRB trains
        scorer = [n for n, p in model.named_parameters() if ".acp.score." in n]
        assert scorer and all(model.get_parameter(n).grad.abs().sum() > 0 for n in scorer)


def roundtrip(model, x):
    model.eval().update(force=True)
    enc = model.compress(x)
    dec = model.decompress(enc["strings"], enc["shape"])
    with torch.no_grad():
        ref = model(x)
    return enc, dec, ref


@pytest.mark.parametrize("preset", CODED_PRESETS)
@pytest.mark.parametrize("size", [(64, 64), (128, 192), (192, 64)])
def test_compress_decompress_is_exact(preset, size):
    model = tiny(preset)
    x = torch.rand(1, 3, *size)
    enc, dec, ref = roundtrip(model, x)
    assert torch.equal(dec["y_hat"], enc["y_hat"])
    assert torch.allclose(dec["x_hat"], ref["x_hat"].clamp(0, 1), atol=1e-5)
    real = bpp_from_strings(enc["strings"], x.shape[-2] * x.shape[-1])
    est = bpp_from_likelihoods(ref["likelihoods"], x.shape[-2] * x.shape[-1]).item()
    assert real > 0 and est > 0


def test_batch_compress_gives_one_string_per_image():
    model = tiny("csm")
    x = torch.rand(2, 3, 64, 64)
    enc, dec, _ = roundtrip(model, x)
    assert [len(s) for s in enc["strings"]] == [2, 2]
    assert enc["strings"][0][0] != enc["strings"][0][1]
    assert torch.equal(dec["y_hat"], enc["y_hat"])


def test_kodak_image_round_trip():
    x = load_image(shared_data("kodak", "kodim01.png"))
    x, _ = pad_center(x, 64)
    model = tiny("csm")
    enc, dec, ref = roundtrip(model, x)
    assert torch.equal(dec["y_hat"], enc["y_hat"])
    assert torch.allclose(dec["x_hat"], ref["x_hat"].clamp(0, 1), atol=1e-5)


def test_compress_before_update_is_a_clear_error():
    model = tiny("csm").eval()
    with pytest.raises(ModelNotUpdatedError, match="update"):
        model.compress(torch.rand(1, 3, 64, 64))


def test_unpadded_input_is_a_clear_error():
    with pytest.raises(ValueError, match="multiples of 64"):
        tiny("csm")(torch.rand(1, 3, 60, 64))


def test_presets_and_overrides():
    assert {"csm", "csm-ref", "tcm", "csm-small"} <= set(list_models())
    model = build_model("csm-acp-static", **tiny_overrides("csm"))
    assert model.config.acp == "static" and model.preset == "csm-acp-static"
    assert not any("ssm_branch.op" in n for n, _ in build_model("csm-cnn-only", **tiny_overrides("csm")).named_parameters())
    assert build_model("csm", scan_directions=2, **tiny_overrides("csm")).g_a[1].ssm_branch.op.directions == 2
    with pytest.raises(ValueError, match="unknown model"):
        build_model("nope")
    with pytest.raises(ValueError, match="unknown override"):
        build_model("csm", acp_mode="static")
    with pytest.raises(ValueError, match="acp must be one of"):
        build_model("csm", acp="random")


def test_lite_preset_is_a_lighter_srb_at_tcm_size():
    """csm-lite: the SRB without the ACP's refinement, two CNN convolutions, no VSS MLP; at N=128 it has fewer
    parameters than the tcm baseline (the paper's csm has more)."""
    lite = build_model("csm-lite")
    assert lite.config.acp == "adaptive" and not lite.config.acp_refine and lite.config.cnn_depth == 2
    block = lite.g_a[1]
    assert block.acp.score.net is None and block.ssm_branch.mlp is None and len(block.cnn_branch.body) == 3
    count = {name: sum(p.numel() for p in build_model(name).parameters()) for name in ("csm", "tcm")}
    assert sum(p.numel() for p in lite.parameters()) == 74896044 < count["tcm"] < count["csm"]
    assert build_model("csm-lite-small").config == build_model("csm-lite", **SMALL).config


def test_released_layout_matches_the_authors_checkpoint_keys():
    shapes = json.loads(shared_data("csm_ref_state_dict_shapes.json").read_text())
    model = build_model("csm-ref")
    ours = {}
    for key, value in model.state_dict().items():
        released = key[len("entropy_model.") :] if key.startswith("entropy_model.") else key
        ours[released] = list(value.shape)
    assert ours == shapes
    assert sum(p.numel() for p in model.parameters()) == 82_878_980


def test_save_and_load_in_a_fresh_process_reproduces_outputs(tmp_path):
    model = tiny("csm").eval()
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)["x_hat"]
    path = save_checkpoint(tmp_path / "m.pth.tar", model, lmbda=0.0035)
    torch.save({"x": x, "x_hat": expected}, tmp_path / "io.pt")
    script = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]);"
        "from models import load_checkpoint;"
        "m = load_checkpoint(sys.argv[2]); d = torch.load(sys.argv[3]);"
        "assert m.checkpoint_info['lambda'] == 0.0035 and m.preset == 'csm';"
        "torch.set_grad_enabled(False);"  # as in the parent: inference takes the fused SS2D kernel both times
        "out = m(d['x'])['x_hat']; print(torch.equal(out, d['x_hat']))"
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(REPO), str(path), str(tmp_path / "io.pt")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("True")


def test_loading_another_presets_checkpoint_lists_the_differences(tmp_path):
    path = save_checkpoint(tmp_path / "tcm.pth.tar", tiny("tcm"))
    state = torch.load(path, weights_only=True)["state_dict"]
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path, preset="csm", **tiny_overrides("csm"))
    message = str(info.value)
    assert "missing key(s)" in message and "unexpected key(s)" in message and "csm" in message
    assert len(message.splitlines()) < 40  # readable, not a wall of keys
    assert len(state) > 40


@pytest.mark.parametrize("wrapper", ["raw", "state_dict", "network", "model_state_dict"])
def test_compressai_style_and_prefixed_dicts_load(tmp_path, wrapper):
    model = tiny("tcm").eval()
    prefixed = {"module." + k: v for k, v in model.state_dict().items()}
    payload = prefixed if wrapper == "raw" else {wrapper: prefixed, "epoch": 3}
    torch.save(payload, tmp_path / "ckpt.pth")
    loaded = load_checkpoint(tmp_path / "ckpt.pth", preset="tcm", **tiny_overrides("tcm"))
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["x_hat"], model(x)["x_hat"])


def test_released_format_file_loads_without_flags(tmp_path):
    """Entropy-model keys at top level and a DDP prefix, as the authors' code saves them: preset inferred."""
    model = build_model("csm-ref", N=16, head_dims=(4,) * 6, hyper_head_dim=4, context_head_dim=4).eval()
    released = {}
    for key, value in model.state_dict().items():
        key = key[len("entropy_model.") :] if key.startswith("entropy_model.") else key
        released["module." + key] = value
    assert any(k.startswith("module." + ENTROPY_MODEL_KEYS[0]) for k in released)
    torch.save({"state_dict": released}, tmp_path / "released.pth.tar")
    loaded = load_checkpoint(tmp_path / "released.pth.tar", head_dims=(4,) * 6, hyper_head_dim=4, context_head_dim=4)
    assert loaded.preset == "csm-ref" and loaded.config.N == 16
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["x_hat"], model(x)["x_hat"])


def test_bad_checkpoint_files_are_clear_errors(tmp_path):
    truncated = tmp_path / "truncated.pth.tar"
    save_checkpoint(tmp_path / "ok.pth.tar", tiny("csm"))
    truncated.write_bytes((tmp_path / "ok.pth.tar").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(truncated)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "text.pth").write_text("hello")
    with pytest.raises(CheckpointError, match="cannot read checkpoint"):
        load_checkpoint(tmp_path / "text.pth")


def test_every_preset_builds():
    for name in PRESETS:
        model = build_model(name, **tiny_overrides(name))
        assert model.preset == name


def test_half_precision_checkpoint_loads_as_float32(tmp_path):
    model = tiny("csm").eval()
    path = save_checkpoint(tmp_path / "half.pth.tar", model, weights_dtype=torch.float16)
    stored = torch.load(path, weights_only=True)["state_dict"]
    assert stored["g_a.0.conv1.weight"].dtype == torch.float16
    loaded = load_checkpoint(path)
    weight = loaded.g_a[0].conv1.weight
    assert weight.dtype == torch.float32
    assert torch.equal(weight, model.g_a[0].conv1.weight.half().float())
    # The constant buffers stay float32: a likelihood bound of 1e-9 would be 0 in float16 (an infinite rate).
    bound = "entropy_model.gaussian_conditional.likelihood_lower_bound.bound"
    assert stored[bound].dtype == torch.float32 and stored[bound].item() == pytest.approx(1e-9)
    # Files exported before that (every float in float16) load with the model's own constants.
    old = {k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()}
    torch.save({**torch.load(path, weights_only=True), "state_dict": old}, tmp_path / "old.pth.tar")
    state = load_checkpoint(tmp_path / "old.pth.tar").state_dict()
    assert state[bound].item() == pytest.approx(1e-9) and state["entropy_bottleneck.likelihood_lower_bound.bound"] > 0
    assert torch.equal(state["g_a.0.conv1.weight"], model.g_a[0].conv1.weight.half().float())


# --- CompressAI architectures ---------------------------------------------------------------------------------------
def test_compressai_architectures_are_listed_built_and_code():
    assert [n for n in list_models() if n.startswith(COMPRESSAI_PREFIX)] == [
        COMPRESSAI_PREFIX + name for name in sorted(compressai.zoo.image_models)
    ]
    torch.manual_seed(0)
    model = build_model("compressai:mbt2018-mean", N=8, M=16)
    assert isinstance(model, MeanScaleHyperprior) and model.preset == "compressai:mbt2018-mean"
    assert architecture(model) == {"arch": "compressai:mbt2018-mean", "arch_args": {"N": 8, "M": 16}}
    x = torch.rand(1, 3, 64, 64)
    out = model(x)
    assert out["x_hat"].shape == x.shape
    assert out["likelihoods"]["y"].shape == (1, 16, 4, 4) and out["likelihoods"]["z"].shape == (1, 8, 1, 1)
    # Its forward leaves only the quantiles (the aux loss's, averaged by train_step, not DDP) without a gradient.
    assert not has_unused_parameters(model, "cpu")
    assert [n for n, p in model.named_parameters() if p.grad is not None] == []  # left as they were
    out = model(torch.rand(1, 3, 64, 64))
    out["x_hat"].mean().backward()
    assert model.entropy_bottleneck.quantiles.grad is None
    model.zero_grad(set_to_none=True)
    model.eval().update(force=True)
    with torch.no_grad():
        estimate = bpp_from_likelihoods(model(x)["likelihoods"], 64 * 64).item()
        encoded = model.compress(x)
        decoded = model.decompress(encoded["strings"], encoded["shape"])
    assert decoded["x_hat"].shape == x.shape and 0 < estimate <= bpp_from_strings(encoded["strings"], 64 * 64)
    assert pad_multiple(model) == 64 and pad_multiple(build_model("compressai:bmshj2018-factorized", N=8, M=8)) == 16
    # Defaults: the constructor's, else the widths of CompressAI's quality-1 model.
    assert compressai_arguments("compressai:mbt2018-mean") == {"N": 128, "M": 192}
    assert compressai_arguments("compressai:cheng2020-anchor") == {"N": 128}


def test_unknown_compressai_architectures_and_arguments_are_clear_errors():
    with pytest.raises(ValueError, match="unknown model 'compressai:nope': CompressAI's image architectures are "):
        build_model("compressai:nope")
    with pytest.raises(ValueError, match="compressai:cheng2020-anchor takes no argument.s. M; its arguments: N"):
        build_model("compressai:cheng2020-anchor", N=8, M=16)


def test_compressai_checkpoint_round_trip_and_half_export(tmp_path):
    torch.manual_seed(0)
    model = build_model("compressai:mbt2018-mean", N=8, M=16).eval()
    path = save_checkpoint(tmp_path / "mbt.pth.tar", model, lmbda=0.0067)
    stored = torch.load(path, weights_only=True)
    assert {k: v for k, v in stored.items() if k != "state_dict"} == {
        "format": "csm-checkpoint", "version": 2, "arch": "compressai:mbt2018-mean", "arch_args": {"N": 8, "M": 16},
        "lambda": 0.0067,
    }
    loaded = load_checkpoint(path)
    assert isinstance(loaded, MeanScaleHyperprior) and loaded.arch_args == {"N": 8, "M": 16}
    assert loaded.checkpoint_info["preset"] == "compressai:mbt2018-mean"
    x = torch.rand(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(x)["x_hat"], model(x)["x_hat"])

    export_checkpoint.main([str(path), str(tmp_path / "half.pth.tar"), "--half"])
    half = torch.load(tmp_path / "half.pth.tar", weights_only=True)
    assert half["arch"] == "compressai:mbt2018-mean" and half["state_dict"]["g_a.0.weight"].dtype == torch.float16
    bound = half["state_dict"]["entropy_bottleneck.likelihood_lower_bound.bound"]
    assert bound.dtype == torch.float32 and bound.item() == pytest.approx(1e-9)  # not rounded to 0
    exported = load_checkpoint(tmp_path / "half.pth.tar")
    assert not exported.update()  # the entropy-coder tables came with the file
    assert torch.equal(exported.g_a[0].weight, model.g_a[0].weight.half().float())
    encoded = exported.compress(x)
    assert exported.decompress(encoded["strings"], encoded["shape"])["x_hat"].shape == x.shape

    # CompressAI's own files (a raw state dict, here with a DDP prefix and the entropy bottleneck's parameter names
    # of its older pretrained files, "_matrices.0") load by naming the architecture.
    old_names = {f"entropy_bottleneck.{name}.": f"entropy_bottleneck._{name}." for name in ("matrices", "biases",
                                                                                          "factors")}
    raw = {}
    for key, value in model.state_dict().items():
        for new, old in old_names.items():
            key = key.replace(new, old)
        raw["module." + key] = value
    assert "module.entropy_bottleneck._matrices.0" in raw
    torch.save(raw, tmp_path / "raw.pth")
    loaded_raw = load_checkpoint(tmp_path / "raw.pth", preset="compressai:mbt2018-mean", N=8, M=16)
    with torch.no_grad():
        assert torch.equal(loaded_raw(x)["x_hat"], model(x)["x_hat"])


def test_checkpoint_versions_and_kinds(tmp_path):
    csm_model = tiny("csm")
    data = torch.load(save_checkpoint(tmp_path / "csm.pth.tar", csm_model), weights_only=True)
    assert data["arch"] == "csm" and data["version"] == 2 and "config" in data  # version-1 readers still read it
    version1 = {k: v for k, v in data.items() if k != "arch"} | {"version": 1}
    torch.save(version1, tmp_path / "v1.pth.tar")
    assert load_checkpoint(tmp_path / "v1.pth.tar").config == csm_model.config
    torch.save(data | {"version": 3}, tmp_path / "v3.pth.tar")
    with pytest.raises(CheckpointError, match="format version 3; this code reads versions 1 to 2"):
        load_checkpoint(tmp_path / "v3.pth.tar")
    compressai_file = save_checkpoint(tmp_path / "mbt.pth.tar", build_model("compressai:mbt2018-mean", N=8, M=16))
    with pytest.raises(CheckpointError, match="does not match 'csm'"):
        load_checkpoint(compressai_file, preset="csm", **tiny_overrides("csm"))
    with pytest.raises(CheckpointError, match="does not match 'compressai:mbt2018-mean' .N=8, M=16."):
        load_checkpoint(tmp_path / "csm.pth.tar", preset="compressai:mbt2018-mean", N=8, M=16)
    with pytest.raises(TypeError, match="build it with build_model"):
        save_checkpoint(tmp_path / "bare.pth.tar", MeanScaleHyperprior(8, 16))
