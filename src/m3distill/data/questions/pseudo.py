"""Offline pseudo-queries in the inverse-cloze style: a sentence or span sampled from the context itself.

These are not real questions: each "question" is a piece of its context, so a model learns to match a fragment
to the passage it came from. They need no model or network, and each context's sample depends only on the seed
and the context id (not on the order or the other contexts), so reruns and subsets give the same queries.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from m3distill.data.chunking import Context, sentence_spans
from m3distill.data.questions.base import (
    GenerationResult,
    comparable,
    filter_questions,
    long_enough,
    written_without_spaces,
)

PSEUDO_NOTE = (
    "pseudo-queries: every question is a sentence or word span copied from its own context (inverse cloze), "
    "not a real question; use --generator llm for real questions"
)
# Sentences longer than this many words are cut to a random window of _MIN..._MAX words, like a typed query.
_MAX_QUERY_WORDS = 24
_MIN_QUERY_WORDS = 8
# Scripts without spaces: the same, in characters.
_MAX_QUERY_CHARS = 64
_MIN_QUERY_CHARS = 16
_MIN_SENTENCE_WORDS = 3
_MIN_SENTENCE_CHARS = 8
_EXTRA_SPAN_TRIES = 4


class PseudoQueryGenerator:
    """Inverse-cloze pseudo-queries, deterministic by ``seed`` and context id.

    Args:
        questions_per_context: queries wanted per context (fewer when the context is too short for distinct ones).
        seed: the random seed; with the context id it fixes each context's queries.
        max_question_chars: longer queries are dropped.
    """

    name = "pseudo"

    def __init__(self, questions_per_context: int, seed: int, max_question_chars: int = 300) -> None:
        if questions_per_context < 1:
            raise ValueError(f"questions_per_context must be at least 1, got {questions_per_context}")
        self.questions_per_context = questions_per_context
        self.seed = seed
        self.max_question_chars = max_question_chars

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "questions_per_context": self.questions_per_context,
            "seed": self.seed,
            "max_question_chars": self.max_question_chars,
            "note": PSEUDO_NOTE,
        }

    def generate(self, contexts: Sequence[Context], *, show_progress: bool = True) -> GenerationResult:
        questions: list[list[str]] = []
        dropped: Counter[str] = Counter()
        for context in tqdm(contexts, desc="pseudo-queries", unit="ctx", disable=not show_progress):
            kept, rejected = filter_questions(
                self._candidates(context),
                context.text,
                n=self.questions_per_context,
                max_chars=self.max_question_chars,
                reject_copies=False,
            )
            questions.append(kept)
            dropped.update(rejected)
        missing = self.questions_per_context * len(contexts) - sum(map(len, questions))
        return GenerationResult(questions=questions, dropped=dropped, stats={"missing": missing})

    def _candidates(self, context: Context) -> list[str]:
        rng = random.Random(_context_seed(self.seed, context.context_id))
        sentences = list(
            dict.fromkeys(
                context.text[start:end]
                for start, end in sentence_spans(context.text)
                if _long_enough(context.text[start:end])
            )
        )
        picked = rng.sample(sentences, k=min(self.questions_per_context, len(sentences)))
        candidates = [_clip(sentence, rng) for sentence in picked]
        # Too few sentences: add distinct random spans of the whole context, as many as a few tries give.
        keys = {comparable(candidate) for candidate in candidates}
        for _ in range((self.questions_per_context - len(candidates)) * _EXTRA_SPAN_TRIES):
            if len(candidates) >= self.questions_per_context:
                break
            span = _random_span(context.text, rng)
            if comparable(span) not in keys:
                keys.add(comparable(span))
                candidates.append(span)
        return candidates


def _context_seed(seed: int, context_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}\0{context_id}".encode()).digest()[:8], "big")


def _long_enough(sentence: str) -> bool:
    return long_enough(sentence, min_words=_MIN_SENTENCE_WORDS, min_chars=_MIN_SENTENCE_CHARS)


def _clip(sentence: str, rng: random.Random) -> str:
    if written_without_spaces(sentence):
        if len(sentence) <= _MAX_QUERY_CHARS:
            return sentence
        return _char_window(sentence, rng)
    words = sentence.split()
    if len(words) <= _MAX_QUERY_WORDS:
        return sentence
    return _word_window(words, rng)


def _random_span(text: str, rng: random.Random) -> str:
    if written_without_spaces(text):
        return _char_window(text, rng) if len(text) > _MIN_QUERY_CHARS else text
    words = text.split()
    return _word_window(words, rng) if len(words) > _MIN_QUERY_WORDS else text


def _word_window(words: list[str], rng: random.Random) -> str:
    length = rng.randint(_MIN_QUERY_WORDS, min(_MAX_QUERY_WORDS, len(words)))
    start = rng.randrange(len(words) - length + 1)
    return " ".join(words[start : start + length])


def _char_window(text: str, rng: random.Random) -> str:
    length = rng.randint(_MIN_QUERY_CHARS, min(_MAX_QUERY_CHARS, len(text)))
    start = rng.randrange(len(text) - length + 1)
    return text[start : start + length].strip()
