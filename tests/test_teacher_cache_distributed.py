"""The teacher cache under torchrun: two CPU processes (gloo) share the shards and write the cache one process would.

Float results depend on the number of threads a matrix product is split over, so every run here uses one torch
thread (OMP_NUM_THREADS=1 in the torchrun processes, torch.set_num_threads(1) in this one): with that, the same
texts in the same batches give bitwise the same embeddings, whichever process computes them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from m3distill.config import TeacherConfig
from m3distill.data.dataset import load_synth_dataset
from m3distill.stages import TeacherStage
from m3distill.teacher.cache import (
    CACHE_MANIFEST_FILE,
    CACHE_TEACHER_FILE,
    SHARDS_DIRNAME,
    TeacherCache,
    build_teacher_cache,
    is_complete_cache,
)

SHARD_SIZE = 8
BATCH_SIZE = 4

# Process 1 crashes right after writing its first shard (shard 1: process r writes the shards numbered r mod 2).
_CRASHING_WORKER = """
import sys
import torch
from m3distill.config import TeacherConfig
from m3distill.teacher.cache import build_teacher_cache
from m3distill.distributed import process_rank

torch.set_num_threads(1)
dataset, model, out, shard_size, batch_size = sys.argv[1:6]


def crash_in_process_1(info):
    if process_rank() == 1:
        raise RuntimeError(f"simulated crash of process 1 after {info.name}")


teacher = TeacherConfig(model=model, shard_size=int(shard_size), batch_size=int(batch_size), device="cpu")
build_teacher_cache(dataset, teacher, out, show_progress=False, on_shard=crash_in_process_1)
"""


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _torchrun(*args: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(_free_port()), *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def dataset(small_dataset, tmp_path_factory) -> Path:
    """About 70 texts: 9 shards of 8, so each process writes several and one writes one more."""
    from test_teacher_cache import write_dataset_subset

    return write_dataset_subset(small_dataset, tmp_path_factory.mktemp("distributed") / "dataset", 8)


def _teacher(model: Path) -> TeacherConfig:
    return TeacherConfig(model=str(model), shard_size=SHARD_SIZE, batch_size=BATCH_SIZE, device="cpu")


def _shards(cache_dir: Path) -> dict[str, list[str]]:
    """Shard name -> its keys, of every complete shard."""
    folder = cache_dir / SHARDS_DIRNAME
    return {file.name.removesuffix(".keys.npy"): [key.decode() for key in np.load(file)]
            for file in sorted(folder.glob("*.keys.npy"))}


def _assert_same_cache(cache_dir: Path, reference_dir: Path, texts: list[str]) -> None:
    assert _shards(cache_dir) == _shards(reference_dir)  # same shard names, same texts in each
    got, expected = TeacherCache.open(cache_dir), TeacherCache.open(reference_dir)
    assert len(got) == len(expected) == len(set(texts))
    for text in texts:  # bitwise, text by text
        assert np.array_equal(got.get([text]), expected.get([text]))


@pytest.mark.slow
def test_two_processes_write_the_cache_one_process_writes(dataset, tiny_xlmr_path, tmp_path, one_thread):
    texts = load_synth_dataset(dataset).texts()
    reference = tmp_path / "one-process"
    TeacherStage(_teacher(tiny_xlmr_path), dataset, reference).run(show_progress=False)
    n_shards = len(_shards(reference))
    assert n_shards == -(-len(set(texts)) // SHARD_SIZE) and n_shards % 2 == 1

    out = tmp_path / "two-processes"
    finished = _torchrun(str(Path(sys.executable).parent / "m3distill"), "-q", "teacher", "--data", str(dataset),
                         "--teacher", str(tiny_xlmr_path), "--out", str(out), "--shard-size", str(SHARD_SIZE),
                         "--batch-size", str(BATCH_SIZE), "--device", "cpu")
    assert finished.returncode == 0, finished.stderr[-3000:]
    summaries = [line for line in finished.stdout.splitlines() if line.startswith("m3distill teacher:")]
    assert len(summaries) == 1 and "embedded by 2 processes" in summaries[0]  # one summary, from process 0

    _assert_same_cache(out, reference, texts)
    # The manifest (written by process 0 alone) and the owner file are those of the one-process run, byte for byte.
    for name in (CACHE_MANIFEST_FILE, CACHE_TEACHER_FILE):
        assert (out / name).read_text() == (reference / name).read_text()
    assert not [file.name for file in (out / SHARDS_DIRNAME).iterdir() if file.name.startswith(".")]  # no temp files


@pytest.mark.slow
def test_a_crashed_process_leaves_no_manifest_and_a_rerun_finishes_the_cache(dataset, tiny_xlmr_path, tmp_path,
                                                                              one_thread):
    texts = load_synth_dataset(dataset).texts()
    reference = tmp_path / "reference"
    build_teacher_cache(dataset, _teacher(tiny_xlmr_path), reference, show_progress=False)

    worker = tmp_path / "crashing_worker.py"
    worker.write_text(_CRASHING_WORKER)
    out = tmp_path / "cache"
    crashed = _torchrun(str(worker), str(dataset), str(tiny_xlmr_path), str(out), str(SHARD_SIZE), str(BATCH_SIZE))
    assert crashed.returncode != 0 and "simulated crash of process 1 after shard-00001" in crashed.stderr
    assert not is_complete_cache(out)
    left = _shards(out)
    # Process 1 finished shard 1 only; process 0 got as far as it got before torchrun stopped it. Every shard left
    # is whole and holds what the plan gave it.
    assert "shard-00001" in left and not [name for name in left if int(name[-5:]) % 2 == 1 and name != "shard-00001"]
    reference_shards = _shards(reference)
    assert all(keys == reference_shards[name] for name, keys in left.items())

    written = []
    summary = build_teacher_cache(dataset, _teacher(tiny_xlmr_path), out, show_progress=False,
                                  on_shard=lambda info: written.append(info.name))
    # Only what was missing, under the numbers the unfinished run had given it (the gaps are filled first).
    assert sorted(written) == sorted(set(reference_shards) - set(left))
    assert summary.n_reused == sum(len(keys) for keys in left.values())
    _assert_same_cache(out, reference, texts)
