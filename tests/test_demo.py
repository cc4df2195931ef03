"""The README's quick start: demo.py compresses a sample photo with the bundled checkpoint, next to JPEG and WebP."""

import subprocess
import sys

import pytest

from codec import DEFAULT_CHECKPOINT
from tests.helpers import REPO


@pytest.mark.skipif(not DEFAULT_CHECKPOINT.exists(), reason="no bundled checkpoint in checkpoints/")
def test_quick_start_demo_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "demo.py", "--out-dir", str(tmp_path), "--threads", "1"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    rows = {line.split()[0]: line.split() for line in lines if line.startswith(("CSM", "JPEG", "WEBP"))}
    assert set(rows) == {"CSM", "JPEG", "WEBP"}
    csm_bytes = int(rows["CSM"][2])
    for codec in ("JPEG", "WEBP"):  # matched to about the same size
        assert abs(int(rows[codec][3]) - csm_bytes) < 0.25 * csm_bytes
    for name in ("image.csm", "image_csm.png", "image.jpg", "image.webp"):
        assert (tmp_path / name).stat().st_size > 0


def test_demo_without_checkpoint_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "demo.py", "--checkpoint", str(tmp_path / "none.pth.tar"), "--out-dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr and "none.pth.tar" in result.stderr


def test_demo_takes_a_quality_or_a_checkpoint_not_both(tmp_path):
    result = subprocess.run(
        [sys.executable, "demo.py", "--quality", "2", "--checkpoint", str(tmp_path / "c.pth.tar")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 2 and "not allowed with argument" in result.stderr
