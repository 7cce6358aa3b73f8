"""The layer-selection rule: which of the teacher's layers a student keeps. Written here once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from m3distill.config import StudentsConfig
from m3distill.errors import M3DistillError
from m3distill.layout import student_name

FIXED_STRATEGIES = ("spread", "uniform", "first", "last")


@dataclass(frozen=True)
class LayerPlan:
    """One student to build.

    Attributes:
        n_layers: how many teacher layers the student keeps.
        strategy: ``uniform``, ``first``, ``last``, ``explicit`` or ``search``.
        layers: the 0-based teacher layers kept, in order; ``None`` while a search has yet to choose them.
    """

    n_layers: int
    strategy: str
    layers: tuple[int, ...] | None

    @property
    def name(self) -> str:
        """The student's folder name (see :func:`m3distill.layout.student_name`)."""
        return student_name(self.layers if self.layers is not None else tuple(range(self.n_layers)))


def plan_layers(n_teacher_layers: int, n_layers: int, strategy: str = "uniform") -> list[int]:
    """0-based teacher layers a student of ``n_layers`` keeps.

    Args:
        n_teacher_layers: layers in the teacher (24 for bge-m3, 6 for all-MiniLM-L6-v2).
        n_layers: layers the student keeps; at most ``n_teacher_layers``.
        strategy: ``spread`` (evenly spaced from the first layer to the last, both kept: 24 -> 8 gives 0, 3, 7,
            10, 13, 16, 20, 23; a 1-layer student keeps the last layer), ``uniform`` (evenly spaced from the first
            layer, the last one dropped: 24 -> 8 gives 0, 3, ..., 21), ``first`` (the bottom ``n_layers``) or
            ``last`` (the top ``n_layers``). ``search`` is not a fixed rule: see :mod:`m3distill.students.search`.

    ``spread`` is the default because keeping the teacher's last layer keeps its output space: on the sample
    corpus a 2-of-6-layer MiniLM student that kept layers 0 and 5 agreed with the teacher's top-10 on 0.65 of
    results where layers 0 and 3 gave 0.56, with the same recipe and budget (benchmarks/fidelity.py).
    """
    if n_teacher_layers < 1:
        raise M3DistillError(f"the teacher has {n_teacher_layers} layers; nothing to keep")
    if not 1 <= n_layers <= n_teacher_layers:
        raise M3DistillError(
            f"a student of {n_layers} layers cannot be cut from a {n_teacher_layers}-layer teacher "
            f"(choose 1..{n_teacher_layers})"
        )
    if strategy == "spread":
        if n_layers == 1:
            return [n_teacher_layers - 1]
        return [round(i * (n_teacher_layers - 1) / (n_layers - 1)) for i in range(n_layers)]
    if strategy == "uniform":
        return [i * n_teacher_layers // n_layers for i in range(n_layers)]
    if strategy == "first":
        return list(range(n_layers))
    if strategy == "last":
        return list(range(n_teacher_layers - n_layers, n_teacher_layers))
    raise M3DistillError(f"unknown layer strategy {strategy!r}; choose one of {', '.join(FIXED_STRATEGIES)} or search")


def validate_layers(layers: Sequence[int], n_teacher_layers: int) -> list[int]:
    """Check an explicit layer list against the teacher and return it as a list.

    Raises :class:`M3DistillError` for an empty list, duplicates, layers out of range, lists that are not
    increasing, or more layers than the teacher has.
    """
    layers = [int(layer) for layer in layers]
    if not layers:
        raise M3DistillError("a layer list must keep at least one layer")
    if len(layers) > n_teacher_layers:
        raise M3DistillError(f"{len(layers)} layers requested but the teacher has only {n_teacher_layers}")
    if len(set(layers)) != len(layers):
        raise M3DistillError(f"layer list {layers} repeats a layer")
    bad = [layer for layer in layers if not 0 <= layer < n_teacher_layers]
    if bad:
        raise M3DistillError(
            f"layer(s) {bad} out of range: the teacher's layers are 0..{n_teacher_layers - 1} (0-based)"
        )
    if layers != sorted(layers):
        raise M3DistillError(f"layer list {layers} must be in increasing order (the student keeps the teacher's order)")
    return layers


def parse_layer_list(text: str) -> list[int]:
    """Parse ``"0,2,4"`` into ``[0, 2, 4]`` with a clear error for anything else."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError as error:
        raise M3DistillError(f"cannot read layer list {text!r}: expected comma-separated integers like 0,2,4") from error


def resolve_layer_plans(students: StudentsConfig, n_teacher_layers: int) -> list[LayerPlan]:
    """One :class:`LayerPlan` per student asked for by ``students``, checked against the teacher.

    Args:
        students: the config section: ``explicit`` layer lists (they win), else ``layers`` counts with ``strategy``.
        n_teacher_layers: the teacher's layer count.

    Raises:
        M3DistillError: a plan the teacher cannot serve, or two students that would share a folder name.
    """
    if students.explicit:
        plans = [
            LayerPlan(len(layers), "explicit", tuple(validate_layers(layers, n_teacher_layers)))
            for layers in students.explicit
        ]
    elif students.strategy == "search":
        for count in students.layers:
            plan_layers(n_teacher_layers, count)  # the same range check as the fixed strategies
        plans = [LayerPlan(count, "search", None) for count in students.layers]
    else:
        plans = [
            LayerPlan(count, students.strategy, tuple(plan_layers(n_teacher_layers, count, students.strategy)))
            for count in students.layers
        ]
    ensure_distinct_names(plans)
    return plans


def planned_student_names(students: StudentsConfig) -> list[str]:
    """Folder names of the students ``students`` asks for, without loading the teacher (names need counts only)."""
    if students.explicit:
        return [student_name(layers) for layers in students.explicit]
    return [student_name(tuple(range(count))) for count in students.layers]


def ensure_distinct_names(plans: Sequence[LayerPlan]) -> None:
    """Raise :class:`M3DistillError` when two plans would write the same student folder."""
    names = [plan.name for plan in plans]
    clashing = sorted({name for name in names if names.count(name) > 1})
    if clashing:
        raise M3DistillError(
            f"two students would share the folder {clashing[0]}: students are named by their layer count, "
            "so ask for each count once"
        )
