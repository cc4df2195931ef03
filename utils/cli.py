"""Argument types shared by the command-line tools."""

import argparse

from utils.bitstream import OVERLAP_MULTIPLE, TILE_MULTIPLE


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def tile_argument(text: str) -> int:
    """argparse type of ``--tile``: 0 (never tile) or a positive multiple of the tile grid (64)."""
    value = int(text)
    if value < 0 or value % TILE_MULTIPLE:
        raise argparse.ArgumentTypeError(f"--tile must be 0 or a positive multiple of {TILE_MULTIPLE}, got {value}")
    return value


def overlap_argument(text: str) -> int:
    """argparse type of ``--tile-overlap``: a multiple of 16 (whole latent positions), >= 0."""
    value = int(text)
    if value < 0 or value % OVERLAP_MULTIPLE:
        raise argparse.ArgumentTypeError(overlap_problem(value))
    return value


def overlap_problem(value: int) -> str:
    return f"--tile-overlap must be a multiple of {OVERLAP_MULTIPLE} from 0 to the tile side; got {value}"
