"""`m3distill train` (not implemented yet)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="(not implemented yet)")
    parser.set_defaults(handler=None)
