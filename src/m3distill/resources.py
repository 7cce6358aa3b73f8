"""Files that ship with m3distill: the sample corpus and the example configs.

In a wheel they live inside the package (``m3distill/_sample``, ``m3distill/_configs``); in a source checkout
(editable install) they are read from the repository's ``data/sample`` and ``configs`` folders.
"""

from __future__ import annotations

from pathlib import Path

from m3distill.errors import M3DistillError

_PACKAGE_DIR = Path(__file__).resolve().parent
_REPO_ROOT = _PACKAGE_DIR.parents[1]


def _first_existing(*candidates: Path) -> Path | None:
    return next((path for path in candidates if path.exists()), None)


def sample_corpus_dir() -> Path:
    """The bundled multilingual sample corpus (``domain/`` and ``general/`` folders of .txt documents)."""
    found = _first_existing(_PACKAGE_DIR / "_sample", _REPO_ROOT / "data" / "sample")
    if found is None:
        raise M3DistillError("the bundled sample corpus is missing from this installation; reinstall m3distill")
    return found


def bundled_config(name: str) -> Path:
    """Path of a shipped example config, e.g. ``demo.yaml`` or ``bge-m3.yaml``."""
    found = _first_existing(_PACKAGE_DIR / "_configs" / name, _REPO_ROOT / "configs" / name)
    if found is None:
        raise M3DistillError(f"the bundled config {name} is missing from this installation; reinstall m3distill")
    return found
