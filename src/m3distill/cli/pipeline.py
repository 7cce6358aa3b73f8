"""`m3distill pipeline` (not implemented yet)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("pipeline", help="(not implemented yet)")
    parser.set_defaults(handler=None)
