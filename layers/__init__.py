"""The building blocks: SS2D and its scans, the SRB with its ACP, Swin blocks, convolutions.

Importing the package imports CompressAI first, without PyTorch Geometric (``compressai_import``).
"""

from .compressai_import import load as _load_compressai

_load_compressai()
