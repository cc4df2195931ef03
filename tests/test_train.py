"""train.py, utils/training.py, utils/data.py and scripts/sweep.py: runs end to end, exact resume, DDP, bad input.

Every run trains a tiny csm-small (or CompressAI's mbt2018-mean) on 64x64 patches of a few BSDS500 images copied to
a temporary folder, with one torch thread (the CPU is shared; two threads fighting over two busy cores are many times
slower than one).
"""

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

import train
from models import build_model, load_checkpoint, read_checkpoint, save_checkpoint
from tests.helpers import REPO, TINY, eval_main, shared_data, torch_threads
from utils.data import EpochSampler, PatchDataset, resolve_dataset_folders, usable_images
from utils.image import load_rgb8
from utils.training import RateDistortionLoss

TINY_FLAGS = ["-m", "csm-small", "--N", str(TINY["N"]), "--M", str(TINY["M"]), "--Z", str(TINY["Z"]),
              "--num-slices", str(TINY["num_slices"]), "--override", f"context_dim={TINY['context_dim']}",
              f"cc_hidden={TINY['cc_hidden']}"]
# The pure-PyTorch scan: these tests are about training, and must not wait for (or on) a C++ extension build.
RUN_FLAGS = [*TINY_FLAGS, "--scan-backend", "torch", "--patch-size", "64", "64", "--batch-size", "1", "--test-batch-size", "2", "-n", "0",
             "--snapshot-every", "0", "--no-progress"]
SUBPROCESS_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """A dataset folder with train/ (4 BSDS500 images) and val/ (2 images)."""
    source = shared_data("bsds500")
    root = tmp_path_factory.mktemp("data")
    for split, count in (("train", 4), ("val", 2)):
        (root / split).mkdir()
        for path in sorted((source / split).glob("*.jpg"))[:count]:
            shutil.copy(path, root / split / path.name)
    return root


def tiny_run(data, save_path, *extra):
    return train.run(["-d", str(data), *RUN_FLAGS, "--save_path", str(save_path), *extra])


def usage_error(capsys, argv):
    """Run train.py in-process, expect a usage error (exit 2) and return its stderr."""
    with pytest.raises(SystemExit) as info:
        train.run(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def logged_losses(caplog):
    return [float(m.group(1)) for r in caplog.records if (m := re.search(r"\(\d+ in all\): loss ([\d.]+)", r.message))]


# --- end to end ----------------------------------------------------------------------------------------------------
def test_cli_trains_and_writes_checkpoints_and_logs(data, tmp_path):
    save = tmp_path / "run"
    cmd = [sys.executable, "train.py", "-d", str(data), *RUN_FLAGS, "--save_path", str(save), "--epochs", "2",
           "--epoch-steps", "1", "--snapshot-every", "1", "--log-every", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    names = {p.name for p in save.iterdir()}
    assert {"checkpoint_latest.pth.tar", "checkpoint_best.pth.tar", "checkpoint_epoch001.pth.tar",
            "checkpoint_epoch002.pth.tar", "tb"} <= names
    assert any(p.name.startswith("events.out.tfevents") for p in (save / "tb").iterdir())
    assert "epoch 1 (step 2) validation: loss" in proc.stdout and "img/s" in proc.stdout
    assert re.search(r"[\d.]+ steps/s [\d.]+ img/s, ETA \d\d:\d\d:\d\d", proc.stdout)
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["step"]) for r in records] == [(1, 1), (2, 2)]
    assert records[0]["seconds"] <= records[1]["seconds"] and all(math.isfinite(r["psnr"]) for r in records)
    latest = read_checkpoint(save / "checkpoint_latest.pth.tar")
    assert (latest["epoch"], latest["step"], latest["step_in_epoch"]) == (2, 2, 0)
    assert latest["lambda"] == 0.0025 and latest["train_args"]["epochs"] == 2
    assert latest["lr_scheduler"]["last_epoch"] == 2 and math.isfinite(latest["best_loss"])


def test_checkpoint_loads_with_eval_loader_and_reproduces_forward(data, tmp_path):
    trainer = tiny_run(data, tmp_path, "--epochs", "1", "--epoch-steps", "2")
    loaded = load_checkpoint(tmp_path / "checkpoint_best.pth.tar", scan_backend="torch")
    assert loaded.checkpoint_info["preset"] == "csm-small" and loaded.checkpoint_info["step"] == 2
    assert loaded.config == trainer.net.config
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected, got = trainer.net.eval()(x), loaded(x)
    assert torch.equal(expected["x_hat"], got["x_hat"])
    for key in ("y", "z"):
        assert torch.equal(expected["likelihoods"][key], got["likelihoods"][key])


def test_overfitting_one_image_lowers_the_loss(tmp_path, caplog):
    source = sorted(shared_data("bsds500", "train").glob("*.jpg"))[0]
    image = Image.open(source).convert("RGB").crop((200, 100, 264, 164))  # 64x64: every crop is the whole image
    for split, copies in (("train", 30), ("val", 1)):
        (tmp_path / "data" / split).mkdir(parents=True)
        for i in range(copies):
            image.save(tmp_path / "data" / split / f"copy{i}.png")
    tiny_run(tmp_path / "data", tmp_path / "run", "--epochs", "1", "-lr", "1e-3", "--log-every", "1", "--no-save")
    losses = logged_losses(caplog)
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < 0.3 * np.mean(losses[:3]), losses


def assert_same_training_state(a, b):
    """Two finished trainers hold the same weights, optimizer states and best loss."""
    state_b = b.net.state_dict()
    for key, value in a.net.state_dict().items():
        assert torch.equal(value, state_b[key]), key
    for opt_a, opt_b in ((a.optimizer, b.optimizer), (a.aux_optimizer, b.aux_optimizer)):
        for state_a, state_b in zip(opt_a.state_dict()["state"].values(), opt_b.state_dict()["state"].values()):
            assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert a.best_loss == b.best_loss


def test_resume_continues_exactly_like_an_uninterrupted_run(data, tmp_path):
    # 3 epochs of 2 steps with learning-rate milestones after epochs 1 and 2; the break falls inside epoch 1.
    flags = ["--epochs", "3", "--epoch-steps", "2", "--lr_epoch", "1", "2", "--seed", "7"]
    full = tiny_run(data, tmp_path / "full", *flags)
    first = tiny_run(data, tmp_path / "part", *flags, "--max-steps", "3")
    assert (first.epoch, first.step, first.step_in_epoch) == (1, 3, 1)
    resumed = tiny_run(data, tmp_path / "part", *flags, "--resume")
    assert (resumed.epoch, resumed.step) == (full.epoch, full.step) == (3, 6)
    assert_same_training_state(full, resumed)
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-6)
    assert resumed.lr_scheduler.state_dict() == full.lr_scheduler.state_dict()


def test_validation_every_few_epochs_and_at_the_end_with_the_run_time(data, tmp_path):
    """--val-every validates every few epochs and after the last; a run stopped by --max-steps validates where it
    stops; metrics.jsonl gets a line per validation with the run's time so far, which a resumed run continues."""
    flags = ["--epochs", "5", "--epoch-steps", "1", "--val-every", "2", "--seed", "3"]
    first = tiny_run(data, tmp_path, *flags, "--max-steps", "3")
    assert (first.epoch, first.step) == (3, 3)
    resumed = tiny_run(data, tmp_path, *flags, "--resume")
    assert resumed.step == 5
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [2, 3, 4, 5]  # epochs 2 and 4, the stop at 3, the last epoch
    seconds = [r["seconds"] for r in records]
    assert seconds == sorted(seconds) and seconds[0] > 0
    # metrics.jsonl rounds to 0.1 s (which may round up); the checkpoint, saved after it, holds the exact time
    assert read_checkpoint(tmp_path / "checkpoint_latest.pth.tar")["train_seconds"] >= seconds[-1] - 0.05


def test_time_limit_stops_validates_and_decays_the_learning_rate_on_time(data, tmp_path, monkeypatch):
    """--time-limit stops after that much training time (a fake clock: 10 s a step) and saves a resumable latest
    checkpoint; --lr-time-milestones decay the learning rate at those fractions of it."""
    now = [1000.0]
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: now[0]))
    real_step = train.train_step

    def ten_second_step(*args, **kwargs):
        now[0] += 10.0
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", ten_second_step)
    flags = ["--epochs", "20", "--epoch-steps", "2", "--val-every", "100", "-lr", "1e-3"]
    first = tiny_run(data, tmp_path, *flags, "--time-limit", "35", "--lr-time-milestones", "0.5", "0.8")
    # steps end at 10, 20, 30, 40 s: decays after steps 2 (57 %) and 3 (86 %), the stop after step 4 (114 %)
    assert first.step == 4 and first.time_decays == 2
    assert first.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)
    saved = read_checkpoint(tmp_path / "checkpoint_latest.pth.tar")
    assert saved["step"] == 4 and saved["optimizer"]["param_groups"][0]["lr"] == pytest.approx(1e-5)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [4]
    resumed = tiny_run(data, tmp_path, *flags, "--resume", "--time-limit", "25")  # 3 more steps, the lr kept
    assert resumed.step == 7 and resumed.optimizer.param_groups[0]["lr"] == pytest.approx(1e-5)


def test_time_milestones_need_a_time_limit(data, capsys):
    assert "needs --time-limit" in usage_error(capsys, ["-d", str(data), "--lr-time-milestones", "0.5"])
    assert "below 1" in usage_error(capsys, ["-d", str(data), "--time-limit", "9", "--lr-time-milestones", "1.5"])


def test_speed_settings_resolve_their_automatic_values(monkeypatch):
    parser, args = train.parse_args(["-d", "x", "--threads", "1"])
    assert (args.amp, args.num_workers, args.fused_adam, args.tf32, args.channels_last) == ("auto", None, True, True,
                                                                                           False)
    monkeypatch.setattr(train, "bf16_native", lambda device: True)
    train.apply_speed_settings(args, torch.device("cpu"))
    assert (args.amp, args.num_workers, args.threads, torch.get_num_threads()) == ("bf16", 0, 1, 1)
    _, args = train.parse_args(["-d", "x", "--amp", "none", "-n", "3"])
    monkeypatch.setattr(train, "available_cores", lambda: 4)
    with torch_threads(1):
        train.apply_speed_settings(args, torch.device("cpu"), world_size=2)
        assert (args.amp, args.num_workers, args.threads, torch.get_num_threads()) == ("none", 3, 2, 2)


def test_a_checkpoint_of_per_tensor_adam_resumes_into_fused_adam(data, tmp_path):
    """Checkpoints written before fused Adam (and with --no-fused-adam) resume into the fused optimizer: the same
    state, the step counters where fused Adam keeps them, and the run goes on exactly as with per-tensor Adam."""
    flags = ["--epochs", "2", "--epoch-steps", "2", "--seed", "2", "--amp", "none"]
    tiny_run(data, tmp_path / "a", *flags, "--no-fused-adam", "--max-steps", "2")
    resumed = tiny_run(data, tmp_path / "a", *flags, "--resume")
    assert all(g["fused"] for g in resumed.optimizer.param_groups)
    steps = [s["step"] for s in resumed.optimizer.state.values()]
    assert all(t.dtype == torch.float32 and float(t) == 4 for t in steps)
    per_tensor = tiny_run(data, tmp_path / "b", *flags, "--no-fused-adam")
    for p, q in zip(resumed.net.parameters(), per_tensor.net.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_channels_last_is_refused_on_the_cpu(data, capsys):
    err = usage_error(capsys, ["-d", str(data), *RUN_FLAGS, "--channels-last"])
    assert "--channels-last needs --cuda" in err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="channels_last training runs on CUDA only")
def test_channels_last_computes_the_same_step_on_cuda():
    """--channels-last changes the memory format of the weights and batches, not the function: the loss and every
    gradient of a step equal those of the default format within float32 rounding. (In eval mode: training's
    quantisation noise is drawn in memory order, so it differs between the formats.)"""
    torch.manual_seed(0)
    model = build_model("csm-small", **TINY).eval().cuda()
    x = torch.rand(2, 3, 64, 64, device="cuda")
    criterion = RateDistortionLoss(0.0025)
    results = []
    for memory_format in (torch.contiguous_format, torch.channels_last):
        model.zero_grad(set_to_none=True)
        model.to(memory_format=memory_format)
        loss = criterion(model(x.contiguous(memory_format=memory_format)), x)["loss"]
        loss.backward()
        results.append([loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None])
    for a, b in zip(*results):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-4 * max(a.abs().max().item(), 1.0))


def test_bf16_autocast_trains(data, tmp_path, caplog):
    trainer = tiny_run(data, tmp_path, "--epochs", "1", "--epoch-steps", "2", "--amp", "bf16", "--no-save",
                       "--log-every", "1")
    assert trainer.step == 2 and trainer.bad_total == 0
    assert all(math.isfinite(v) for v in logged_losses(caplog))
    assert all(p.dtype == torch.float32 for p in trainer.net.parameters())


def test_checkpoint_initialises_weights_without_resuming(data, tmp_path):
    model = build_model("csm-small", **TINY)
    save_checkpoint(tmp_path / "pretrained.pth.tar", model, 0.013)
    parser, args = train.parse_args(["-d", str(data), *RUN_FLAGS, "--save_path", str(tmp_path / "run"),
                                     "--checkpoint", str(tmp_path / "pretrained.pth.tar")])
    trainer = train.Trainer(args, train.Session(args, parser), parser.error)
    assert (trainer.epoch, trainer.step) == (0, 0)
    loaded = trainer.net.state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, loaded[key]), key


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def ddp_run(data, tmp_path, flags, *overrides):
    """Train with two processes for one epoch of 2 steps (or as ``overrides`` say); returns the final weights of rank 0
    and of rank 1."""
    dump = tmp_path / "dump"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "train.py", "-d", str(data), *flags, "--save_path",
           str(tmp_path / "run"), "--epochs", "1", "--epoch-steps", "2", "--debug-dump-rank-params", str(dump), *overrides]
    proc = subprocess.run(cmd, cwd=REPO, env=SUBPROCESS_ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return [torch.load(dump / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_ddp_two_processes_end_with_identical_parameters(data, tmp_path):
    rank0, rank1 = ddp_run(data, tmp_path, RUN_FLAGS)
    saved = read_checkpoint(tmp_path / "run" / "checkpoint_latest.pth.tar")
    assert saved["world_size"] == 2 and len(saved["rng"]) == 2
    initial = build_model("csm-small", **TINY).state_dict()
    assert not torch.equal(rank0["g_a.0.conv1.weight"], initial["g_a.0.conv1.weight"])  # it did train
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key
        assert torch.equal(value, saved["state_dict"][key]), key


def test_ddp_processes_stop_together_on_the_first_ones_clock(data, tmp_path):
    # Epochs of 2 steps; the time limit is long past after the first, and the processes agree on it every READ_EVERY
    # steps.
    rank0, rank1 = ddp_run(data, tmp_path, RUN_FLAGS, "--epochs", str(train.READ_EVERY), "--time-limit",
                           "1e-6")
    assert read_checkpoint(tmp_path / "run" / "checkpoint_latest.pth.tar")["step"] == train.READ_EVERY
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key


# --- non-finite steps ----------------------------------------------------------------------------------------------
def nan_at(monkeypatch, bad_steps):
    """Make the training loss NaN at the given (1-based) training steps."""
    original = RateDistortionLoss.forward
    calls = {"train": 0}

    def forward(self, output, target):
        result = original(self, output, target)
        if torch.is_grad_enabled():  # training, not validation
            calls["train"] += 1
            if bad_steps == "all" or calls["train"] in bad_steps:
                result["loss"] = result["loss"] * math.nan
        return result

    monkeypatch.setattr(RateDistortionLoss, "forward", forward)


def test_a_non_finite_step_is_skipped_and_counted(data, tmp_path, monkeypatch, caplog):
    nan_at(monkeypatch, {2})
    trainer = tiny_run(data, tmp_path, "--epochs", "1", "--epoch-steps", "3")
    assert trainer.step == 3 and trainer.bad_total == 1
    assert any("step 2: non-finite loss" in r.message for r in caplog.records)
    assert read_checkpoint(tmp_path / "checkpoint_latest.pth.tar")["bad_steps_total"] == 1
    # Skipped means no optimizer step: Adam took two steps, not three.
    assert all(int(s["step"]) == 2 for s in trainer.optimizer.state_dict()["state"].values())


def test_too_many_non_finite_steps_in_a_row_stop_the_run(data, tmp_path, monkeypatch, capsys):
    nan_at(monkeypatch, "all")
    with pytest.raises(SystemExit) as info:
        tiny_run(data, tmp_path, "--epochs", "1", "--epoch-steps", "5", "--max-bad-steps", "2")
    assert info.value.code not in (0, None)
    assert "3 non-finite steps in a row" in str(info.value) and "step 3" in str(info.value)


# --- bad input -----------------------------------------------------------------------------------------------------
def write_images(folder, count, size=(80, 72)):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"img{i}.png")


def test_missing_dataset_folder_is_a_usage_error(tmp_path, capsys):
    err = usage_error(capsys, ["-d", str(tmp_path / "nope"), *RUN_FLAGS])
    assert f"dataset folder {tmp_path / 'nope'} does not exist" in err


def test_empty_dataset_folder_is_a_usage_error(tmp_path, capsys):
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    err = usage_error(capsys, ["-d", str(tmp_path), *RUN_FLAGS])
    assert "no images" in err and str(tmp_path / "train") in err


def test_flat_folder_needs_a_validation_set(tmp_path, capsys):
    write_images(tmp_path / "flat", 2)
    err = usage_error(capsys, ["-d", str(tmp_path / "flat"), *RUN_FLAGS])
    assert "--val-dataset" in err
    train_dir, val_dir = resolve_dataset_folders(tmp_path / "flat", tmp_path / "flat")
    assert train_dir == val_dir == tmp_path / "flat"


def test_images_smaller_than_the_patch(tmp_path, capsys, caplog):
    write_images(tmp_path / "train", 2, size=(80, 72))
    write_images(tmp_path / "train" / "small", 1, size=(63, 100))
    assert usable_images(tmp_path / "train", (64, 64)) == [tmp_path / "train" / f"img{i}.png" for i in range(2)]
    assert any("smaller than the 64x64 patch" in r.message and "small/img0.png (63x100)" in r.message
               for r in caplog.records)
    write_images(tmp_path / "val", 1, size=(63, 100))
    err = usage_error(capsys, ["-d", str(tmp_path), *RUN_FLAGS])
    assert f"no usable validation images in {tmp_path / 'val'}" in err and "smaller than the 64x64 patch" in err


def test_unreadable_files_are_skipped_then_an_error(tmp_path, capsys, caplog):
    write_images(tmp_path / "train", 1)
    (tmp_path / "train" / "broken.jpg").write_bytes(b"not an image")
    dataset = PatchDataset(tmp_path / "train", (64, 64), random_crop=True)
    assert len(dataset) == 1 and dataset[0].shape == (3, 64, 64)
    assert any("unreadable" in r.message and "broken.jpg" in r.message for r in caplog.records)
    (tmp_path / "val").mkdir()
    (tmp_path / "val" / "empty.png").write_bytes(b"")
    err = usage_error(capsys, ["-d", str(tmp_path), *RUN_FLAGS])
    assert "no usable validation images" in err and "empty.png" in err


def test_checkpoint_of_a_different_model_is_a_usage_error(data, tmp_path, capsys):
    other = build_model("csm-small", **{**TINY, "N": 16})
    path = save_checkpoint(tmp_path / "other.pth.tar", other)
    err = usage_error(capsys, ["-d", str(data), *RUN_FLAGS, "--checkpoint", str(path)])
    assert f"checkpoint {path} holds a different model" in err and "N: 16 vs 8" in err
    # A file without our config (a raw state dict) is checked key by key instead.
    torch.save(other.state_dict(), tmp_path / "raw.pth")
    err = usage_error(capsys, ["-d", str(data), *RUN_FLAGS, "--checkpoint", str(tmp_path / "raw.pth")])
    assert str(tmp_path / "raw.pth") in err and "wrong shape" in err


def test_resume_needs_a_training_state(data, tmp_path, capsys):
    path = save_checkpoint(tmp_path / "weights.pth.tar", build_model("csm-small", **TINY))
    err = usage_error(capsys, ["-d", str(data), *RUN_FLAGS, "--checkpoint", str(path), "--resume"])
    assert f"checkpoint {path} has no training state" in err
    err = usage_error(capsys, ["-d", str(data), *RUN_FLAGS, "--save_path", str(tmp_path / "new"), "--resume"])
    assert str(tmp_path / "new" / "checkpoint_latest.pth.tar") in err and "does not exist" in err


def test_argument_errors(data, capsys):
    assert "multiples of 64" in usage_error(capsys, ["-d", str(data), "--patch-size", "100", "64"])
    assert "ms-ssim" in usage_error(capsys, ["-d", str(data), "--type", "ms-ssim", "--patch-size", "64", "64"])
    assert "unknown override" in usage_error(capsys, ["-d", str(data), *RUN_FLAGS, "--override", "bogus=1"])
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in usage_error(capsys, ["-d", str(data), "--cuda"])


# --- library pieces ------------------------------------------------------------------------------------------------
def test_epoch_sampler_shards_a_per_epoch_permutation_and_skips():
    shards = [list(EpochSampler(10, seed=3, rank=r, world_size=3)) for r in range(3)]
    assert all(len(s) == 4 for s in shards)  # 10 padded to 12
    assert set(sum(shards, [])) == set(range(10))
    sampler = EpochSampler(10, seed=3)
    epoch0 = list(sampler)
    sampler.set_epoch(1)
    assert list(sampler) != epoch0 and sorted(sampler) == list(range(10))
    sampler.set_epoch(0, skip=4)
    assert list(sampler) == epoch0[4:] and len(sampler) == 6


def test_random_crops_depend_only_on_seed_epoch_and_index(data):
    dataset = PatchDataset(data / "train", (64, 64), random_crop=True, seed=5)
    first = dataset[1]
    assert torch.equal(dataset[1], first)
    dataset.set_epoch(1)
    assert not torch.equal(dataset[1], first)
    centre = PatchDataset(data / "val", (64, 128), random_crop=False, role="validation")
    assert centre[0].shape == (3, 64, 128)


def test_cached_images_give_the_same_crops(data):
    """The decoded-image cache changes nothing but speed: the same crops, and only within its byte budget."""
    plain = PatchDataset(data / "train", (64, 64), random_crop=True, seed=5)
    cached = PatchDataset(data / "train", (64, 64), random_crop=True, seed=5, cache_bytes=2**30)
    budget = load_rgb8(plain.files[0])[0].numel()  # room for the first image only
    small = PatchDataset(data / "train", (64, 64), random_crop=True, seed=5, cache_bytes=budget)
    for epoch in (0, 1):
        for dataset in (plain, cached, small):
            dataset.set_epoch(epoch)
        for i in range(len(plain)):
            expected = plain[i]
            assert torch.equal(cached[i], expected) and torch.equal(small[i], expected)
            assert expected.dtype == torch.float32 and expected.is_contiguous()
    assert len(cached._cache) == len(plain) and list(small._cache) == [0] and small._cached_bytes == budget


def test_rate_distortion_loss_values():
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 192, 192, generator=gen)
    x_hat = (x + 0.05 * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    likelihoods = {"y": torch.full((2, 4, 12, 12), 0.5), "z": torch.full((2, 2, 3, 3), 0.25)}
    bpp = (2 * 4 * 144 * 1 + 2 * 2 * 9 * 2) / (2 * 192 * 192)
    mse = ((x_hat.double() - x.double()) ** 2).mean().item()
    out = RateDistortionLoss(0.01)({"x_hat": x_hat, "likelihoods": likelihoods}, x)
    assert out["bpp_loss"].item() == pytest.approx(bpp, rel=1e-6)
    assert out["loss"].item() == pytest.approx(0.01 * 255**2 * mse + bpp, rel=1e-5)
    out = RateDistortionLoss(2.0, "ms-ssim")({"x_hat": x_hat, "likelihoods": likelihoods}, x)
    assert 0 < out["ms_ssim"].item() < 1
    assert out["loss"].item() == pytest.approx(2.0 * (1 - out["ms_ssim"].item()) + bpp, rel=1e-5)


def test_sweep_dry_run_prints_one_training_per_lambda_and_the_evaluation(tmp_path):
    cmd = [sys.executable, "scripts/sweep.py", "--lambdas", "0.0025", "0.013", "--save_path", str(tmp_path),
           "--eval-data", "/data/kodak", "--gpus", "0", "1", "--dry-run", "--", "-d", "/data/train", "--epochs", "4"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("CUDA_VISIBLE_DEVICES=0 ") and "--lambda 0.0025" in lines[0]
    assert f"--save_path {tmp_path / 'lambda_0.013'}" in lines[1] and "--epochs 4 " in lines[1]
    assert "eval.py --checkpoint" in lines[2]
    assert str(tmp_path / "lambda_0.0025" / "checkpoint_best.pth.tar") in lines[2]
    assert f"-o {tmp_path / 'rd.json'}" in lines[2]


# --- CompressAI architectures --------------------------------------------------------------------------------------
COMPRESSAI_FLAGS = ["-m", "compressai:mbt2018-mean", "--N", "8", "--M", "16", "--patch-size", "64", "64",
                    "--batch-size", "1", "--test-batch-size", "2", "-n", "0", "--snapshot-every", "0", "--no-progress"]


def test_compressai_architecture_trains_resumes_exactly_and_evaluates(data, tmp_path):
    flags = ["--epochs", "2", "--epoch-steps", "2", "--seed", "3"]

    def run(folder, *extra):
        return train.run(["-d", str(data), *COMPRESSAI_FLAGS, "--save_path", str(tmp_path / folder), *flags, *extra])

    full = run("full")
    first = run("part", "--max-steps", "3")
    assert (first.epoch, first.step, first.step_in_epoch) == (1, 3, 1)
    assert type(first.net).__name__ == "MeanScaleHyperprior"
    # The aux optimizer holds the entropy bottleneck's quantiles (N channels), the main one everything else.
    (quantiles,) = first.aux_optimizer.param_groups[0]["params"]
    assert quantiles.shape == (8, 1, 3)
    saved = read_checkpoint(tmp_path / "part" / "checkpoint_latest.pth.tar")  # weights_only=True
    assert saved["arch"] == "compressai:mbt2018-mean" and saved["arch_args"] == {"N": 8, "M": 16}
    assert "config" not in saved and saved["version"] == 2
    resumed = run("part", "--resume")
    assert (resumed.epoch, resumed.step) == (full.epoch, full.step) == (2, 4)
    assert_same_training_state(full, resumed)

    out = tmp_path / "eval.json"
    eval_main()(["--checkpoint", str(tmp_path / "part" / "checkpoint_best.pth.tar"), "--data", str(data / "val"),
                 "--threads", "1", "-o", str(out)])
    document = json.loads(out.read_text())
    assert document["rate"] == "entropy-coded" and document["name"] == "compressai:mbt2018-mean"
    (checkpoint,) = document["checkpoints"]
    assert checkpoint["arch"] == "compressai:mbt2018-mean" and checkpoint["arch_args"] == {"N": 8, "M": 16}
    assert checkpoint["step"] == 4
    # No y_hat from CompressAI's compress/decompress: the latent check is skipped and says so.
    assert document["results"]["round_trip_failures"] == [None] and "null" in document["meta"]["round_trip"]
    for record in document["per_image"][0]["images"]:
        assert record["round_trip"] is None
        pixels = record["width"] * record["height"]
        assert record["bpp_real"] == record["num_bytes"] * 8 / pixels
        # The real rate is the estimate plus at most a few bytes of coder overhead per string.
        assert 0 < record["bpp_real"] - record["bpp_est"] < 0.1 * record["bpp_est"] + 32 * 8 / pixels, record
        assert math.isfinite(record["psnr-rgb"]) and record["encoding_time"] > 0


def test_compressai_architecture_refuses_csm_options(data, capsys):
    base = ["-d", str(data), *COMPRESSAI_FLAGS]
    err = usage_error(capsys, [*base, "--Z", "16", "--acp", "static", "--override", "context_dim=8", "--scan-backend",
                               "torch"])
    assert "--Z, --acp, --override, --scan-backend: not an option of compressai:mbt2018-mean" in err
    assert "takes --N and --M only" in err
    err = usage_error(capsys, ["-d", str(data), "-m", "compressai:cheng2020-anchor", "--N", "8", "--M", "16"])
    assert "--M: not an option of compressai:cheng2020-anchor, which takes --N only" in err
    err = usage_error(capsys, ["-d", str(data), "-m", "compressai:nope"])
    assert "invalid choice: 'compressai:nope'" in err and "compressai:mbt2018-mean" in err
    help_text = train.build_parser().format_help()
    assert "compressai:ARCH" in help_text and "cheng2020-attn" in help_text


def test_checkpoint_of_the_other_kind_is_a_usage_error(data, tmp_path, capsys):
    compressai_path = save_checkpoint(tmp_path / "mbt.pth.tar", build_model("compressai:mbt2018-mean", N=8, M=16))
    csm_path = save_checkpoint(tmp_path / "csm.pth.tar", build_model("csm-small", **TINY))
    err = usage_error(capsys, ["-d", str(data), *RUN_FLAGS, "--checkpoint", str(compressai_path)])
    assert f"checkpoint {compressai_path} holds a 'compressai:mbt2018-mean' model, this run builds 'csm-small'" in err
    err = usage_error(capsys, ["-d", str(data), *COMPRESSAI_FLAGS, "--checkpoint", str(csm_path)])
    assert f"checkpoint {csm_path} holds a 'csm-small' model, this run builds 'compressai:mbt2018-mean'" in err
    wider = save_checkpoint(tmp_path / "wider.pth.tar", build_model("compressai:mbt2018-mean", N=8, M=24))
    err = usage_error(capsys, ["-d", str(data), *COMPRESSAI_FLAGS, "--checkpoint", str(wider)])
    assert "holds a different model" in err and "M: 24 vs 16" in err


def test_compressai_architecture_trains_with_ddp(data, tmp_path):
    """Its quantiles are reached by the aux loss only: DDP must leave them to train_step (a second step fails
    otherwise)."""
    rank0, rank1 = ddp_run(data, tmp_path, COMPRESSAI_FLAGS)
    initial = build_model("compressai:mbt2018-mean", N=8, M=16).state_dict()
    assert not torch.equal(rank0["entropy_bottleneck.quantiles"], initial["entropy_bottleneck.quantiles"])
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key]), key


def test_sweep_passes_a_compressai_architecture_through(tmp_path):
    cmd = [sys.executable, "scripts/sweep.py", "--lambdas", "0.0025", "--save_path", str(tmp_path), "--dry-run", "--",
           "-d", "/data/train", "-m", "compressai:mbt2018-mean", "--N", "64", "--M", "96"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "train.py -d /data/train -m compressai:mbt2018-mean --N 64 --M 96 --lambda 0.0025" in proc.stdout
