"""Distillation: each student learns to reproduce the teacher's cached embeddings (and how they rank the corpus).

    OUT_DIR/<student_name>/          one sentence-transformers folder per student (see m3distill.layout)
      modules.json, model.safetensors, ...   loads with plain SentenceTransformer(path)
      README.md                      model card: teacher, kept layers, parameters, data, settings, dev metrics
      logs/                          TensorBoard events
      sparse_linear.pt, colbert_linear.pt    M3 teachers only: the student's own (trained) bge-m3 heads
      m3distill_student.json         the same facts as the card; its presence marks the student complete

While a student trains its folder holds ``run.json`` (the layers chosen, and the search scores), ``checkpoints/``
(the Trainer's, every ``save_steps``) and ``logs/``. When training ends the finished folder replaces it in one
rename, without the checkpoints unless ``training.keep_checkpoints``. Under ``torchrun`` every process trains
(the Trainer's DDP) and only rank 0 writes.

A student of an M3 teacher (one with bge-m3's sparse and ColBERT head files, see :mod:`m3distill.m3`) starts with
copies of the teacher's heads and trains them with its layers (``training.loss.sparse`` / ``colbert``); the heads
are saved in every checkpoint and in the finished folder, so it loads in FlagEmbedding's ``BGEM3FlagModel`` too.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, SentenceTransformerTrainingArguments
from tqdm.auto import tqdm
from transformers import EarlyStoppingCallback, PrinterCallback, ProgressCallback, TrainerCallback
from transformers.integrations import TensorBoardCallback
from transformers.trainer_utils import get_last_checkpoint

from m3distill._version import __version__
from m3distill.atomic import (
    atomic_dir,
    disk_space_for,
    refuse_files_not_ours,
    write_json_atomic,
    write_text_atomic,
)
from m3distill.config import (
    DEFAULT_TRAINING_STEPS,
    StudentsConfig,
    TeacherConfig,
    TrainingConfig,
    settings_record,
)
from m3distill.data.dataset import SynthDataset, dataset_fingerprint, load_synth_dataset
from m3distill.distributed import process_count, process_rank
from m3distill.encoding import resolve_precision
from m3distill.errors import M3DistillError
from m3distill.layout import HEAD_FILES, STUDENT_METADATA_FILE, STUDENT_RUN_FILE, folder_kind
from m3distill.m3 import (
    M3_OUTPUTS,
    M3Embeddings,
    M3Heads,
    encode_m3,
    head_files_sha256,
    load_m3_heads,
    write_multi_vector_folder,
)
from m3distill.metrics import row_cosines, sparse_alignment_metrics
from m3distill.models import (
    count_embedding_parameters,
    count_parameters,
    load_teacher,
    local_model_folder,
    num_layers,
    process_device,
)
from m3distill.students.build import build_student
from m3distill.students.vocabulary import (
    VocabularyChoice,
    choose_vocabulary,
    full_vocabulary_record,
    trim_student,
    write_vocabulary_map,
)
from m3distill.students.folder import (
    CHECKPOINTS_DIRNAME,
    LOGS_DIRNAME,
    is_m3distill_student_dir,
    is_trained_student,
    student_contents,
    student_files,
)
from m3distill.students.layer_plan import (
    LayerPlan,
    ensure_distinct_names,
    resolve_layer_plans,
    validate_layers,
)
from m3distill.students.search import SearchSettings, search_layer_plan
from m3distill.teacher.cache import TeacherCache
from m3distill.teacher.fingerprint import teacher_fingerprint
from m3distill.training.dev_set import (
    DEV_TOP_K,
    DevSet,
    TeacherTopKEvaluator,
    build_dev_set,
    dev_evaluator,
    dev_metrics,
    own_forward_pass,
)
from m3distill.training.losses import DistillationLoss, needs_online_teacher
from m3distill.training.model_card import student_model_card
from m3distill.training.record import plan_spec, student_fingerprint
from m3distill.training.sampler import ContextGroupedBatchSampler, LengthGroupedBatchSampler, register_text_groups

logger = logging.getLogger(__name__)

_DEV_HEAD_TEXTS = 256


@dataclass(frozen=True)
class StudentResult:
    """One trained (or already finished) student.

    Attributes:
        name: folder name, e.g. ``student-3L``.
        path: the student folder.
        layers: teacher layers kept.
        n_parameters: the student's parameter count.
        dev_before: dev metrics of the untrained cut (see :func:`m3distill.training.dev_set.dev_metrics`).
        dev_after: dev metrics of the trained student (best checkpoint).
        global_step: optimizer steps trained in total.
        seconds_per_step: mean wall time of one training step (forward, backward, optimizer) in this run.
        train_seconds: wall time of ``Trainer.train`` in this run, evaluations and checkpoints included.
        search: the layer search's scores (:meth:`SearchResult.to_dict`), when strategy was ``search``.
        skipped: True when the folder was already complete and nothing was trained.
    """

    name: str
    path: Path
    layers: tuple[int, ...]
    n_parameters: int
    dev_before: dict[str, float]
    dev_after: dict[str, float]
    global_step: int
    seconds_per_step: float
    train_seconds: float
    search: dict[str, Any] | None = None
    skipped: bool = False
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_metadata(cls, path: Path, metadata: dict[str, Any], *, skipped: bool) -> StudentResult:
        """The result recorded in a finished student's metadata."""
        settings = metadata["training"]
        return cls(
            name=metadata["name"], path=path, layers=tuple(metadata["layers"]),
            n_parameters=metadata["parameters"]["student"],
            dev_before=metadata["dev_before"], dev_after=metadata["dev_after"], global_step=settings["global_step"],
            seconds_per_step=settings["seconds_per_step"], train_seconds=settings["train_seconds"],
            search=metadata.get("search"), skipped=skipped, metadata=metadata,
        )


def distil_students(
    dataset_dir: str | Path,
    cache_dir: str | Path,
    *,
    teacher: TeacherConfig,
    students: StudentsConfig | Sequence[LayerPlan | Sequence[int]],
    training: TrainingConfig,
    out_dir: str | Path,
    resume: bool = False,
    show_progress: bool = True,
) -> list[StudentResult]:
    """Train one student per layer plan to reproduce the cached teacher embeddings.

    Each student is the teacher's embeddings plus the plan's layers (:func:`m3distill.students.build.build_student`),
    trained with sentence-transformers' SentenceTransformerTrainer and :class:`DistillationLoss` (the terms and
    weights of ``training.loss``) for a budget of optimizer steps, evaluated on the dev split before and during
    training (top-10 agreement with the teacher, MSE, Spearman), stopped early when ``training.best_metric`` stops
    improving, and saved with the best dev checkpoint and the record of what it was made from
    (:mod:`m3distill.training.record`).

    Every plan is trained: which students need training (not the finished and current ones) and whether the cache
    is this teacher's are the train stage's questions (:func:`m3distill.stages.train.train_students` asks them), and
    a folder holding a finished student is refused here.

    Args:
        dataset_dir: dataset directory from ``m3distill synth``; training uses its train split (the text kinds of
            ``training.texts``: contexts, questions, crops, general text), evaluation its dev split.
        cache_dir: teacher cache from ``m3distill teacher`` holding every text of the dataset.
        teacher: the teacher settings: the teacher that made the cache. Unset ``max_seq_length`` and ``revision``
            are taken from the cache.
        students: the ``students`` config section, or explicit plans (:class:`LayerPlan` or layer lists).
        training: steps, learning rate, loss, batch size, evaluation, early stopping and checkpoint settings.
        out_dir: folder receiving one sub-folder per student (see :func:`m3distill.layout.student_name`).
        resume: continue each unfinished student from its latest checkpoint.
        show_progress: show the Trainer's progress bars.

    Raises:
        M3DistillError: missing or incomplete dataset or cache, a plan the teacher cannot serve, texts missing from
            the cache, a finished student in the way, or an unfinished student without ``resume``. All of these are
            checked before any student trains.
    """
    out_dir = Path(out_dir)
    dataset = load_synth_dataset(dataset_dir)
    cache = TeacherCache.open(cache_dir)
    # Unset settings are the ones the cache was made with, so the student records the cache's teacher.
    teacher = teacher.model_copy(update={
        "max_seq_length": teacher.max_seq_length or cache.fingerprint.max_seq_length,
        "revision": teacher.revision or cache.fingerprint.revision,
    })
    teacher_model = load_teacher(teacher, device=process_device(training.device or teacher.device))
    plans = _resolve_plans(students, num_layers(teacher_model))
    job = _TrainingJob.prepare(dataset, cache, teacher, teacher_model, training, show_progress=show_progress,
                               search_settings=students if isinstance(students, StudentsConfig) else StudentsConfig())
    # Only process 0 writes student folders, so only it checks them: under torchrun a slower process could look in
    # while process 0 writes run.json (atomically, through a temporary file) and take the folder for the user's.
    for plan in plans if process_rank() == 0 else ():
        _check_resumable(out_dir / plan.name, resume)
    return [job.train(plan, out_dir / plan.name, resume=resume) for plan in plans]


def _checked_training_texts(dataset: SynthDataset, training: TrainingConfig) -> list[str]:
    """:func:`training_texts`, saying in the log what they are and which kinds asked for the dataset lacks; raises
    :class:`M3DistillError` when there are none."""
    train_texts = training_texts(dataset, training)
    n_held_out_contexts = len(train_texts) - len(dataset.texts(["train"], training.texts))
    if n_held_out_contexts:
        logger.info("training texts: %d from the train split, plus the %d dev and test contexts (all_contexts; "
                    "their questions stay unseen)", len(train_texts) - n_held_out_contexts, n_held_out_contexts)
    for kind, settings in (("crops", "synth.crop_sentences / crop_spans"), ("general", "synth.general")):
        if kind in training.texts and not dataset.texts(["train"], [kind]):
            logger.warning("training.texts asks for %s, but the dataset %s has none (%s): training without them",
                           kind, dataset.root, settings)
    if not train_texts:
        raise M3DistillError(
            f"the dataset {dataset.root} has no training texts; rerun `m3distill synth` with a train split"
        )
    return train_texts


def training_texts(dataset: SynthDataset, training: TrainingConfig) -> list[str]:
    """The distinct texts the students learn from, in a fixed order.

    Args:
        dataset: the synth dataset.
        training: its ``texts`` name the kinds of train-split text (contexts, questions, crops, general);
            ``all_contexts`` adds the dev and test splits' contexts when contexts are among them. Questions and
            crops of the dev and test splits are never training texts: the dev and test questions stay unseen.
    """
    texts = dataset.texts(["train"], training.texts)
    if _learns_all_contexts(training):
        known = set(texts)
        texts += [text for text in dataset.texts(["dev", "test"], ["contexts"]) if text not in known]
    return texts


def _learns_all_contexts(training: TrainingConfig) -> bool:
    return training.all_contexts and "contexts" in training.texts


def _resolve_plans(
    students: StudentsConfig | Sequence[LayerPlan | Sequence[int]], n_teacher_layers: int
) -> list[LayerPlan]:
    if isinstance(students, StudentsConfig):
        return resolve_layer_plans(students, n_teacher_layers)
    plans = []
    for item in students:
        if isinstance(item, LayerPlan):
            if item.layers is not None:
                validate_layers(item.layers, n_teacher_layers)
            plans.append(item)
        else:
            layers = tuple(validate_layers(item, n_teacher_layers))
            plans.append(LayerPlan(len(layers), "explicit", layers))
    if not plans:
        raise M3DistillError("no students asked for: give at least one layer count or layer list")
    ensure_distinct_names(plans)
    return plans


def _check_student_dir_is_ours(student_dir: Path) -> None:
    """Refuse a student folder holding files m3distill did not write: finishing the student replaces the folder."""
    if not student_dir.exists() and not student_dir.is_symlink():
        return
    if student_dir.is_dir() and not any(student_dir.iterdir()):
        return
    if not (student_dir.is_dir() and is_m3distill_student_dir(student_dir)):
        kind = folder_kind(student_dir)
        raise M3DistillError(
            f"{student_dir} holds files that are not an m3distill student (no {STUDENT_METADATA_FILE} or "
            f"{STUDENT_RUN_FILE}"
            f"{f'; it is {kind}' if kind else ''}); training would replace it: move it away or choose another --out"
        )
    refuse_files_not_ours(student_dir, student_files(student_dir), replacing="finishing the student")


def _check_resumable(student_dir: Path, resume: bool) -> None:
    if is_trained_student(student_dir):  # retraining sets a finished student aside first (the train stage)
        raise M3DistillError(f"{student_dir} holds a finished student; retrain it with `m3distill train --force`, or "
                             "choose another --out")
    _check_student_dir_is_ours(student_dir)
    checkpoints = student_dir / CHECKPOINTS_DIRNAME
    if resume or not checkpoints.is_dir():
        return
    last = get_last_checkpoint(str(checkpoints))
    if last is not None:
        raise M3DistillError(
            f"{student_dir} holds checkpoints of an unfinished run (latest {Path(last).name}); pass --resume to "
            "continue it, or delete the folder to start over"
        )


@dataclass
class _TrainingJob:
    """What all students of one ``distil_students`` call share."""

    dataset: SynthDataset
    cache: TeacherCache
    teacher_model: SentenceTransformer
    teacher_heads: M3Heads | None
    teacher_heads_sha256: str | None
    fingerprint: dict[str, Any]
    train_texts: list[str]
    train_embeddings: np.ndarray
    epoch_rows: np.ndarray  # rows of train_texts making one epoch (training.context_share repeats the contexts)
    dev: DevSet
    training: TrainingConfig
    search_settings: StudentsConfig
    show_progress: bool
    vocabulary: VocabularyChoice | None = None  # the students' trimmed vocabulary (students.vocabulary)
    _teacher_dev_outputs: M3Embeddings | None = None

    @classmethod
    def prepare(cls, dataset: SynthDataset, cache: TeacherCache, teacher: TeacherConfig,
                teacher_model: SentenceTransformer, training: TrainingConfig, *, search_settings: StudentsConfig,
                show_progress: bool) -> _TrainingJob:
        """The teacher's heads, the training texts with their cached embeddings and the dev set, once every setting
        is checked (the schedule, the precision on this device)."""
        fingerprint = teacher_fingerprint(teacher_model, teacher.model, revision=teacher.revision)
        teacher_folder = local_model_folder(teacher.model, teacher.revision)
        teacher_heads = load_m3_heads(teacher_model, teacher_folder)
        if teacher_heads is not None:
            teacher_heads.to(teacher_model.device)
            logger.info("M3 teacher: the students keep and train the sparse and ColBERT heads (loss.sparse %g, "
                        "loss.colbert %g)", training.loss.sparse, training.loss.colbert)
        train_texts = _checked_training_texts(dataset, training)
        dev = build_dev_set(dataset, cache, max_texts=training.max_dev_texts, corpus_size=training.dev_corpus_size,
                            seed=training.seed)
        epoch_rows = context_repeats(train_texts, set(dataset.contexts["text"]), training.context_share)
        _schedule(training, len(epoch_rows))
        resolve_precision(training.precision, teacher_model.device, bf16_on_cpu=True)
        vocabulary = None
        if search_settings.vocabulary != "full":  # trimmed before training, so the students learn their tokenization
            vocabulary = choose_vocabulary(teacher_model.tokenizer, train_texts, search_settings.vocabulary,
                                           budget=search_settings.vocabulary_budget)
        return cls(
            dataset=dataset, cache=cache, teacher_model=teacher_model, teacher_heads=teacher_heads,
            teacher_heads_sha256=head_files_sha256(teacher_folder) if teacher_heads is not None else None,
            fingerprint=fingerprint.to_dict(), train_texts=train_texts, train_embeddings=cache.get(train_texts),
            epoch_rows=epoch_rows,
            dev=dev, training=training, search_settings=search_settings, show_progress=show_progress,
            vocabulary=vocabulary,
        )

    def train(self, plan: LayerPlan, student_dir: Path, *, resume: bool) -> StudentResult:
        is_main = process_rank() == 0
        layers, search = self._layers(plan, student_dir, resume=resume, write=is_main)
        student, heads = self._untrained_student(layers)
        evaluator = dev_evaluator(self.dev, batch_size=self.training.batch_size,
                                  max_tokens_per_batch=self.training.dev_max_tokens_per_batch)
        dev_before = dev_metrics(evaluator(student))
        heads_before = self._dev_head_metrics(student, heads)
        logger.info("%s untrained: dev %s", plan.name, _format_metrics(dev_before))
        args, precision = self._arguments(student_dir / CHECKPOINTS_DIRNAME, student.device)
        last = self._last_checkpoint(plan, student_dir, resume, precision)
        timer = _StepTimer()
        trainer = _HeadsTrainer(
            heads=heads, model=student, args=args, train_dataset=self._train_dataset(),
            loss=self._loss(student, heads, precision), evaluator=evaluator,
            callbacks=self._callbacks(plan, student_dir, heads, timer, tensorboard=is_main),
        )
        # One bar per student and one line per dev evaluation instead of the Trainer's raw log dicts.
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        # Checkpoints, then the finished student, in the student's folder: a full disk is one line naming both.
        with disk_space_for(student_dir, self._bytes_written(student, heads)):
            started = time.perf_counter()
            trainer.train(resume_from_checkpoint=last)
            train_seconds = time.perf_counter() - started
            dev_after = _best_dev_metrics(trainer) or dev_metrics(evaluator(trainer.model))
            logger.info("%s trained: dev %s", plan.name, _format_metrics(dev_after))
            resumed_from = int(Path(last).name.rsplit("-", 1)[-1]) if last else None
            record = self._training_record(trainer, precision, timer, train_seconds, resumed_from_step=resumed_from)
            metadata = {**self._metadata(plan, layers, search, student, record),
                        "dev_before": dev_before, "dev_after": dev_after}
            if heads is not None:
                with own_forward_pass(trainer.model) as trained:  # in fp32, as the dev metrics are
                    heads_after = self._dev_head_metrics(trained, heads)
                logger.info("%s heads: dev %s (untrained: %s)", plan.name, _format_metrics(heads_after),
                            _format_metrics(heads_before))
                metadata["dev_heads_before"], metadata["dev_heads_after"] = heads_before, heads_after
            if trainer.is_world_process_zero():
                metadata = self._write_student(trainer.model, student_dir, metadata, heads)
            trainer.accelerator.wait_for_everyone()
        return StudentResult.from_metadata(student_dir, metadata, skipped=False)

    def _untrained_student(self, layers: list[int]) -> tuple[SentenceTransformer, M3Heads | None]:
        """The teacher's embeddings and ``layers``, and (an M3 teacher only) its heads, which train with them."""
        student = build_student(self.teacher_model, layers)
        if self.vocabulary is not None:
            trim_student(student, self.vocabulary)
        student.max_seq_length = self.training.max_seq_length or self.fingerprint["max_seq_length"]
        if self.training.dropout is not None:
            set_dropout(student, self.training.dropout)
        heads = copy.deepcopy(self.teacher_heads).to(student.device) if self.teacher_heads is not None else None
        if heads is not None:
            heads.requires_grad_(True)
            heads.teacher_token_ids = self._teacher_token_ids()
        return student, heads

    def _teacher_token_ids(self) -> torch.Tensor | None:
        """The teacher's id of each of a trimmed student's token ids (None for the full vocabulary)."""
        return torch.tensor(self.vocabulary.kept_ids, dtype=torch.long) if self.vocabulary is not None else None

    def _last_checkpoint(self, plan: LayerPlan, student_dir: Path, resume: bool, precision: str) -> str | None:
        """The checkpoint to resume from (with ``resume``); logs the plan's budget too."""
        checkpoints = student_dir / CHECKPOINTS_DIRNAME
        last = get_last_checkpoint(str(checkpoints)) if resume and checkpoints.is_dir() else None
        if resume and last is None:
            logger.info("%s: no checkpoint to resume from; training from the start", plan.name)
        elif last is not None:
            logger.info("%s: resuming from %s", plan.name, Path(last).name)
        total_steps = _schedule(self.training, len(self.epoch_rows))[0]
        seen = total_steps * self.training.batch_size * process_count()
        logger.info("%s: up to %d steps x %d texts = %d texts seen: each of the %d training texts about %.1f times; "
                    "computing in %s", plan.name, total_steps, self.training.batch_size, seen, len(self.train_texts),
                    seen / len(self.train_texts), precision)
        return last

    def _callbacks(self, plan: LayerPlan, student_dir: Path, heads: M3Heads | None, timer: _StepTimer, *,
                   tensorboard: bool) -> list[TrainerCallback]:
        callbacks: list[TrainerCallback] = [timer, _StudentProgress(plan.name, show_bar=self.show_progress)]
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            callbacks.append(TensorBoardCallback(tb_writer=SummaryWriter(str(student_dir / LOGS_DIRNAME))))
        if self.training.early_stopping_patience:
            callbacks.append(EarlyStoppingCallback(early_stopping_patience=self.training.early_stopping_patience))
        if heads is not None and process_count() > 1:
            callbacks.append(_AverageHeadGradients(heads))
        return callbacks

    def _bytes_written(self, student: SentenceTransformer, heads: M3Heads | None) -> int:
        """About what training a student writes: float32 weights, and in each checkpoint kept (the last
        ``save_total_limit`` and the best) the weights plus AdamW's two moments."""
        weights = 4 * (count_parameters(student) + (count_parameters(heads) if heads is not None else 0))
        return weights * (1 + 3 * (self.training.save_total_limit + 1))

    def _dev_head_metrics(self, student: SentenceTransformer, heads: M3Heads | None) -> dict[str, float | None]:
        """How close the student's sparse and ColBERT outputs are to the teacher's on (up to 256) dev texts."""
        if heads is None:
            return {}
        texts = self.dev.texts[:_DEV_HEAD_TEXTS]
        if self._teacher_dev_outputs is None:
            self._teacher_dev_outputs = encode_m3(self.teacher_model, self.teacher_heads, texts,
                                                  batch_size=self.training.batch_size)
        teacher = self._teacher_dev_outputs
        outputs = encode_m3(student, heads, texts, batch_size=self.training.batch_size)
        metrics = {key.removeprefix("alignment_"): value
                   for key, value in sparse_alignment_metrics(outputs.sparse, teacher.sparse).items()}
        cosines = [float(np.mean(row_cosines(mine, theirs))) for mine, theirs in zip(outputs.colbert, teacher.colbert)
                   if mine.shape == theirs.shape and len(mine)]
        metrics["colbert_token_cosine"] = float(np.mean(cosines)) if cosines else None
        return metrics

    def _batch_sampler(self):
        # An in-batch similarity loss needs questions beside their own contexts; otherwise similar lengths batch best.
        if self.training.loss.in_batch_kl:
            return ContextGroupedBatchSampler
        return LengthGroupedBatchSampler if self.training.group_by_length else "batch_sampler"

    def _train_dataset(self) -> Dataset:
        texts = [self.train_texts[row] for row in self.epoch_rows]
        dataset = _train_dataset(texts, self.train_embeddings[self.epoch_rows])
        if self.training.loss.in_batch_kl:
            register_text_groups(texts, _text_groups(self.dataset, texts))
        return dataset

    def _top_k_score(self) -> Callable[[SentenceTransformer], float] | None:
        """Dev top-10 agreement of a model with the teacher, or None when the dev corpus is too small for it."""
        if len(self.dev.corpus) < DEV_TOP_K:
            return None
        evaluator = TeacherTopKEvaluator(self.dev.queries, self.dev.query_embeddings, self.dev.corpus,
                                         self.dev.corpus_embeddings, batch_size=self.training.batch_size)
        return lambda model: next(iter(evaluator(model).values()))

    def _loss(self, student: SentenceTransformer, heads: M3Heads | None, precision: str) -> DistillationLoss:
        config = self.training.loss
        anchors = None
        if config.anchor_kl:
            count = min(config.n_anchors, len(self.train_texts))
            rows = np.sort(np.random.default_rng(self.training.seed).choice(len(self.train_texts), count, replace=False))
            anchors = self.train_embeddings[rows]
        online = needs_online_teacher(config, has_heads=heads is not None)
        return DistillationLoss(student, config, anchors=anchors, teacher=self.teacher_model if online else None,
                                heads=heads, teacher_heads=self.teacher_heads if heads is not None else None,
                                teacher_precision=precision, teacher_token_ids=self._teacher_token_ids())

    def _layers(self, plan: LayerPlan, student_dir: Path, *, resume: bool, write: bool) -> tuple[list[int], dict | None]:
        """The plan's layers; for a search, the recorded choice when resuming, else a fresh search.

        An unfinished student started with other layers is refused when it holds checkpoints to resume, and started
        over when it holds none: then there is nothing of it to keep.
        """
        run_file = student_dir / STUDENT_RUN_FILE
        recorded = json.loads(run_file.read_text(encoding="utf-8")) if resume and run_file.is_file() else None
        if recorded is not None and plan.layers is not None and tuple(recorded["layers"]) != plan.layers:
            checkpoints = student_dir / CHECKPOINTS_DIRNAME
            if checkpoints.is_dir() and get_last_checkpoint(str(checkpoints)) is not None:
                raise M3DistillError(
                    f"{student_dir} was started with layers {recorded['layers']}, not {list(plan.layers)}; "
                    "resume with the same plan or delete the folder"
                )
            logger.info("%s: started with layers %s and no checkpoint; starting over with %s", plan.name,
                        recorded["layers"], list(plan.layers))
            recorded = None
        if recorded is not None:
            return list(recorded["layers"]), recorded.get("search")
        search = None
        if plan.layers is None:
            dev_count = min(len(self.dev.texts), self.search_settings.search_dev_texts)
            result = search_layer_plan(
                self.teacher_model, plan.n_layers, dev_texts=self.dev.texts[:dev_count],
                dev_embeddings=self.dev.embeddings[:dev_count], train_texts=self.train_texts,
                train_embeddings=self.train_embeddings, top_k_score=self._top_k_score(),
                settings=SearchSettings(
                    n_candidates=self.search_settings.search_candidates, steps=self.search_settings.search_steps,
                    batch_size=self.training.batch_size, learning_rate=self.training.learning_rate,
                    seed=self.training.seed, max_seq_length=self.training.max_seq_length,
                ),
            )
            search = result.to_dict()
            layers = list(result.best)
        else:
            layers = list(plan.layers)
        if write:
            write_json_atomic(run_file, {"layers": layers, "strategy": plan.strategy, "search": search})
        return layers, search

    def _arguments(self, checkpoints: Path, device: torch.device) -> tuple[SentenceTransformerTrainingArguments, str]:
        training = self.training
        total_steps, eval_steps, save_steps = _schedule(training, len(self.epoch_rows))
        precision = resolve_precision(training.precision, device, bf16_on_cpu=True)
        metric = _best_metric_key(training.best_metric, has_top_k=len(self.dev.corpus) >= DEV_TOP_K)
        args = SentenceTransformerTrainingArguments(
            output_dir=str(checkpoints),
            max_steps=total_steps,
            per_device_train_batch_size=training.batch_size,
            per_device_eval_batch_size=training.batch_size,
            learning_rate=training.learning_rate,
            warmup_steps=training.warmup_ratio,  # a float below 1 is a ratio of the total steps
            weight_decay=training.weight_decay,
            lr_scheduler_type=training.lr_scheduler,
            bf16=precision == "bf16",
            fp16=precision == "fp16",
            use_cpu=device.type == "cpu",
            eval_strategy="steps",
            eval_steps=eval_steps,
            save_strategy="steps",
            save_steps=save_steps,
            save_total_limit=training.save_total_limit,
            load_best_model_at_end=True,
            metric_for_best_model=metric,
            greater_is_better=True,
            logging_steps=max(1, total_steps // 20),
            logging_first_step=True,
            report_to="none",  # TensorBoard is added as a callback that writes into the student's logs/
            dataloader_num_workers=0,
            seed=training.seed,
            disable_tqdm=not self.show_progress,
            batch_sampler=self._batch_sampler(),
        )
        return args, precision

    def _metadata(self, plan: LayerPlan, layers: list[int], search: dict | None, student: SentenceTransformer,
                  training: dict[str, Any]) -> dict[str, Any]:
        """The finished student's metadata but its dev metrics: what it was made from (its fingerprint record), what
        it is and how it was trained (``training``, see :meth:`_training_record`)."""
        # What the student was made from: a later run retrains it (or refuses to reuse it) when any of it changed.
        record = student_fingerprint(
            dataset_fingerprint(self.dataset.root), self.cache.manifest, self.training,
            plan_spec(plan.n_layers, plan.strategy, plan.layers, self.search_settings), self.teacher_heads_sha256,
        ).to_record()
        return {
            **record,
            "m3distill_version": __version__,
            "name": plan.name,
            "layers": layers,
            "strategy": plan.strategy,
            "search": search,
            "teacher": self.fingerprint,
            "parameters": {"student": count_parameters(student), "teacher": count_parameters(self.teacher_model),
                           "student_embeddings": count_embedding_parameters(student)},
            "vocabulary": (self.vocabulary.record() if self.vocabulary is not None
                           else full_vocabulary_record(self.teacher_model.tokenizer)),
            "outputs": list(M3_OUTPUTS if self.teacher_heads is not None else M3_OUTPUTS[:1]),
            "data": {
                "dataset": str(self.dataset.root),
                "teacher_cache": str(self.cache.root),
                "train_texts": len(self.train_texts),
                "epoch_texts": len(self.epoch_rows),
                "all_contexts": _learns_all_contexts(self.training),
                "dev_texts": len(self.dev.texts),
                "dev_pairs": len(self.dev.pairs),
            },
            "training": training,
        }

    def _training_record(self, trainer: SentenceTransformerTrainer, precision: str, timer: _StepTimer,
                         train_seconds: float, *, resumed_from_step: int | None) -> dict[str, Any]:
        """How the student was trained: the settings, the steps taken, the timings and the loss."""
        training = self.training
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        best = trainer.state.best_model_checkpoint
        texts_seen = trainer.state.global_step * training.batch_size * trainer.args.world_size
        return {
            "epochs": training.epochs,
            "max_steps": training.max_steps,
            "global_step": trainer.state.global_step,
            "batch_size": training.batch_size,
            "learning_rate": training.learning_rate,
            "warmup_ratio": training.warmup_ratio,
            "lr_scheduler": training.lr_scheduler,
            "weight_decay": training.weight_decay,
            "loss": settings_record(training.loss),
            "texts": list(training.texts),
            "context_share": training.context_share,
            "early_stopping_patience": training.early_stopping_patience,
            "texts_seen": texts_seen,
            "passes_over_train_texts": round(texts_seen / len(self.train_texts), 2),
            "max_seq_length": trainer.model.max_seq_length,
            "precision": precision,
            "seed": training.seed,
            "world_size": trainer.args.world_size,
            "best_metric": training.best_metric,
            "best_step": int(best.rsplit("-", 1)[-1]) if best else None,
            "train_loss_first": losses[0] if losses else None,
            "train_loss_last": losses[-1] if losses else None,
            "resumed_from_step": resumed_from_step,
            "steps_this_run": timer.steps,
            "seconds_per_step": timer.seconds_per_step,
            "train_seconds": train_seconds,
        }

    def _write_student(self, model: SentenceTransformer, student_dir: Path, metadata: dict[str, Any],
                       heads: M3Heads | None) -> dict[str, Any]:
        """Save the student in one rename; returns its metadata as written (with its files' hashes)."""
        # The finished folder replaces the training folder in one rename: a student is either complete or absent.
        _check_student_dir_is_ours(student_dir)
        with atomic_dir(student_dir, overwrite=True, ours=student_files(student_dir)) as tmp:
            model.save(str(tmp), create_model_card=False)
            if heads is not None:
                heads.save(tmp)
                write_multi_vector_folder(tmp, heads)  # the ColBERT output in sentence-transformers' own class
            if self.vocabulary is not None:
                write_vocabulary_map(tmp, self.vocabulary)
            for kept in (LOGS_DIRNAME, CHECKPOINTS_DIRNAME if self.training.keep_checkpoints else None):
                if kept and (student_dir / kept).is_dir():
                    shutil.copytree(student_dir / kept, tmp / kept)
            write_text_atomic(tmp / "README.md", student_model_card(metadata))
            # What the student consists of: its files' hashes are its identity (checked whenever it is read), and
            # anything else that appears in its folder later is the user's.
            metadata = {**metadata, "contents": student_contents(tmp), "files": sorted(
                f"{path.name}/**" if path.is_dir() else path.name for path in tmp.iterdir())}
            write_json_atomic(tmp / STUDENT_METADATA_FILE, metadata)  # last: marks the student complete
        logger.info("wrote %s", student_dir)
        return metadata


class _HeadsTrainer(SentenceTransformerTrainer):
    """The Trainer, plus the student's M3 heads in every checkpoint: saved beside the weights, and loaded back on
    resume and when the best checkpoint is restored at the end (the heads are the loss's parameters, which the
    Trainer's own checkpoints leave out)."""

    def __init__(self, *args, heads: M3Heads | None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.heads = heads

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        super()._save(output_dir, state_dict=state_dict)
        if self.heads is not None:
            self.heads.save(output_dir if output_dir is not None else self.args.output_dir)

    def _load_from_checkpoint(self, checkpoint_path: str, *args, **kwargs) -> None:
        super()._load_from_checkpoint(checkpoint_path, *args, **kwargs)
        if self.heads is None:
            return
        if not all((Path(checkpoint_path) / name).is_file() for name in HEAD_FILES):
            raise M3DistillError(f"checkpoint {checkpoint_path} has no head files; delete the student folder and "
                                 "train it again")
        # Copied into the existing parameters: the optimizer holds them, so they must stay the same tensors.
        self.heads.load_state_dict(M3Heads.load(checkpoint_path).state_dict())


class _AverageHeadGradients(TrainerCallback):
    """Under torchrun, average the heads' gradients over the processes before each optimizer step (DDP averages
    the student's, but the heads belong to the loss, which DDP does not wrap)."""

    def __init__(self, heads: M3Heads) -> None:
        self.heads = heads

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if not torch.distributed.is_available() or not torch.distributed.is_initialized():
            return
        world = torch.distributed.get_world_size()
        for parameter in self.heads.parameters():
            if parameter.grad is not None:
                torch.distributed.all_reduce(parameter.grad)
                parameter.grad /= world


class _StepTimer(TrainerCallback):
    """Wall time of the training steps alone (no evaluation, no checkpointing)."""

    def __init__(self) -> None:
        self._started = 0.0
        self.seconds = 0.0
        self.steps = 0

    def on_step_begin(self, args, state, control, **kwargs):
        self._started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self.seconds += time.perf_counter() - self._started
        self.steps += 1

    @property
    def seconds_per_step(self) -> float:
        return self.seconds / self.steps if self.steps else 0.0


class _StudentProgress(TrainerCallback):
    """A step bar with the running loss (when ``show_bar``) and one logged line of dev metrics per evaluation."""

    def __init__(self, name: str, *, show_bar: bool) -> None:
        self.name = name
        self.show_bar = show_bar
        self.bar: Any = None

    def on_train_begin(self, args, state, control, **kwargs):
        if self.show_bar and state.is_world_process_zero:
            self.bar = tqdm(total=state.max_steps, initial=state.global_step, desc=self.name, unit="step",
                            dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.bar is not None and logs and "loss" in logs:
            self.bar.set_postfix(loss=f"{logs['loss']:.4g}", refresh=False)

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not state.is_world_process_zero or not metrics:
            return
        try:
            line = _format_metrics({key: value for key, value in dev_metrics(metrics).items() if key != "mse_x100"})
        except KeyError:  # not our dev evaluator's metrics
            return
        logger.info("%s step %d/%d: dev %s", self.name, state.global_step, state.max_steps, line)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def set_dropout(model: torch.nn.Module, rate: float) -> None:
    """Set the rate of every dropout module of ``model`` to ``rate``.

    The saved config keeps the teacher's rates, so whoever fine-tunes the student later gets the usual dropout.
    """
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = rate


def _schedule(training: TrainingConfig, n_train_texts: int) -> tuple[int, int, int]:
    """Total optimizer steps, evaluation interval and checkpoint interval (default: 8 evaluations per run)."""
    steps_per_epoch = max(1, n_train_texts // (training.batch_size * process_count()))
    if training.max_steps:
        total_steps = training.max_steps
    elif training.epochs:
        total_steps = max(1, math.ceil(training.epochs * steps_per_epoch))
    else:
        total_steps = DEFAULT_TRAINING_STEPS
    eval_steps = training.eval_steps or training.save_steps or max(1, total_steps // 8)
    save_steps = training.save_steps or eval_steps
    if save_steps % eval_steps:
        raise M3DistillError(
            f"training.save_steps ({save_steps}) must be a multiple of training.eval_steps ({eval_steps}): "
            "the best checkpoint is chosen among evaluated ones"
        )
    return total_steps, eval_steps, save_steps


def _best_metric_key(best_metric: str, *, has_top_k: bool) -> str:
    """The Trainer's name of the dev metric that picks the kept checkpoint (Spearman when top-k is not measured)."""
    if best_metric == "top_k" and has_top_k:
        return f"eval_dev_teacher_p@{DEV_TOP_K}"
    if best_metric == "mse":
        return "eval_dev_negative_mse"
    return "eval_dev_spearman_cosine"


def _best_dev_metrics(trainer: SentenceTransformerTrainer) -> dict[str, float] | None:
    """The dev metrics logged when the kept (best) checkpoint was evaluated: no need to evaluate it again."""
    best = trainer.state.best_model_checkpoint
    if not best:
        return None
    step = int(best.rsplit("-", 1)[-1])
    for entry in trainer.state.log_history:
        if entry.get("step") == step and "eval_dev_negative_mse" in entry:
            return dev_metrics({key: value for key, value in entry.items() if key.startswith("eval_dev_")})
    return None


def _text_groups(dataset: SynthDataset, texts: list[str]) -> list[int]:
    """The group of each training text: its context's (contexts, questions, crops) or its own (general text)."""
    context_of: dict[str, str] = {}
    for frame in (dataset.contexts, dataset.questions, dataset.crops):
        train = frame[frame["split"] == "train"]
        for text, context_id in zip(train["text"], train["context_id"]):
            context_of.setdefault(text, context_id)
    numbers: dict[str, int] = {}
    return [numbers.setdefault(context_of.get(text, f"\0{row}"), len(numbers)) for row, text in enumerate(texts)]


def context_repeats(texts: list[str], contexts: set[str], share: float | None) -> np.ndarray:
    """Rows of ``texts`` making one epoch: each text once, and the contexts among them repeated a whole number of
    times until they make up at least ``share`` of the rows (``None``: each text once).

    Repeating rather than dropping questions keeps every question; a whole number of copies keeps every context
    equally often, so the epoch's passages stay balanced.
    """
    rows = np.arange(len(texts))
    if share is None:
        return rows
    context_rows = np.array([row for row, text in enumerate(texts) if text in contexts], dtype=np.int64)
    n_other = len(texts) - len(context_rows)
    if not len(context_rows) or not n_other:
        return rows
    copies = math.ceil(share * n_other / ((1 - share) * len(context_rows)))  # at least 1: share and n_other > 0
    if copies > 1:
        logger.info("training.context_share %g: each context %d times per epoch (%d of %d texts are contexts)",
                    share, copies, copies * len(context_rows), copies * len(context_rows) + n_other)
    return np.concatenate([rows, np.tile(context_rows, copies - 1)])


def _train_dataset(texts: list[str], embeddings: np.ndarray) -> Dataset:
    """Texts with their teacher embeddings in the ``label`` column the loss reads."""
    labels = pa.FixedSizeListArray.from_arrays(pa.array(embeddings.reshape(-1), type=pa.float32()), embeddings.shape[1])
    return Dataset(pa.table({"text": pa.array(texts, type=pa.string()), "label": labels}))


def _format_metrics(metrics: dict[str, float]) -> str:
    return ", ".join(f"{key} {value:.4g}" for key, value in metrics.items() if value is not None)
