"""Average checkpoints of one training run into a model folder (imcap.training.averaging).

    .venv/bin/python scripts/average_checkpoints.py runs/x/best ckpt-9.pt ckpt-10.pt --output runs/x/avg

MODEL_DIR gives the architecture, tokenizer and preprocessing (the run's `best/`); the checkpoints are
`imcap train`'s checkpoint.pt files (copies of them from the epochs to average), or model folders of the
same architecture fine-tuned from one checkpoint (a "model soup"):

    .venv/bin/python scripts/average_checkpoints.py src/imcap/default_model \
        src/imcap/default_model runs/other/best --output runs/soup

`--weights` mixes them unequally (summing to 1), or goes past one of them: an SCST model and the
cross-entropy checkpoint it started from, weighted 1.2 and -0.2, go a fifth further along SCST's direction:

    .venv/bin/python scripts/average_checkpoints.py runs/x/best runs/x/best xe-6.pt \
        --weights 1.2 -0.2 --output runs/x/further
"""

from __future__ import annotations

import argparse
from pathlib import Path

from imcap.training.averaging import average_checkpoints


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "model_dir", type=Path, help="a model folder of the same architecture (a run's best/)"
    )
    parser.add_argument(
        "checkpoints", type=Path, nargs="+", help="checkpoint.pt files or model folders to average"
    )
    parser.add_argument("--output", type=Path, required=True, help="the averaged model's folder")
    parser.add_argument(
        "--weights", type=float, nargs="+", help="one weight per checkpoint, summing to 1 (default: equal)"
    )
    parser.add_argument("--fp32", action="store_true", help="save fp32 weights (default: fp16)")
    args = parser.parse_args()
    missing = [str(p) for p in [args.model_dir, *args.checkpoints] if not p.exists()]
    if missing:
        parser.error(f"not found: {', '.join(missing)}")
    if args.weights is not None and len(args.weights) != len(args.checkpoints):
        parser.error(f"{len(args.weights)} --weights for {len(args.checkpoints)} checkpoints")
    try:
        out = average_checkpoints(
            args.model_dir, args.checkpoints, args.output, fp16=not args.fp32, weights=args.weights
        )
    except ValueError as error:
        parser.error(str(error))
    print(f"averaged {len(args.checkpoints)} checkpoints -> {out}")


if __name__ == "__main__":
    main()
