"""The whole pipeline in one call: synth -> teacher cache -> students -> evaluation and report.

Each stage reads and writes the run directory (m3distill.layout). A stage is skipped when its outputs are complete
and were made from the same settings; a changed setting, or ``force``, redoes that stage and every later one.

Nothing of the user's is removed: inputs are checked before any output is touched, synth and evaluate replace
their output only once the new one is complete, and the outputs that must be cleared before a redo (teacher cache,
students) are removed only where they carry m3distill's own marker.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m3distill.atomic import write_json_atomic, write_text_atomic
from m3distill.config import M3DistillConfig, config_to_yaml, load_config
from m3distill.data.dataset import is_complete_dataset
from m3distill.errors import M3DistillError
from m3distill.layout import REPORT_JSON_FILE, RunLayout, is_inside
from m3distill.resources import bundled_config, sample_corpus_dir

try:
    import fcntl
except ImportError:  # Windows: runs are not locked there
    fcntl = None

logger = logging.getLogger(__name__)

STAGES = ("synth", "teacher", "train", "evaluate")
_STATE_FILE = "pipeline_state.json"
_LOCK_FILE = ".lock"


@dataclass
class PipelineResult:
    """What a pipeline run did: the report directory and, per stage, "ran" or "skipped" with seconds taken."""

    run_dir: Path
    report_dir: Path
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


def _settings_hash(config: M3DistillConfig, stage: str) -> str:
    """Hash of the settings a stage's outputs depend on (its own section and those of the stages before it)."""
    sections = {
        "synth": ["synth", "teacher.model"],
        "teacher": ["synth", "teacher"],
        "train": ["synth", "teacher", "students", "training"],
        "evaluate": ["synth", "teacher", "students", "training", "evaluation"],
    }[stage]
    dumped = config.model_dump(mode="json")
    picked: dict[str, Any] = {}
    for dotted in sections:
        node: Any = dumped
        for part in dotted.split("."):
            node = node[part]
        picked[dotted] = node
    # Where the run lives is not a setting: moving a run directory must not invalidate it.
    return hashlib.sha256(json.dumps(picked, sort_keys=True).encode()).hexdigest()[:16]


def _load_state(layout: RunLayout) -> dict[str, str]:
    path = layout.root / _STATE_FILE
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return {}


def _validate_force(force: Iterable[str]) -> set[str]:
    force = set(force)
    unknown = force - set(STAGES) - {"all"}
    if unknown:
        raise M3DistillError(f"unknown stage(s) {', '.join(sorted(unknown))} for --force; choose from {', '.join(STAGES)} or all")
    if "all" in force:
        return set(STAGES)
    # Redoing a stage changes the inputs of every later one.
    first = min(STAGES.index(stage) for stage in force) if force else len(STAGES)
    return set(STAGES[first:])


def _stage_complete(stage: str, config: M3DistillConfig, layout: RunLayout) -> bool:
    if stage == "synth":
        return is_complete_dataset(layout.dataset)
    if stage == "teacher":
        from m3distill.teacher.cache import is_complete_cache

        return is_complete_cache(layout.teacher_cache)
    if stage == "train":
        from m3distill.training import planned_students_complete

        return planned_students_complete(config, layout.students)
    return (layout.report / REPORT_JSON_FILE).is_file()


def _output_dirs(layout: RunLayout) -> dict[str, Path]:
    """The folder each stage writes (and may replace) in the run directory."""
    return {"synth": layout.dataset, "teacher": layout.teacher_cache, "train": layout.students, "evaluate": layout.report}


def _check_sources_outside_outputs(config: M3DistillConfig, layout: RunLayout) -> None:
    """Refuse a corpus inside a folder the run replaces or clears: redoing that stage would delete it."""
    for name, source in (("synth.corpus", config.synth.corpus), ("synth.general", config.synth.general)):
        if not source or not Path(source).expanduser().exists():
            continue  # unset, or a hub dataset id
        for stage, output in _output_dirs(layout).items():
            if is_inside(source, output):
                raise M3DistillError(
                    f"{name} {source} lies inside {output}, which the {stage} stage replaces; move it out of "
                    f"{output} (anywhere else, even elsewhere in {layout.root}) or choose another run_dir"
                )


def _check_stage_inputs(stage: str, config: M3DistillConfig, layout: RunLayout) -> None:
    """Refuse to start a stage whose inputs are missing; called before any of its outputs is touched."""
    if stage == "synth":
        if config.synth.corpus is None:
            raise M3DistillError("no corpus configured: set synth.corpus in the config (a file, folder or dataset id)")
        # Whether the corpus itself reads is checked by synthesize, which replaces the dataset only when done.
        return
    if not is_complete_dataset(layout.dataset):
        raise M3DistillError(f"the dataset {layout.dataset} is missing or incomplete; rerun with --force synth")
    if stage == "train":
        from m3distill.teacher.cache import is_complete_cache

        if not is_complete_cache(layout.teacher_cache):
            raise M3DistillError(
                f"the teacher cache {layout.teacher_cache} is missing or incomplete; rerun with --force teacher"
            )


def _remove_outputs(stage: str, layout: RunLayout) -> None:
    """Clear what a redone stage would otherwise resume from, removing only folders m3distill marked as its own.

    synth and evaluate write a complete new output beside the old one and swap it in, so theirs stay until then.
    A folder without m3distill's marker is refused, never removed.
    """
    if stage == "teacher":
        from m3distill.teacher.cache import CACHE_MANIFEST_FILE, CACHE_TEACHER_FILE

        target = layout.teacher_cache
        if not target.exists():
            return
        if not any((target / marker).is_file() for marker in (CACHE_TEACHER_FILE, CACHE_MANIFEST_FILE)):
            raise M3DistillError(
                f"{target} is not a teacher cache m3distill wrote (no {CACHE_TEACHER_FILE}); it is left alone: move "
                "it away or choose another run_dir"
            )
        logger.info("removing %s to redo stage %s", target, stage)
        shutil.rmtree(target)
    elif stage == "train" and layout.students.is_dir():
        from m3distill.training.distill import is_m3distill_student_dir

        for folder in sorted(layout.students.iterdir()):
            if folder.is_dir() and is_m3distill_student_dir(folder):
                logger.info("removing %s to redo stage %s", folder, stage)
                shutil.rmtree(folder)
            else:
                logger.info("leaving %s in place: m3distill did not write it", folder)


def _run_stage(stage: str, config: M3DistillConfig, layout: RunLayout, show_progress: bool) -> None:
    if stage == "synth":
        from m3distill.data.synth import synthesize

        synthesize(config.synth, layout.dataset, tokenizer=config.synth.tokenizer or config.teacher.model,
                   overwrite=True, show_progress=show_progress)
    elif stage == "teacher":
        from m3distill.teacher.cache import build_teacher_cache

        build_teacher_cache(layout.dataset, config.teacher, layout.teacher_cache, show_progress=show_progress)
    elif stage == "train":
        from m3distill.training import train_students

        train_students(layout.dataset, layout.teacher_cache, teacher=config.teacher, students=config.students,
                       training=config.training, out_dir=layout.students, resume=True, show_progress=show_progress)
    else:
        from m3distill.evaluation.evaluate import evaluate_models
        from m3distill.training import completed_student_dirs

        evaluate_models(layout.dataset, config.teacher, completed_student_dirs(layout.students), config.evaluation,
                        layout.report, show_progress=show_progress,
                        teacher_embeddings=lambda texts: _cached_teacher_embeddings(layout, texts))


def _cached_teacher_embeddings(layout: RunLayout, texts: list[str]):
    """The teacher stage's float32 embeddings of ``texts``, or None so that the evaluation encodes them itself.

    The run's settings hashes guarantee the cache was made by this run's teacher; float16 caches are not used
    because the evaluation must see exactly what the teacher computes.
    """
    from m3distill.teacher.cache import TeacherCache

    try:
        cache = TeacherCache.open(layout.teacher_cache)
        if cache.dtype != "float32":
            return None
        return cache.get(texts)
    except M3DistillError as error:
        logger.info("evaluating without the teacher cache: %s", error)
        return None


def run_pipeline(
    config: M3DistillConfig,
    *,
    force: Iterable[str] = (),
    show_progress: bool = True,
    on_stage: Callable[[str, str], None] | None = None,
) -> PipelineResult:
    """Run every stage of ``config`` in its run directory, skipping stages whose outputs are complete and current.

    Args:
        config: the whole run's settings; ``config.run_dir`` is created if needed.
        force: stages to redo even when complete (``synth``, ``teacher``, ``train``, ``evaluate`` or ``all``);
            every later stage is redone too.
        show_progress: show progress bars.
        on_stage: called with (stage, "start" | "skip" | "done") so a CLI can print where it is.

    Raises :class:`M3DistillError` when another process is running a pipeline in the same run directory.
    """
    forced = _validate_force(force)
    layout = RunLayout(config.run_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    with _run_dir_lock(layout):
        return _run_stages(config, layout, forced, show_progress, on_stage)


@contextmanager
def _run_dir_lock(layout: RunLayout) -> Iterator[None]:
    """Hold the run directory for this process: two runs in one directory would delete each other's outputs."""
    if fcntl is None:
        yield
        return
    path = layout.root / _LOCK_FILE
    with open(path, "a+", encoding="utf-8") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise M3DistillError(
                f"run directory {layout.root} is in use by {holder}; wait for it to finish or use another run directory"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"m3distill process {os.getpid()}")
        handle.flush()
        try:
            yield
        finally:
            handle.truncate(0)
            fcntl.flock(handle, fcntl.LOCK_UN)


def _run_stages(config: M3DistillConfig, layout: RunLayout, forced: set[str], show_progress: bool,
                on_stage: Callable[[str, str], None] | None) -> PipelineResult:
    _check_sources_outside_outputs(config, layout)
    write_text_atomic(layout.config, config_to_yaml(config))
    state = _load_state(layout)
    result = PipelineResult(run_dir=layout.root, report_dir=layout.report)
    redo_rest = False
    for stage in STAGES:
        current = _settings_hash(config, stage)
        changed = state.get(stage) not in (None, current)
        if changed:
            logger.info("stage %s: settings changed since the last run; redoing it and the stages after it", stage)
        redo = redo_rest or stage in forced or changed
        if not redo and state.get(stage) == current and _stage_complete(stage, config, layout):
            result.stages[stage] = {"status": "skipped", "seconds": 0.0}
            if on_stage:
                on_stage(stage, "skip")
            continue
        _check_stage_inputs(stage, config, layout)
        # The later stages' outputs stay in place (synth and evaluate keep theirs until the new one is complete), so
        # they must not look current once this stage has changed their inputs, even if this run stops here.
        _forget_stages_after(stage, state, layout)
        if redo:
            _remove_outputs(stage, layout)
            redo_rest = True
        if on_stage:
            on_stage(stage, "start")
        started = time.perf_counter()
        # A stage that was interrupted resumes inside its own code (cache shards, checkpoints, LLM cache).
        _run_stage(stage, config, layout, show_progress)
        state[stage] = current
        write_json_atomic(layout.root / _STATE_FILE, state)
        result.stages[stage] = {"status": "ran", "seconds": round(time.perf_counter() - started, 2)}
        redo_rest = redo_rest or redo
        if on_stage:
            on_stage(stage, "done")
    return result


def _forget_stages_after(stage: str, state: dict[str, str], layout: RunLayout) -> None:
    later = STAGES[STAGES.index(stage) + 1:]
    if any(name in state for name in later):
        for name in later:
            state.pop(name, None)
        write_json_atomic(layout.root / _STATE_FILE, state)


def demo_config(run_dir: str | Path = "m3distill-demo") -> M3DistillConfig:
    """configs/demo.yaml with the corpus pointed at the bundled sample, wherever m3distill is installed."""
    config = load_config(bundled_config("demo.yaml"))
    sample = sample_corpus_dir()
    data = config.model_dump()
    data["run_dir"] = str(run_dir)
    data["synth"]["corpus"] = str(sample / "domain")
    data["synth"]["general"] = str(sample / "general")
    return M3DistillConfig.model_validate(data)


def run_config_file(path: str | Path, *, force: Iterable[str] = (), run_dir: str | None = None,
                    show_progress: bool = True, on_stage: Callable[[str, str], None] | None = None) -> PipelineResult:
    """Load a YAML config and run it; ``run_dir`` overrides the config's."""
    config = load_config(path)
    if run_dir is not None:
        config = config.model_copy(update={"run_dir": run_dir})
    return run_pipeline(config, force=force, show_progress=show_progress, on_stage=on_stage)
