"""Layer plans from the config, and the search that scores candidate plans against the teacher."""

from __future__ import annotations

import math

import numpy as np
import pytest

from m3distill.config import StudentsConfig
from m3distill.data.dataset import load_synth_dataset
from m3distill.errors import M3DistillError
from m3distill.models import load_sentence_transformer
from m3distill.students.build import build_student
from m3distill.students.layer_plan import (
    LayerPlan,
    plan_layers,
    planned_student_names,
    resolve_layer_plans,
)
from m3distill.students.search import SearchSettings, candidate_plans, search_layer_plan


def test_plans_follow_the_strategy_or_the_explicit_lists():
    assert resolve_layer_plans(StudentsConfig(layers=[8, 6, 4]), 24) == [
        LayerPlan(8, "spread", (0, 3, 7, 10, 13, 16, 20, 23)),
        LayerPlan(6, "spread", (0, 5, 9, 14, 18, 23)),
        LayerPlan(4, "spread", (0, 8, 15, 23)),
    ]
    assert resolve_layer_plans(StudentsConfig(layers=[8], strategy="uniform"), 24) == [
        LayerPlan(8, "uniform", (0, 3, 6, 9, 12, 15, 18, 21)),
    ]
    assert resolve_layer_plans(StudentsConfig(layers=[2], strategy="last"), 6) == [LayerPlan(2, "last", (4, 5))]
    explicit = StudentsConfig(layers=[3], explicit=[[0, 5], [1, 2, 3]])
    assert [plan.layers for plan in resolve_layer_plans(explicit, 6)] == [(0, 5), (1, 2, 3)]
    searched = resolve_layer_plans(StudentsConfig(layers=[3, 1], strategy="search"), 6)
    assert [(plan.layers, plan.name) for plan in searched] == [(None, "student-3L"), (None, "student-1L")]
    assert planned_student_names(StudentsConfig(layers=[3, 1], strategy="search")) == ["student-3L", "student-1L"]
    assert planned_student_names(explicit) == ["student-2L", "student-3L"]


@pytest.mark.parametrize(
    ("students", "message"),
    [
        (StudentsConfig(layers=[7]), "cannot be cut from a 6-layer teacher"),
        (StudentsConfig(layers=[7], strategy="search"), "cannot be cut"),
        (StudentsConfig(explicit=[[0, 6]]), "out of range"),
        (StudentsConfig(explicit=[[2, 1]]), "increasing"),
        (StudentsConfig(layers=[2, 2]), "share the folder student-2L"),
        (StudentsConfig(explicit=[[0, 1], [2, 3]]), "share the folder student-2L"),
    ],
)
def test_plans_the_teacher_cannot_serve_are_clear_errors(students, message):
    with pytest.raises(M3DistillError, match=message):
        resolve_layer_plans(students, 6)


@pytest.mark.parametrize(("teacher", "student"), [(6, 3), (6, 1), (24, 8), (4, 4), (5, 4)])
def test_candidates_are_distinct_valid_plans_led_by_the_fixed_strategies(teacher, student):
    plans = candidate_plans(teacher, student, 6)
    assert len(plans) == min(6, math.comb(teacher, student))
    assert len({tuple(plan) for plan in plans}) == len(plans)
    assert all(len(plan) == student and plan == sorted(plan) and 0 <= plan[0] and plan[-1] < teacher for plan in plans)
    assert plans[0] == plan_layers(teacher, student, "spread")  # the default strategy first
    assert [i * teacher // student for i in range(student)] in plans  # then uniform


def test_search_keeps_the_candidate_closest_to_the_teacher(small_dataset, tiny_xlmr_path):
    teacher = load_sentence_transformer(tiny_xlmr_path, device="cpu")
    texts = load_synth_dataset(small_dataset).texts(["dev"])[:40]
    target = teacher.encode(texts)
    result = search_layer_plan(teacher, 2, dev_texts=texts, dev_embeddings=target, settings=SearchSettings(n_candidates=4))
    assert len(result.candidates) == 4
    # Independent reference: cut each candidate, encode, and measure the MSE by hand.
    by_hand = {}
    for candidate in result.candidates:
        predicted = build_student(teacher, list(candidate.layers)).encode(texts)
        by_hand[candidate.layers] = float(np.mean((predicted - target) ** 2))
        assert candidate.mse == pytest.approx(by_hand[candidate.layers], rel=1e-5)
    assert result.best == min(by_hand, key=by_hand.get)
    assert result.to_dict()["candidates"][0]["layers"] == list(result.best)


def test_search_steps_train_each_candidate_first(small_dataset, tiny_xlmr_path):
    teacher = load_sentence_transformer(tiny_xlmr_path, device="cpu")
    dataset = load_synth_dataset(small_dataset)
    dev, train = dataset.texts(["dev"])[:30], dataset.texts(["train"])[:64]
    weights_before = {name: value.clone() for name, value in teacher.state_dict().items()}
    untrained = search_layer_plan(teacher, 1, dev_texts=dev, dev_embeddings=teacher.encode(dev),
                                  settings=SearchSettings(n_candidates=2))
    trained = search_layer_plan(teacher, 1, dev_texts=dev, dev_embeddings=teacher.encode(dev), train_texts=train,
                                train_embeddings=teacher.encode(train),
                                settings=SearchSettings(n_candidates=2, steps=5, batch_size=8, learning_rate=1e-3))
    assert trained.steps == 5
    before = {score.layers: score.mse for score in untrained.candidates}
    assert all(score.mse != before[score.layers] for score in trained.candidates)
    assert all(value.equal(weights_before[name]) for name, value in teacher.state_dict().items())  # teacher untouched
