"""The distillation loss terms, each checked against a plain-torch computation written here, and the dev top-k
agreement evaluator against numpy exact search."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sentence_transformers.sentence_transformer.losses import MSELoss

from m3distill.config import LossConfig
from m3distill.students.build import build_student
from m3distill.training.dev_set import TeacherTopKEvaluator
from m3distill.training.losses import DistillationLoss

TEXTS = [
    "The cat sat on the mat.",
    "A dog barked at the mailman in the morning.",
    "Quantum computers use qubits.",
    "apt-get installs packages on Debian systems.",
    "Der Hund bellt laut.",
    "Les chats dorment beaucoup.",
]


@pytest.fixture(scope="module")
def batch(minilm_teacher):
    student = build_student(minilm_teacher, [0, 5])
    features = student.preprocess(TEXTS)
    with torch.no_grad():
        teacher = minilm_teacher(dict(features))
    return student, features, teacher["sentence_embedding"], teacher["token_embeddings"]


def _only(**weights) -> LossConfig:
    """A loss config with exactly the given terms (the defaults switch cosine and anchor KL on)."""
    zero = {"mse": 0.0, "cosine": 0.0, "in_batch_kl": 0.0, "anchor_kl": 0.0, "token": 0.0}
    return LossConfig(**{**zero, **weights})


def _loss(student, features, labels, config, **kwargs) -> float:
    with torch.no_grad():
        return float(DistillationLoss(student, config, **kwargs)([dict(features)], labels))


def _student_outputs(student, features):
    with torch.no_grad():
        out = student(dict(features))
    return out["sentence_embedding"], out["token_embeddings"]


def test_mse_alone_is_sentence_transformers_mse_loss(batch):
    student, features, labels, _ = batch
    with torch.no_grad():
        reference = float(MSELoss(student)([dict(features)], labels))
    assert _loss(student, features, labels, _only(mse=1.0)) == pytest.approx(reference, rel=1e-6)


def test_each_term_matches_its_definition_and_terms_add_up(batch, minilm_teacher):
    student, features, labels, teacher_tokens = batch
    embeddings, tokens = _student_outputs(student, features)
    s, t = F.normalize(embeddings, dim=-1), F.normalize(labels, dim=-1)

    def kl(student_scores, teacher_scores, temperature):
        p = torch.softmax(teacher_scores / temperature, -1)
        return float((p * (p.log() - torch.log_softmax(student_scores / temperature, -1))).sum(-1).mean())

    anchors = labels[[0, 2, 4]].numpy() * 3.0  # anchors need not be unit length: the loss normalises them
    bank = F.normalize(torch.as_tensor(anchors), dim=-1)
    mask = features["attention_mask"].unsqueeze(-1).float()
    expected = {
        "cosine": float((1 - (s * t).sum(-1)).mean()),
        "in_batch_kl": kl(s @ s.T, t @ t.T, 0.1),
        "anchor_kl": kl(s @ bank.T, t @ bank.T, 0.02),
        "token": float((((tokens - teacher_tokens) ** 2) * mask).sum() / (mask.sum() * tokens.shape[-1])),
    }
    settings = {"temperature": 0.1, "anchor_temperature": 0.02}
    for term, value in expected.items():
        config = _only(**{term: 1.0}, **settings)
        got = _loss(student, features, labels, config, anchors=anchors, teacher=minilm_teacher)
        assert got == pytest.approx(value, rel=1e-4, abs=1e-7), term
        assert value > 0, term
    mse = float(F.mse_loss(embeddings, labels))
    every = LossConfig(mse=2.0, cosine=0.5, in_batch_kl=0.3, anchor_kl=0.2, token=4.0, **settings)
    total = _loss(student, features, labels, every, anchors=anchors, teacher=minilm_teacher)
    want = 2 * mse + 0.5 * expected["cosine"] + 0.3 * expected["in_batch_kl"] + 0.2 * expected["anchor_kl"] + 4 * expected["token"]
    assert total == pytest.approx(want, rel=1e-4)


def test_a_student_equal_to_the_teacher_has_zero_loss(minilm_teacher):
    student = build_student(minilm_teacher, list(range(6)))
    features = student.preprocess(TEXTS)
    with torch.no_grad():
        labels = minilm_teacher(dict(features))["sentence_embedding"]
    config = LossConfig(mse=1.0, cosine=1.0, in_batch_kl=1.0, anchor_kl=1.0, token=1.0)
    assert _loss(student, features, labels, config, anchors=labels.numpy(), teacher=minilm_teacher) == pytest.approx(
        0.0, abs=1e-5
    )


def test_the_loss_trains_the_student_and_never_the_teacher(batch, minilm_teacher):
    student, features, labels, _ = batch
    student = build_student(minilm_teacher, [0, 5])
    before = {name: value.clone() for name, value in minilm_teacher.state_dict().items()}
    loss = DistillationLoss(student, _only(cosine=1.0, token=1.0), teacher=minilm_teacher)
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    values = []
    for _ in range(4):
        value = loss([student.preprocess(TEXTS)], labels)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()
        values.append(float(value))
    assert values[-1] < values[0]
    assert all(value.equal(before[name]) for name, value in minilm_teacher.state_dict().items())


def test_terms_that_need_more_than_the_labels_say_so(batch):
    student = batch[0]
    with pytest.raises(ValueError, match="anchor"):
        DistillationLoss(student, _only(anchor_kl=1.0))
    with pytest.raises(ValueError, match="online teacher"):
        DistillationLoss(student, _only(token=1.0))
    with pytest.raises(ValueError, match="every loss weight is 0"):
        _only()
    assert (LossConfig().cosine, LossConfig().anchor_kl, LossConfig().mse) == (1.0, 0.0, 0.0)  # the default recipe
    assert (LossConfig().sparse, LossConfig().colbert) == (1.0, 1.0)  # M3 teachers: the heads train by default


def test_teacher_top_k_evaluator_equals_numpy_exact_search(minilm_teacher):
    rng = np.random.default_rng(0)
    corpus = [f"document number {i} about {word}" for i, word in enumerate(rng.choice(
        ["cats", "dogs", "apt", "kernels", "qubits", "bread", "rivers", "opera"], size=40))]
    queries = ["cats and dogs", "linux packages", "quantum", "baking bread", "music"]
    teacher_q, teacher_c = minilm_teacher.encode(queries), minilm_teacher.encode(corpus)
    student = build_student(minilm_teacher, [0, 5])
    evaluator = TeacherTopKEvaluator(queries, teacher_q, corpus, teacher_c, ks=(5, 10), name="dev")

    # Teacher against itself: full agreement.
    assert evaluator(minilm_teacher) == {"dev_teacher_p@5": 1.0, "dev_teacher_p@10": 1.0}

    got = evaluator(student)
    student_q, student_c = student.encode(queries), student.encode(corpus)
    for k in (5, 10):
        teacher_top = np.argsort(-(teacher_q @ teacher_c.T), axis=1)[:, :k]
        student_top = np.argsort(-(student_q @ student_c.T), axis=1)[:, :k]
        reference = np.mean([len(set(a) & set(b)) / k for a, b in zip(teacher_top, student_top)])
        assert got[f"dev_teacher_p@{k}"] == pytest.approx(reference)
    assert got["dev_teacher_p@5"] < 1.0


def test_the_online_teacher_computes_in_the_training_precision(batch, minilm_teacher):
    student, features, labels, _ = batch
    seen: list[torch.dtype | None] = []

    def record(module, inputs):
        seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)

    hook = minilm_teacher[0].register_forward_pre_hook(record)
    try:
        fp32 = _loss(student, features, labels, _only(token=1.0), teacher=minilm_teacher)
        bf16 = _loss(student, features, labels, _only(token=1.0), teacher=minilm_teacher, teacher_precision="bf16")
    finally:
        hook.remove()
    assert seen == [None, torch.bfloat16]  # outside the Trainer's autocast, the loss applies it to the teacher
    assert bf16 == pytest.approx(fp32, rel=0.05) and bf16 != fp32
