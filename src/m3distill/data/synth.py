"""``m3distill synth``'s work: a corpus -> contexts -> questions -> splits -> a dataset directory.

The directory's files are described in :mod:`m3distill.data.dataset`. It is written atomically (an interrupted
run leaves no dataset, or the previous one) and deterministically (same inputs and seed -> byte-identical files;
timings are reported in :class:`SynthSummary`, never in the files). The manifest records a sha256 of the inputs
(corpus contents, tokenizer vocabulary, settings), which the synth stage (:mod:`m3distill.stages.synth`) compares:
rerunning with the same inputs returns the existing dataset as up to date, and different inputs are refused unless
``overwrite`` is set. LLM answers are cached beside the directory, so a rerun after a crash repeats no finished
request.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from m3distill._version import __version__
from m3distill.atomic import atomic_dir, disk_space_for, refuse_files_not_ours, write_json_atomic
from m3distill.config import SynthConfig, settings_record
from m3distill.data.chunking import Context, chunk_documents, load_tokenizer, model_token_limit
from m3distill.data.corpus import Corpus, load_corpus
from m3distill.data.crops import context_crops
from m3distill.data.dataset import (
    CONTEXT_SCHEMA,
    CROP_SCHEMA,
    GENERAL_SCHEMA,
    QUESTION_SCHEMA,
    is_complete_dataset,
    write_table,
)
from m3distill.data.questions import make_question_generator
from m3distill.data.splits import assign_splits, general_budget, sample_general
from m3distill.errors import M3DistillError
from m3distill.layout import (
    CONTEXTS_FILE,
    CROPS_FILE,
    DATASET_CREATED_BY,
    DATASET_FILES,
    DATASET_MANIFEST_FILE,
    GENERAL_FILE,
    QUESTIONS_FILE,
    SPLITS,
    folder_kind,
    is_inside,
)

logger = logging.getLogger(__name__)

DATASET_FORMAT = 1
UNKNOWN_LANGUAGE = "und"
# LLM settings that change how answers are fetched, not what they are: left out of the input hash.
_TRANSPORT_SETTINGS = ("concurrency", "timeout_s", "max_retries", "backoff_s", "cache_path", "api_key_env")
NO_CORPUS = ("no corpus configured: set synth.corpus in the config or pass --corpus PATH (a file, folder or "
              "dataset id)")


@dataclass
class SynthSummary:
    """What ``synthesize`` made (or found up to date) in ``out_dir``.

    ``contexts`` and ``questions`` count per split; ``languages`` counts contexts per detected language;
    ``generator_stats`` holds request/cache counters of the question generator (empty when up to date).
    """

    out_dir: Path
    documents: int
    contexts: dict[str, int]
    questions: dict[str, int]
    general: int
    crops: int
    languages: dict[str, int]
    dropped_questions: dict[str, int]
    seconds: float
    up_to_date: bool = False
    generator_stats: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        """The one-line summary the CLI prints."""
        per_split = "/".join(str(self.contexts.get(split, 0)) for split in SPLITS)
        questions = "/".join(str(self.questions.get(split, 0)) for split in SPLITS)
        state = "up to date" if self.up_to_date else f"in {self.seconds:.1f}s"
        return (
            f"{self.documents} documents -> {sum(self.contexts.values())} contexts (train/dev/test {per_split}), "
            f"{sum(self.questions.values())} questions ({questions}), {self.crops} crops, {self.general} general texts, "
            f"{len(self.languages)} languages; {state} -> {self.out_dir}"
        )


def write_dataset(
    config: SynthConfig,
    out_dir: str | Path,
    *,
    tokenizer: str | Path,
    overwrite: bool = False,
    show_progress: bool = True,
    inputs: SynthInputs | None = None,
) -> SynthSummary:
    """Build the dataset directory ``out_dir`` from ``config.corpus`` (and ``config.general``).

    Whether a dataset already in ``out_dir`` is current is the synth stage's question
    (:func:`m3distill.stages.synth.synthesize`); this writes the dataset when asked.

    Args:
        config: the synth settings; ``config.corpus`` must be set.
        out_dir: the dataset directory to write (usually ``<run_dir>/dataset``).
        tokenizer: model folder or hub id whose tokenizer counts context tokens (the teacher's).
        overwrite: replace a dataset already in ``out_dir``. A non-empty folder that is not an m3distill dataset
            (no manifest.json) is never replaced, with or without ``overwrite``.
        show_progress: show progress bars.
        inputs: the inputs as the synth stage read them for its fingerprint (:func:`read_synth_inputs`), so they
            are not read twice; read here when None.

    Raises:
        M3DistillError: no corpus, unreadable inputs, an unusable tokenizer or endpoint, split sizes that leave no
            training data, ``out_dir`` holding a dataset and ``overwrite`` unset, ``out_dir`` holding files that are
            not an m3distill dataset, or a corpus inside ``out_dir``.
    """
    started = time.perf_counter()
    if not config.corpus:
        raise M3DistillError(NO_CORPUS)
    out_dir = Path(out_dir)
    _check_inputs_outside(out_dir, {"corpus": config.corpus, "general": config.general})
    generator = make_question_generator(config, out_dir)
    inputs = inputs if inputs is not None else read_synth_inputs(config, tokenizer=tokenizer)
    replace = _check_out_dir(out_dir, overwrite)

    _warn_if_model_reads_less(tokenizer, inputs.tokenizer, config.max_tokens)
    rows = _dataset_rows(config, inputs, generator, show_progress)
    manifest = _manifest(config, inputs, str(tokenizer), generator.describe(), rows)
    # About what the tables hold (Parquet compresses the text; the ids and offsets are small beside it).
    needed = sum(len(row["text"].encode("utf-8")) for table in (rows.contexts, rows.questions, rows.general, rows.crops)
                 for row in table)
    with disk_space_for(out_dir, needed), atomic_dir(out_dir, overwrite=replace, ours=DATASET_FILES) as tmp:
        write_table(tmp / CONTEXTS_FILE, rows.contexts, CONTEXT_SCHEMA)
        write_table(tmp / QUESTIONS_FILE, rows.questions, QUESTION_SCHEMA)
        write_table(tmp / GENERAL_FILE, rows.general, GENERAL_SCHEMA)
        write_table(tmp / CROPS_FILE, rows.crops, CROP_SCHEMA)
        write_json_atomic(tmp / DATASET_MANIFEST_FILE, manifest)  # last: it marks the dataset complete

    summary = _summary(out_dir, manifest, time.perf_counter() - started)
    summary.generator_stats = dict(rows.generation.stats)
    logger.info("synth: %s", summary.line())
    return summary


@dataclass
class _DatasetRows:
    """The rows of the dataset's four tables, and what making them found."""

    contexts: list[dict[str, Any]]
    questions: list[dict[str, Any]]
    crops: list[dict[str, Any]]
    general: list[dict[str, Any]]
    general_report: dict[str, Any] | None
    languages: list[str]
    duplicate_contexts: int
    generation: Any  # the question generator's Generation: questions, dropped, stats


def _dataset_rows(config: SynthConfig, inputs: SynthInputs, generator: Any, show_progress: bool) -> _DatasetRows:
    """Contexts, their languages and splits, their questions and crops, and the general texts."""
    contexts, duplicate_contexts = _chunk(inputs.corpus, inputs.tokenizer, config, show_progress, "chunking corpus")
    languages = _languages(contexts, config.detect_language, show_progress)
    splits = assign_splits([context.context_id for context in contexts], config.splits, config.seed)
    generation = generator.generate(contexts, languages=languages if config.detect_language else None,
                                    show_progress=show_progress)
    context_rows = [
        {**_context_fields(context), "language": language, "split": split}
        for context, language, split in zip(contexts, languages, splits)
    ]
    question_rows = [
        {"question_id": f"{context.context_id}#q{number}", "context_id": context.context_id, "split": split,
         "generator": generator.name, "text": question}
        for context, split, questions in zip(contexts, splits, generation.questions)
        for number, question in enumerate(questions)
    ]
    domain_texts = {row["text"] for row in question_rows} | {context.text for context in contexts}
    crop_rows = [
        row for row in context_crops(contexts, splits, sentences=config.crop_sentences,
                                     spans_per_context=config.crop_spans, seed=config.seed)
        if row["text"] not in domain_texts  # a crop equal to a question or context adds nothing
    ]
    n_train_texts = sum(split == "train" for split in splits) + sum(row["split"] == "train" for row in question_rows)
    general_rows, general_report = _general(
        inputs.general, inputs.tokenizer, config, {context.text for context in contexts}, n_train_texts, show_progress
    )
    return _DatasetRows(context_rows, question_rows, crop_rows, general_rows, general_report, languages,
                        duplicate_contexts, generation)


def _manifest(config: SynthConfig, inputs: SynthInputs, tokenizer: str, generator: dict[str, Any],
              rows: _DatasetRows) -> dict[str, Any]:
    """The dataset's manifest: what it was made from (``input_hash``, ``inputs``), how, and what it holds."""
    return {
        "format": DATASET_FORMAT,
        "created_by": DATASET_CREATED_BY,
        "m3distill_version": __version__,
        "input_hash": inputs.input_hash,
        "inputs": inputs.record,
        "seed": config.seed,
        "corpus": {"source": config.corpus, "ingestion": inputs.corpus.report.to_dict()},
        "general": rows.general_report,
        "chunking": {
            "tokenizer": tokenizer,
            "tokenizer_sha256": inputs.record["tokenizer"],
            "max_tokens": config.max_tokens,
            "overlap_tokens": config.overlap_tokens,
            "special_tokens_counted": False,
            "duplicate_contexts_dropped": rows.duplicate_contexts,
        },
        "generator": {
            **generator,
            "dropped": dict(sorted(rows.generation.dropped.items())),
            "missing": rows.generation.stats.get("missing", 0),
        },
        "splits": {"by": "context", "dev": config.splits.dev, "test": config.splits.test},
        "counts": {
            "documents": len(inputs.corpus.documents),
            "contexts": _per_split(row["split"] for row in rows.contexts),
            "questions": _per_split(row["split"] for row in rows.questions),
            "general": len(rows.general),
            "crops": dict(sorted(Counter(row["kind"] for row in rows.crops).items())),
        },
        "languages": dict(sorted(Counter(rows.languages).items())) if config.detect_language else None,
    }


def _load(source: str, config: SynthConfig, max_documents: int | None) -> Corpus:
    return load_corpus(
        source,
        text_column=config.text_column,
        id_column=config.id_column,
        hf_split=config.hf_split,
        skip_bad_files=config.skip_bad_files,
        max_documents=max_documents,
    )


@dataclass(frozen=True)
class SynthInputs:
    """What a dataset is made from, read once: the corpus, the general corpus, the loaded tokenizer, and their
    ``record`` (the corpus and general contents, the tokenizer vocabulary and the settings) that the manifest
    keeps, with its hash as ``input_hash``."""

    corpus: Corpus
    general: Corpus | None
    tokenizer: Any
    record: dict[str, Any]

    @property
    def input_hash(self) -> str:
        return hash_synth_inputs(self.record)


def synth_inputs(config: SynthConfig, *, tokenizer: str | Path) -> dict[str, Any]:
    """What a dataset is made from: the corpus and general contents, the tokenizer vocabulary and the settings.

    Reads the corpus (and general corpus) and loads the tokenizer; :func:`hash_synth_inputs` of the result is the
    ``input_hash`` that :func:`write_dataset` records in the manifest.
    """
    return read_synth_inputs(config, tokenizer=tokenizer).record


def hash_synth_inputs(inputs: dict[str, Any]) -> str:
    """The sha256 of :func:`synth_inputs`: the dataset manifest's ``input_hash``."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()


def read_synth_inputs(config: SynthConfig, *, tokenizer: str | Path) -> SynthInputs:
    """Read the corpus (and general corpus) and load the tokenizer: :class:`SynthInputs`."""
    if not config.corpus:
        raise M3DistillError(NO_CORPUS)
    corpus = _load(config.corpus, config, config.max_documents)
    general = _load(config.general, config, None) if config.general else None
    loaded_tokenizer = load_tokenizer(tokenizer)
    tokenizer_hash = hashlib.sha256(loaded_tokenizer.backend_tokenizer.to_str().encode("utf-8")).hexdigest()
    # Paths are left out (the contents count, not where they lie); so are LLM settings when no LLM is used. The
    # record is redacted before it is hashed: the endpoint's host counts, a credential in its URL does not.
    settings = settings_record(config, exclude={"corpus", "general"})
    if config.generator == "llm":
        settings["llm"] = {k: v for k, v in settings["llm"].items() if k not in _TRANSPORT_SETTINGS}
    else:
        settings.pop("llm")
    record = {
        "corpus": corpus.fingerprint,
        "general": general.fingerprint if general else None,
        "tokenizer": tokenizer_hash,
        "settings": settings,
    }
    return SynthInputs(corpus, general, loaded_tokenizer, record)


def _check_inputs_outside(out_dir: Path, sources: dict[str, str | None]) -> None:
    """Refuse a corpus that lies inside ``out_dir``: writing the dataset replaces that folder, corpus and all."""
    for name, source in sources.items():
        if source and Path(source).expanduser().exists() and is_inside(source, out_dir):
            raise M3DistillError(
                f"the {name} {source} lies inside the output folder {out_dir}, which synth replaces; move the {name} "
                "out of it or choose another --out"
            )


def _check_out_dir(out_dir: Path, overwrite: bool) -> bool:
    """Whether an existing folder in ``out_dir`` is replaced (False: there is none, or it is empty).

    Only a folder carrying synth's marker (its manifest) is ever replaced, only with ``overwrite``, and only when it
    holds nothing but the dataset's files; any other non-empty folder (the user's, or another stage's output such as
    a teacher cache) is refused even with ``overwrite``, saying what it is.
    """
    kind = folder_kind(out_dir)
    if kind not in (None, "a dataset"):
        raise M3DistillError(
            f"{out_dir} is {kind}, not a dataset; synth replaces only a dataset it wrote, even with --overwrite: "
            "choose another --out"
        )
    if not out_dir.exists():
        return False
    if not out_dir.is_dir():
        raise M3DistillError(f"{out_dir} is a file; --out must be a directory")
    if not any(out_dir.iterdir()):
        return True
    if kind is None:
        raise M3DistillError(
            f"{out_dir} is not empty and is not an m3distill dataset (no {DATASET_MANIFEST_FILE}); m3distill "
            "never replaces it, even with --overwrite: choose another --out, or empty the folder yourself"
        )
    if not overwrite:
        state = "a dataset" if is_complete_dataset(out_dir) else "an incomplete m3distill dataset"
        raise M3DistillError(f"{out_dir} already holds {state}; pass --overwrite to replace it, or choose another --out")
    refuse_files_not_ours(out_dir, DATASET_FILES, replacing="replacing the dataset")
    return True


def _warn_if_model_reads_less(name: str | Path, tokenizer: Any, max_tokens: int) -> None:
    limit = model_token_limit(name, tokenizer)
    if limit is not None and max_tokens > limit:
        logger.warning(
            "max_tokens %d is more than %s reads (%d tokens besides its special tokens): the model will cut longer "
            "contexts; lower --max-tokens to %d", max_tokens, name, limit, limit,
        )


def _chunk(
    corpus: Corpus, tokenizer: Any, config: SynthConfig, show_progress: bool, description: str
) -> tuple[list[Context], int]:
    """Contexts of a corpus, dropping repeats of an earlier context's text (boilerplate shared by documents)."""
    contexts = chunk_documents(
        corpus.documents,
        tokenizer,
        max_tokens=config.max_tokens,
        overlap_tokens=config.overlap_tokens,
        show_progress=show_progress,
        description=description,
    )
    unique: dict[str, Context] = {}
    for context in contexts:
        unique.setdefault(context.text, context)
    if len(unique) < len(contexts):
        logger.info("dropped %d contexts repeating an earlier one word for word", len(contexts) - len(unique))
    return list(unique.values()), len(contexts) - len(unique)


def _languages(contexts: Sequence[Context], detect: bool, show_progress: bool) -> list[str]:
    if not detect:
        return [UNKNOWN_LANGUAGE] * len(contexts)
    import py3langid

    return [
        py3langid.classify(context.text)[0]
        for context in tqdm(contexts, desc="languages", unit="ctx", disable=not show_progress)
    ]


def _general(
    general: Corpus | None,
    tokenizer: Any,
    config: SynthConfig,
    domain_texts: set[str],
    n_domain_train_texts: int,
    show_progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any] | None]:
    """Training-only general texts (chunked like the corpus), sampled by ``general_ratio``, and their report."""
    if general is None:
        return [], None
    contexts, duplicates = _chunk(general, tokenizer, config, show_progress, "chunking general")
    # A general text identical to a domain context would put test text into training.
    available = [context for context in contexts if context.text not in domain_texts]
    budget = general_budget(n_domain_train_texts, config.general_ratio)
    chosen = sample_general([context.context_id for context in available], budget, config.seed)
    rows = [{"general_id": available[index].context_id, "split": "train", "text": available[index].text} for index in chosen]
    report = {
        "source": config.general,
        "ingestion": general.report.to_dict(),
        "contexts": len(contexts) + duplicates,
        "duplicates_dropped": duplicates + len(contexts) - len(available),
        "available": len(available),
        "ratio": config.general_ratio,
        "wanted": budget,
        "used": len(rows),
    }
    if budget > len(available):
        logger.info("general corpus: %d texts wanted (ratio %s), only %d available", budget, config.general_ratio,
                    len(available))
    return rows, report


def _context_fields(context: Context) -> dict[str, Any]:
    return {
        "context_id": context.context_id,
        "doc_id": context.doc_id,
        "chunk_index": context.chunk_index,
        "char_start": context.char_start,
        "char_end": context.char_end,
        "n_tokens": context.n_tokens,
        "text": context.text,
    }


def _per_split(splits: Any) -> dict[str, int]:
    counts = Counter(splits)
    return {split: counts.get(split, 0) for split in SPLITS}


def _summary(out_dir: Path, manifest: dict[str, Any], seconds: float, *, up_to_date: bool = False) -> SynthSummary:
    counts = manifest["counts"]
    return SynthSummary(
        out_dir=out_dir,
        documents=counts["documents"],
        contexts=dict(counts["contexts"]),
        questions=dict(counts["questions"]),
        general=counts["general"],
        crops=sum(counts.get("crops", {}).values()),
        languages=dict(manifest.get("languages") or {}),
        dropped_questions=dict(manifest["generator"].get("dropped", {})),
        seconds=seconds,
        up_to_date=up_to_date,
    )


def read_dataset_summary(out_dir: str | Path, seconds: float = 0.0) -> SynthSummary:
    """What the finished dataset in ``out_dir`` holds, read from its manifest, as the summary of a dataset found up to
    date."""
    out_dir = Path(out_dir)
    manifest = json.loads((out_dir / DATASET_MANIFEST_FILE).read_text(encoding="utf-8"))
    return _summary(out_dir, manifest, seconds, up_to_date=True)
