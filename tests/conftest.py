"""Shared fixtures: the packaged MiniLM teacher, a tiny bge-m3-shaped model, and a small dataset directory.

Everything runs offline: the hub is switched off for the whole session so a test can never download.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import random
import shutil
from pathlib import Path

import pytest
import torch
from stand_in import TINY_SHAPE, make_xlmr_stand_in, packaged_minilm_path

from m3distill.data.dataset import CONTEXT_SCHEMA, GENERAL_SCHEMA, QUESTION_SCHEMA, write_table
from m3distill.layout import CONTEXTS_FILE, DATASET_MANIFEST_FILE, GENERAL_FILE, QUESTIONS_FILE

torch.set_num_threads(2)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The bundled sample corpus (domain/ and general/ folders of .txt documents)."""
    return SAMPLE_DIR


@pytest.fixture(scope="session")
def minilm_path() -> Path:
    """Folder of the packaged all-MiniLM-L6-v2 teacher."""
    return packaged_minilm_path()


@pytest.fixture(scope="session")
def minilm_teacher(minilm_path):
    """The MiniLM teacher, loaded once on the CPU. Tests must not modify it."""
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(minilm_path), device="cpu")


@pytest.fixture(scope="session")
def m3_teacher_path(tmp_path_factory, minilm_path) -> Path:
    """The M3 test teacher: a copy of the packaged MiniLM folder plus seeded bge-m3 sparse and ColBERT heads."""
    from m3distill.m3 import make_m3_test_teacher

    return make_m3_test_teacher(tmp_path_factory.mktemp("m3-teacher") / "minilm-m3", base=minilm_path)


@pytest.fixture(scope="session")
def tiny_xlmr_path(tmp_path_factory) -> Path:
    """A random 4-layer, 64-wide XLM-RoBERTa sentence-transformers folder with CLS pooling (bge-m3's shape, shrunk)."""
    return make_xlmr_stand_in(tmp_path_factory.mktemp("tiny-xlmr"), **TINY_SHAPE, max_seq_length=128)


def _paragraphs(folder: Path, per_language: int, rng: random.Random) -> list[tuple[str, str, str]]:
    """(doc_id, language, paragraph) triples, ``per_language`` documents per language, paragraphs cut to 400 chars."""
    found = []
    for language_dir in sorted(p for p in folder.iterdir() if p.is_dir()):
        files = sorted(language_dir.glob("*.txt"))[:per_language]
        for file in files:
            for index, paragraph in enumerate(file.read_text(encoding="utf-8").split("\n\n")[:3]):
                paragraph = paragraph.strip()[:400]
                if len(paragraph) > 60:
                    found.append((f"{language_dir.name}/{file.stem}", language_dir.name, paragraph))
    rng.shuffle(found)
    return found


def write_small_dataset(out_dir: Path, *, per_language: int = 4, seed: int = 0) -> Path:
    """A dataset directory in the format `m3distill synth` writes, built directly from the sample corpus.

    It does not use the synth code, so teacher/train/evaluate tests stay independent of it. Contexts are
    paragraphs; each has two pseudo-questions (its first sentence and its last words). Splits: 70/15/15.
    """
    rng = random.Random(seed)
    paragraphs = _paragraphs(SAMPLE_DIR / "domain", per_language, rng)
    contexts, questions = [], []
    seen: set[str] = set()
    for doc_id, language, text in paragraphs:
        if text in seen:
            continue
        seen.add(text)
        number = len(contexts)
        split = "train" if number % 20 < 14 else "dev" if number % 20 < 17 else "test"
        context_id = f"c{number:05d}"
        contexts.append(
            dict(context_id=context_id, doc_id=doc_id, chunk_index=0, char_start=0, char_end=len(text),
                 n_tokens=len(text.split()), language=language, split=split, text=text)
        )
        first_sentence = text.split(". ")[0][:120]
        last_words = " ".join(text.split()[-8:])
        for q, question in enumerate(dict.fromkeys([first_sentence, last_words])):
            questions.append(
                dict(question_id=f"q{number:05d}-{q}", context_id=context_id, split=split, generator="pseudo",
                     text=question)
            )
    general = [
        dict(general_id=f"g{i:05d}", split="train", text=text)
        for i, (_, _, text) in enumerate(_paragraphs(SAMPLE_DIR / "general", 2, rng)[:60])
        if text not in seen
    ]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_table(out_dir / CONTEXTS_FILE, contexts, CONTEXT_SCHEMA)
    write_table(out_dir / QUESTIONS_FILE, questions, QUESTION_SCHEMA)
    write_table(out_dir / GENERAL_FILE, general, GENERAL_SCHEMA)
    (out_dir / DATASET_MANIFEST_FILE).write_text('{"generator": "pseudo", "note": "test fixture"}\n', encoding="utf-8")
    return out_dir


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A ~200-context, 16-language dataset directory (read-only: copy it before modifying)."""
    return write_small_dataset(tmp_path_factory.mktemp("small-dataset") / "dataset")


@pytest.fixture(scope="session")
def few_documents(tmp_path_factory, sample_dir) -> Path:
    """Three English documents of the sample corpus in a folder of their own."""
    corpus = tmp_path_factory.mktemp("few-documents") / "docs"
    corpus.mkdir()
    for file in sorted((sample_dir / "domain" / "en").glob("*.txt"))[:3]:
        shutil.copy(file, corpus / file.name)
    return corpus
