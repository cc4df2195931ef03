"""Export a trained checkpoint for distribution: entropy-coder tables built, weights optionally in float16.

    python scripts/export_checkpoint.py runs/x/checkpoint_best.pth.tar checkpoints/csm-small.pth.tar --half

The training state (optimizers, RNG) is dropped. With ``--half`` the learned weights (not the constant buffers: bounds, pedestals) are rounded to float16 *before* the
tables are built, so the stored tables belong to exactly the weights a user loads (they load back as float32).
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from models import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("input", type=Path, help="checkpoint written by train.py")
    parser.add_argument("output", type=Path, help="exported checkpoint")
    parser.add_argument("--half", action="store_true", help="store floating-point weights in float16")
    args = parser.parse_args(argv)
    try:
        model = load_checkpoint(args.input)
    except CheckpointError as exc:
        sys.exit(f"error: {exc}")
    if args.half:
        with torch.no_grad():
            for tensor in model.parameters():  # the constant buffers (bounds) stay as they are
                tensor.copy_(tensor.half().float())
    model.update(force=True)
    info = model.checkpoint_info
    save_checkpoint(
        args.output,
        model,
        lmbda=info["lambda"],
        weights_dtype=torch.float16 if args.half else None,
        **{k: info[k] for k in ("epoch", "step") if k in info},
    )
    size = args.output.stat().st_size / 2**20
    print(f"{args.input} -> {args.output}: {model.preset}, lambda {info['lambda']}, {size:.1f} MiB")


if __name__ == "__main__":
    main()
