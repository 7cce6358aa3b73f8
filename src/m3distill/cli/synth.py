"""`m3distill synth`: turn a corpus into the dataset of contexts and questions (m3distill.data.synth.synthesize)."""

from __future__ import annotations

import argparse
import logging

from m3distill.cli._common import add_config_argument, resolve_config
from m3distill.layout import RunLayout

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
    inputs = parser.add_argument_group("inputs")
    inputs.add_argument("--corpus", metavar="PATH",
                        help="file or folder (.txt/.md/.jsonl/.csv/.parquet), saved HF dataset dir, or HF dataset id")
    inputs.add_argument("--general", metavar="PATH", help="general text (any corpus format) mixed into training only")
    inputs.add_argument("--general-ratio", type=float, metavar="R",
                        help="general texts per domain training text (default 1.0; 0 = none)")
    inputs.add_argument("--text-column", metavar="NAME", help="text column of table files and datasets (default text)")
    inputs.add_argument("--id-column", metavar="NAME", help="document id column (default: row number)")
    inputs.add_argument("--hf-split", metavar="NAME", help="split of a Hugging Face dataset (default train)")
    inputs.add_argument("--max-documents", type=int, metavar="N", help="use only the first N documents")
    inputs.add_argument("--skip-bad-files", action="store_true", default=None,
                        help="skip (and count) undecodable files and files lacking a column instead of failing")

    output = parser.add_argument_group("output")
    output.add_argument("--out", metavar="DIR", help="dataset directory (default: <run_dir>/dataset)")
    output.add_argument("--run-dir", metavar="DIR", help="run directory (default from the config)")
    output.add_argument("--overwrite", action="store_true", help="replace an existing dataset made from other inputs")

    chunking = parser.add_argument_group("contexts")
    chunking.add_argument("--tokenizer", metavar="MODEL",
                          help="model folder or hub id whose tokenizer counts tokens (default: the teacher's)")
    chunking.add_argument("--teacher", metavar="MODEL", help="teacher model (sets teacher.model)")
    chunking.add_argument("--max-tokens", type=int, metavar="N",
                          help="tokens per context, special tokens not counted (default 256)")
    chunking.add_argument("--overlap-tokens", type=int, metavar="N",
                          help="tokens shared by consecutive contexts, whole sentences (default 32)")
    chunking.add_argument("--no-language-detection", dest="detect_language", action="store_false", default=None,
                          help="do not detect each context's language")

    questions = parser.add_argument_group("questions and splits")
    questions.add_argument("--generator", choices=("pseudo", "llm"), help="question generator (default pseudo)")
    questions.add_argument("--questions-per-context", type=int, metavar="N", help="questions per context (default 2)")
    questions.add_argument("--seed", type=int, help="random seed (default 42)")
    questions.add_argument("--dev", type=float, metavar="SIZE", help="dev contexts: fraction < 1 or count (default 0.1)")
    questions.add_argument("--test", type=float, metavar="SIZE", help="test contexts: fraction < 1 or count (default 0.1)")

    llm = parser.add_argument_group("LLM endpoint (--generator llm)")
    llm.add_argument("--llm-base-url", metavar="URL", help="OpenAI-compatible base URL, e.g. http://localhost:8000/v1")
    llm.add_argument("--llm-model", metavar="NAME", help="model name the endpoint serves")
    llm.add_argument("--llm-api-key-env", metavar="VAR", help="NAME of the env var holding the API key (default OPENAI_API_KEY)")
    llm.add_argument("--llm-concurrency", type=int, metavar="N", help="requests in flight at once (default 8)")
    llm.add_argument("--llm-cache", metavar="FILE", help="answer cache (default <out>.llm-cache.sqlite)")
    parser.set_defaults(handler=run_synth)


def run_synth(args: argparse.Namespace) -> int:
    """Handler: resolve the config, run :func:`synthesize`, print the one-line summary."""
    from m3distill.data.synth import synthesize

    config = resolve_config(
        args,
        {
            "run_dir": args.run_dir,
            "teacher.model": args.teacher,
            "synth.corpus": args.corpus,
            "synth.general": args.general,
            "synth.general_ratio": args.general_ratio,
            "synth.text_column": args.text_column,
            "synth.id_column": args.id_column,
            "synth.hf_split": args.hf_split,
            "synth.max_documents": args.max_documents,
            "synth.skip_bad_files": args.skip_bad_files,
            "synth.tokenizer": args.tokenizer,
            "synth.max_tokens": args.max_tokens,
            "synth.overlap_tokens": args.overlap_tokens,
            "synth.detect_language": args.detect_language,
            "synth.generator": args.generator,
            "synth.questions_per_context": args.questions_per_context,
            "synth.seed": args.seed,
            "synth.splits.dev": args.dev,
            "synth.splits.test": args.test,
            "synth.llm.base_url": args.llm_base_url,
            "synth.llm.model": args.llm_model,
            "synth.llm.api_key_env": args.llm_api_key_env,
            "synth.llm.concurrency": args.llm_concurrency,
            "synth.llm.cache_path": args.llm_cache,
        },
    )
    out_dir = args.out or RunLayout(config.run_dir).dataset
    summary = synthesize(
        config.synth,
        out_dir,
        tokenizer=config.synth.tokenizer or config.teacher.model,
        overwrite=args.overwrite,
        show_progress=logging.getLogger().getEffectiveLevel() <= logging.INFO,
    )
    print(f"m3distill synth: {summary.line()}")
    return 0
