"""Speed figures: the models take turns, every turn spans enough time, and the report says median, spread and
whether a speed-up is believable. Timed with fake clocks and fake models: nothing here depends on this machine."""

from __future__ import annotations

import pytest
import torch

from m3distill.config import SpeedConfig
from m3distill.evaluation.speed import (
    ONNX_RUNTIME,
    TORCH_RUNTIME,
    TimedModel,
    interleaved_throughput,
    measure_speed,
    speed_figures,
    spread,
)
from m3distill.metrics import (
    LAYER_RATIO,
    MEMORY_MEASURE,
    PARAMETERS,
    WEIGHTS_BYTES,
    SECONDS_PER_RUN,
    SPEEDUP,
    SPEEDUP_MAX,
    SPEEDUP_MIN,
    SPEEDUP_SUSPECT,
    TEXTS_PER_S,
    TEXTS_PER_S_MAX,
    TEXTS_PER_S_MIN,
    is_suspect_speedup,
    speedup_limit,
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


def test_another_runtime_may_beat_the_layer_ratio_without_being_suspect():
    # An int8 ONNX export of a 2-layer student can honestly run 4x a 6-layer torch teacher (ratio 3): fused kernels
    # and int8 matrix products are not "fewer layers of the same kind". The same figure from torch is suspect.
    throughput = {"teacher": [10.0], "student": [40.0], "student (int8)": [40.0]}
    runtimes = {"teacher": TORCH_RUNTIME, "student": TORCH_RUNTIME, "student (int8)": ONNX_RUNTIME}
    figures = speed_figures(throughput, "teacher", {"teacher": 6, "student": 2, "student (int8)": 2}, n_texts=10,
                            runtimes=runtimes)
    assert figures["student"][SPEEDUP_SUSPECT] is True
    assert figures["student (int8)"][SPEEDUP_SUSPECT] is False
    assert figures["student (int8)"][SPEEDUP] == 4.0 and figures["student (int8)"][LAYER_RATIO] == 3.0


def test_a_model_on_another_device_than_the_teacher_gets_texts_per_s_but_no_speed_up():
    # ONNX on the CPU against a teacher on a GPU: the ratio would compare the hardware.
    throughput = {"teacher": [100.0, 120.0], "student (onnx)": [30.0, 40.0]}
    figures = speed_figures(throughput, "teacher", {"teacher": 6, "student (onnx)": 2}, n_texts=10,
                            runtimes={"teacher": TORCH_RUNTIME, "student (onnx)": ONNX_RUNTIME},
                            devices={"teacher": "cuda", "student (onnx)": "cpu"})
    onnx = figures["student (onnx)"]
    assert (onnx[TEXTS_PER_S], onnx[TEXTS_PER_S_MIN], onnx[TEXTS_PER_S_MAX]) == (35.0, 30.0, 40.0)
    assert onnx[SPEEDUP] is None and onnx[SPEEDUP_MIN] is None and onnx[SPEEDUP_MAX] is None
    assert onnx[SPEEDUP_SUSPECT] is False and figures["teacher"][SPEEDUP] == 1.0


def test_measure_speed_times_anything_that_encodes_in_the_same_turns():
    calls: list[tuple[str, int]] = []

    def onnx_encode(texts, batch_size):
        calls.append(("student (onnx)", len(texts)))

    models = {
        "teacher": FakeModel("teacher", calls),
        "student (onnx)": TimedModel(encode=onnx_encode, device=torch.device("cpu"), parameters=6,
                                     weights_bytes=1234, runtime=ONNX_RUNTIME, keeps_memory=True),
    }
    config = SpeedConfig(n_texts=4, batch_size=2, repeats=2, warmup_batches=1, min_seconds_per_repeat=0)
    metrics = measure_speed(models, ["text"] * 4, config, teacher="teacher",
                            layers={"teacher": 4, "student (onnx)": 4})
    # onnxruntime keeps what a pass allocated: its memory pass comes before its warm-up, or it would read as 0.
    untimed = [("teacher", 2), ("teacher", 4), ("student (onnx)", 4), ("student (onnx)", 2)]
    assert calls == untimed + [("teacher", 4), ("student (onnx)", 4)] * 2
    onnx = metrics["student (onnx)"]
    assert onnx[PARAMETERS] == 6 and onnx[WEIGHTS_BYTES] == 1234 and onnx[MEMORY_MEASURE]
    assert onnx[TEXTS_PER_S] > 0 and onnx[SPEEDUP] > 0 and onnx[SPEEDUP_SUSPECT] is False
    assert metrics["teacher"][WEIGHTS_BYTES] == 6 * 4  # the fake's 3 x 2 float32 parameters


def test_a_token_budget_in_the_speed_settings_times_the_models_through_encode_texts(monkeypatch):
    import m3distill.encoding

    budgets: list[tuple[str, int | None, str]] = []

    def recording_encode_texts(model, texts, *, batch_size, max_tokens_per_batch=None, precision="auto", **_):
        budgets.append((model.name, max_tokens_per_batch, precision))

    monkeypatch.setattr(m3distill.encoding, "encode_texts", recording_encode_texts)
    calls: list[tuple[str, int]] = []
    models = {name: FakeModel(name, calls) for name in ("teacher", "s1")}
    config = SpeedConfig(n_texts=4, batch_size=2, repeats=1, warmup_batches=0, min_seconds_per_repeat=0,
                         max_tokens_per_batch=64, precision="fp32")
    measure_speed(models, ["text"] * 4, config, teacher="teacher", layers={"teacher": 2, "s1": 1})
    assert budgets and set(budgets) == {("teacher", 64, "fp32"), ("s1", 64, "fp32")}
    assert calls == []  # nothing went through the plain fixed-batch encode
