"""Parts the stages' fingerprints share: what identifies a dataset's contents and a configured teacher.

:class:`m3distill.fingerprint.Fingerprint` is what a fingerprint is; each stage composes its own from parts like
these and alone compares it with the one its output records (a student's record is composed by the training,
:mod:`m3distill.training.record`, which writes it).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from m3distill.data.dataset import dataset_fingerprint
from m3distill.fingerprint import CONTENTS, hash_model_files

__all__ = ["dataset_fingerprint", "teacher_identity", "teacher_made_by"]


def teacher_identity(teacher: Any) -> dict[str, Any]:
    """The parts that pin a configured teacher (a :class:`~m3distill.config.TeacherConfig`) without loading it.

    A local folder (or a packaged model) is identified by the hash of its model files, a hub id by its name and
    the revision of the local snapshot (the commit the files came from); the maximum sequence length is a setting.
    """
    from m3distill.models import local_model_folder, resolve_model_name

    parts: dict[str, Any] = {"teacher.max_seq_length": teacher.max_seq_length}
    if Path(resolve_model_name(teacher.model)).expanduser().is_dir():
        parts["teacher.model" + CONTENTS] = hash_model_files(Path(resolve_model_name(teacher.model)).expanduser())
        return parts
    snapshot = local_model_folder(teacher.model, teacher.revision)
    parts["teacher.model"] = teacher.model
    parts["teacher.revision"] = snapshot.name if snapshot is not None else teacher.revision
    return parts


def teacher_made_by(identity: Mapping[str, Any], made_by: Mapping[str, Any]) -> dict[str, Any]:
    """The parts of :func:`teacher_identity` as a teacher's recorded fingerprint (a
    :class:`~m3distill.teacher.fingerprint.TeacherFingerprint` as a dict: what made a cache) has them, so that
    ``Fingerprint(identity).change(teacher_made_by(identity, made_by))`` names what differs.

    A maximum sequence length left unset in ``identity`` is the model's own, which the record holds resolved: it is
    not compared.
    """
    if "teacher.model" + CONTENTS in identity:
        parts: dict[str, Any] = {"teacher.model" + CONTENTS: made_by.get("files_sha256")}
    else:
        parts = {"teacher.model": made_by.get("name"), "teacher.revision": made_by.get("revision")}
    unset = identity.get("teacher.max_seq_length") is None
    parts["teacher.max_seq_length"] = None if unset else made_by.get("max_seq_length")
    return parts
