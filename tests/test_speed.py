"""Speed figures: the models take turns, every turn spans enough time, and the report says median, spread and
whether a speed-up is believable. Timed with fake clocks and fake models: nothing here depends on this machine."""

from __future__ import annotations

import pytest
import torch

from m3distill.config import SpeedConfig
from m3distill.evaluation.speed import (
    interleaved_throughput,
    is_suspect_speedup,
    measure_speed,
    speed_figures,
    speedup_limit,
    spread,
)
from m3distill.metrics import (
    LAYER_RATIO,
    MEMORY_MEASURE,
    PARAMETERS,
    SECONDS_PER_RUN,
    SPEEDUP,
    SPEEDUP_MAX,
    SPEEDUP_MIN,
    SPEEDUP_SUSPECT,
    TEXTS_PER_S,
    TEXTS_PER_S_MAX,
    TEXTS_PER_S_MIN,
)


class FakeClock:
    """A clock that only moves when a fake encoder says its work took time."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _encoders(clock: FakeClock, seconds_per_call: dict[str, float], calls: list[str], texts_per_call: int = 10):
    def encoder(label: str):
        def encode() -> int:
            calls.append(label)
            clock.now += seconds_per_call[label]
            return texts_per_call

        return encode

    return {label: encoder(label) for label in seconds_per_call}


def test_models_take_turns_in_every_repeat():
    clock, calls = FakeClock(), []
    encoders = _encoders(clock, {"teacher": 1.0, "s1": 1.0, "s2": 1.0}, calls)
    interleaved_throughput(encoders, repeats=3, min_seconds=0, clock=clock)
    assert calls == ["teacher", "s1", "s2"] * 3


def test_a_turn_encodes_again_until_it_has_lasted_the_minimum():
    clock, calls = FakeClock(), []
    # Powers of two keep the fake clock's sums exact.
    encoders = _encoders(clock, {"teacher": 0.5, "student": 0.125}, calls)
    throughput = interleaved_throughput(encoders, repeats=2, min_seconds=1.0, clock=clock)
    assert calls == (["teacher"] * 2 + ["student"] * 8) * 2
    assert throughput == {"teacher": [20.0, 20.0], "student": [80.0, 80.0]}


def test_a_turn_runs_at_least_once_and_never_divides_by_a_zero_reading():
    clock, calls = FakeClock(), []
    # The first call reads 0 s (a timer coarser than the work): the turn goes on until time has passed.
    durations = iter([0.0, 0.25])

    def encode() -> int:
        calls.append("fast")
        clock.now += next(durations)
        return 5

    assert interleaved_throughput({"fast": encode}, repeats=1, min_seconds=0, clock=clock) == {"fast": [40.0]}
    assert calls == ["fast", "fast"]


def test_median_and_spread():
    assert spread([3.0, 1.0, 2.0]) == spread([1.0, 2.0, 3.0])
    figures = spread([40.0, 10.0, 20.0])
    assert (figures.median, figures.low, figures.high) == (20.0, 10.0, 40.0)
    assert spread([1.0, 3.0]).median == 2.0  # an even count: the mean of the middle two
    with pytest.raises(ValueError, match="at least one repeat"):
        spread([])


def test_speed_ups_pair_each_repeat_with_the_teachers_same_repeat():
    # Repeat 3 was fast for everyone (a quiet machine): paired ratios cancel that out.
    throughput = {"teacher": [10.0, 20.0, 40.0], "student": [30.0, 50.0, 200.0]}
    figures = speed_figures(throughput, "teacher", {"teacher": 6, "student": 2}, n_texts=100)
    student, teacher = figures["student"], figures["teacher"]
    assert (student[TEXTS_PER_S], student[TEXTS_PER_S_MIN], student[TEXTS_PER_S_MAX]) == (50.0, 30.0, 200.0)
    assert student[SECONDS_PER_RUN] == 2.0
    # Ratios 3, 2.5 and 5: the median is 3, not the ratio of the medians (50 / 20 = 2.5).
    assert (student[SPEEDUP], student[SPEEDUP_MIN], student[SPEEDUP_MAX]) == (3.0, 2.5, 5.0)
    assert (teacher[SPEEDUP], teacher[SPEEDUP_MIN], teacher[SPEEDUP_MAX]) == (1.0, 1.0, 1.0)
    assert student[LAYER_RATIO] == 3.0 and student[SPEEDUP_SUSPECT] is False
    assert LAYER_RATIO not in teacher and SPEEDUP_SUSPECT not in teacher


def test_a_speed_up_above_the_layer_ratio_is_suspect():
    # The demo's figure: a 1-layer student at 6.97x a 6-layer teacher.
    throughput = {"teacher": [41.0], "student-1L": [41.0 * 6.97], "student-3L": [41.0 * 1.9]}
    figures = speed_figures(throughput, "teacher", {"teacher": 6, "student-1L": 1, "student-3L": 3}, n_texts=256)
    assert figures["student-1L"][SPEEDUP_SUSPECT] is True and figures["student-1L"][LAYER_RATIO] == 6.0
    assert figures["student-3L"][SPEEDUP_SUSPECT] is False
    assert speedup_limit(6, 2) == 3.0 and speedup_limit(None, 2) is None and speedup_limit(6, 0) is None
    assert is_suspect_speedup(3.01, 3.0) and not is_suspect_speedup(3.0, 3.0)
    assert not is_suspect_speedup(100.0, None) and not is_suspect_speedup(None, 3.0)


def test_repeats_of_different_lengths_are_refused():
    with pytest.raises(ValueError, match="time them together"):
        speed_figures({"teacher": [1.0, 2.0], "student": [3.0]}, "teacher", {}, n_texts=1)


class FakeModel(torch.nn.Module):
    """Enough of a SentenceTransformer for measure_speed: encode() records its calls."""

    def __init__(self, name: str, calls: list[tuple[str, int]]) -> None:
        super().__init__()
        self.name, self.calls = name, calls
        self.weight = torch.nn.Parameter(torch.zeros(3, 2))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def encode(self, texts, batch_size, show_progress_bar):
        self.calls.append((self.name, len(texts)))


def test_measure_speed_warms_every_model_up_before_the_timed_turns():
    calls: list[tuple[str, int]] = []
    models = {name: FakeModel(name, calls) for name in ("teacher", "s1", "s2")}
    config = SpeedConfig(n_texts=8, batch_size=2, repeats=2, warmup_batches=1, min_seconds_per_repeat=0)
    metrics = measure_speed(models, ["text"] * 8, config, teacher="teacher", layers={"teacher": 4, "s1": 2, "s2": 1})
    untimed = [(name, n) for name in ("teacher", "s1", "s2") for n in (2, 8)]  # warm-up batch, then memory pass
    assert calls == untimed + [("teacher", 8), ("s1", 8), ("s2", 8)] * 2
    assert list(metrics) == ["teacher", "s1", "s2"]
    assert metrics["s1"][PARAMETERS] == 6 and metrics["s1"][MEMORY_MEASURE]
    assert metrics["teacher"][SPEEDUP] == 1.0 and metrics["s2"][LAYER_RATIO] == 4.0
    assert all(metrics[name][TEXTS_PER_S] > 0 for name in models)
    with pytest.raises(ValueError, match="not among the timed models"):
        measure_speed(models, ["text"], config, teacher="nobody", layers={})
