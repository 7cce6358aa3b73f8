"""Draw m3distill from its imports: rooms, arrows, circles, and the imports that run back up a floor.

    python scripts/import_floors.py              # the figures and every import that runs back up
    python scripts/import_floors.py --arrows     # also every arrow between rooms
    python scripts/import_floors.py --src DIR    # another checkout's src/m3distill (e.g. an older commit)

Nothing is imported: every ``.py`` file is parsed with :mod:`ast`, so the drawing is cheap and safe to run anywhere
(tests/test_import_floors.py runs it on every test run).

What counts:
- A **room** is a sub-package of m3distill (``data/``, ``stages/``, ...) or a top-level module (``config.py``);
  the package's own ``__init__.py`` is the room ``m3distill`` (the public API), ``__main__.py`` the room
  ``__main__``.
- An **arrow** is an import that runs: at module level or inside a function (a lazy import still runs), but not one
  under ``if TYPE_CHECKING:``, which only type checkers see. ``from m3distill.x import y`` is an arrow to the
  module ``m3distill.x.y`` when that is a module, else to ``m3distill.x``. The rooms' arrows are the distinct
  (room, room) pairs, a room's arrows to itself left out.
- A **circle** is a set of files that reach each other through arrows (a strongly connected component of more than
  one file, or a file importing itself).
- A **back-up import** is an arrow from a room to a room on a higher floor of :data:`FLOORS`: the lower room then
  depends on one that depends on it, which is how circles start. Rooms of one floor may import each other sideways.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

PACKAGE = "m3distill"
DEFAULT_SRC = Path(__file__).resolve().parents[1] / "src" / PACKAGE

# The floors, lowest first: each room may import the rooms of its own floor and of the floors below it. They follow
# the data: what every stage shares lies below the stages' workers, the workers are in the order the data flows
# through them, the stages decide above their workers, the pipeline and the public API drive the stages, and the
# command line is a shell on top.
FLOORS: list[tuple[str, tuple[str, ...]]] = [
    # Facts with no dependencies: the version, the one error type, the run directory's layout, shipped files.
    ("ground", ("_version", "errors", "layout", "resources")),
    # The settings model, atomic writes, process rank and world size, locks.
    ("settings and files", ("config", "atomic", "distributed", "locks")),
    # The vocabulary every worker shares: loading models, encoding, bge-m3's outputs, the metric names, the ONNX
    # encoder, fingerprints and stage status, what a student folder is.
    ("shared vocabulary", ("models", "encoding", "m3", "m3_outputs", "metrics", "onnx_serving", "fingerprint",
                           "students")),
    # The workers, in the order the data flows through them.
    ("data", ("data",)),
    ("teacher", ("teacher",)),
    ("training", ("training",)),
    ("export", ("exporting",)),
    ("report", ("report",)),
    ("evaluation", ("evaluation",)),
    # Each stage decides whether its output is current, then asks its worker.
    ("stages", ("stages",)),
    # The whole pipeline, and the public API over the stages.
    ("pipeline and API", ("pipeline", PACKAGE)),
    # The command line: parses flags into config and calls the API.
    ("command line", ("cli", "__main__")),
]
FLOOR_OF: dict[str, int] = {room: number for number, (_, rooms) in enumerate(FLOORS) for room in rooms}


@dataclass(frozen=True)
class Import:
    """One import that runs: ``source`` (a module) imports ``target`` (a module) at ``line``."""

    source: str
    target: str
    line: int
    lazy: bool  # inside a function


def module_name(path: Path, src: Path) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PACKAGE, *parts])


def room_of(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1:
        return PACKAGE
    return parts[1]


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.Module, module: str, is_package: bool, modules: set[str]) -> Iterable[Import]:
    def resolve(node: ast.ImportFrom) -> str:
        if not node.level:
            return node.module or ""
        base = module.split(".") if is_package else module.split(".")[:-1]
        base = base[: len(base) - (node.level - 1)]
        return ".".join(base + ([node.module] if node.module else []))

    def visit(node: ast.AST, lazy: bool) -> Iterable[Import]:
        if isinstance(node, ast.If) and _is_type_checking(node.test):
            for child in node.orelse:
                yield from visit(child, lazy)
            return
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield Import(module, alias.name, node.lineno, lazy)
        elif isinstance(node, ast.ImportFrom):
            target = resolve(node)
            if target.split(".")[0] == PACKAGE:
                for alias in node.names:
                    submodule = f"{target}.{alias.name}"
                    yield Import(module, submodule if submodule in modules else target, node.lineno, lazy)
        lazy = lazy or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        for child in ast.iter_child_nodes(node):
            yield from visit(child, lazy)

    yield from visit(tree, False)


def read_package(src: Path) -> tuple[set[str], list[Import]]:
    """Every module of the package in ``src`` and every import that runs between them."""
    files = {module_name(path, src): path for path in sorted(src.rglob("*.py"))}
    modules = set(files)
    imports: list[Import] = []
    for module, path in files.items():
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        found = _imports(tree, module, path.name == "__init__.py", modules)
        imports += list({(item.target, item.line): item for item in found if item.target in modules}.values())
    return modules, imports


def circles(modules: set[str], imports: list[Import]) -> list[list[str]]:
    """The strongly connected components of more than one module (or a module importing itself), largest first."""
    graph: dict[str, set[str]] = defaultdict(set)
    for item in imports:
        graph[item.source].add(item.target)
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def connect(node: str) -> None:  # Tarjan, iteratively: deep chains need no recursion limit
        nonlocal counter
        work = [(node, iter(sorted(graph[node])))]
        index[node] = low[node] = counter
        counter += 1
        stack.append(node)
        on_stack.add(node)
        while work:
            current, children = work[-1]
            for child in children:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                    break
                if child in on_stack:
                    low[current] = min(low[current], index[child])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[current])
                if low[current] == index[current]:
                    component = []
                    while True:
                        member = stack.pop()
                        on_stack.discard(member)
                        component.append(member)
                        if member == current:
                            break
                    if len(component) > 1 or current in graph[current]:
                        found.append(sorted(component))

    for module in sorted(modules):
        if module not in index:
            connect(module)
    return sorted(found, key=len, reverse=True)


def back_up_imports(imports: list[Import]) -> list[Import]:
    """The imports from a room to a room on a higher floor (rooms missing from :data:`FLOORS` count as the top)."""
    top = len(FLOORS)
    return [item for item in imports
            if FLOOR_OF.get(room_of(item.source), top) < FLOOR_OF.get(room_of(item.target), top)]


def room_arrows(imports: list[Import]) -> set[tuple[str, str]]:
    return {(room_of(item.source), room_of(item.target)) for item in imports
            if room_of(item.source) != room_of(item.target)}


def _where(module: str, src: Path) -> str:
    path = src.joinpath(*module.split(".")[1:])
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(src.parent))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, default=DEFAULT_SRC, help="the package folder (default: this checkout's)")
    parser.add_argument("--arrows", action="store_true", help="also list every arrow between rooms")
    args = parser.parse_args(argv)
    modules, imports = read_package(args.src)
    rooms = {room_of(module) for module in modules}
    arrows = room_arrows(imports)
    found = circles(modules, imports)
    eager = circles(modules, [item for item in imports if not item.lazy])
    back_up = back_up_imports(imports)
    unplaced = sorted(rooms - set(FLOOR_OF))
    print(f"{len(modules)} files, {len(rooms)} rooms, {len(arrows)} arrows between rooms, "
          f"{len(found)} circle(s) ({sum(map(len, found))} files; {len(eager)} circle(s) of "
          f"{sum(map(len, eager))} files among the module-level imports alone), {len(back_up)} import(s) back up a floor")
    if unplaced:
        print(f"rooms on no floor (counted as the top): {', '.join(unplaced)}")
    for number, circle in enumerate(found, 1):
        print(f"circle {number} ({len(circle)} files): {', '.join(_where(module, args.src) for module in circle)}")
    for item in back_up:
        source, target = room_of(item.source), room_of(item.target)
        print(f"back up: {_where(item.source, args.src)}:{item.line} imports {item.target} "
              f"({source} on floor {FLOOR_OF.get(source, len(FLOORS))} -> {target} on floor "
              f"{FLOOR_OF.get(target, len(FLOORS))}{', lazily' if item.lazy else ''})")
    if args.arrows:
        for source, target in sorted(arrows):
            print(f"arrow: {source} -> {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
