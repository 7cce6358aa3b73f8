"""Throughput, size and memory of a model, measured the same way for the teacher and every student.

Policy: the same texts for every model (test texts, repeated to ``n_texts``), the same device, and
``SentenceTransformer.encode`` with ``batch_size`` texts per batch (encode sorts texts by length before batching,
so batches hold texts of similar length). ``warmup_batches`` batches run untimed first; each of ``repeats`` timed
runs encodes all texts, tokenisation included; texts/s is ``n_texts`` over the median run time.

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
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from m3distill.config import SpeedConfig
from m3distill.teacher.loading import count_parameters, local_model_folder

logger = logging.getLogger(__name__)

SPEED_PREFIX = "speed"
TEXTS_PER_S = f"{SPEED_PREFIX}_texts_per_s"
SPEEDUP = f"{SPEED_PREFIX}_speedup_vs_teacher"
PARAMETERS = f"{SPEED_PREFIX}_parameters"
WEIGHTS_BYTES = f"{SPEED_PREFIX}_weights_bytes"
SIZE_ON_DISK = f"{SPEED_PREFIX}_size_on_disk_bytes"
PEAK_MEMORY = f"{SPEED_PREFIX}_peak_memory_increase_bytes"
MEMORY_MEASURE = f"{SPEED_PREFIX}_memory_measure"
SECONDS_PER_RUN = f"{SPEED_PREFIX}_seconds_per_run"

# Weight files we count as a model's size on disk; a folder's .bin files count only when it has no .safetensors
# (folders converted to safetensors often keep the old .bin beside it).
_SAFE_WEIGHTS = (".safetensors",)
_LEGACY_WEIGHTS = (".bin", ".pt", ".pth")
_SKIPPED_FOLDERS = ("checkpoint", "onnx", "openvino", "runs")


def speed_texts(texts: Sequence[str], n_texts: int) -> list[str]:
    """``n_texts`` texts taken from ``texts`` in order, starting over when they run out."""
    if not texts:
        raise ValueError("no texts to time")
    return [texts[i % len(texts)] for i in range(n_texts)]


def measure_speed(
    model: SentenceTransformer, texts: Sequence[str], config: SpeedConfig
) -> dict[str, float | int | str]:
    """Encode ``texts`` (already ``n_texts`` long) ``config.repeats`` times and report throughput and memory.

    Args:
        model: the model to time, already on its device.
        texts: the texts every model is timed on (see :func:`speed_texts`).
        config: batch size, warm-up batches and repeats.

    Returns ``speed_texts_per_s``, ``speed_seconds_per_run`` (the median), ``speed_peak_memory_increase_bytes``
    and ``speed_memory_measure`` (how memory was measured), ``speed_parameters`` and ``speed_weights_bytes``.
    """
    texts = list(texts)
    device = model.device
    warmup = texts[: config.warmup_batches * config.batch_size]
    if warmup:
        model.encode(warmup, batch_size=config.batch_size, show_progress_bar=False)
    durations = []
    with _peak_memory(device) as memory:
        for _ in range(config.repeats):
            _synchronize(device)
            started = time.perf_counter()
            model.encode(texts, batch_size=config.batch_size, show_progress_bar=False)
            _synchronize(device)
            durations.append(time.perf_counter() - started)
    seconds = statistics.median(durations)
    parameters = {id(p): p for p in model.parameters()}.values()
    return {
        TEXTS_PER_S: len(texts) / seconds,
        SECONDS_PER_RUN: seconds,
        PEAK_MEMORY: memory["bytes"],
        MEMORY_MEASURE: memory["measure"],
        PARAMETERS: count_parameters(model),
        WEIGHTS_BYTES: sum(p.numel() * p.element_size() for p in parameters),
    }


def size_on_disk(name_or_path: str | Path) -> int | None:
    """Bytes of the weight files of a model folder (a hub id: its local cache snapshot); ``None`` if not found.

    Counts ``*.safetensors`` (or, in folders without them, ``*.bin``/``*.pt``/``*.pth``), recursively, skipping
    training checkpoints and exported ONNX/OpenVINO copies.
    """
    folder = local_model_folder(name_or_path)
    if folder is None:
        return None
    total = 0
    for directory in [folder, *sorted(p for p in folder.rglob("*") if p.is_dir())]:
        relative = directory.relative_to(folder).parts
        if any(part.startswith(_SKIPPED_FOLDERS) or part.startswith(".") for part in relative):
            continue
        files = [p for p in directory.iterdir() if p.is_file()]
        weights = [p for p in files if p.suffix in _SAFE_WEIGHTS] or [p for p in files if p.suffix in _LEGACY_WEIGHTS]
        total += sum(p.stat().st_size for p in weights)
    return total


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
