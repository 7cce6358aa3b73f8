"""The teacher cache: every dataset text embedded once by the teacher, stored in memory-mapped shards.

    CACHE_DIR/
      teacher.json                  written first: the teacher's fingerprint, the storage dtype and the compute
                                    precision. Shards are only ever added by the same teacher in the same dtype and
                                    precision: the teacher stage compares them, and clears or refuses the cache.
      shards/shard-00000.dense.npy  (n, dim) float32 or float16 sentence embeddings, row i for key i
      shards/shard-00000.keys.npy   (n,) S64 text keys (see :func:`text_key`); written last, so its presence
                                    marks the shard complete
      manifest.json                 written last: the teacher stage's fingerprint record (fingerprint, inputs), the
                                    teacher's fingerprint, dim, dtype, precision, count, outputs, and the shards
                                    with their row counts and the checksum of each of their files (format 2; format 1
                                    kept the teacher's fingerprint as "fingerprint" and the stage's record nested in
                                    "inputs", and is still read)

Opening a cache for training or evaluation checks every shard against its manifest entry (rows, dimension, file
sizes, and the xxh3-128 checksum of each file's bytes: about 0.1 s per GB when the files are in the page cache): a
shard truncated or changed on disk is one clear error, the teacher stage counts the cache as unfinished, and the
next ``m3distill teacher`` run embeds its texts again. A cache written before checksums were recorded is checked by
size only, and gets its checksums the next time ``m3distill teacher`` runs on it.

Shards are the unit of resumption. The texts still missing from the cache are sorted by (length, key) and cut
into shards of ``teacher.shard_size``, numbered with the lowest numbers no shard has: the gaps a failed
multi-process run or a removed damaged shard left, then after the last shard. A run killed after some shards and
rerun therefore plans exactly the shards the first run had not finished, under the same numbers, with the same
texts in the same batches, so the result equals an uninterrupted run. A dataset that gained texts gets new shards
for those only.

Several processes (``torchrun --nproc_per_node N m3distill teacher``, see :mod:`m3distill.distributed`)
share the work by shards: every process plans the same shards from the same folder (they check that they agree),
process r embeds the shards whose number modulo N is r, each on its own device (``cuda:LOCAL_RANK`` on GPUs), and
process 0 writes the manifest once every shard of the plan is complete. A run where one process fails leaves the
finished shards of all of them and no manifest; the next run, with any number of processes, plans only the rest.
Shards hold the same texts in the same batches however many processes write them, so the cache is the same.

Precision (``teacher.precision``): bf16 or fp16 compute changes the embeddings beyond float error, so the resolved
precision is recorded in teacher.json and the manifest (caches written before it was recorded are fp32) and a cache
is only extended in its own precision. The token budget (``teacher.max_tokens_per_batch``) only changes which texts
share a batch, like ``batch_size``: float-error differences, so neither is recorded and shards made with different
batching mix freely.

Room for bge-m3's other outputs (a later issue): each output is a set of per-shard files named
``shard-NNNNN.<output>*.npy`` and listed under ``outputs`` in the manifest. Planned, all memory-mappable:

    sparse:  shard-NNNNN.sparse_offsets.npy (n+1,) int64, .sparse_token_ids.npy (nnz,) int32,
             .sparse_weights.npy (nnz,) float   -- text i owns entries offsets[i]:offsets[i+1]
    colbert: shard-NNNNN.colbert_offsets.npy (n+1,) int64, .colbert_vectors.npy (tokens, dim) float
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from m3distill.atomic import atomic_path, disk_space_for, write_json_atomic
from m3distill.config import TeacherConfig
from m3distill.data.dataset import load_synth_dataset
from m3distill.encoding import encode_texts, resolve_precision
from m3distill.errors import M3DistillError
from m3distill.layout import CACHE_TEACHER_FILE, folder_kind
from m3distill.models import load_teacher, process_device
from m3distill.distributed import ProcessGroup, process_group
from m3distill.teacher.fingerprint import TeacherFingerprint, teacher_fingerprint

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 2
# Earlier formats this m3distill still reads (see _in_current_format).
_READ_FORMATS = (1, CACHE_FORMAT_VERSION)
CACHE_MANIFEST_FILE = "manifest.json"
SHARDS_DIRNAME = "shards"
DENSE_OUTPUT = "dense"
# The compute precision of caches that do not record one (written before it was recorded): full precision.
DEFAULT_CACHE_PRECISION = "fp32"
# What m3distill writes in a cache folder, as patterns for m3distill.atomic.files_not_ours.
CACHE_FILES = (CACHE_TEACHER_FILE, CACHE_MANIFEST_FILE, f"{SHARDS_DIRNAME}/shard-*.npy")
_KEY_DTYPE = "S64"
_SHARD_PATTERN = re.compile(r"^shard-(\d{5,})\.keys\.npy$")


def text_key(text: str) -> str:
    """The cache key of a text: the hex SHA-256 of its UTF-8 bytes. The one definition used everywhere."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# The checksum of each shard file recorded in the manifest: xxh3-128 reads at memory speed (sha256 is 15 times
# slower), so checking a cache on every open stays cheap; it guards against damage, not against an adversary.
CHECKSUM = "xxh3_128"
_SHARD_FILES = ("keys", DENSE_OUTPUT)  # the files of a shard, by output name
_CHECKSUM_CHUNK_BYTES = 1 << 20


@dataclass(frozen=True)
class ShardInfo:
    """A shard just written: its number, file stem, how many texts it holds and the checksum of each of its files."""

    index: int
    name: str
    count: int
    checksums: dict[str, str] | None = None


@dataclass(frozen=True)
class CacheSummary:
    """What :func:`build_teacher_cache` did.

    Attributes:
        cache_dir: the cache folder.
        n_texts: distinct texts in the dataset (all splits, all kinds).
        n_computed: texts embedded by this run.
        n_reused: dataset texts already in the cache.
        n_shards: shards in the cache after this run.
        dim: embedding dimension.
        dtype: storage dtype of the embeddings.
        seconds: wall time of the embedding step (of all processes together under torchrun).
        precision: the compute precision of the cache's embeddings (``fp32``, ``bf16``, ``fp16``).
        processes: how many processes shared the work (torchrun's WORLD_SIZE).
    """

    cache_dir: Path
    n_texts: int
    n_computed: int
    n_reused: int
    n_shards: int
    dim: int
    dtype: str
    seconds: float
    precision: str = DEFAULT_CACHE_PRECISION
    processes: int = 1

    @property
    def texts_per_second(self) -> float:
        """Embedding throughput of this run (0 when nothing was computed)."""
        return self.n_computed / self.seconds if self.n_computed and self.seconds > 0 else 0.0


def is_complete_cache(cache_dir: str | Path) -> bool:
    """True when ``cache_dir`` holds a finished teacher cache (its manifest exists)."""
    return (Path(cache_dir) / CACHE_MANIFEST_FILE).is_file()


def cache_fingerprint(cache_dir: str | Path) -> TeacherFingerprint:
    """The fingerprint of the teacher that made the cache in ``cache_dir``, read from its manifest alone."""
    return TeacherFingerprint.from_dict(TeacherCache.read_manifest(cache_dir)["teacher"])


def build_teacher_cache(
    dataset_dir: str | Path,
    teacher: TeacherConfig,
    out_dir: str | Path,
    *,
    model: SentenceTransformer | None = None,
    show_progress: bool = True,
    on_shard: Callable[[ShardInfo], None] | None = None,
    inputs: dict[str, Any] | None = None,
) -> CacheSummary:
    """Embed every text of a dataset directory (contexts, questions, general; all splits) with the teacher.

    The cache in ``out_dir`` is created, resumed or extended: whether an existing cache may be extended (the same
    teacher, dtype and precision made it) is the teacher stage's question (:mod:`m3distill.stages.teacher`), which
    clears one that may not before it calls this. Under torchrun the processes share the shards (see the module's
    docstring): each one calls this function with the same arguments and gets the same summary.

    Args:
        dataset_dir: a dataset directory written by ``m3distill synth``.
        teacher: the teacher settings: model, revision, max_seq_length, batch_size, max_tokens_per_batch, precision,
            dtype, shard_size, device.
        out_dir: the cache folder; created, resumed or extended.
        model: an already-loaded teacher to use instead of loading ``teacher.model`` (it is not modified; its
            max_seq_length must equal ``teacher.max_seq_length`` when that is set).
        show_progress: show a tqdm bar with texts/s (under torchrun, process 0's, over its own shards).
        on_shard: called after each shard is written (progress hooks; tests use it to simulate a kill).
        inputs: what the cache was made from (the teacher stage's fingerprint record), recorded in the manifest so
            that a later run can tell whether the cache is current.

    Raises:
        M3DistillError: the dataset is missing or incomplete; ``out_dir`` holds something that is not a teacher
            cache; the precision cannot run on the device; or, under torchrun, the processes do not see the same
            cache folder or a shard of another process is missing at the end.
    """
    out_dir = Path(out_dir)
    with process_group() as group:
        texts = _dataset_texts(dataset_dir)
        model = _teacher_model(teacher, model)
        precision = resolve_precision(teacher.precision, model.device)
        fingerprint = teacher_fingerprint(model, teacher.model, revision=teacher.revision)
        shard_keys, checksums = _open_for_writing(out_dir, fingerprint, teacher.dtype, precision, group)
        plan = _plan_shards(texts, shard_keys, teacher.shard_size)
        # Also the last wait before shards are written: no process plans from a folder another has begun to fill.
        if not group.agree(_plan_digest(shard_keys, plan)):
            raise M3DistillError(
                f"the {group.world_size} processes see different teacher caches in {out_dir}: run them on one "
                "machine, or put the cache on a file system all of them share"
            )
        n_missing = sum(len(chunk) for _, chunk in plan)
        if group.is_main:
            logger.info("teacher cache %s: %d texts, %d cached, %d to embed in %d shards, in %s", out_dir, len(texts),
                        len(texts) - n_missing, n_missing, len(plan), precision)
        started = time.perf_counter()
        _write_my_shards(out_dir, plan, _Embedder(model, teacher, precision, fingerprint.dim), group, checksums,
                         show_progress=show_progress, on_shard=on_shard)
        group.barrier()
        seconds = time.perf_counter() - started
        shard_counts = {name: len(keys) for name, keys in shard_keys.items()}
        shard_counts.update({_shard_name(index): len(chunk) for index, chunk in plan})
        if group.is_main:
            theirs = [(index, chunk) for index, chunk in plan if index % group.world_size != group.rank]
            checksums.update(_check_planned_shards(out_dir, theirs, fingerprint.dim, group))
            _write_manifest(out_dir, fingerprint, teacher.dtype, precision, shard_counts, checksums, inputs)
        # The others return once the manifest exists: whatever runs next in them may open the cache.
        group.barrier()
    summary = CacheSummary(
        cache_dir=out_dir, n_texts=len(texts), n_computed=n_missing, n_reused=len(texts) - n_missing,
        n_shards=len(shard_counts), dim=fingerprint.dim, dtype=teacher.dtype, seconds=seconds, precision=precision,
        processes=group.world_size,
    )
    if group.is_main:
        logger.info(
            "teacher cache complete: %d texts in %d shards (%.1f texts/s)",
            sum(shard_counts.values()), len(shard_counts), summary.texts_per_second,
        )
    return summary


def _dataset_texts(dataset_dir: str | Path) -> list[str]:
    texts = load_synth_dataset(dataset_dir).texts()
    if not texts:
        raise M3DistillError(f"dataset {dataset_dir} holds no texts; rerun `m3distill synth` with a non-empty corpus")
    return texts


def _open_for_writing(out_dir: Path, fingerprint: TeacherFingerprint, dtype: str, precision: str,
                      group: ProcessGroup) -> tuple[dict[str, list[str]], dict[str, dict[str, str] | None]]:
    """The keys and checksums of the intact shards already in ``out_dir``, once the folder is claimed as this
    teacher's cache (process 0 writes teacher.json into a new one and removes damaged shards)."""
    # Every process checks the folder before any of them writes to it, so a refusal is every process's.
    claimed = _check_cache_dir(out_dir)
    group.barrier()
    # Process 0 alone claims the folder and removes damaged shards; the others read what it left.
    intact = None
    if group.is_main:
        if not claimed:
            _claim_cache_dir(out_dir, fingerprint, dtype, precision)
        intact = _intact_shards(out_dir, fingerprint.dim)
    group.barrier()
    if intact is None:
        intact = _intact_shards(out_dir, fingerprint.dim, main=False)
    return {name: keys for name, (keys, _) in intact.items()}, {name: sums for name, (_, sums) in intact.items()}


@dataclass(frozen=True)
class _Embedder:
    """The teacher as the shards are embedded: the model, its settings, the precision it computes in, its width."""

    model: SentenceTransformer
    teacher: TeacherConfig
    precision: str
    dim: int


def _write_my_shards(out_dir: Path, plan: list[tuple[int, list[tuple[str, str]]]], embedder: _Embedder,
                     group: ProcessGroup, checksums: dict[str, dict[str, str] | None], *, show_progress: bool,
                     on_shard: Callable[[ShardInfo], None] | None) -> None:
    """Embed and write this process's shards of ``plan`` (number modulo the processes), adding their checksums."""
    mine = [(index, chunk) for index, chunk in plan if index % group.world_size == group.rank]
    if group.world_size > 1:
        logger.info("process %d of %d: %d shards (%d texts) on %s", group.rank, group.world_size, len(mine),
                    sum(len(chunk) for _, chunk in mine), embedder.model.device)
    desc = "teacher cache" if group.world_size == 1 else f"teacher cache (process 0 of {group.world_size})"
    # Each text's embedding in the storage dtype and its 64-byte key.
    needed = sum(len(chunk) for _, chunk in mine) * (embedder.dim * np.dtype(embedder.teacher.dtype).itemsize + 64)
    with disk_space_for(out_dir, needed), tqdm(total=sum(len(chunk) for _, chunk in mine), unit="text", desc=desc,
                                               smoothing=0.1, disable=not (show_progress and group.is_main)) as bar:
        for index, chunk in mine:
            info = _write_shard(out_dir, index, chunk, embedder.model, embedder.teacher, embedder.precision, bar)
            checksums[info.name] = info.checksums
            if on_shard is not None:
                on_shard(info)


def _plan_shards(
    texts: Sequence[str], shard_keys: dict[str, list[str]], shard_size: int
) -> list[tuple[int, list[tuple[str, str]]]]:
    """The shards to write: the texts not in ``shard_keys``, as (shard number, [(key, text)...]).

    (length, key) order puts similar lengths in the same batches (little padding) and is the same on every rerun
    and in every process. The shards take the lowest free numbers: the texts of shards missing from a run that
    did not finish are the union of those whole shards, so they are cut into the same shards again, which get their
    old numbers back.
    """
    cached_keys = {key for keys in shard_keys.values() for key in keys}
    by_key = {key: text for text in texts if (key := text_key(text)) not in cached_keys}
    missing = sorted(by_key.items(), key=lambda item: (len(item[1]), item[0]))
    taken = {_shard_index(name) for name in shard_keys}
    free = (index for index in itertools.count() if index not in taken)
    return [(next(free), missing[offset : offset + shard_size]) for offset in range(0, len(missing), shard_size)]


def _plan_digest(shard_keys: dict[str, list[str]], plan: list[tuple[int, list[tuple[str, str]]]]) -> str:
    """One hash of the shards present and the plan, for the processes to compare."""
    digest = hashlib.sha256()
    for name in sorted(shard_keys, key=_shard_index):
        digest.update(f"{name}:{len(shard_keys[name])}\n".encode())
    for index, chunk in plan:
        digest.update(f"{index}:".encode() + b",".join(key.encode() for key, _ in chunk) + b"\n")
    return digest.hexdigest()


def _check_planned_shards(
    root: Path, shards: list[tuple[int, list[tuple[str, str]]]], dim: int, group: ProcessGroup
) -> dict[str, dict[str, str]]:
    """The checksums of ``shards`` (written by the other processes), once each is checked to be complete and to
    hold the planned texts; raises :class:`M3DistillError` otherwise."""
    checksums = {}
    for index, chunk in shards:
        name = _shard_name(index)
        try:
            keys, _ = _open_shard(root, name, count=len(chunk), dim=dim)
        except (FileNotFoundError, _CorruptShard) as error:
            keys, why = None, "is missing" if isinstance(error, FileNotFoundError) else str(error)
        else:
            why = "holds other texts than planned"
        if keys != [key for key, _ in chunk]:
            raise M3DistillError(
                f"teacher cache {root}: shard {name} of process {index % group.world_size} {why}; rerun "
                "`m3distill teacher` to embed what is missing"
            )
        checksums[name] = _shard_checksums(root, name)
    return checksums


class TeacherCache:
    """Read access to a finished teacher cache; open it with :meth:`TeacherCache.open`."""

    def __init__(
        self, root: Path, manifest: dict[str, Any], shards: dict[str, np.ndarray], index: dict[str, tuple[str, int]]
    ):
        self.root = root
        self.manifest = manifest
        self._shards = shards
        self._index = index

    @staticmethod
    def read_manifest(cache_dir: str | Path) -> dict[str, Any]:
        """The manifest of the finished cache in ``cache_dir``.

        Raises :class:`M3DistillError` when the folder is missing, incomplete or written by another version.
        """
        root = Path(cache_dir)
        if not root.is_dir():
            raise M3DistillError(f"teacher cache not found: {root} (create it with `m3distill teacher`)")
        manifest_file = root / CACHE_MANIFEST_FILE
        if not manifest_file.is_file():
            raise M3DistillError(
                f"{root} is not a complete teacher cache: {CACHE_MANIFEST_FILE} is missing "
                "(an interrupted `m3distill teacher`? rerun it to finish)"
            )
        manifest = json.loads(manifest_file.read_text(encoding="utf-8"))
        if manifest.get("format") not in _READ_FORMATS:
            raise M3DistillError(
                f"{root} holds teacher cache format {manifest.get('format')!r}; this m3distill reads "
                f"{', '.join(map(str, _READ_FORMATS))}: rebuild it with `m3distill teacher` into a new folder"
            )
        return _in_current_format(manifest)

    @classmethod
    def open(cls, cache_dir: str | Path) -> TeacherCache:
        """Open the cache in ``cache_dir`` (memory-mapped; nothing is read into memory but the keys), after
        checking every shard file against the checksum the manifest records (one read of the files).

        Raises :class:`M3DistillError` when the folder is missing, incomplete or written by another version, or
        when a shard is missing or does not match its manifest entry (truncated or damaged on disk).
        """
        root = Path(cache_dir)
        manifest = cls.read_manifest(root)
        shards: dict[str, np.ndarray] = {}
        index: dict[str, tuple[str, int]] = {}
        if any(not entry.get("checksums") for entry in manifest["shards"]):
            logger.info("teacher cache %s records no checksums of its shards (written by an earlier m3distill): they "
                        "are checked by size only until `m3distill teacher` runs on it and records them", root)
        for entry in manifest["shards"]:
            name = entry["name"]
            try:
                keys, shards[name] = _open_shard(root, name, count=int(entry["count"]), dim=int(manifest["dim"]),
                                                 checksums=entry.get("checksums"))
            except FileNotFoundError as error:
                raise M3DistillError(
                    f"teacher cache {root} is damaged: {Path(error.filename).name} is missing; rerun `m3distill teacher`"
                ) from error
            except _CorruptShard as error:
                raise M3DistillError(
                    f"teacher cache {root} is damaged: shard {name} {error}; rerun `m3distill teacher` with the same "
                    "settings to embed its texts again"
                ) from None
            for row, key in enumerate(keys):
                index[key] = (name, row)
        return cls(root, manifest, shards, index)

    @property
    def fingerprint(self) -> TeacherFingerprint:
        """The teacher that made this cache."""
        return TeacherFingerprint.from_dict(self.manifest["teacher"])

    @property
    def dim(self) -> int:
        """Embedding dimension."""
        return int(self.manifest["dim"])

    @property
    def dtype(self) -> str:
        """Storage dtype (``float32`` or ``float16``); :meth:`get` always returns float32."""
        return str(self.manifest["dtype"])

    @property
    def precision(self) -> str:
        """The precision the teacher computed the embeddings in (``fp32``, ``bf16``, ``fp16``)."""
        return str(self.manifest.get("precision", DEFAULT_CACHE_PRECISION))

    def __len__(self) -> int:
        return len(self._index)

    def __contains__(self, text: object) -> bool:
        return isinstance(text, str) and text_key(text) in self._index

    def get(self, texts: Sequence[str]) -> np.ndarray:
        """Teacher embeddings of ``texts`` as a float32 array of shape (len(texts), dim), in the given order.

        Raises :class:`M3DistillError` saying how many texts are not in the cache.
        """
        keys = [text_key(text) for text in texts]
        missing = [text for text, key in zip(texts, keys) if key not in self._index]
        if missing:
            raise M3DistillError(
                f"{len(missing)} of {len(texts)} texts are not in the teacher cache {self.root} "
                f"(first: {missing[0][:60]!r}); rerun `m3distill teacher` on this dataset"
            )
        out = np.empty((len(texts), self.dim), dtype=np.float32)
        by_shard: dict[str, tuple[list[int], list[int]]] = {}
        for position, key in enumerate(keys):
            name, row = self._index[key]
            positions, rows = by_shard.setdefault(name, ([], []))
            positions.append(position)
            rows.append(row)
        for name, (positions, rows) in by_shard.items():
            out[positions] = self._shards[name][rows]
        return out


def _teacher_model(teacher: TeacherConfig, model: SentenceTransformer | None) -> SentenceTransformer:
    if model is None:
        # Under torchrun each process embeds on its own GPU (cuda:LOCAL_RANK).
        return load_teacher(teacher, device=process_device(teacher.device))
    if teacher.max_seq_length is not None and teacher.max_seq_length != model.max_seq_length:
        raise ValueError(
            f"the given model has max_seq_length {model.max_seq_length} but the config asks for {teacher.max_seq_length}"
        )
    return model


def _check_cache_dir(out_dir: Path) -> bool:
    """True when ``out_dir`` is already a teacher cache (its teacher.json is there); False when it is new or empty.

    Raises :class:`M3DistillError` when it holds something else. Reads only: the folder is claimed by
    :func:`_claim_cache_dir`. Whose cache it is (teacher, dtype, precision) the teacher stage has checked.
    """
    if (out_dir / CACHE_TEACHER_FILE).is_file():
        return True
    if out_dir.exists() and any(out_dir.iterdir()):
        kind = folder_kind(out_dir)
        raise M3DistillError(f"{out_dir} is {kind or 'not empty'} and is not a teacher cache; choose an empty or new "
                             "folder")
    return False


def _claim_cache_dir(out_dir: Path, fingerprint: TeacherFingerprint, dtype: str, precision: str) -> None:
    """Record which teacher, dtype and precision own ``out_dir`` (a new or empty folder, see :func:`_check_cache_dir`)."""
    write_json_atomic(out_dir / CACHE_TEACHER_FILE,
                      {"fingerprint": fingerprint.to_dict(), "dtype": dtype, "precision": precision})


def _shard_file(root: Path, name: str, output: str) -> Path:
    return root / SHARDS_DIRNAME / f"{name}.{output}.npy"


def _shard_index(name: str) -> int:
    return int(name.split("-", 1)[1])


def _shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _complete_shards(root: Path) -> list[str]:
    folder = root / SHARDS_DIRNAME
    if not folder.is_dir():
        return []
    names = [file.name[: -len(".keys.npy")] for file in folder.iterdir() if _SHARD_PATTERN.match(file.name)]
    return sorted((name for name in names if _shard_file(root, name, DENSE_OUTPUT).is_file()), key=_shard_index)


def _read_keys(root: Path, name: str) -> list[str]:
    return [key.decode("ascii") for key in np.load(_shard_file(root, name, "keys"))]


class _CorruptShard(Exception):
    """A shard whose files exist but do not hold what its manifest entry (or its own keys) say."""


def _open_shard(root: Path, name: str, *, count: int | None, dim: int,
                checksums: dict[str, str] | None = None) -> tuple[list[str], np.ndarray]:
    """A shard's keys and its memory-mapped embeddings, checked against each other, against ``count`` rows of
    ``dim`` values and, when given, against the ``checksums`` of its files; raises :class:`_CorruptShard` saying
    what is wrong, FileNotFoundError when a file is missing."""
    dense_file = _shard_file(root, name, DENSE_OUTPUT)
    for output, expected in (checksums or {}).items():
        if _file_checksum(_shard_file(root, name, output)) != expected:
            raise _CorruptShard(f"has a {output} file that does not match the checksum recorded when it was written "
                                "(changed on disk since)")
    try:
        keys = _read_keys(root, name)
    except (ValueError, EOFError, UnicodeDecodeError) as error:
        raise _CorruptShard(f"has an unreadable keys file ({error})") from None
    try:
        dense = np.load(dense_file, mmap_mode="r")
    except (ValueError, EOFError) as error:  # "mmap length is greater than file size": truncated
        raise _CorruptShard(f"has a truncated or unreadable embeddings file ({error})") from None
    if count is not None and len(keys) != count:
        raise _CorruptShard(f"holds {len(keys)} keys where the manifest lists {count}")
    if dense.shape != (len(keys), dim):
        raise _CorruptShard(f"holds embeddings of shape {dense.shape} for {len(keys)} keys of dimension {dim}")
    if dense_file.stat().st_size != dense.offset + dense.nbytes:
        raise _CorruptShard(f"has an embeddings file of {dense_file.stat().st_size} bytes, not {dense.offset + dense.nbytes}")
    return keys, dense


def _intact_shards(root: Path, dim: int, *, main: bool = True) -> dict[str, tuple[list[str], dict[str, str] | None]]:
    """The keys and file checksums of every complete shard in ``root`` that reads back whole.

    In the main process each shard is checked against the checksums the manifest records, a damaged one is removed
    (so that its texts are embedded again), and the checksums of shards the manifest does not list yet (left by an
    interrupted run, or by an m3distill that recorded none) are computed. The other processes of a torchrun read
    what the main one left, without checksums.
    """
    recorded: dict[str, dict[str, Any]] = {}
    manifest_file = root / CACHE_MANIFEST_FILE
    if manifest_file.is_file():
        try:
            recorded = {entry["name"]: entry for entry in json.loads(manifest_file.read_text())["shards"]}
        except (json.JSONDecodeError, KeyError, TypeError, ValueError):
            recorded = {}
    if main and any(not entry.get("checksums") for entry in recorded.values()):
        logger.info("teacher cache %s: recording the checksums of its shards (written by an earlier m3distill)", root)
    intact = {}
    for name in _complete_shards(root):
        entry = recorded.get(name, {})
        count = int(entry["count"]) if "count" in entry else None
        checksums = entry.get("checksums") if main else None
        try:
            keys, _ = _open_shard(root, name, count=count, dim=dim, checksums=checksums)
        except _CorruptShard as error:
            if not main:
                continue
            logger.warning("teacher cache %s: shard %s %s; embedding its texts again", root, name, error)
            for output in ("keys", DENSE_OUTPUT):  # keys first: without them the shard no longer counts as complete
                _shard_file(root, name, output).unlink(missing_ok=True)
            continue
        intact[name] = (keys, checksums or (_shard_checksums(root, name) if main else None))
    return intact


def damaged_shards(cache_dir: str | Path) -> dict[str, str]:
    """The shards of the finished cache in ``cache_dir`` that are missing or do not match their manifest entry
    (rows, sizes, checksums), by name, with what is wrong; empty for an intact cache."""
    root = Path(cache_dir)
    manifest = TeacherCache.read_manifest(root)
    damaged = {}
    for entry in manifest["shards"]:
        try:
            _open_shard(root, entry["name"], count=int(entry["count"]), dim=int(manifest["dim"]),
                        checksums=entry.get("checksums"))
        except FileNotFoundError as error:
            damaged[entry["name"]] = f"lacks {Path(error.filename).name}"
        except _CorruptShard as error:
            damaged[entry["name"]] = str(error)
    return damaged


def _file_checksum(path: Path) -> str:
    # One reused 1 MiB buffer: larger reads, or a new bytes object per read, are slower than the hashing itself.
    digest = xxhash.xxh3_128()
    buffer = bytearray(_CHECKSUM_CHUNK_BYTES)
    view = memoryview(buffer)
    with open(path, "rb", buffering=0) as handle:
        while size := handle.readinto(buffer):
            digest.update(view[:size])
    return digest.hexdigest()


def _shard_checksums(root: Path, name: str) -> dict[str, str]:
    """The checksum of each file of a shard, by output name (``keys``, ``dense``)."""
    return {output: _file_checksum(_shard_file(root, name, output)) for output in _SHARD_FILES}


def _write_shard(
    root: Path, index: int, chunk: list[tuple[str, str]], model: SentenceTransformer, teacher: TeacherConfig,
    precision: str, bar: tqdm,
) -> ShardInfo:
    name = _shard_name(index)
    texts = [text for _, text in chunk]
    if teacher.max_tokens_per_batch is None:
        # Batches of batch_size consecutive texts of the (length, key)-sorted shard, as every cache before token
        # budgets was written: the same batches give the same floats.
        parts = []
        for start in range(0, len(texts), teacher.batch_size):
            batch = texts[start : start + teacher.batch_size]
            parts.append(encode_texts(model, batch, batch_size=len(batch), precision=precision))
            bar.update(len(batch))
        dense = np.concatenate(parts)
    else:
        dense = encode_texts(model, texts, batch_size=teacher.batch_size,
                             max_tokens_per_batch=teacher.max_tokens_per_batch, precision=precision,
                             on_batch=bar.update)
    dense = dense.astype(teacher.dtype, copy=False)
    checksums = {}
    with atomic_path(_shard_file(root, name, DENSE_OUTPUT)) as tmp:
        np.save(tmp, dense)
        checksums[DENSE_OUTPUT] = _file_checksum(tmp)
    # The keys go last: a shard with keys is complete.
    with atomic_path(_shard_file(root, name, "keys")) as tmp:
        np.save(tmp, np.array([key for key, _ in chunk], dtype=_KEY_DTYPE))
        checksums["keys"] = _file_checksum(tmp)
    return ShardInfo(index=index, name=name, count=len(chunk), checksums=checksums)


def _write_manifest(root: Path, fingerprint: TeacherFingerprint, dtype: str, precision: str,
                    shard_counts: dict[str, int], checksums: dict[str, dict[str, str] | None],
                    inputs: dict[str, Any] | None = None) -> None:
    write_json_atomic(
        root / CACHE_MANIFEST_FILE,
        {
            "format": CACHE_FORMAT_VERSION,
            # The one fingerprint record, as every stage's output keeps it: what the cache was made from.
            "fingerprint": (inputs or {}).get("fingerprint"),
            "inputs": (inputs or {}).get("inputs"),
            "teacher": fingerprint.to_dict(),
            "dim": fingerprint.dim,
            "dtype": dtype,
            "precision": precision,
            "count": sum(shard_counts.values()),
            "outputs": {DENSE_OUTPUT: {"dtype": dtype, "shape": ["n", fingerprint.dim]}},
            "checksum": CHECKSUM,
            "shards": [{"name": name, "count": shard_counts[name], "checksums": checksums[name]}
                       for name in sorted(shard_counts, key=_shard_index)],
        },
    )


def _in_current_format(manifest: dict[str, Any]) -> dict[str, Any]:
    """A manifest as this m3distill writes it. Format 1 kept the teacher's fingerprint as ``fingerprint`` and the
    teacher stage's record nested as ``inputs: {fingerprint, inputs}`` (or none); format 2 keeps one fingerprint
    record, ``fingerprint`` and ``inputs`` as every stage's output does, and the teacher's as ``teacher``."""
    if manifest.get("format") != 1:
        return manifest
    record = manifest.get("inputs") if isinstance(manifest.get("inputs"), dict) else {}
    return {**manifest, "format": CACHE_FORMAT_VERSION, "teacher": manifest.get("fingerprint"),
            "fingerprint": record.get("fingerprint"), "inputs": record.get("inputs")}


def read_cache_manifest(cache_dir: str | Path) -> dict[str, Any] | None:
    """The manifest of the finished cache in ``cache_dir`` in the current format, or None when there is none (or it
    is unreadable, or of a format this m3distill does not read)."""
    try:
        return TeacherCache.read_manifest(cache_dir)
    except (M3DistillError, OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return None


def read_cache_owner(cache_dir: str | Path) -> dict[str, Any] | None:
    """teacher.json of the (finished or unfinished) cache in ``cache_dir``: the teacher's fingerprint, the storage
    dtype and the precision (``fp32`` for caches from before it was recorded); None when there is none."""
    try:
        owner = json.loads((Path(cache_dir) / CACHE_TEACHER_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    if not isinstance(owner, dict) or not isinstance(owner.get("fingerprint"), dict):
        return None
    return {**owner, "precision": owner.get("precision", DEFAULT_CACHE_PRECISION)}
