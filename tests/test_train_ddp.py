"""Data-parallel training: `m3distill train` under torchrun with two CPU processes (gloo)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from sentence_transformers import SentenceTransformer

from m3distill.config import TeacherConfig
from m3distill.teacher.cache import build_teacher_cache
from m3distill.training import STUDENT_METADATA_FILE


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.mark.slow
def test_torchrun_with_two_cpu_processes_trains_one_student(small_dataset, tiny_xlmr_path, tmp_path):
    cache = tmp_path / "teacher_cache"
    build_teacher_cache(small_dataset, TeacherConfig(model=str(tiny_xlmr_path), device="cpu"), cache, show_progress=False)
    out = tmp_path / "students"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
        "--master_port", str(_free_port()), str(Path(sys.executable).parent / "m3distill"), "-q", "train",
        "--data", str(small_dataset), "--cache", str(cache), "--out", str(out), "--plan", "0,2",
        "--max-steps", "8", "--eval-steps", "4", "--batch-size", "8", "--lr", "1e-4", "--device", "cpu",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    finished = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-3000:]
    assert finished.stdout.count("m3distill train:") == 1  # one summary, from rank 0

    assert sorted(p.name for p in out.iterdir()) == ["student-2L"]  # rank 0 alone wrote, nothing left over
    metadata = json.loads((out / "student-2L" / STUDENT_METADATA_FILE).read_text())
    settings = metadata["training"]
    assert settings["world_size"] == 2 and settings["global_step"] == 8
    assert settings["train_loss_last"] < settings["train_loss_first"]
    # (The random stand-in's cut already has cosine 0.9995 to its teacher: the training loss is the signal here.)
    assert set(metadata["dev_after"]) >= {"mse", "mean_cosine", "spearman_cosine", "teacher_p@10"}
    model = SentenceTransformer(str(out / "student-2L"), device="cpu")
    assert model.encode(["a sentence"]).shape == (1, 64)

    # Retraining under torchrun: process 0 alone sets the old student aside, and removes it once the new one is whole.
    # (Every process moving it raced: one found the folder gone, or deleted the copy the other had just set aside.)
    first = (out / "student-2L").stat().st_ino
    command[command.index("--master_port") + 1] = str(_free_port())
    retrained = subprocess.run([*command, "--force"], env=env, capture_output=True, text=True, timeout=300)
    assert retrained.returncode == 0, retrained.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["student-2L"]
    again = json.loads((out / "student-2L" / STUDENT_METADATA_FILE).read_text())
    assert (out / "student-2L").stat().st_ino != first and again["training"]["global_step"] == 8  # a new folder
