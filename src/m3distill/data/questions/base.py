"""The question-generator interface, its result, and the filters every generated question passes."""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from m3distill.data.chunking import Context

# Reasons a generated question is dropped (the keys of GenerationResult.dropped).
EMPTY = "empty"
TOO_LONG = "too_long"
DUPLICATE = "duplicate"
COPIED = "copied"
SURPLUS = "surplus"
PREAMBLE = "preamble"

# A question is "copied" when this share of its word trigrams (or character 4-grams in scripts written without
# spaces) appears in the context: a reworded question reuses words, not whole runs of them.
_COPIED_NGRAM_SHARE = 0.8
_MIN_NGRAMS_FOR_SHARE = 3
_WORD = re.compile(r"\w+")
# Scripts written without spaces between words: kana, CJK ideographs, Thai, Lao, Myanmar, Khmer, half-width kana.
_UNSPACED_CHAR = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff\uff66-\uff9f]")


@dataclass
class GenerationResult:
    """Questions per context (aligned with the contexts given), dropped outputs by reason, and counters.

    ``stats`` holds generator-specific counts such as ``requests``, ``retries`` and ``cache_hits``; ``missing`` is
    how many questions short of ``n`` per context the result is in total.
    """

    questions: list[list[str]]
    dropped: Counter[str] = field(default_factory=Counter)
    stats: dict[str, int] = field(default_factory=dict)


class QuestionGenerator(Protocol):
    """Something that writes up to ``questions_per_context`` questions for each context."""

    name: str
    questions_per_context: int

    def describe(self) -> dict[str, Any]:
        """The generator's settings for the dataset manifest (never a secret)."""
        ...

    def generate(self, contexts: Sequence[Context], *, languages: Sequence[str] | None = None,
                 show_progress: bool = True) -> GenerationResult:
        """Questions for each of ``contexts``, in the same order; independent of that order. ``languages`` holds
        each context's detected language code, where synth detected them."""
        ...


def comparable(text: str) -> str:
    """``text`` casefolded with punctuation and whitespace reduced to single spaces, for comparisons."""
    return " ".join(_WORD.findall(text.casefold()))


def written_without_spaces(text: str) -> bool:
    """True when most letters of ``text`` belong to scripts that do not separate words by spaces (Chinese, Japanese,
    Thai...), so words must be counted as characters."""
    letters = sum(char.isalpha() for char in text)
    return letters > 0 and len(_UNSPACED_CHAR.findall(text)) * 2 > letters


def long_enough(text: str, *, min_words: int, min_chars: int) -> bool:
    """True when ``text`` has at least ``min_words`` words, or ``min_chars`` characters in scripts without spaces."""
    if written_without_spaces(text):
        return len(text) >= min_chars
    return len(text.split()) >= min_words


def is_copied(question: str, context_text: str) -> bool:
    """True when ``question`` is lifted from the context: a verbatim substring, or most of its n-grams are."""
    question_key, context_key = comparable(question), comparable(context_text)
    if not question_key:
        return False
    if question_key in context_key:
        return True
    by_chars = written_without_spaces(question_key)
    grams = _ngrams(question_key, by_chars)
    if len(grams) < _MIN_NGRAMS_FOR_SHARE:
        return False
    context_grams = set(_ngrams(context_key, by_chars))
    return sum(gram in context_grams for gram in grams) >= _COPIED_NGRAM_SHARE * len(grams)


def filter_questions(
    candidates: Iterable[str], context_text: str, *, n: int, max_chars: int, reject_copies: bool
) -> tuple[list[str], Counter[str]]:
    """Keep the first ``n`` acceptable candidates; count the others by reason.

    Args:
        candidates: generated questions, in the generator's order.
        context_text: the context they were generated for.
        n: how many questions to keep.
        max_chars: longer questions are dropped as ``too_long``.
        reject_copies: drop questions copied from the context (off for pseudo-queries, which are copies by design).
    """
    kept: list[str] = []
    seen: set[str] = set()
    dropped: Counter[str] = Counter()
    for candidate in candidates:
        question = " ".join(candidate.split())
        key = comparable(question)
        if not key:
            dropped[EMPTY] += 1
        elif len(question) > max_chars:
            dropped[TOO_LONG] += 1
        elif key in seen:
            dropped[DUPLICATE] += 1
        elif reject_copies and is_copied(question, context_text):
            dropped[COPIED] += 1
        elif len(kept) >= n:
            dropped[SURPLUS] += 1
        else:
            seen.add(key)
            kept.append(question)
    return kept, dropped


def _ngrams(key: str, by_chars: bool) -> list[str]:
    words = key.split()
    if by_chars:
        chars = key.replace(" ", "")
        return [chars[i : i + 4] for i in range(len(chars) - 3)]
    return [" ".join(words[i : i + 3]) for i in range(len(words) - 2)]
