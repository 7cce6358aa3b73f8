"""Crops: the sentences of each training context and random spans of it, extra training texts for the students.

A small corpus gives few contexts; their sentences and random word spans (crop augmentation) multiply the texts the
teacher embeds and the students learn from, at lengths between a query's and a context's. Only training contexts
are cropped, so no dev or test text leaks into training.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Sequence
from typing import Any

from m3distill.data.chunking import Context, sentence_spans
from m3distill.data.questions.base import long_enough, written_without_spaces

SENTENCE = "sentence"
SPAN = "span"
_MIN_WORDS = 5
_MIN_CHARS = 12  # for scripts written without spaces (Chinese, Japanese, Thai)


def context_crops(
    contexts: Sequence[Context], splits: Sequence[str], *, sentences: bool, spans_per_context: int, seed: int
) -> list[dict[str, Any]]:
    """Crop rows (crop_id, context_id, split, kind, text) of the training contexts, deterministic in ``seed``.

    Args:
        contexts: every context of the dataset.
        splits: the split of each context; only ``train`` ones are cropped.
        sentences: add each sentence of a context (those long enough to mean something and shorter than it).
        spans_per_context: random spans of whole words (characters for scripts without spaces) per context,
            each between a few words and three quarters of the context.
        seed: seed of the spans.
    """
    rows: list[dict[str, Any]] = []
    seen: set[str] = set()  # overlapping contexts share sentences: each text once
    for context, split in zip(contexts, splits):
        if split != "train":
            continue
        texts: dict[str, str] = {}
        if sentences:
            for start, end in sentence_spans(context.text):
                sentence = context.text[start:end]
                if _long_enough(sentence) and sentence != context.text and sentence not in seen:
                    texts.setdefault(sentence, SENTENCE)
        rng = random.Random(_seed(seed, context.context_id))
        for _ in range(spans_per_context):
            span = _random_span(context.text, rng)
            if span and span != context.text and span not in seen:
                texts.setdefault(span, SPAN)
        seen.update(texts)
        rows += [
            {"crop_id": f"{context.context_id}#c{number}", "context_id": context.context_id, "split": split,
             "kind": kind, "text": text}
            for number, (text, kind) in enumerate(texts.items())
        ]
    return rows


def _seed(seed: int, context_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"crops\0{seed}\0{context_id}".encode()).digest()[:8], "big")


def _long_enough(text: str) -> bool:
    return long_enough(text, min_words=_MIN_WORDS, min_chars=_MIN_CHARS)


def _random_span(text: str, rng: random.Random) -> str | None:
    """Whole words (characters without spaces) from a random start, a few words to 3/4 of the text long."""
    units = list(text) if written_without_spaces(text) else text.split()
    smallest = _MIN_CHARS if written_without_spaces(text) else _MIN_WORDS
    largest = (3 * len(units)) // 4
    if largest < smallest:
        return None
    length = rng.randint(smallest, largest)
    start = rng.randrange(len(units) - length + 1)
    joined = "".join(units[start : start + length]) if written_without_spaces(text) else " ".join(units[start : start + length])
    return joined.strip() or None
