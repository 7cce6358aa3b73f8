"""The package drawn from its imports (scripts/import_floors.py): no circle, and no import that runs back up a floor.

The floors follow the data (see the script's FLOORS): what every stage shares lies below the workers, the workers
never import the stages nor the package's __init__, the stages decide above their workers, and the command line is
a shell on top. Parsed with ast: nothing is imported, so this costs a fraction of a second.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SRC = REPO_ROOT / "src" / "m3distill"


@functools.cache
def _floors():
    spec = importlib.util.spec_from_file_location("import_floors", REPO_ROOT / "scripts" / "import_floors.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_no_import_circle():
    floors = _floors()
    modules, imports = floors.read_package(SRC)
    assert floors.circles(modules, imports) == []


def test_every_room_has_a_floor_and_no_import_runs_back_up_one():
    floors = _floors()
    modules, imports = floors.read_package(SRC)
    assert {floors.room_of(module) for module in modules} <= set(floors.FLOOR_OF)
    back_up = [f"{item.source}:{item.line} imports {item.target}" for item in floors.back_up_imports(imports)]
    assert back_up == []


def test_workers_never_import_the_stages_nor_the_package_init():
    floors = _floors()
    _, imports = floors.read_package(SRC)
    workers = {"data", "teacher", "training", "exporting", "evaluation", "report", "students"}
    wrong = [f"{item.source}:{item.line} imports {item.target}" for item in imports
             if floors.room_of(item.source) in workers and floors.room_of(item.target) in {"stages", "m3distill"}]
    assert wrong == []
