"""The longest functions of m3distill, and those with more than 8 parameters.

    python scripts/function_sizes.py             # the ten longest, and every function over 8 parameters
    python scripts/function_sizes.py --most 30   # more of the longest
    python scripts/function_sizes.py --src DIR   # another checkout's src/m3distill

A function's length is its lines from ``def`` (decorators left out) to its last line, docstring included; its
parameters are all of them but ``self`` and ``cls`` (``*args`` and ``**kwargs`` count one each). Parsed with
:mod:`ast`, nothing is imported.
"""

from __future__ import annotations

import argparse
import ast
import sys
from dataclasses import dataclass
from pathlib import Path

DEFAULT_SRC = Path(__file__).resolve().parents[1] / "src" / "m3distill"
MAX_PARAMETERS = 8


@dataclass(frozen=True)
class Function:
    where: str  # file:line
    name: str  # Class.method or function, nested ones as outer.inner
    lines: int
    parameters: int


def _parameters(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    arguments = node.args
    names = [*arguments.posonlyargs, *arguments.args, *arguments.kwonlyargs]
    count = len([name for name in names if name.arg not in ("self", "cls")])
    return count + (arguments.vararg is not None) + (arguments.kwarg is not None)


def functions(src: Path) -> list[Function]:
    found: list[Function] = []
    for path in sorted(src.rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        where = path.relative_to(src.parent)

        def visit(node: ast.AST, prefix: str) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    name = prefix + child.name
                    found.append(Function(f"{where}:{child.lineno}", name, child.end_lineno - child.lineno + 1,
                                          _parameters(child)))
                    visit(child, name + ".")
                elif isinstance(child, ast.ClassDef):
                    visit(child, prefix + child.name + ".")
                else:
                    visit(child, prefix)

        visit(tree, "")
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="the package folder (default: this checkout's)")
    parser.add_argument("--most", type=int, default=10, help="how many of the longest to list (default: 10)")
    args = parser.parse_args(argv)
    found = functions(args.src)
    print(f"{len(found)} functions; the {args.most} longest:")
    for function in sorted(found, key=lambda item: item.lines, reverse=True)[: args.most]:
        print(f"  {function.lines:4d} lines  {function.name}  ({function.where})")
    many = sorted((item for item in found if item.parameters > MAX_PARAMETERS), key=lambda item: -item.parameters)
    print(f"{len(many)} function(s) with more than {MAX_PARAMETERS} parameters:")
    for function in many:
        print(f"  {function.parameters:4d} params {function.name}  ({function.where})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
