"""Token-aware chunking with the real MiniLM tokenizer: limits, spans, boundaries, overlap."""

from __future__ import annotations

import re

import pytest

from m3distill.data.chunking import chunk_documents, load_tokenizer, sentence_spans
from m3distill.data.corpus import Document, load_corpus
from m3distill.errors import M3DistillError


@pytest.fixture(scope="module")
def tokenizer(minilm_path):
    return load_tokenizer(minilm_path)


@pytest.fixture(scope="module")
def sample_documents(sample_dir) -> list[Document]:
    """Three documents per language of the sample corpus (16 languages, Latin, Cyrillic, CJK, Hangul)."""
    documents = load_corpus(sample_dir / "domain").documents
    per_language: dict[str, list[Document]] = {}
    for document in documents:
        per_language.setdefault(document.doc_id.split("/")[0], []).append(document)
    return [document for group in per_language.values() for document in group[:3]]


def _standalone_count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@pytest.mark.parametrize(("max_tokens", "overlap_tokens"), [(256, 32), (64, 16), (16, 0)])
def test_contexts_respect_the_limit_and_span_their_document(tokenizer, sample_documents, max_tokens, overlap_tokens):
    contexts = chunk_documents(
        sample_documents, tokenizer, max_tokens=max_tokens, overlap_tokens=overlap_tokens, show_progress=False
    )
    by_id = {document.doc_id: document.text for document in sample_documents}

    assert {context.doc_id for context in contexts} == set(by_id)
    for context in contexts:
        assert by_id[context.doc_id][context.char_start : context.char_end] == context.text
        assert context.n_tokens == _standalone_count(tokenizer, context.text)
        assert 0 < context.n_tokens <= max_tokens
        assert context.text == context.text.strip()
    for doc_id, text in by_id.items():
        own = [context for context in contexts if context.doc_id == doc_id]
        assert [context.chunk_index for context in own] == list(range(len(own)))
        for previous, following in zip(own, own[1:]):
            assert following.char_start > previous.char_start and following.char_end > previous.char_end
        covered = [False] * len(text)
        for context in own:
            covered[context.char_start : context.char_end] = [True] * (context.char_end - context.char_start)
        assert all(covered[i] for i, char in enumerate(text) if not char.isspace()), f"text of {doc_id} lost"


def test_contexts_end_at_sentence_ends_and_overlap_by_whole_sentences(tokenizer):
    sentences = [f"Sentence number {i} talks about topic {i} at some length." for i in range(40)]
    document = Document("doc", " ".join(sentences))

    contexts = chunk_documents([document], tokenizer, max_tokens=60, overlap_tokens=15, show_progress=False)

    assert len(contexts) > 3
    for context in contexts:
        assert context.text.endswith(".")
        assert context.text.startswith("Sentence number")
    for previous, following in zip(contexts, contexts[1:]):
        assert following.char_start < previous.char_end, "consecutive contexts share a sentence"
        shared = document.text[following.char_start : previous.char_end]
        assert _standalone_count(tokenizer, shared) <= 15


def test_without_overlap_contexts_do_not_share_text(tokenizer):
    document = Document("doc", " ".join(f"Short sentence {i} here." for i in range(60)))
    contexts = chunk_documents([document], tokenizer, max_tokens=40, overlap_tokens=0, show_progress=False)
    for previous, following in zip(contexts, contexts[1:]):
        assert following.char_start > previous.char_end


def test_paragraph_break_is_preferred_when_it_fills_half_a_context(tokenizer):
    first = " ".join(f"First paragraph sentence {i}." for i in range(8))
    second = " ".join(f"Second paragraph sentence {i}." for i in range(8))
    document = Document("doc", f"{first}\n\n{second}")
    assert _standalone_count(tokenizer, first) < 64 < _standalone_count(tokenizer, document.text)

    contexts = chunk_documents([document], tokenizer, max_tokens=64, overlap_tokens=0, show_progress=False)

    assert contexts[0].text == first
    assert contexts[1].text == second


def test_an_over_long_sentence_is_cut_between_words(tokenizer):
    words = [f"word{i}" for i in range(400)]
    document = Document("doc", " ".join(words))

    contexts = chunk_documents([document], tokenizer, max_tokens=50, overlap_tokens=10, show_progress=False)

    assert len(contexts) > 5
    for context in contexts:
        assert context.n_tokens <= 50
        assert re.fullmatch(r"word\d+( word\d+)*", context.text), "cut inside a word"
    for previous, following in zip(contexts, contexts[1:]):
        assert following.char_start < previous.char_end, "pieces of a long sentence overlap"


def test_japanese_is_cut_at_full_stops_without_spaces(tokenizer):
    sentence = "これは日本語の文です。"
    document = Document("ja", sentence * 30)

    contexts = chunk_documents([document], tokenizer, max_tokens=40, overlap_tokens=0, show_progress=False)

    assert len(contexts) > 2
    assert all(context.text.endswith("。") and context.n_tokens <= 40 for context in contexts)


def test_sentence_spans_understand_several_scripts():
    text = "Hello there! How are you?  Fine.\n\n你好。再见！¿Qué tal? Bien (gracias)."
    assert [text[start:end] for start, end in sentence_spans(text)] == [
        "Hello there!", "How are you?", "Fine.", "你好。", "再见！", "¿Qué tal?", "Bien (gracias).",
    ]


def test_missing_tokenizer_folder_is_a_clear_error(tmp_path):
    with pytest.raises(M3DistillError, match="tokenizer folder not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(M3DistillError, match="could not load the tokenizer"):
        load_tokenizer(tmp_path)
