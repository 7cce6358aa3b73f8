"""The offline generator's query shapes: questions in the context's language, keywords, headings, sentences."""

from __future__ import annotations

import re

import pytest

from m3distill.data.chunking import Context
from m3distill.data.questions import PseudoQueryGenerator
from m3distill.data.questions.base import comparable
from m3distill.data.questions.key_phrases import (
    STOPWORDS,
    TermStatistics,
    action_phrases,
    heading_lines,
    salience,
    terms,
)
from m3distill.data.questions.templates import TEMPLATES

TOOLS = {
    "dpkg": "dpkg installs, removes and inspects Debian packages. To remove a package, run dpkg with --remove and "
            "the package name. The package database lives in /var/lib/dpkg.",
    "apt": "apt downloads packages from repositories and resolves dependencies. To upgrade the installed packages, "
           "run apt upgrade after apt update has refreshed the package lists.",
    "free": "free shows the amount of free and used memory and swap space. The buffers and cache columns come from "
            "/proc/meminfo, which the kernel fills.",
    "gpasswd": "gpasswd administers /etc/group and /etc/gshadow. Every group can have administrators, members and "
               "a password. To add a user to a group, call gpasswd with --add.",
    "zsh-faq": "Startup files\nThe shell reads .zshenv first, then .zprofile for login shells, then .zshrc for "
               "interactive shells. Put aliases and key bindings in .zshrc so that every interactive shell has them.",
}


def _contexts(texts: dict[str, str]) -> list[Context]:
    return [Context(f"{name}#0", name, 0, 0, len(text), len(text.split()), text) for name, text in texts.items()]


def _frame_pattern(frame: str) -> re.Pattern:
    """A frame of the templates as a regex: its slots match anything, case and question mark are free."""
    body = re.escape(frame.rstrip("?？ ").lstrip("¿"))
    body = body.replace(r"\{p\}", ".+").replace(r"\{q\}", ".+").replace(r"\{a\}", ".+")
    return re.compile(rf"^¿?{body}\s*[?？]?$", re.IGNORECASE | re.DOTALL)


def _matches_a_frame(text: str, language: str) -> bool:
    one, two, action = TEMPLATES[language]
    return any(_frame_pattern(frame).match(text) for frame in (*one, *two, *action))


def test_each_shape_writes_what_it_names():
    contexts = _contexts(TOOLS)
    for shape in ("question", "keywords", "heading"):
        generator = PseudoQueryGenerator(questions_per_context=2, seed=3, query_shapes=[shape])
        generated = generator.generate(contexts, languages=["en"] * len(contexts), show_progress=False).questions
        for context, texts in zip(contexts, generated):
            assert texts, (shape, context.doc_id)
            for text in texts:
                if shape == "question":
                    assert _matches_a_frame(text, "en"), text
                elif shape == "keywords":
                    words = text.split()
                    assert 2 <= len(words) <= 6, text
                    assert all(comparable(word) in comparable(context.text) for word in words), text
                    assert not {word.casefold() for word in words} & STOPWORDS["en"], text
                else:  # a heading line of the document, else one of its key phrases
                    assert comparable(text) in comparable(context.text), text
    zsh = PseudoQueryGenerator(1, seed=3, query_shapes=["heading"]).generate(
        _contexts({"zsh-faq": TOOLS["zsh-faq"]}), languages=["en"], show_progress=False).questions
    assert zsh == [["Startup files"]]


def test_shapes_are_taken_in_turn_and_the_sentence_shape_copies():
    contexts = _contexts(TOOLS)
    generator = PseudoQueryGenerator(questions_per_context=3, seed=1, query_shapes=["question", "keywords", "sentence"])
    generated = generator.generate(contexts, languages=["en"] * len(contexts), show_progress=False).questions
    for context, texts in zip(contexts, generated):
        assert len(texts) == 3
        questions = [text for text in texts if _matches_a_frame(text, "en")]
        copied = [text for text in texts if comparable(text) in comparable(context.text) and len(text.split()) >= 3]
        assert questions and copied, texts
    assert generator.describe()["query_shapes"] == ["question", "keywords", "sentence"]


def test_queries_are_deterministic_and_do_not_depend_on_the_order_of_contexts():
    contexts = _contexts(TOOLS)
    generator = PseudoQueryGenerator(questions_per_context=3, seed=5, query_shapes=["question", "keywords", "heading"])
    forward = generator.generate(contexts, languages=["en"] * 5, show_progress=False).questions
    backward = generator.generate(contexts[::-1], languages=["en"] * 5, show_progress=False).questions[::-1]
    other_seed = PseudoQueryGenerator(3, seed=6, query_shapes=["question", "keywords", "heading"]).generate(
        contexts, languages=["en"] * 5, show_progress=False).questions
    assert forward == backward
    assert forward != other_seed


@pytest.fixture(scope="module")
def sample_contexts(sample_dir) -> dict[str, list[Context]]:
    """Up to eight one-paragraph contexts per language of the bundled sample corpus."""
    found = {}
    for folder in sorted((sample_dir / "domain").iterdir()):
        paragraphs = [paragraph for file in sorted(folder.glob("man1-*.txt"))
                      for paragraph in file.read_text(encoding="utf-8").split("\n\n") if len(paragraph) > 80][:8]
        found[folder.name] = [Context(f"{folder.name}{i}#0", f"{folder.name}/{i}", 0, 0, len(text),
                                      len(text.split()), text) for i, text in enumerate(paragraphs)]
    return found


def test_questions_are_written_in_the_language_of_their_context(sample_contexts):
    assert set(sample_contexts) <= set(TEMPLATES), "every language of the sample corpus has question frames"
    generator = PseudoQueryGenerator(questions_per_context=2, seed=2, query_shapes=["question"])
    for language, contexts in sample_contexts.items():
        generated = generator.generate(contexts, languages=[language] * len(contexts), show_progress=False)
        texts = [text for texts in generated.questions for text in texts]
        assert len(texts) >= len(contexts), language
        in_frames = [text for text in texts if _matches_a_frame(text, language)]
        assert len(in_frames) == len(texts), (language, [t for t in texts if t not in in_frames])


def test_languages_are_detected_when_synth_gives_none(sample_contexts):
    contexts = sample_contexts["de"][:4]
    generated = PseudoQueryGenerator(1, seed=2, query_shapes=["question"]).generate(contexts, show_progress=False)
    assert all(_matches_a_frame(texts[0], "de") for texts in generated.questions)


def test_salient_terms_skip_function_words_and_phrases_stay_inside_sentences():
    texts = list(TOOLS.values())
    statistics = TermStatistics(texts, ["en"] * len(texts))
    about = salience(TOOLS["free"], "en", statistics)
    assert {"the", "and", "of", "which"}.isdisjoint(term.casefold() for term in about.terms)
    assert {"memory", "swap", "buffers", "kernel"} <= set(about.terms)
    for phrase in about.phrases:
        assert phrase in TOOLS["free"] and not re.search(r"[.,;:]\s", phrase), phrase


def test_action_phrases_name_tasks_and_stop_at_the_clause():
    text = ("To remove a package from the system, run dpkg. Use apt to upgrade the installed packages may take a "
            "while. It is used to the end.")
    assert action_phrases(text, "en") == ["remove a package", "upgrade the installed packages"]
    assert action_phrases("Pour afficher la liste des paquets, lancez dpkg -l.", "fr") == [
        "afficher la liste des paquets"]
    assert action_phrases("Um die Liste anzuzeigen, dpkg -l.", "de") == []


def test_terms_and_headings_of_other_scripts():
    assert [term.key for term in terms("패키지를 설치합니다", "ko")] == ["패키지", "설치합니다"]
    assert [term.text for term in terms("dpkgはパッケージを管理します", "ja")][:2] == ["dpkg", "パッケージ"]
    assert heading_lines("Overview\nText that follows the heading.\nMore text.") == ["Overview"]
    assert heading_lines("A sentence that ends with a period.\nMore text.") == []
