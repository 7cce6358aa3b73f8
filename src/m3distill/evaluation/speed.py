"""Throughput, size and memory of a model, measured the same way for the teacher and every student.

Policy: the same texts for every model (test texts, repeated to ``n_texts``), the same device, and
``SentenceTransformer.encode`` with ``batch_size`` texts per batch (encode sorts texts by length before batching,
so batches hold texts of similar length), tokenisation included. Each model first runs ``warmup_batches`` batches
and then one pass over the texts untimed; that pass measures its memory (a runtime that keeps what a pass
allocated, onnxruntime's CPU arena, makes the pass come first). Then come ``repeats`` timed repeats in
which the models take turns in a fixed order (teacher, student 1, student 2, ..., then again): a slow-down of the
machine (another process, thermal throttling) hits every model of a repeat alike instead of whichever model
happened to run then. In its turn a model encodes the texts again and again until at least
``min_seconds_per_repeat`` have passed, so every timing spans seconds, not milliseconds.

Reported per model: the median texts/s over the repeats and its min and max; the speed-up over the teacher is the
median of each repeat's ratio of the model's texts/s to the teacher's in the same repeat (paired, so a busy
repeat cancels out), with its min and max. A student with a fraction of the teacher's layers cannot be faster than
the layer ratio (teacher layers / student layers: embeddings, tokenisation and pooling cost the same for both), so
a median speed-up above it is flagged as suspect: the timing was disturbed.

Models need not be sentence-transformers: anything wrapped in a :class:`TimedModel` (how it encodes, where it runs,
what it weighs, which runtime runs it) takes its turns alike, e.g. a student's ONNX export on onnxruntime
(:func:`timed_onnx_encoder`). The layer-ratio check compares models of the teacher's runtime only: another runtime
(onnxruntime's fused kernels, int8 matrix products) can honestly beat the layer ratio. A model on another device
than the teacher (ONNX on the CPU while the teacher runs on a GPU) gets its texts/s but no speed-up: that ratio
would compare the hardware, not the models.

Memory is the extra memory encoding needs on top of the loaded model, labelled with how it was measured:
``cuda_max_allocated_increase`` (``torch.cuda.max_memory_allocated`` during encoding minus the allocation before)
on a GPU, ``cpu_rss_sampled_increase`` (peak resident set size sampled every few milliseconds with psutil, minus
the size before, once freed memory is handed back to the OS with glibc's ``malloc_trim``) on a CPU, or
``cpu_maxrss_increase`` (the process's ``ru_maxrss`` high-water mark growth; 0 when an earlier peak was higher)
when psutil is missing. Weights are reported separately (``speed_weights_bytes``).
"""

from __future__ import annotations

import logging
import platform
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from tqdm.auto import tqdm

from m3distill.config import SpeedConfig
from m3distill.metrics import (
    TEXTS_PER_S,
    TEXTS_PER_S_MIN,
    TEXTS_PER_S_MAX,
    SPEEDUP,
    SPEEDUP_MIN,
    SPEEDUP_MAX,
    LAYER_RATIO,
    SPEEDUP_SUSPECT,
    PARAMETERS,
    WEIGHTS_BYTES,
    PEAK_MEMORY,
    MEMORY_MEASURE,
    SECONDS_PER_RUN,
    SPEED_OUTPUTS,
    is_suspect_speedup,
    speedup_limit,
)
from m3distill.m3 import M3Heads, encode_m3
from m3distill.m3_outputs import M3_OUTPUTS
from m3distill.models import local_model_folder

logger = logging.getLogger(__name__)

# Weight files we count as a model's size on disk; a folder's .bin files count only when it has no .safetensors
# (folders converted to safetensors often keep the old .bin beside it).
_SAFE_WEIGHTS = (".safetensors",)
_LEGACY_WEIGHTS = (".bin", ".pt", ".pth")
_SKIPPED_FOLDERS = ("checkpoint", "onnx", "openvino", "runs")

Encoder = Callable[[], int]
"""One unit of timed work: encodes the timed texts once and returns how many texts it encoded."""

TORCH_RUNTIME = "torch"
ONNX_RUNTIME = "onnxruntime"


@dataclass(frozen=True)
class TimedModel:
    """What the speed measurement needs of a model, whatever runs it.

    Attributes:
        encode: ``encode(texts, batch_size)`` encodes the texts and returns once the work is done.
        device: where it runs: memory is measured there, and GPU work is waited for.
        parameters: its parameter count (``None`` when unknown).
        weights_bytes: the bytes its weights take (``None`` when unknown).
        runtime: what runs it (:data:`TORCH_RUNTIME`, :data:`ONNX_RUNTIME`); the layer-ratio check applies only to
            models of the teacher's runtime.
        keeps_memory: its runtime keeps what a pass allocated for the next one (onnxruntime's CPU arena): its
            memory is measured on its first pass, before the warm-up, which would otherwise hide it.
        outputs: what one pass produces: ``("dense",)``, or an M3 model's ``("dense", "sparse", "colbert")``.
    """

    encode: Callable[[list[str], int], object]
    device: torch.device
    parameters: int | None
    weights_bytes: int | None
    runtime: str = TORCH_RUNTIME
    keeps_memory: bool = False
    outputs: tuple[str, ...] = ("dense",)


def timed_sentence_transformer(model: SentenceTransformer, *, max_tokens_per_batch: int | None = None,
                               precision: str = "auto", heads: M3Heads | None = None) -> TimedModel:
    """A sentence-transformers model to time, encoding as the teacher cache does
    (:func:`m3distill.encoding.encode_texts`: fixed batches or a token budget, bf16 on a GPU with ``auto``).

    With ``heads`` (an M3 model's) a pass produces all three outputs at once, as :func:`m3distill.encode_m3` does
    (fixed batches, the model's own precision); the heads' weights count in its parameters and bytes.
    """
    from m3distill.encoding import encode_texts, resolve_precision

    modules = [model] if heads is None else [model, heads]
    parameters = {id(p): p for module in modules for p in module.parameters()}.values()
    plain = max_tokens_per_batch is None and resolve_precision(precision, model.device) == "fp32"

    def encode(texts: list[str], batch_size: int) -> None:
        if heads is not None:
            encode_m3(model, heads, texts, batch_size=batch_size)
        elif plain:  # what encode_texts would do too, without its bookkeeping inside the timed turn
            model.encode(texts, batch_size=batch_size, show_progress_bar=False)
        else:
            encode_texts(model, texts, batch_size=batch_size, max_tokens_per_batch=max_tokens_per_batch,
                         precision=precision)

    return TimedModel(encode=encode, device=torch.device(model.device),
                      parameters=sum(p.numel() for p in parameters),  # shared weights once, as count_parameters
                      weights_bytes=sum(p.numel() * p.element_size() for p in parameters),
                      outputs=M3_OUTPUTS if heads is not None else ("dense",))


def timed_onnx_encoder(encoder, *, parameters: int | None = None, all_outputs: bool = False) -> TimedModel:
    """An ONNX export on onnxruntime's CPU provider (an :class:`m3distill.onnx_serving.OnnxEncoder`) to time.

    Args:
        encoder: the loaded export; its ``weights_bytes`` are its weights.
        parameters: the parameter count of the model it was exported from (an export keeps every parameter, int8
            ones in a quarter of the bytes).
        all_outputs: a pass produces every output the export has (``encode_m3``: an M3 student's three), not the
            dense embeddings alone.
    """
    outputs = tuple(encoder.outputs) if all_outputs else ("dense",)

    def encode(texts: list[str], batch_size: int) -> None:
        if len(outputs) > 1:
            encoder.encode_m3(texts, batch_size=batch_size)
        else:
            encoder.encode(texts, batch_size=batch_size)

    return TimedModel(encode=encode, device=torch.device("cpu"), parameters=parameters,
                      weights_bytes=int(encoder.weights_bytes), runtime=ONNX_RUNTIME, keeps_memory=True,
                      outputs=outputs)


@dataclass(frozen=True)
class Spread:
    """The median of some repeated measurements, and their smallest and largest value."""

    median: float
    low: float
    high: float


def spread(values: Sequence[float]) -> Spread:
    """The median, min and max of ``values`` (at least one)."""
    if not values:
        raise ValueError("no values: measure at least one repeat")
    return Spread(median=statistics.median(values), low=min(values), high=max(values))


def speed_texts(texts: Sequence[str], n_texts: int) -> list[str]:
    """``n_texts`` texts taken from ``texts`` in order, starting over when they run out."""
    if not texts:
        raise ValueError("no texts to time")
    return [texts[i % len(texts)] for i in range(n_texts)]


def interleaved_throughput(
    encoders: Mapping[str, Encoder],
    repeats: int,
    min_seconds: float,
    *,
    clock: Callable[[], float] = time.perf_counter,
    after_turn: Callable[[], None] | None = None,
) -> dict[str, list[float]]:
    """Texts/s of each encoder in each of ``repeats`` repeats, the encoders taking turns in their mapping order.

    Args:
        encoders: label -> one unit of work (see :data:`Encoder`); every unit should encode the same texts.
        repeats: how many times every encoder gets a turn.
        min_seconds: a turn calls its encoder again until at least this many seconds have passed (always once).
        clock: the timer, in seconds.
        after_turn: called after each turn (a progress bar's update).

    Returns label -> one texts/s figure per repeat, in repeat order.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be at least 1, not {repeats}")
    throughput: dict[str, list[float]] = {label: [] for label in encoders}
    for _ in range(repeats):
        for label, encode in encoders.items():
            encoded, started = 0, clock()
            while True:
                encoded += encode()
                elapsed = clock() - started
                # A timer too coarse for one unit reads 0 s: keep going until something was measured.
                if elapsed >= min_seconds and elapsed > 0:
                    break
            throughput[label].append(encoded / elapsed)
            if after_turn is not None:
                after_turn()
    return throughput


def speed_figures(
    throughput: Mapping[str, Sequence[float]],
    teacher: str,
    layers: Mapping[str, int | None],
    n_texts: int,
    *,
    runtimes: Mapping[str, str] | None = None,
    devices: Mapping[str, str] | None = None,
) -> dict[str, dict[str, float | bool | None]]:
    """The timing metrics of every model from its per-repeat texts/s (see :func:`interleaved_throughput`).

    Args:
        throughput: label -> texts/s per repeat; every model has the same number of repeats.
        teacher: the label the speed-ups are relative to.
        layers: label -> transformer layers (``None`` when unknown), for the speed-up limit.
        n_texts: texts in one pass, for the seconds per pass.
        runtimes: label -> what runs the model (all the same runtime when ``None``); a model of another runtime
            than the teacher's is never suspect (see below).
        devices: label -> device type (all the same device when ``None``); a model on another device than the
            teacher's gets no speed-up (``None``).

    Returns label -> ``speed_texts_per_s`` (median) with ``_min``/``_max``, ``speed_seconds_per_run`` (one pass
    at the median rate), ``speed_speedup_vs_teacher`` (median of the per-repeat ratios to the teacher) with
    ``_min``/``_max``, and for every model but the teacher ``speed_layer_ratio`` and ``speed_speedup_suspect``.
    """
    reference = throughput[teacher]
    runtimes, devices = runtimes or {}, devices or {}
    figures: dict[str, dict[str, float | bool | None]] = {}
    for label, runs in throughput.items():
        if len(runs) != len(reference):
            raise ValueError(f"{label} has {len(runs)} repeats and {teacher} {len(reference)}: time them together")
        rate = spread(runs)
        figures[label] = {
            TEXTS_PER_S: rate.median, TEXTS_PER_S_MIN: rate.low, TEXTS_PER_S_MAX: rate.high,
            SECONDS_PER_RUN: n_texts / rate.median, SPEEDUP: None, SPEEDUP_MIN: None, SPEEDUP_MAX: None,
        }
        # A ratio to a teacher on other hardware (a CPU export against a GPU teacher) measures the hardware.
        comparable = devices.get(label) == devices.get(teacher)
        if comparable:
            speedup = spread([mine / theirs for mine, theirs in zip(runs, reference)])
            figures[label].update({SPEEDUP: speedup.median, SPEEDUP_MIN: speedup.low, SPEEDUP_MAX: speedup.high})
        if label != teacher:
            limit = speedup_limit(layers.get(teacher), layers.get(label))
            figures[label][LAYER_RATIO] = limit
            # The layer ratio bounds fewer layers of the same kind on the same runtime. Another runtime can beat
            # it honestly (an ONNX graph with fused kernels, int8 matrix products), so only the teacher's runtime
            # is held to it; its figure is still reported for comparison.
            same_runtime = runtimes.get(label) == runtimes.get(teacher)
            figures[label][SPEEDUP_SUSPECT] = same_runtime and comparable and is_suspect_speedup(
                figures[label][SPEEDUP], limit)
    return figures


def measure_speed(
    models: Mapping[str, SentenceTransformer | TimedModel],
    texts: Sequence[str],
    config: SpeedConfig,
    *,
    teacher: str,
    layers: Mapping[str, int | None],
    show_progress: bool = False,
) -> dict[str, dict[str, float | int | str | bool | None]]:
    """Time every model on ``texts`` together (see the module's policy) and measure its memory and weights.

    Args:
        models: label -> model, already on its device (a :class:`TimedModel`, or a sentence-transformers model);
            the order is the order of the turns.
        texts: the texts every model is timed on, already ``n_texts`` long (see :func:`speed_texts`).
        config: batch size, warm-up batches, repeats and the minimum seconds of a turn.
        teacher: the label of the model speed-ups are relative to.
        layers: label -> transformer layers (``None`` when unknown), for the speed-up limit.
        show_progress: show a progress bar over the turns.

    Returns label -> the metrics of :func:`speed_figures` plus ``speed_peak_memory_increase_bytes``,
    ``speed_memory_measure``, ``speed_parameters`` and ``speed_weights_bytes``.
    """
    if teacher not in models:
        raise ValueError(f"the teacher {teacher!r} is not among the timed models {list(models)}")
    texts = list(texts)
    timed = {label: model if isinstance(model, TimedModel) else timed_sentence_transformer(
                 model, max_tokens_per_batch=config.max_tokens_per_batch, precision=config.precision)
             for label, model in models.items()}
    with tqdm(total=len(timed) * (config.repeats + 1), desc="speed", unit="turn", disable=not show_progress) as bar:
        metrics = {}
        for label, model in timed.items():
            metrics[label] = _warm_up_and_measure_memory(model, texts, config)
            bar.update()
        encoders = {label: _encoder(model, texts, config.batch_size) for label, model in timed.items()}
        throughput = interleaved_throughput(encoders, config.repeats, config.min_seconds_per_repeat,
                                            after_turn=bar.update)
    for label, model in timed.items():
        metrics[label][SPEED_OUTPUTS] = "+".join(model.outputs)
    runtimes = {label: model.runtime for label, model in timed.items()}
    devices = {label: model.device.type for label, model in timed.items()}
    for label, figures in speed_figures(throughput, teacher, layers, len(texts), runtimes=runtimes,
                                        devices=devices).items():
        metrics[label].update(figures)
        versus = ("no speed-up: not on the teacher's device" if figures[SPEEDUP] is None
                  else f"{figures[SPEEDUP]:.2f}x the teacher")
        logger.info("%s: %.1f texts/s (%.1f-%.1f over %d repeats), %s", label, figures[TEXTS_PER_S],
                    figures[TEXTS_PER_S_MIN], figures[TEXTS_PER_S_MAX], config.repeats, versus)
        if figures.get(SPEEDUP_SUSPECT):
            logger.warning("%s: speed-up %.2fx is above the layer ratio %.2fx, which it cannot honestly reach: the "
                           "machine was busy while timing; rerun with more speed.repeats or "
                           "speed.min_seconds_per_repeat", label, figures[SPEEDUP], figures[LAYER_RATIO])
    return metrics


def _warm_up_and_measure_memory(
    model: TimedModel, texts: list[str], config: SpeedConfig
) -> dict[str, float | int | str | bool | None]:
    """Run the warm-up batches, then one untimed pass over ``texts`` that measures the memory encoding needs.

    A model whose runtime keeps what it allocated (``keeps_memory``) is measured on its first pass instead, before
    the warm-up: after it, the memory the pass needs is already held and reads as no increase.
    """
    warmup = texts[: config.warmup_batches * config.batch_size]
    if warmup and not model.keeps_memory:
        model.encode(warmup, config.batch_size)
    with _peak_memory(model.device) as memory:
        model.encode(texts, config.batch_size)
        _synchronize(model.device)  # finished before the memory is read and before the first timed turn starts
    if warmup and model.keeps_memory:
        model.encode(warmup, config.batch_size)
    return {
        PEAK_MEMORY: memory["bytes"],
        MEMORY_MEASURE: memory["measure"],
        PARAMETERS: model.parameters,
        WEIGHTS_BYTES: model.weights_bytes,
    }


def _encoder(model: TimedModel, texts: list[str], batch_size: int) -> Encoder:
    device = model.device

    def encode_once() -> int:
        model.encode(texts, batch_size)
        # GPU work is asynchronous: the pass is done only once the device is.
        _synchronize(device)
        return len(texts)

    return encode_once


def size_on_disk(name_or_path: str | Path) -> int | None:
    """Bytes of the weight files of a model folder (a hub id: its local cache snapshot); ``None`` if not found.

    Counts ``*.safetensors`` (or, in folders without them, ``*.bin``/``*.pt``/``*.pth``), recursively, skipping
    training checkpoints and exported ONNX/OpenVINO copies.
    """
    folder = local_model_folder(name_or_path)
    if folder is None:
        return None
    counted: dict[tuple[int, int], int] = {}  # by (device, inode): a hard-linked file (multi_vector/) counts once
    for directory in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        relative = directory.relative_to(folder).parts
        if any(part.startswith(_SKIPPED_FOLDERS) or part.startswith(".") for part in relative):
            continue
        files = [p for p in directory.iterdir() if p.is_file()]
        weights = [p for p in files if p.suffix in _SAFE_WEIGHTS] or [p for p in files if p.suffix in _LEGACY_WEIGHTS]
        for path in weights:
            stat = path.stat()
            counted[(stat.st_dev, stat.st_ino)] = stat.st_size
    return sum(counted.values())


def device_description(device: str | torch.device) -> str:
    """Human-readable name of ``device``: the GPU's name, or the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"{_cpu_model()} ({torch.get_num_threads()} torch threads)"


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _return_freed_memory() -> None:
    """Hand memory freed by earlier models back to the OS, so this model's encoding shows up as RSS growth.

    Without it glibc keeps the previous model's freed activations in its arenas, the next model reuses them,
    and its increase reads as almost nothing.
    """
    import ctypes
    import ctypes.util
    import gc

    gc.collect()
    libc_name = ctypes.util.find_library("c")
    if platform.system() != "Linux" or not libc_name:
        return
    try:
        ctypes.CDLL(libc_name).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (e.g. musl): nothing to trim
        pass


@contextmanager
def _peak_memory(device: torch.device) -> Iterator[dict]:
    result: dict = {"bytes": 0, "measure": ""}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        yield result
        peak = torch.cuda.max_memory_allocated(device)
        result.update(bytes=int(peak - before), measure="cuda_max_allocated_increase")
        return
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is None:
        import resource

        # ru_maxrss is KiB on Linux (bytes on macOS); the high-water mark only grows past earlier peaks.
        scale = 1 if platform.system() == "Darwin" else 1024
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        yield result
        after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        result.update(bytes=int((after - before) * scale), measure="cpu_maxrss_increase")
        return
    process = psutil.Process()
    _return_freed_memory()
    before = process.memory_info().rss
    peak = [before]
    stop = threading.Event()

    def _sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            stop.wait(0.005)

    sampler = threading.Thread(target=_sample, name="m3distill-rss-sampler", daemon=True)
    sampler.start()
    try:
        yield result
    finally:
        stop.set()
        sampler.join()
    peak[0] = max(peak[0], process.memory_info().rss)
    result.update(bytes=int(peak[0] - before), measure="cpu_rss_sampled_increase")
