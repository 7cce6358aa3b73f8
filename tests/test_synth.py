"""`m3distill synth` end to end: pseudo-queries, splits, general mixing, determinism, atomic output, the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
from pydantic import ValidationError

from m3distill.cli import main
from m3distill.config import SplitConfig, SynthConfig
from m3distill.data.chunking import Context
from m3distill.data.dataset import load_synth_dataset
from m3distill.data.questions import PseudoQueryGenerator
from m3distill.data.questions.base import comparable
from m3distill.data.splits import assign_splits, sample_general, split_sizes
from m3distill.errors import M3DistillError
from m3distill.layout import CONTEXTS_FILE, DATASET_MANIFEST_FILE
from m3distill.stages.synth import synthesize


def _context(context_id: str, text: str) -> Context:
    return Context(context_id, context_id.split("#")[0], 0, 0, len(text), len(text.split()), text)


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, sample_dir) -> tuple[Path, Path]:
    """Two documents per language from the sample corpus (domain) and one per language (general)."""
    root = tmp_path_factory.mktemp("small-corpus")
    for part, per_language in (("domain", 2), ("general", 1)):
        for language_dir in sorted((sample_dir / part).iterdir()):
            for file in sorted(language_dir.glob("*.txt"))[:per_language]:
                target = root / part / language_dir.name / file.name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(file, target)
    return root / "domain", root / "general"


def _config(corpus: Path, general: Path | None = None, **changes) -> SynthConfig:
    return SynthConfig(corpus=str(corpus), general=str(general) if general else None, max_tokens=96,
                       overlap_tokens=16, **changes)


def test_copied_sentences_are_spans_of_their_context_deterministic_and_order_free():
    contexts = [
        _context(f"doc{i}#0", f"Sentence one of doc {i} is here. The second sentence of doc {i} follows it. "
                              f"A third one about topic {i} closes the paragraph.")
        for i in range(20)
    ] + [_context("ja#0", "これは日本語の長い文章で、検索のための疑似クエリを作る例です。" * 3)]
    generator = PseudoQueryGenerator(questions_per_context=2, seed=7, query_shapes=["sentence"])

    forward = generator.generate(contexts, show_progress=False).questions
    backward = generator.generate(contexts[::-1], show_progress=False).questions[::-1]
    other_seed = PseudoQueryGenerator(questions_per_context=2, seed=8, query_shapes=["sentence"]).generate(
        contexts, show_progress=False).questions

    assert forward == backward
    assert forward != other_seed
    for context, questions in zip(contexts, forward):
        assert len(questions) == 2 and questions[0] != questions[1]
        assert all(comparable(question) in comparable(context.text) for question in questions)
    assert "pseudo-queries" in generator.describe()["note"]


def test_split_sizes_fractions_counts_and_impossible_requests():
    assert split_sizes(100, SplitConfig(dev=0.1, test=0.2)) == {"train": 70, "dev": 10, "test": 20}
    assert split_sizes(100, SplitConfig(dev=5, test=7)) == {"train": 88, "dev": 5, "test": 7}
    assert split_sizes(5, SplitConfig(dev=0.1, test=0.1)) == {"train": 3, "dev": 1, "test": 1}
    with pytest.raises(M3DistillError, match="leave no training contexts"):
        split_sizes(10, SplitConfig(dev=5, test=5))
    # Sizes no corpus can meet are refused with the settings, before any input is read.
    with pytest.raises(ValidationError, match="whole number"):
        SplitConfig(dev=2.5, test=0)
    with pytest.raises(ValidationError, match="leave no training contexts"):
        SplitConfig(dev=0.5, test=0.5)


def test_splits_and_general_sample_depend_on_seed_and_ids_not_order():
    ids = [f"doc{i}#{j}" for i in range(30) for j in range(3)]
    splits = dict(zip(ids, assign_splits(ids, SplitConfig(dev=0.2, test=0.1), seed=1)))
    reversed_splits = dict(zip(ids[::-1], assign_splits(ids[::-1], SplitConfig(dev=0.2, test=0.1), seed=1)))
    assert splits == reversed_splits
    assert list(splits.values()).count("dev") == 18 and list(splits.values()).count("test") == 9
    assert splits != dict(zip(ids, assign_splits(ids, SplitConfig(dev=0.2, test=0.1), seed=2)))

    chosen = sample_general(ids, 10, seed=3)
    assert len(chosen) == 10 and chosen == sorted(chosen)
    assert {ids[i] for i in chosen} == {ids[::-1][i] for i in sample_general(ids[::-1], 10, seed=3)}


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory, sample_dir, minilm_path):
    """`m3distill synth` on the whole bundled sample (domain + general), as the demo runs it, crops switched on."""
    out = tmp_path_factory.mktemp("sample-run") / "dataset"
    config = SynthConfig(corpus=str(sample_dir / "domain"), general=str(sample_dir / "general"), max_tokens=128,
                         overlap_tokens=16, crop_sentences=True, crop_spans=2)
    summary = synthesize(config, out, tokenizer=minilm_path, show_progress=False)
    return summary, load_synth_dataset(out)


def test_sample_dataset_keeps_every_context_and_its_questions_in_one_split(sample_run):
    summary, dataset = sample_run
    contexts, questions, general = dataset.contexts, dataset.questions, dataset.general

    assert contexts["context_id"].is_unique and questions["question_id"].is_unique
    assert not contexts["text"].duplicated().any()
    split_of = dict(zip(contexts["context_id"], contexts["split"]))
    assert set(questions["context_id"]) <= set(split_of)
    assert (questions["split"] == questions["context_id"].map(split_of)).all()
    assert set(general["split"]) == {"train"}
    assert not set(general["text"]) & set(contexts["text"])
    assert (contexts["n_tokens"] <= 128).all()

    counts = dataset.manifest["counts"]
    assert counts["contexts"] == contexts["split"].value_counts().to_dict() == summary.contexts
    assert counts["questions"] == questions["split"].value_counts().to_dict() == summary.questions
    assert counts["general"] == len(general) == summary.general
    assert 0.05 < counts["contexts"]["test"] / len(contexts) < 0.15
    assert len(summary.languages) >= 8 and {"en", "de", "ja", "ru"} <= set(summary.languages)
    assert summary.languages == contexts["language"].value_counts().to_dict()
    assert "pseudo-queries" in dataset.manifest["generator"]["note"]


def test_sample_dataset_mixes_general_text_by_ratio(sample_run):
    _, dataset = sample_run
    report = dataset.manifest["general"]
    n_train = (dataset.contexts["split"] == "train").sum() + (dataset.questions["split"] == "train").sum()
    assert report["wanted"] == round(n_train * report["ratio"])
    assert report["used"] == len(dataset.general) == min(report["wanted"], report["available"])


def test_crops_are_sentences_and_spans_of_training_contexts_only(sample_run):
    from m3distill.data.chunking import sentence_spans

    summary, dataset = sample_run
    crops, contexts = dataset.crops, dataset.contexts.set_index("context_id")
    assert len(crops) > len(contexts[contexts["split"] == "train"])
    assert set(crops["split"]) == {"train"} and set(crops["kind"]) == {"sentence", "span"}
    assert (contexts.loc[crops["context_id"], "split"] == "train").all()
    assert crops["crop_id"].is_unique and not crops["text"].duplicated().any()
    # Every crop lies inside its own context and is shorter; none repeats a context or a question.
    for text, kind, context_id in zip(crops["text"], crops["kind"], crops["context_id"]):
        own = contexts.loc[context_id, "text"]
        if kind == "sentence":
            assert text in {own[start:end] for start, end in sentence_spans(own)}
        else:
            assert " ".join(text.split()) in " ".join(own.split()) or text in own
        assert len(text) < len(own)
    assert not set(crops["text"]) & (set(contexts["text"]) | set(dataset.questions["text"]))
    assert dataset.manifest["counts"]["crops"] == crops["kind"].value_counts().to_dict()
    assert summary.crops == len(crops)
    # Training reads them; dev and test texts never include them.
    assert set(crops["text"]) <= set(dataset.texts(["train"]))
    assert not set(crops["text"]) & set(dataset.texts(["dev", "test"]))


def test_crops_are_off_by_default_and_each_kind_switches_on_alone(tmp_path, small_corpus, minilm_path):
    corpus, _ = small_corpus
    synthesize(_config(corpus), tmp_path / "default", tokenizer=minilm_path, show_progress=False)
    assert load_synth_dataset(tmp_path / "default").crops.empty
    synthesize(_config(corpus, crop_sentences=True, crop_spans=2), tmp_path / "both", tokenizer=minilm_path,
               show_progress=False)
    both = load_synth_dataset(tmp_path / "both")
    assert set(both.crops["kind"]) == {"sentence", "span"}
    train_contexts = both.split_contexts("train")
    spans = both.crops[both.crops["kind"] == "span"]
    assert spans.groupby("context_id").size().max() == 2 and set(spans["context_id"]) <= set(train_contexts["context_id"])
    synthesize(_config(corpus, crop_spans=1), tmp_path / "spans", tokenizer=minilm_path, show_progress=False)
    assert set(load_synth_dataset(tmp_path / "spans").crops["kind"]) == {"span"}
    synthesize(_config(corpus, crop_sentences=True), tmp_path / "sentences", tokenizer=minilm_path,
               show_progress=False)
    assert set(load_synth_dataset(tmp_path / "sentences").crops["kind"]) == {"sentence"}


def test_a_dataset_without_crops_still_loads(tmp_path, small_corpus, minilm_path):
    corpus, _ = small_corpus
    synthesize(_config(corpus, crop_sentences=True), tmp_path / "d", tokenizer=minilm_path, show_progress=False)
    (tmp_path / "d" / "crops.parquet").unlink()  # as m3distill 0.1 wrote it
    dataset = load_synth_dataset(tmp_path / "d")
    assert dataset.crops.empty and dataset.texts(["train"])


def test_sample_dataset_loads_with_datasets_parquet(sample_run):
    import datasets

    summary, dataset = sample_run
    loaded = datasets.load_dataset("parquet", data_files={"train": str(dataset.root / CONTEXTS_FILE)})["train"]
    assert loaded.num_rows == len(dataset.contexts)
    assert loaded[0]["text"] == dataset.contexts["text"].iloc[0]


def test_same_seed_gives_byte_identical_files_and_a_rerun_is_up_to_date(tmp_path, small_corpus, minilm_path):
    domain, general = small_corpus
    config = _config(domain, general)
    first = synthesize(config, tmp_path / "a" / "dataset", tokenizer=minilm_path, show_progress=False)
    synthesize(config, tmp_path / "b" / "dataset", tokenizer=minilm_path, show_progress=False)

    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(files) == 5  # contexts, questions, crops, general, manifest
    for file in files:
        assert (tmp_path / "a" / file).read_bytes() == (tmp_path / "b" / file).read_bytes(), file

    again = synthesize(config, tmp_path / "a" / "dataset", tokenizer=minilm_path, show_progress=False)
    assert again.up_to_date and not first.up_to_date
    assert (again.contexts, again.questions) == (first.contexts, first.questions)

    reseeded = _config(domain, general, seed=1)
    with pytest.raises(M3DistillError, match="--overwrite"):
        synthesize(reseeded, tmp_path / "a" / "dataset", tokenizer=minilm_path, show_progress=False)
    synthesize(reseeded, tmp_path / "a" / "dataset", tokenizer=minilm_path, overwrite=True, show_progress=False)
    assert (tmp_path / "a" / "dataset" / CONTEXTS_FILE).read_bytes() != (tmp_path / "b" / "dataset" / CONTEXTS_FILE).read_bytes()


def test_an_interrupted_run_leaves_no_dataset(tmp_path, small_corpus, minilm_path, monkeypatch):
    def interrupted(self, contexts, *, languages=None, show_progress=True):
        raise KeyboardInterrupt

    monkeypatch.setattr(PseudoQueryGenerator, "generate", interrupted)
    with pytest.raises(KeyboardInterrupt):
        synthesize(_config(small_corpus[0]), tmp_path / "dataset", tokenizer=minilm_path, show_progress=False)
    assert list(tmp_path.iterdir()) == []


def _cli(*args: str) -> list[str]:
    return ["-q", "synth", *args]


def test_cli_bad_file_is_one_line_exit_2_and_nothing_written(tmp_path, capsys, minilm_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "good.txt").write_text("A perfectly good document. It has two sentences.", encoding="utf-8")
    (corpus / "broken.txt").write_bytes(b"\xff\xfe\x00 not utf-8 \xc3\x28")
    out = tmp_path / "run" / "dataset"

    code = main(_cli("--corpus", str(corpus), "--out", str(out), "--tokenizer", str(minilm_path)))

    stderr = capsys.readouterr().err.strip()
    assert code == 2
    assert len(stderr.splitlines()) == 1 and "broken.txt" in stderr and "UTF-8" in stderr
    assert not out.exists() and not out.parent.exists()

    code = main(_cli("--corpus", str(corpus), "--out", str(out), "--tokenizer", str(minilm_path), "--skip-bad-files",
                     "--dev", "0", "--test", "0"))
    assert code == 0
    manifest = json.loads((out / DATASET_MANIFEST_FILE).read_text(encoding="utf-8"))
    assert manifest["corpus"]["ingestion"]["bad_files"][0].startswith("broken.txt:")
    assert "1 documents -> 1 contexts" in capsys.readouterr().out


def test_cli_missing_column_is_one_line_exit_2(tmp_path, capsys, minilm_path):
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text('{"body": "Some text."}\n', encoding="utf-8")
    code = main(_cli("--corpus", str(corpus), "--out", str(tmp_path / "dataset"), "--tokenizer", str(minilm_path)))
    stderr = capsys.readouterr().err.strip()
    assert code == 2 and len(stderr.splitlines()) == 1
    assert "docs.jsonl" in stderr and "no column 'text'" in stderr
    assert not (tmp_path / "dataset").exists()


def test_cli_flags_reach_the_dataset(tmp_path, capsys, small_corpus, minilm_path):
    out = tmp_path / "dataset"
    code = main(_cli("--corpus", str(small_corpus[0]), "--out", str(out), "--tokenizer", str(minilm_path),
                     "--max-tokens", "48", "--overlap-tokens", "8", "--questions-per-context", "1", "--seed", "5",
                     "--dev", "3", "--test", "4", "--no-language-detection"))
    assert code == 0
    summary = capsys.readouterr().out.strip()
    assert summary.startswith("m3distill synth: ") and len(summary.splitlines()) == 1
    contexts = pd.read_parquet(out / CONTEXTS_FILE)
    manifest = json.loads((out / DATASET_MANIFEST_FILE).read_text(encoding="utf-8"))
    assert contexts["n_tokens"].max() <= 48
    assert contexts["split"].value_counts().to_dict()["dev"] == 3
    assert contexts["split"].value_counts().to_dict()["test"] == 4
    assert set(contexts["language"]) == {"und"} and manifest["languages"] is None
    assert (manifest["seed"], manifest["generator"]["questions_per_context"]) == (5, 1)
    assert manifest["chunking"]["max_tokens"] == 48 and manifest["chunking"]["special_tokens_counted"] is False


def test_no_corpus_is_a_clear_error(tmp_path, minilm_path):
    with pytest.raises(M3DistillError, match="--corpus"):
        synthesize(SynthConfig(), tmp_path / "dataset", tokenizer=minilm_path)
