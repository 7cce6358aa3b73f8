"""Build the M3 test teacher: the packaged all-MiniLM-L6-v2 folder plus seeded bge-m3 sparse and ColBERT heads.

    python scripts/build_m3_test_teacher.py OUT_DIR [--seed 0] [--base MODEL_DIR_OR_ID]

The folder holds every file of the base sentence-transformers model, ``sparse_linear.pt`` (Linear(384, 1)) and
``colbert_linear.pt`` (Linear(384, 384)), FlagEmbedding's file names: m3distill treats it as an M3 teacher
(dense + sparse + ColBERT outputs) and its students keep both heads. The same seed gives the same heads.
"""

from __future__ import annotations

import argparse
import sys

from m3distill.errors import M3DistillError
from m3distill.m3 import make_m3_test_teacher


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", help="new folder to write the teacher into")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random heads")
    parser.add_argument("--base", default="sentence-transformers/all-MiniLM-L6-v2",
                        help="sentence-transformers folder or packaged id to add the heads to")
    args = parser.parse_args(argv)
    try:
        path = make_m3_test_teacher(args.out_dir, base=args.base, seed=args.seed)
    except M3DistillError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
