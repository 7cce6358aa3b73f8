"""Pieces every subcommand shares: the --config flag and turning flags into config overrides."""

from __future__ import annotations

import argparse
import os

from m3distill.cli._flags import flag_overrides
from m3distill.config import M3DistillConfig, apply_overrides, load_config


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="FILE", help="YAML config file; flags given here override its values")


def resolve_config(args: argparse.Namespace) -> M3DistillConfig:
    """The config file named by ``--config`` (or the defaults) with the config flags given in ``args`` applied."""
    return apply_overrides(load_config(getattr(args, "config", None)), flag_overrides(args))


def show_progress(args: argparse.Namespace) -> bool:
    """Progress bars, unless -q or TQDM_DISABLE=1 asks for none: one rule for every command."""
    return not getattr(args, "quiet", False) and os.environ.get("TQDM_DISABLE") != "1"
