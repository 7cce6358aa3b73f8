"""`m3distill evaluate` (not implemented yet)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("evaluate", help="(not implemented yet)")
    parser.set_defaults(handler=None)
