"""Shared test fixtures' data: where the read-only shared data lives, tiny model configurations, thread counts,
eval.py's main."""

import importlib.util
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"

# Tiny widths so that every preset builds and codes an image in well under a second on 2 cores.
TINY = {"N": 8, "M": 40, "Z": 16, "context_dim": 16, "cc_hidden": (16, 16), "num_slices": 2}
TINY_SWIN = {**TINY, "head_dims": (4,) * 6, "hyper_head_dim": 4, "context_head_dim": 4}


def tiny_overrides(preset):
    """Overrides that make ``preset`` tiny (Swin-based presets need head dims that fit 8 channels)."""
    return TINY_SWIN if preset in ("csm-ref", "tcm", "tcm-small", "csm-swin-context") else TINY


def shared_data(*parts):
    """Path under ../shared/data, or skip the test when the shared data is not there."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"shared data not available: {path}")
    return path


def eval_main():
    """eval.py's main(), imported from the file (for the checks that need no separate process)."""
    spec = importlib.util.spec_from_file_location("eval_cli", REPO / "eval.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@contextmanager
def torch_threads(count):
    """torch's CPU thread count set to ``count`` inside the block, restored after it. Tests of small tensors run on
    one: on a shared 2-core machine OpenMP's threads wait on each other at every op, several times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
