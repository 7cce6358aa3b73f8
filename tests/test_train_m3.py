"""Students of an M3 teacher keep bge-m3's sparse and ColBERT heads: trained, checkpointed, resumed and saved."""

from __future__ import annotations

import pytest
import torch
from sentence_transformers import SentenceTransformer

from m3distill.config import LossConfig, TeacherConfig, TrainingConfig
from m3distill.m3 import HEAD_FILES, M3Heads, encode_m3, is_m3_model, load_m3_heads
from m3distill.teacher.cache import build_teacher_cache
from m3distill.training import distil_students, is_trained_student, read_student_metadata
from m3distill.training import distill
from m3distill.training.losses import DistillationLoss

from stand_in import TINY_SHAPE, make_xlmr_stand_in


@pytest.fixture(scope="module")
def tiny_m3_path(tmp_path_factory):
    """The tiny XLM-R stand-in with seeded bge-m3 heads: an M3 teacher that trains in milliseconds per step."""
    return make_xlmr_stand_in(tmp_path_factory.mktemp("tiny-m3") / "teacher", **TINY_SHAPE, max_seq_length=128,
                              m3_heads=True)


@pytest.fixture(scope="module")
def tiny_m3_cache(small_dataset, tiny_m3_path, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny-m3-cache") / "teacher_cache"
    build_teacher_cache(small_dataset, TeacherConfig(model=str(tiny_m3_path), device="cpu"), out, show_progress=False)
    return out


def _training(**update) -> TrainingConfig:
    settings = {"max_steps": 6, "save_steps": 2, "eval_steps": 2, "batch_size": 8, "learning_rate": 1e-3,
                "max_dev_texts": 40, "early_stopping_patience": None, "keep_checkpoints": True}
    return TrainingConfig(**{**settings, **update})


def _state(heads: M3Heads) -> dict[str, torch.Tensor]:
    return {name: value.clone() for name, value in heads.state_dict().items()}


def test_student_of_an_m3_teacher_trains_and_saves_its_own_heads(small_dataset, tiny_m3_cache, tiny_m3_path,
                                                                 tmp_path):
    teacher = TeacherConfig(model=str(tiny_m3_path), device="cpu")
    [result] = distil_students(small_dataset, tiny_m3_cache, teacher=teacher, students=[[0, 3]],
                              training=_training(), out_dir=tmp_path, show_progress=False)
    folder = result.path
    assert is_m3_model(folder) and is_trained_student(folder)
    assert read_student_metadata(folder)["outputs"] == ["dense", "sparse", "colbert"]

    # The heads started as the teacher's and were trained: they moved.
    teacher_heads, student_heads = M3Heads.load(tiny_m3_path), M3Heads.load(folder)
    moved = [not torch.equal(teacher_heads.state_dict()[name], value)
             for name, value in student_heads.state_dict().items()]
    assert all(moved)

    # The saved heads are the best checkpoint's (the Trainer restores the best weights; the heads come with them).
    best = read_student_metadata(folder)["training"]["best_step"]
    checkpoint = M3Heads.load(folder / "checkpoints" / f"checkpoint-{best}")
    for name, value in student_heads.state_dict().items():
        assert torch.equal(checkpoint.state_dict()[name], value)

    # Plain sentence-transformers still loads the folder (dense), and all three outputs come from it.
    model = SentenceTransformer(str(folder), device="cpu")
    outputs = encode_m3(model, load_m3_heads(model, folder), ["a first text", "and another one, longer"])
    assert outputs.outputs == ("dense", "sparse", "colbert") and outputs.dense.shape == (2, 64)


def test_head_weights_zero_leave_the_heads_as_the_teachers(small_dataset, tiny_m3_cache, tiny_m3_path, tmp_path):
    teacher = TeacherConfig(model=str(tiny_m3_path), device="cpu")
    training = _training(max_steps=2, loss=LossConfig(sparse=0.0, colbert=0.0))
    [result] = distil_students(small_dataset, tiny_m3_cache, teacher=teacher, students=[[0, 3]], training=training,
                              out_dir=tmp_path, show_progress=False)
    teacher_heads, student_heads = M3Heads.load(tiny_m3_path), M3Heads.load(result.path)
    for name, value in student_heads.state_dict().items():
        assert torch.equal(teacher_heads.state_dict()[name], value)


def test_head_losses_pull_the_students_heads_towards_the_teachers(tiny_m3_path):
    teacher = SentenceTransformer(str(tiny_m3_path), device="cpu")
    teacher_heads = M3Heads.load(tiny_m3_path)
    student = SentenceTransformer(str(tiny_m3_path), device="cpu")
    heads = M3Heads.load(tiny_m3_path)
    torch.manual_seed(0)
    with torch.no_grad():  # knock the student's heads off the teacher's
        for parameter in heads.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    loss = DistillationLoss(student, LossConfig(cosine=0.0, anchor_kl=0.0, mse=1e-9, sparse=1.0, colbert=1.0),
                            teacher=teacher, heads=heads, teacher_heads=teacher_heads)
    # Only the student's heads are the loss's own parameters beside the student's: never the teacher's.
    own = {id(p) for p in loss.parameters()}
    assert {id(p) for p in heads.parameters()} <= own
    assert not own & {id(p) for p in teacher.parameters()} and not own & {id(p) for p in teacher_heads.parameters()}

    features = student.preprocess(["the sparse head weighs tokens", "ColBERT keeps a vector per token", "x"])
    labels = torch.as_tensor(teacher.encode(["the sparse head weighs tokens", "ColBERT keeps a vector per token", "x"]))
    optimizer = torch.optim.Adam(heads.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        optimizer.zero_grad()
        value = loss([dict(features)], labels)
        value.backward()
        optimizer.step()
        losses.append(value.item())
    assert losses[-1] < 0.2 * losses[0]


def test_interrupted_m3_student_resumes_to_the_same_heads(small_dataset, tiny_m3_cache, tiny_m3_path, tmp_path,
                                                           monkeypatch):
    teacher = TeacherConfig(model=str(tiny_m3_path), device="cpu")
    training = _training()
    [straight] = distil_students(small_dataset, tiny_m3_cache, teacher=teacher, students=[[0, 3]], training=training,
                                out_dir=tmp_path / "straight", show_progress=False)

    def killed_after_step_4(self, args, state, control, **kwargs):  # the process dies once checkpoint-4 is saved
        if state.global_step == 4:
            raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(distill._StepTimer, "on_save", killed_after_step_4, raising=False)
        with pytest.raises(KeyboardInterrupt):
            distil_students(small_dataset, tiny_m3_cache, teacher=teacher, students=[[0, 3]], training=training,
                           out_dir=tmp_path / "resumed", show_progress=False)
    checkpoint = tmp_path / "resumed" / "student-2L" / "checkpoints" / "checkpoint-4"
    assert all((checkpoint / name).is_file() for name in HEAD_FILES)
    [resumed] = distil_students(small_dataset, tiny_m3_cache, teacher=teacher, students=[[0, 3]], training=training,
                               out_dir=tmp_path / "resumed", resume=True, show_progress=False)
    assert resumed.metadata["training"]["resumed_from_step"] == 4
    assert resumed.metadata["training"]["best_step"] == straight.metadata["training"]["best_step"]
    a, b = M3Heads.load(straight.path), M3Heads.load(resumed.path)
    for name, value in a.state_dict().items():
        assert torch.allclose(value, b.state_dict()[name], atol=1e-6), name
