"""The whole pipeline in one call: synth -> teacher cache -> students -> (ONNX export) -> evaluation and report.

A loop over the stages of :mod:`m3distill.stages`, in the run directory (m3distill.layout). Each stage decides
for itself whether its outputs are current (its fingerprint, recorded in them, equals the one computed now from
its settings and what it reads), exactly as it does when run alone: a current stage is skipped, a missing or
unfinished one is made or resumed, a stale one is redone and the line saying why is logged. ``force`` redoes a
stage and every later one.

Nothing of the user's is removed: inputs are checked before any output is touched, synth, train and evaluate
replace an output only once the new one is complete, and the teacher cache is cleared only where it carries
m3distill's own marker.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from m3distill.atomic import write_text_atomic
from m3distill.config import M3DistillConfig, config_to_yaml, load_config
from m3distill.errors import M3DistillError
from m3distill.layout import RunLayout, is_inside
from m3distill.locks import hold_run_dir
from m3distill.resources import bundled_config, sample_corpus_dir
from m3distill.stages import ALL_STAGE_NAMES, STAGE_NAMES, run_stages

if TYPE_CHECKING:
    from m3distill.data.synth import SynthSummary
    from m3distill.stages import EvaluationResult, ExportStageResult, TrainResult
    from m3distill.teacher.cache import CacheSummary

logger = logging.getLogger(__name__)

STAGES = STAGE_NAMES  # every run's stages; ALL_STAGES adds export, which a run has when export.enabled
ALL_STAGES = ALL_STAGE_NAMES


@dataclass(frozen=True)
class StageRun:
    """What the pipeline did with one stage.

    Attributes:
        status: ``ran`` or ``skipped`` (its outputs were current).
        seconds: time the stage took (0 when skipped).
        reason: for a stage redone because its outputs were stale, what changed.
    """

    status: Literal["ran", "skipped"]
    seconds: float = 0.0
    reason: str | None = None

    def __getitem__(self, key: str) -> Any:
        # Read as the mapping it was before it was typed: run.stages["train"]["status"].
        if key not in ("status", "seconds", "reason") or (key == "reason" and self.reason is None):
            raise KeyError(key)
        return getattr(self, key)


@dataclass
class PipelineResult:
    """What a pipeline run did: the report directory and, per stage, what it did (:class:`StageRun`); ``results``
    holds each stage's typed result for the stages that ran."""

    run_dir: Path
    report_dir: Path
    stages: dict[str, StageRun] = field(default_factory=dict)
    results: dict[str, SynthSummary | CacheSummary | TrainResult | ExportStageResult | EvaluationResult] = field(
        default_factory=dict)


def _validate_force(force: Iterable[str], config: M3DistillConfig | None = None) -> set[str]:
    force = set(force)
    unknown = force - set(ALL_STAGES) - {"all"}
    if unknown:
        raise M3DistillError(f"unknown stage(s) {', '.join(sorted(unknown))} for --force; choose from {', '.join(ALL_STAGES)} or all")
    if "export" in force and config is not None and not config.export.enabled:
        raise M3DistillError("--force export: this run has no export stage (export.enabled is false); enable it in "
                             "the config, or export with `m3distill export --force`")
    if "all" in force:
        return set(ALL_STAGES)
    # Redoing a stage changes the inputs of every later one.
    first = min(ALL_STAGES.index(stage) for stage in force) if force else len(ALL_STAGES)
    return set(ALL_STAGES[first:])


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


@contextmanager
def _run_log(layout: RunLayout) -> Iterator[None]:
    """Append everything m3distill logs during the run to RUN_DIR/m3distill.log (the terminal shows less), and how
    the run ended when it failed: the error (with its traceback when it is not a user's error), or the interruption."""
    handler = logging.FileHandler(layout.log, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    package_logger = logging.getLogger("m3distill")
    package_logger.addHandler(handler)
    try:
        yield
    except BaseException as error:
        # Into the file alone: the terminal gets the CLI's one line (or the traceback) already.
        interrupted = isinstance(error, KeyboardInterrupt)
        handler.handle(logger.makeRecord(
            logger.name, logging.ERROR, __file__, 0, "run interrupted" if interrupted else "run failed: %s",
            () if interrupted else (error,),
            None if interrupted or isinstance(error, M3DistillError) else (type(error), error, error.__traceback__),
        ))
        raise
    finally:
        package_logger.removeHandler(handler)
        handler.close()


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
        force: stages to redo even when current (``synth``, ``teacher``, ``train``, ``export``, ``evaluate`` or
            ``all``); every later stage is redone too. The export stage runs only when ``export.enabled``.
        show_progress: show progress bars.
        on_stage: called with (stage, "start" | "skip" | "done") so a CLI can print where it is.

    Raises :class:`M3DistillError` when another process is running a pipeline in the same run directory, or when
    torchrun started several processes (only the teacher and train stages share work among processes).
    """
    forced = _validate_force(force, config)
    _refuse_several_processes()
    layout = RunLayout(config.run_dir)
    layout.root.mkdir(parents=True, exist_ok=True)
    with hold_run_dir(layout.root), _run_log(layout):
        _check_sources_outside_outputs(config, layout)
        result = PipelineResult(run_dir=layout.root, report_dir=layout.report)
        config_written = False
        for stage in run_stages(config):
            redo = stage.name in forced
            status = None if redo else stage.status()
            if status is not None and status.current:
                result.stages[stage.name] = StageRun("skipped")
                if on_stage:
                    on_stage(stage.name, "skip")
                continue
            if status is not None and status.state == "stale":
                logger.info("stage %s is out of date (%s); redoing it", stage.name, status.reason)
            stage.check_inputs()
            if not config_written:
                # RUN_DIR/config.yaml describes what the outputs are made from: it changes when the first of them is
                # about to, once what that stage reads (the corpus, the tokenizer, the teacher) has been read.
                stage.fingerprint()
                write_text_atomic(layout.config, run_config_yaml(config))
                config_written = True
            if on_stage:
                on_stage(stage.name, "start")
            started = time.perf_counter()
            # An interrupted stage resumes inside its own code (cache shards, checkpoints, LLM cache).
            result.results[stage.name] = stage.run(replace_stale=True, force=redo, show_progress=show_progress)
            result.stages[stage.name] = StageRun("ran", round(time.perf_counter() - started, 2),
                                                 status.reason if status is not None and status.reason else None)
            if on_stage:
                on_stage(stage.name, "done")
        if not config_written:
            write_text_atomic(layout.config, run_config_yaml(config))
        return result


def _refuse_several_processes() -> None:
    """Refuse torchrun's N processes before any of them touches the run directory: synth, export and evaluate run
    in one process, and N copies of them would race for the same outputs. The stages that share work among
    processes run alone under torchrun, and a plain ``run`` afterwards skips what they made."""
    from m3distill.distributed import process_count  # here: m3distill imports without torch (the ONNX encoder)

    processes = process_count()
    if processes > 1:
        raise M3DistillError(
            f"torchrun started {processes} processes, but the whole pipeline runs in one: run `m3distill synth "
            "--config CONFIG`, then `torchrun ... m3distill teacher --config CONFIG` and `torchrun ... m3distill "
            "train --config CONFIG`, then `m3distill run CONFIG` in one process (it skips the stages done)"
        )


def run_config_yaml(config: M3DistillConfig) -> str:
    """The YAML that RUN_DIR/config.yaml holds: the run's settings with the run directory made absolute, so that
    ``m3distill run RUN_DIR/config.yaml`` (whose relative paths are taken from RUN_DIR) reruns this same run instead
    of starting a new one in RUN_DIR/RUN_DIR."""
    return config_to_yaml(config.model_copy(update={"run_dir": str(Path(config.run_dir).expanduser().resolve())}))


M3_DEMO_TEACHER_DIRNAME = "m3-test-teacher"


def demo_config(run_dir: str | Path = "m3distill-demo", *, m3: bool = False) -> M3DistillConfig:
    """configs/demo.yaml with the corpus pointed at the bundled sample, wherever m3distill is installed.

    With ``m3`` the teacher is the M3 test teacher (the packaged all-MiniLM-L6-v2 plus seeded bge-m3 sparse and
    ColBERT heads, see :func:`m3distill.m3.make_m3_test_teacher`), written into ``RUN_DIR/m3-test-teacher`` when it
    is not there yet: the students then keep and train both heads, and the report covers all of bge-m3's outputs.
    """
    config = load_config(bundled_config("demo.yaml"))
    sample = sample_corpus_dir()
    data = config.model_dump()
    data["run_dir"] = str(run_dir)
    data["synth"]["corpus"] = str(sample / "domain")
    data["synth"]["general"] = str(sample / "general")
    data["evaluation"]["real_questions"] = str(sample / "questions" / "perlfaq8.jsonl")
    if m3:
        from m3distill.m3 import is_m3_model, make_m3_test_teacher

        _refuse_several_processes()  # before the test teacher is written into the run directory
        teacher_dir = Path(run_dir).expanduser().resolve() / M3_DEMO_TEACHER_DIRNAME  # the same from any folder
        if not is_m3_model(teacher_dir):
            make_m3_test_teacher(teacher_dir, base=data["teacher"]["model"])
        data["teacher"]["model"] = str(teacher_dir)
    return M3DistillConfig.model_validate(data)


def run_config_file(path: str | Path, *, force: Iterable[str] = (), run_dir: str | None = None,
                    show_progress: bool = True, on_stage: Callable[[str, str], None] | None = None) -> PipelineResult:
    """Load a YAML config and run it; ``run_dir`` overrides the config's."""
    config = load_config(path)
    if run_dir is not None:
        config = config.model_copy(update={"run_dir": run_dir})
    return run_pipeline(config, force=force, show_progress=show_progress, on_stage=on_stage)
