"""The shared foundation: config loading, atomic writes, layer plans, students, the dataset contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer

from m3distill.atomic import atomic_dir, write_json_atomic
from m3distill.cli import main
from m3distill.config import M3DistillConfig, apply_overrides, load_config
from m3distill.data.dataset import load_synth_dataset
from m3distill.errors import M3DistillError
from m3distill.models import load_sentence_transformer, num_layers
from m3distill.students.build import build_student
from m3distill.students.layer_plan import parse_layer_list, plan_layers, validate_layers


def test_empty_config_is_the_bge_m3_default(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    config = load_config(path)
    assert config.teacher.model == "BAAI/bge-m3"
    assert config.students.layers == [8, 6, 4]
    assert config.evaluation.k == [10, 20, 30, 40, 50]


def test_config_typo_is_a_clear_error(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("teacher:\n  modle: x\n", encoding="utf-8")
    with pytest.raises(M3DistillError, match=r"teacher\.modle"):
        load_config(path)


def test_overrides_replace_single_fields_and_skip_none():
    config = apply_overrides(M3DistillConfig(), {"teacher.model": "some/model", "training.epochs": None})
    assert config.teacher.model == "some/model"
    assert config.training.epochs == M3DistillConfig().training.epochs
    with pytest.raises(M3DistillError, match="overlap_tokens"):
        apply_overrides(config, {"synth.overlap_tokens": 300, "synth.max_tokens": 256})


def test_atomic_dir_leaves_nothing_when_interrupted(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            write_json_atomic(tmp / "a.json", {"x": 1})
            raise RuntimeError("killed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []
    with atomic_dir(target) as tmp:
        write_json_atomic(tmp / "a.json", {"x": 1})
    assert (target / "a.json").read_text() == '{\n  "x": 1\n}\n'


@pytest.mark.parametrize(
    ("teacher", "student", "strategy", "expected"),
    [
        (24, 8, "uniform", [0, 3, 6, 9, 12, 15, 18, 21]),
        (24, 6, "uniform", [0, 4, 8, 12, 16, 20]),
        (24, 4, "uniform", [0, 6, 12, 18]),
        (6, 3, "uniform", [0, 2, 4]),
        (6, 1, "uniform", [0]),
        (6, 2, "first", [0, 1]),
        (6, 2, "last", [4, 5]),
        (6, 6, "uniform", [0, 1, 2, 3, 4, 5]),
        (24, 8, "spread", [0, 3, 7, 10, 13, 16, 20, 23]),
        (24, 6, "spread", [0, 5, 9, 14, 18, 23]),
        (24, 4, "spread", [0, 8, 15, 23]),
        (6, 3, "spread", [0, 2, 5]),
        (6, 2, "spread", [0, 5]),
        (6, 1, "spread", [5]),
        (6, 6, "spread", [0, 1, 2, 3, 4, 5]),
    ],
)
def test_layer_plans(teacher, student, strategy, expected):
    assert plan_layers(teacher, student, strategy) == expected


@pytest.mark.parametrize(
    ("layers", "message"),
    [([], "at least one"), ([0, 0], "repeats"), ([0, 6], "out of range"), ([-1], "out of range"),
     ([2, 1], "increasing"), (list(range(7)), "only 6")],
)
def test_bad_layer_lists_are_clear_errors(layers, message):
    with pytest.raises(M3DistillError, match=message):
        validate_layers(layers, 6)


def test_plan_refuses_more_layers_than_the_teacher():
    with pytest.raises(M3DistillError, match="cannot be cut"):
        plan_layers(6, 7)
    with pytest.raises(M3DistillError, match="comma-separated"):
        parse_layer_list("1,two")


def test_student_holds_exactly_the_chosen_teacher_layers(minilm_teacher, tmp_path):
    student = build_student(minilm_teacher, [0, 2, 4])
    assert num_layers(student) == 3 and num_layers(minilm_teacher) == 6
    teacher_layers = minilm_teacher[0].auto_model.encoder.layer
    student_layers = student[0].auto_model.encoder.layer
    for new, old in enumerate([0, 2, 4]):
        teacher_state, student_state = teacher_layers[old].state_dict(), student_layers[new].state_dict()
        assert teacher_state.keys() == student_state.keys()
        assert all(torch.equal(teacher_state[key], student_state[key]) for key in teacher_state)
        assert student_layers[new] is not teacher_layers[old]  # a copy: training the student leaves the teacher
    # Embeddings and pooling are the teacher's too.
    assert torch.equal(
        student[0].auto_model.embeddings.word_embeddings.weight, minilm_teacher[0].auto_model.embeddings.word_embeddings.weight
    )
    student.save(str(tmp_path / "student"))
    reloaded = SentenceTransformer(str(tmp_path / "student"), device="cpu")
    texts = ["a small test", "ein kleiner Test"]
    np.testing.assert_allclose(reloaded.encode(texts), student.encode(texts), atol=1e-6)
    assert reloaded[0].auto_model.config.num_hidden_layers == 3


def test_xlmr_stand_in_has_bge_m3_pooling_and_cuts(tiny_xlmr_path):
    model = load_sentence_transformer(tiny_xlmr_path, device="cpu")
    assert type(model[0].auto_model).__name__ == "XLMRobertaModel"
    assert model[1].get_config_dict()["pooling_mode"] == "cls"
    embedding = model.encode(["hello"])
    assert np.isclose(np.linalg.norm(embedding), 1.0, atol=1e-5)
    assert num_layers(build_student(model, [0, 3])) == 2


def test_missing_model_is_one_clear_error(tmp_path):
    with pytest.raises(M3DistillError, match="not found"):
        load_sentence_transformer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(M3DistillError, match="not a sentence-transformers model"):
        load_sentence_transformer(tmp_path / "empty")
    with pytest.raises(M3DistillError, match="hub"):
        load_sentence_transformer("no-such-org/no-such-model-xyz")


def test_small_dataset_fixture_follows_the_contract(small_dataset):
    dataset = load_synth_dataset(small_dataset)
    assert set(dataset.contexts["split"]) == {"train", "dev", "test"}
    merged = dataset.questions.merge(dataset.contexts[["context_id", "split"]], on="context_id", suffixes=("", "_c"))
    assert (merged["split"] == merged["split_c"]).all()
    assert len(dataset.texts(["test"])) > 0


def test_incomplete_dataset_is_refused(tmp_path):
    (tmp_path / "d").mkdir()
    with pytest.raises(M3DistillError, match="not a complete"):
        load_synth_dataset(tmp_path / "d")


def test_cli_without_command_prints_help(capsys):
    assert main([]) == 2
    assert "synth" in capsys.readouterr().out
