"""Offline queries for each context, shaped like what people type, with no model and no network.

Each context gets ``questions_per_context`` texts, its shapes taken in turn from ``query_shapes`` (starting at a
shape drawn per context, so every shape is equally common):

- ``question``: an interrogative in the context's language built on one of its key phrases ("How does dpkg-divert
  work?", "Wie konfiguriere ich Auslagerungsspeicher?"), on two of them ("What is the difference between X and Y?")
  or, in English, French, Spanish, Italian and Portuguese, on a task the context names ("How do I remove a
  package?" from "... to remove a package, use ..."); see :mod:`m3distill.data.questions.templates`;
- ``keywords``: 2-6 of its salient terms, as typed into a search box ("dpkg diversion package file");
- ``heading``: a heading line of the context or of its document, else its best key phrase;
- ``span``: a short run of 2-8 consecutive words of the context (8-24 characters in scripts without spaces), the
  random short spans of the literature on unseen inputs;
- ``sentence``: a sentence or word span copied from the context (the inverse-cloze pseudo-queries of m3distill
  before 0.2, which are pieces of their context rather than queries).

Key phrases and salient terms come from corpus statistics (:mod:`m3distill.data.questions.key_phrases`), so the
texts depend on the whole corpus; the random choices depend only on the seed and the context id, so a rerun gives
the same texts. None of these are real questions: the real-question benchmark (README) measures how far they take a
student towards people's questions.
"""

from __future__ import annotations

import hashlib
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from tqdm.auto import tqdm

from m3distill.data.chunking import Context, sentence_spans
from m3distill.data.questions.key_phrases import TermStatistics, action_phrases, heading_lines, salience
from m3distill.data.questions.templates import templates
from m3distill.data.questions.base import (
    GenerationResult,
    comparable,
    filter_questions,
    long_enough,
    written_without_spaces,
)

PSEUDO_NOTE = (
    "pseudo-queries ({shapes}) written offline from each context's own words, not real questions; use --generator "
    "llm for questions written by a language model, and evaluation.real_questions to measure on people's questions"
)
QUERY_SHAPES = ("question", "keywords", "heading", "span", "sentence")
_SPAN_WORDS = (2, 8)
_SPAN_CHARS = (8, 24)
# Candidates drawn per wanted text: shapes that find nothing (no heading, no key phrase) leave room to the others.
_CANDIDATES_PER_QUERY = 4
# Key phrases and terms considered for a context: its best few, so that queries stay on what it is about.
_TOP_PHRASES = 6
_TOP_TERMS = 8
_MAX_PHRASE_CHARS = 48
# How often a query is typed in lower case, and without its question mark.
_LOWERCASE_SHARE = 0.3
_NO_MARK_SHARE = 0.2
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
    """Offline queries of the shapes ``query_shapes``, deterministic by ``seed``, context id and corpus.

    Args:
        questions_per_context: queries wanted per context (fewer when the context is too short for distinct ones).
        seed: the random seed; with the context id it fixes each context's random choices.
        max_question_chars: longer queries are dropped.
        query_shapes: the shapes written, in turn (see the module's docstring); ``("sentence",)`` gives the
            copied-sentence pseudo-queries of earlier versions, text for text.
    """

    name = "pseudo"

    def __init__(self, questions_per_context: int, seed: int, max_question_chars: int = 300,
                 query_shapes: Sequence[str] = ("question", "keywords", "heading")) -> None:
        if questions_per_context < 1:
            raise ValueError(f"questions_per_context must be at least 1, got {questions_per_context}")
        unknown = [shape for shape in query_shapes if shape not in QUERY_SHAPES]
        if not query_shapes or unknown:
            raise ValueError(f"query_shapes must name some of {', '.join(QUERY_SHAPES)}; got {list(query_shapes)}")
        self.questions_per_context = questions_per_context
        self.seed = seed
        self.max_question_chars = max_question_chars
        self.query_shapes = tuple(dict.fromkeys(query_shapes))

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "questions_per_context": self.questions_per_context,
            "seed": self.seed,
            "max_question_chars": self.max_question_chars,
            "query_shapes": list(self.query_shapes),
            "note": PSEUDO_NOTE.format(shapes=", ".join(self.query_shapes)),
        }

    def generate(self, contexts: Sequence[Context], *, languages: Sequence[str] | None = None,
                 show_progress: bool = True) -> GenerationResult:
        """Queries for each context. ``languages`` (one code per context, as synth detects them) picks each
        context's question frames and function words; contexts without one are detected here."""
        shaped = self.query_shapes != ("sentence",)
        if shaped:
            languages = _languages(contexts, languages)
            statistics = TermStatistics([context.text for context in contexts], languages)
            titles = _document_headings(contexts)
        questions: list[list[str]] = []
        dropped: Counter[str] = Counter()
        for number, context in enumerate(tqdm(contexts, desc="pseudo-queries", unit="ctx", disable=not show_progress)):
            if shaped:
                candidates = self._shaped_candidates(context, languages[number], statistics, titles)
            else:
                candidates = self._candidates(context)
            kept, rejected = filter_questions(
                candidates,
                context.text,
                n=self.questions_per_context,
                max_chars=self.max_question_chars,
                reject_copies=False,
            )
            questions.append(kept)
            dropped.update(rejected)
        missing = self.questions_per_context * len(contexts) - sum(map(len, questions))
        return GenerationResult(questions=questions, dropped=dropped, stats={"missing": missing})

    def _shaped_candidates(self, context: Context, language: str, statistics: TermStatistics,
                           titles: dict[str, list[str]]) -> list[str]:
        rng = random.Random(_context_seed(self.seed, context.context_id))
        about = salience(context.text, language, statistics)
        phrases = [phrase for phrase in about.phrases if len(phrase) <= _MAX_PHRASE_CHARS][:_TOP_PHRASES]
        headings = list(dict.fromkeys([*about.headings, *titles.get(context.doc_id, [])]))
        sentences = iter(self._candidates(context, n=self.questions_per_context * _CANDIDATES_PER_QUERY))
        first = rng.randrange(len(self.query_shapes))
        candidates = []
        for turn in range(self.questions_per_context * _CANDIDATES_PER_QUERY):
            shape = self.query_shapes[(first + turn) % len(self.query_shapes)]
            if shape == "question":
                text = _question(phrases, action_phrases(context.text, language), language, rng)
            elif shape == "keywords":
                text = _keywords(about.terms[:_TOP_TERMS], rng)
            elif shape == "heading":
                text = rng.choice(headings) if headings else (phrases[0] if phrases else None)
            elif shape == "span":
                text = _short_span(context.text, rng)
            else:
                text = next(sentences, None)
            if text:
                candidates.append(text)
        return candidates

    def _candidates(self, context: Context, n: int | None = None) -> list[str]:
        """Copied sentences (or word spans) of the context: the ``sentence`` shape."""
        n = self.questions_per_context if n is None else n
        rng = random.Random(_context_seed(self.seed, context.context_id))
        sentences = list(
            dict.fromkeys(
                context.text[start:end]
                for start, end in sentence_spans(context.text)
                if _long_enough(context.text[start:end])
            )
        )
        picked = rng.sample(sentences, k=min(n, len(sentences)))
        candidates = [_clip(sentence, rng) for sentence in picked]
        # Too few sentences: add distinct random spans of the whole context, as many as a few tries give.
        keys = {comparable(candidate) for candidate in candidates}
        for _ in range((n - len(candidates)) * _EXTRA_SPAN_TRIES):
            if len(candidates) >= n:
                break
            span = _random_span(context.text, rng)
            if comparable(span) not in keys:
                keys.add(comparable(span))
                candidates.append(span)
        return candidates


def _question(phrases: list[str], actions: list[str], language: str, rng: random.Random) -> str | None:
    one, two, action = templates(language)
    if action and actions and rng.random() < 0.5:
        text = rng.choice(action).format(a=rng.choice(actions[:_TOP_PHRASES]))
    elif two and len(phrases) >= 2 and rng.random() < 0.2:
        first, second = rng.sample(phrases[:4], 2)
        if first.casefold() in second.casefold() or second.casefold() in first.casefold():
            return None
        text = rng.choice(two).format(p=first, q=second)
    elif phrases:
        # The best phrases are the likeliest subjects: weights 1, 1/2, 1/3...
        phrase = rng.choices(phrases, weights=[1 / (rank + 1) for rank in range(len(phrases))])[0]
        text = rng.choice(one).format(p=phrase)
    else:
        return None
    return _as_typed(text, rng)


def _short_span(text: str, rng: random.Random) -> str | None:
    if written_without_spaces(text):
        low, high = _SPAN_CHARS
        if len(text) < low:
            return None
        length = rng.randint(low, min(high, len(text)))
        start = rng.randrange(len(text) - length + 1)
        return text[start : start + length].strip()
    words = text.split()
    low, high = _SPAN_WORDS
    if len(words) < low:
        return None
    length = rng.randint(low, min(high, len(words)))
    start = rng.randrange(len(words) - length + 1)
    return " ".join(words[start : start + length])


def _keywords(terms: list[str], rng: random.Random) -> str | None:
    if len(terms) < 2:
        return None
    picked = rng.sample(terms, rng.randint(2, min(6, len(terms))))
    text = " ".join(picked)
    return text.lower() if rng.random() < 0.5 else text


def _as_typed(text: str, rng: random.Random) -> str:
    """Some queries are typed in lower case, some without their question mark."""
    if rng.random() < _LOWERCASE_SHARE:
        text = text.lower()
    if rng.random() < _NO_MARK_SHARE:
        text = text.rstrip("?？ ").lstrip("¿")
    return text


def _languages(contexts: Sequence[Context], languages: Sequence[str] | None) -> list[str]:
    import py3langid

    if languages is None:
        languages = [""] * len(contexts)
    return [language if language and language != "und" else py3langid.classify(context.text)[0]
            for context, language in zip(contexts, languages)]


def _document_headings(contexts: Sequence[Context]) -> dict[str, list[str]]:
    """Each document's title: the heading lines its first context starts with (help pages, Markdown, FAQs)."""
    titles: dict[str, list[str]] = {}
    for context in contexts:
        if context.chunk_index == 0:
            first = heading_lines(context.text)[:1]
            if first and context.text.lstrip().startswith(first[0]):
                titles[context.doc_id] = first
    return titles


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
