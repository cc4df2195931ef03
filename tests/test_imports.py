"""layers/compressai_import.py: CompressAI imported without torch_geometric, torchvision and pandas, which stay
importable afterwards."""

import subprocess
import sys

from tests.helpers import REPO

CODE = """
import sys
import models, utils.codec_io
heavy = [m for m in ("torch_geometric", "torchvision", "pandas") if m in sys.modules]
import compressai.registry
from compressai.entropy_models import EntropyBottleneck, GaussianConditional
import torchvision.transforms, pandas
print(heavy, torchvision.transforms.RandomCrop.__module__, pandas.DataFrame(dict(a=[1])).shape)
"""


def test_compressai_without_its_heavy_imports_and_the_real_ones_after():
    result = subprocess.run([sys.executable, "-c", CODE], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "[] torchvision.transforms.transforms (1, 1)"
