"""``m3distill synth``: a corpus -> contexts -> questions -> splits -> a dataset directory.

The directory's files are described in :mod:`m3distill.data.dataset`. It is written atomically (an interrupted
run leaves no dataset, or the previous one) and deterministically (same inputs and seed -> byte-identical files;
timings are reported in :class:`SynthSummary`, never in the files). The manifest records a sha256 of the inputs
(corpus contents, tokenizer vocabulary, settings): rerunning with the same inputs returns the existing dataset as
up to date, and different inputs are refused unless ``overwrite`` is set. LLM answers are cached beside the
directory, so a rerun after a crash repeats no finished request.
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

from m3distill import __version__
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


def synthesize(
    config: SynthConfig,
    out_dir: str | Path,
    *,
    tokenizer: str | Path,
    overwrite: bool = False,
    show_progress: bool = True,
) -> SynthSummary:
    """Build the dataset directory ``out_dir`` from ``config.corpus`` (and ``config.general``).

    Args:
        config: the synth settings; ``config.corpus`` must be set.
        out_dir: the dataset directory to write (usually ``<run_dir>/dataset``).
        tokenizer: model folder or hub id whose tokenizer counts context tokens (the teacher's).
        overwrite: replace an existing dataset made from other inputs. A non-empty folder that is not an m3distill
            dataset (no manifest.json) is never replaced, with or without ``overwrite``.
        show_progress: show progress bars.

    Raises:
        M3DistillError: no corpus, unreadable inputs, an unusable tokenizer or endpoint, split sizes that leave no
            training data, ``out_dir`` holding another dataset and ``overwrite`` unset, ``out_dir`` holding files
            that are not an m3distill dataset, or a corpus inside ``out_dir``.
    """
    started = time.perf_counter()
    if not config.corpus:
        raise M3DistillError("no corpus given: pass --corpus PATH (a file, folder or dataset) or set synth.corpus")
    out_dir = Path(out_dir)
    _check_inputs_outside(out_dir, {"corpus": config.corpus, "general": config.general})
    generator = make_question_generator(config, out_dir)

    corpus, general_corpus, loaded_tokenizer, inputs = _read_inputs(config, tokenizer)
    input_hash = hash_synth_inputs(inputs)

    replace = _check_out_dir(out_dir, input_hash, overwrite)
    if replace is None:
        logger.info("%s is up to date (same inputs and settings)", out_dir)
        return _summary_from_manifest(out_dir, time.perf_counter() - started)

    _warn_if_model_reads_less(tokenizer, loaded_tokenizer, config.max_tokens)
    contexts, duplicate_contexts = _chunk(corpus, loaded_tokenizer, config, show_progress, "chunking corpus")
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
        general_corpus, loaded_tokenizer, config, {context.text for context in contexts}, n_train_texts, show_progress
    )

    manifest = {
        "format": DATASET_FORMAT,
        "created_by": DATASET_CREATED_BY,
        "m3distill_version": __version__,
        "input_hash": input_hash,
        "inputs": inputs,
        "seed": config.seed,
        "corpus": {"source": config.corpus, "ingestion": corpus.report.to_dict()},
        "general": general_report,
        "chunking": {
            "tokenizer": str(tokenizer),
            "tokenizer_sha256": inputs["tokenizer"],
            "max_tokens": config.max_tokens,
            "overlap_tokens": config.overlap_tokens,
            "special_tokens_counted": False,
            "duplicate_contexts_dropped": duplicate_contexts,
        },
        "generator": {
            **generator.describe(),
            "dropped": dict(sorted(generation.dropped.items())),
            "missing": generation.stats.get("missing", 0),
        },
        "splits": {"by": "context", "dev": config.splits.dev, "test": config.splits.test},
        "counts": {
            "documents": len(corpus.documents),
            "contexts": _per_split(row["split"] for row in context_rows),
            "questions": _per_split(row["split"] for row in question_rows),
            "general": len(general_rows),
            "crops": dict(sorted(Counter(row["kind"] for row in crop_rows).items())),
        },
        "languages": dict(sorted(Counter(languages).items())) if config.detect_language else None,
    }
    # About what the tables hold (Parquet compresses the text; the ids and offsets are small beside it).
    needed = sum(len(row["text"].encode("utf-8")) for rows in (context_rows, question_rows, general_rows, crop_rows)
                 for row in rows)
    with disk_space_for(out_dir, needed), atomic_dir(out_dir, overwrite=replace, ours=DATASET_FILES) as tmp:
        write_table(tmp / CONTEXTS_FILE, context_rows, CONTEXT_SCHEMA)
        write_table(tmp / QUESTIONS_FILE, question_rows, QUESTION_SCHEMA)
        write_table(tmp / GENERAL_FILE, general_rows, GENERAL_SCHEMA)
        write_table(tmp / CROPS_FILE, crop_rows, CROP_SCHEMA)
        write_json_atomic(tmp / DATASET_MANIFEST_FILE, manifest)  # last: it marks the dataset complete

    summary = _summary(out_dir, manifest, time.perf_counter() - started)
    summary.generator_stats = dict(generation.stats)
    logger.info("synth: %s", summary.line())
    return summary


def _load(source: str, config: SynthConfig, max_documents: int | None) -> Corpus:
    return load_corpus(
        source,
        text_column=config.text_column,
        id_column=config.id_column,
        hf_split=config.hf_split,
        skip_bad_files=config.skip_bad_files,
        max_documents=max_documents,
    )


def synth_inputs(config: SynthConfig, *, tokenizer: str | Path) -> dict[str, Any]:
    """What a dataset is made from: the corpus and general contents, the tokenizer vocabulary and the settings.

    Reads the corpus (and general corpus) and loads the tokenizer; :func:`hash_synth_inputs` of the result is the
    ``input_hash`` that :func:`synthesize` records in the manifest, so a dataset is current exactly when they match.
    """
    return _read_inputs(config, tokenizer)[3]


def hash_synth_inputs(inputs: dict[str, Any]) -> str:
    """The sha256 of :func:`synth_inputs`: the dataset manifest's ``input_hash``."""
    return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode("utf-8")).hexdigest()


def _read_inputs(config: SynthConfig, tokenizer: str | Path) -> tuple[Corpus, Corpus | None, Any, dict[str, Any]]:
    if not config.corpus:
        raise M3DistillError("no corpus given: pass --corpus PATH (a file, folder or dataset) or set synth.corpus")
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
    inputs = {
        "corpus": corpus.fingerprint,
        "general": general.fingerprint if general else None,
        "tokenizer": tokenizer_hash,
        "settings": settings,
    }
    return corpus, general, loaded_tokenizer, inputs


def _check_inputs_outside(out_dir: Path, sources: dict[str, str | None]) -> None:
    """Refuse a corpus that lies inside ``out_dir``: writing the dataset replaces that folder, corpus and all."""
    for name, source in sources.items():
        if source and Path(source).expanduser().exists() and is_inside(source, out_dir):
            raise M3DistillError(
                f"the {name} {source} lies inside the output folder {out_dir}, which synth replaces; move the {name} "
                "out of it or choose another --out"
            )


def _check_out_dir(out_dir: Path, input_hash: str, overwrite: bool) -> bool | None:
    """``None`` when ``out_dir`` already holds this very dataset; else whether an existing folder is replaced.

    Only a folder carrying synth's marker (its manifest) is ever replaced, and only when it holds nothing but the
    dataset's files; any other non-empty folder (the user's, or another stage's output such as a teacher cache) is
    refused even with ``overwrite``, saying what it is.
    """
    kind = folder_kind(out_dir)
    if kind not in (None, "a dataset"):
        raise M3DistillError(
            f"{out_dir} is {kind}, not a dataset; synth replaces only a dataset it wrote, even with --overwrite: "
            "choose another --out"
        )
    if is_complete_dataset(out_dir):
        try:
            found = json.loads((out_dir / DATASET_MANIFEST_FILE).read_text(encoding="utf-8")).get("input_hash")
        except (json.JSONDecodeError, AttributeError):
            found = None
        if found == input_hash and not overwrite:
            return None
        if not overwrite:
            raise M3DistillError(
                f"{out_dir} already holds a dataset made from other inputs or settings; pass --overwrite to "
                "replace it, or choose another --out"
            )
        refuse_files_not_ours(out_dir, DATASET_FILES, replacing="replacing the dataset")
        return True
    if out_dir.exists():
        if not out_dir.is_dir():
            raise M3DistillError(f"{out_dir} is a file; --out must be a directory")
        if any(out_dir.iterdir()):
            if kind is None:
                raise M3DistillError(
                    f"{out_dir} is not empty and is not an m3distill dataset (no {DATASET_MANIFEST_FILE}); m3distill "
                    "never replaces it, even with --overwrite: choose another --out, or empty the folder yourself"
                )
            if not overwrite:
                raise M3DistillError(
                    f"{out_dir} holds an incomplete m3distill dataset; pass --overwrite to replace it, or choose "
                    "another --out"
                )
            refuse_files_not_ours(out_dir, DATASET_FILES, replacing="replacing the dataset")
        return True
    return False


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


def _summary_from_manifest(out_dir: Path, seconds: float) -> SynthSummary:
    manifest = json.loads((out_dir / DATASET_MANIFEST_FILE).read_text(encoding="utf-8"))
    return _summary(out_dir, manifest, seconds, up_to_date=True)
