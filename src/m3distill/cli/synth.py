"""`m3distill synth`: turn a corpus into the dataset of contexts and questions (m3distill.data.synth.synthesize)."""

from __future__ import annotations

import argparse

from m3distill.cli._common import add_config_argument, resolve_config, show_progress
from m3distill.cli._flags import add_config_flags

_DESCRIPTION = """\
Turn your documents into a dataset: contexts (token-aware chunks cut with the teacher's tokenizer), questions
about them (pseudo-queries offline, or real questions from an OpenAI-compatible LLM endpoint), train/dev/test
splits by context, and optional general text mixed into training. Writes Parquet files and manifest.json to
--out (default: <run_dir>/dataset), atomically; rerunning with the same inputs reports "up to date".

The LLM's API key is read from the environment variable named by --llm-api-key-env (never stored); its answers
are cached in <out>.llm-cache.sqlite, so an interrupted run resumes without repeating requests.
"""

_EPILOG = """\
examples:
  m3distill synth --corpus docs/ --out runs/x/dataset
  m3distill synth --corpus data.jsonl --text-column body --id-column url --general wiki.parquet
  OPENAI_API_KEY=... m3distill synth --corpus docs/ --generator llm \\
      --llm-base-url http://localhost:8000/v1 --llm-model Qwen/Qwen2.5-7B-Instruct
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="build the dataset (contexts, questions, splits) from your documents",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_config_argument(parser)
    parser.add_argument("--out", metavar="DIR", help="dataset directory (default: <run_dir>/dataset)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo the dataset: replace one made from other inputs (refused without this flag)")
    add_config_flags(parser, "run_dir", "teacher.model", "synth")
    parser.set_defaults(handler=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    """Handler: resolve the config, run the synth stage through the API, print the one-line summary."""
    import m3distill

    summary = m3distill.synth(resolve_config(args), out_dir=args.out, overwrite=args.overwrite,
                              show_progress=show_progress(args))
    print(f"m3distill synth: {summary.line()}")
    return 0
