"""Fingerprints: what an output was made from, recorded in that output and compared on the next run; and where an
output stands against it (:class:`StageStatus`).

A :class:`Fingerprint` is a flat mapping of named parts (``synth.max_tokens``, ``dataset (contents)``,
``training.max_steps``) to JSON values, and the sha256 of that mapping. Contents count, never where they lie: a
corpus, a dataset or a local model folder enters as a hash of its files (:func:`hash_model_files` for a model), so
a run directory moved or reached from another installation stays current. When the recorded parts differ from the
current ones, :meth:`Fingerprint.change` names the first part that changed, for the one line a user reads.

This room lies below every worker and every stage: the stages (:mod:`m3distill.stages`) compose the fingerprints
and alone compare them; the workers only record what they are given and hash what they write.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from m3distill.errors import M3DistillError

# How a content part is spelled, so that a changed one reads "the corpus contents changed", not two hashes.
CONTENTS = " (contents)"

State = Literal["missing", "current", "stale"]


@dataclass(frozen=True)
class StageStatus:
    """Where a stage's outputs stand.

    Attributes:
        state: ``missing`` (none, or unfinished: the stage makes or resumes them), ``current`` (made from the
            same inputs and settings: reused) or ``stale`` (made from other ones: redone or refused).
        reason: for ``stale``, what changed, e.g. ``training.max_steps is 10 now, 6 when it was made``.
    """

    state: State
    reason: str = ""

    @property
    def current(self) -> bool:
        return self.state == "current"


@dataclass(frozen=True)
class Fingerprint:
    """The parts an output depends on and their digest.

    Attributes:
        parts: dotted part name -> JSON value (settings) or hex digest (contents, named ``... (contents)``).
        digest: the sha256 of ``parts``, unless a stage keeps an established digest (synth's ``input_hash``).
    """

    parts: dict[str, Any]
    digest: str = field(default="")

    def __post_init__(self) -> None:
        if not self.digest:
            object.__setattr__(self, "digest", digest_of(self.parts))

    def to_record(self) -> dict[str, Any]:
        """The JSON form stored in an output's manifest or metadata."""
        return {"fingerprint": self.digest, "inputs": self.parts}

    def change(self, recorded_parts: Mapping[str, Any] | None) -> str:
        """One phrase naming what differs between ``recorded_parts`` (stored with the output) and this fingerprint:
        every difference, up to three, then how many more."""
        if not isinstance(recorded_parts, Mapping):
            return "it records no fingerprint (made by an earlier m3distill or interrupted)"
        changes = []
        for name in sorted(set(self.parts) | set(recorded_parts)):
            now, then = self.parts.get(name), recorded_parts.get(name)
            if now == then:
                continue
            if name.endswith(CONTENTS):
                changes.append(f"{name[: -len(CONTENTS)]} contents changed")
            else:
                changes.append(f"{name} is {_short(now)} now, {_short(then)} when it was made")
        if not changes:
            return "it was made from other inputs"
        more = f" and {len(changes) - 3} more" if len(changes) > 3 else ""
        return ", ".join(changes[:3]) + more


def digest_of(value: Any) -> str:
    """sha256 of the canonical JSON of ``value``."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode("utf-8")).hexdigest()


def flatten(prefix: str, value: Any) -> dict[str, Any]:
    """``{"a": {"b": 1}}`` under ``prefix`` ``x`` -> ``{"x.a.b": 1}``; lists and scalars are leaves."""
    if not isinstance(value, Mapping):
        return {prefix: value}
    flat: dict[str, Any] = {}
    for key, item in value.items():
        flat.update(flatten(f"{prefix}.{key}" if prefix else str(key), item))
    return flat


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 40 else text[:37] + "..."


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or None when it is missing or unreadable."""
    try:
        found = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return found if isinstance(found, dict) else None


# Files that define a sentence-transformers model: configs, tokenizers, module code and weights. READMEs, ONNX or
# OpenVINO exports and training leftovers do not change the embeddings and are not hashed.
_HASHED_SUFFIXES = (".json", ".txt", ".model", ".safetensors", ".bin", ".py", ".tiktoken")
_UNHASHED_NAMES = ("README.md", "trainer_state.json", "training_args.bin", "optimizer.pt", "scheduler.pt")
_HASH_CHUNK_BYTES = 1 << 20


def hash_model_files(folder: str | Path) -> str:
    """SHA-256 over the relative names and full contents of the files that define the model in ``folder``.

    Top-level files and those inside the module folders listed in modules.json are hashed; see
    ``_HASHED_SUFFIXES``. Contents are read in 1 MiB chunks, so memory stays flat for multi-GB weights.
    """
    return combine_file_digests(model_file_digests(folder))


def model_file_digests(folder: str | Path, *, leave_out: tuple[str, ...] = (),
                       also: tuple[str, ...] = ()) -> dict[str, str]:
    """The SHA-256 of each file :func:`hash_model_files` hashes, by relative name, in the order it hashes them.

    Args:
        folder: a sentence-transformers model folder.
        leave_out: top-level files not to hash (a record m3distill keeps beside the model, for one).
        also: further top-level files to hash when present (an M3 model's head files).
    """
    folder = Path(folder)
    names = [name for name in _model_file_list(folder) if name not in leave_out]
    names += [name for name in also if (folder / name).is_file() and name not in names]
    digests = {}
    for relative in names:
        with open(folder / relative, "rb") as handle:
            file_digest = hashlib.file_digest(handle, "sha256") if hasattr(hashlib, "file_digest") else _chunked(handle)
        digests[relative] = file_digest.hexdigest()
    return digests


def combine_file_digests(digests: dict[str, str]) -> str:
    """One SHA-256 of :func:`model_file_digests`: their names and digests, in their order."""
    digest = hashlib.sha256()
    for relative, file_digest in digests.items():
        digest.update(relative.encode("utf-8") + b"\0" + bytes.fromhex(file_digest))
    return digest.hexdigest()


def _chunked(handle) -> Any:
    digest = hashlib.sha256()
    while chunk := handle.read(_HASH_CHUNK_BYTES):
        digest.update(chunk)
    return digest


def _model_file_list(folder: Path) -> list[str]:
    subfolders = {""}
    modules_file = folder / "modules.json"
    if modules_file.is_file():
        try:
            subfolders |= {entry.get("path", "") for entry in json.loads(modules_file.read_text(encoding="utf-8"))}
        except (json.JSONDecodeError, AttributeError) as error:
            raise M3DistillError(f"{modules_file} is not a valid modules.json: {error}") from error
    found = []
    for subfolder in sorted(subfolders):
        directory = folder / subfolder
        if not directory.is_dir():
            continue
        for file in sorted(directory.iterdir()):
            if file.is_file() and file.suffix in _HASHED_SUFFIXES and file.name not in _UNHASHED_NAMES:
                found.append(file.relative_to(folder).as_posix())
    return found
