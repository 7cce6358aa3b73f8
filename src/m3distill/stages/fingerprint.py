"""Fingerprints: what a stage's output was made from, recorded in that output and compared on the next run.

A :class:`Fingerprint` is a flat mapping of named parts (``synth.max_tokens``, ``dataset (contents)``,
``training.max_steps``) to JSON values, and the sha256 of that mapping. Contents count, never where they lie: a
corpus, a dataset or a local model folder enters as a hash of its files, so a run directory moved or reached from
another installation stays current. When the recorded parts differ from the current ones, :meth:`Fingerprint.change`
names the first part that changed, for the one line a user reads.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# How a content part is spelled, so that a changed one reads "the corpus contents changed", not two hashes.
CONTENTS = " (contents)"


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


def dataset_fingerprint(dataset_dir: str | Path) -> str | None:
    """What identifies a finished dataset's contents: its manifest's ``input_hash`` (the inputs it was made from),
    or for a dataset written by other means the sha256 of its files. None when there is no finished dataset."""
    from m3distill.data.dataset import TABLES, is_complete_dataset
    from m3distill.layout import DATASET_MANIFEST_FILE

    root = Path(dataset_dir)
    if not is_complete_dataset(root):
        return None
    manifest = read_json(root / DATASET_MANIFEST_FILE) or {}
    if isinstance(manifest.get("input_hash"), str):
        return manifest["input_hash"]
    digest = hashlib.sha256()
    for name in sorted([DATASET_MANIFEST_FILE, *(file for file, _ in TABLES.values())]):
        if (root / name).is_file():
            digest.update(name.encode() + b"\0" + hashlib.sha256((root / name).read_bytes()).digest())
    return digest.hexdigest()


def teacher_identity(teacher: Any) -> dict[str, Any]:
    """The parts that pin a configured teacher (a :class:`~m3distill.config.TeacherConfig`) without loading it.

    A local folder (or a packaged model) is identified by the hash of its model files, a hub id by its name and
    the revision of the local snapshot (the commit the files came from); the maximum sequence length is a setting.
    """
    from m3distill.models import local_model_folder, resolve_model_name
    from m3distill.teacher.fingerprint import hash_model_files

    parts: dict[str, Any] = {"teacher.max_seq_length": teacher.max_seq_length}
    if Path(resolve_model_name(teacher.model)).expanduser().is_dir():
        parts["teacher.model" + CONTENTS] = hash_model_files(Path(resolve_model_name(teacher.model)).expanduser())
        return parts
    snapshot = local_model_folder(teacher.model, teacher.revision)
    parts["teacher.model"] = teacher.model
    parts["teacher.revision"] = snapshot.name if snapshot is not None else teacher.revision
    return parts


def cache_identity(cache_manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The parts that pin the teacher embeddings in a finished cache: the teacher that made them (its files, not
    where they lay) and the storage dtype."""
    fingerprint = dict(cache_manifest.get("fingerprint") or {})
    if fingerprint.get("files_sha256"):
        fingerprint.pop("name", None)
    parts = {f"teacher.{key}": value for key, value in fingerprint.items()}
    if "files_sha256" in fingerprint:
        parts["teacher.files" + CONTENTS] = parts.pop("teacher.files_sha256")
    parts["teacher.dtype"] = cache_manifest.get("dtype")
    # bf16/fp16 teacher embeddings are other targets; fp32 caches (all caches before the precision field) add nothing.
    if cache_manifest.get("precision", "fp32") != "fp32":
        parts["teacher.precision"] = cache_manifest["precision"]
    return parts


# Settings that change where or how fast a student trains, not what it learns.
_TRAINING_LOGISTICS = ("device", "keep_checkpoints", "save_total_limit", "save_steps", "dev_max_tokens_per_batch")


def student_fingerprint(dataset: str | None, cache_manifest: Mapping[str, Any], training: Any,
                        plan: Mapping[str, Any], teacher_heads: str | None = None) -> Fingerprint:
    """What a trained student is made from: the dataset, the teacher cache, the training settings and its plan.

    Args:
        dataset: :func:`dataset_fingerprint` of the dataset it trains on.
        cache_manifest: the teacher cache's manifest.
        training: the :class:`~m3distill.config.TrainingConfig`.
        plan: :func:`plan_spec` of the student.
        teacher_heads: :func:`m3distill.m3.head_files_sha256` of an M3 teacher (``None`` for a dense-only one):
            its students are trained against those heads, which the cache does not cover.
    """
    from m3distill.config import settings_record

    settings = settings_record(training, exclude=set(_TRAINING_LOGISTICS))
    heads = {} if teacher_heads is None else {"teacher.heads" + CONTENTS: teacher_heads}
    return Fingerprint({
        "dataset" + CONTENTS: dataset,
        **cache_identity(cache_manifest),
        **heads,
        **flatten("training", settings),
        **flatten("student", dict(plan)),
    })


def plan_spec(n_layers: int, strategy: str, layers: Any, students: Any) -> dict[str, Any]:
    """A student's plan as its fingerprint sees it: explicit layers, or the count and the strategy that picks them
    (plus the search settings for ``search``); the same whether read from the config or from a resolved plan."""
    spec: dict[str, Any] = {"n_layers": n_layers, "strategy": strategy,
                            "layers": list(layers) if strategy == "explicit" else None}
    if strategy == "search":
        spec.update(search_candidates=students.search_candidates, search_steps=students.search_steps,
                    search_dev_texts=students.search_dev_texts)
    return spec
