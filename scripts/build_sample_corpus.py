#!/usr/bin/env python3
"""Build data/sample/: the multilingual sample corpus bundled with m3distill.

The texts are the DESCRIPTION sections of Debian's manual pages in many languages (/usr/share/man), rendered
with man(1) and stripped of formatting. Section-1 pages (user commands) form the *domain* part, the corpus a
user would distil for; pages of sections 5, 7 and 8 (file formats, overviews, admin commands) form the *general*
part that is mixed into training. Rerunnable and deterministic for a given set of installed man pages:

    python scripts/build_sample_corpus.py            # writes data/sample/{domain,general}/<lang>/*.txt
    python scripts/build_sample_corpus.py --check    # prints what it would write, touches nothing
    python scripts/build_sample_corpus.py --only-questions   # the perlfaq8 part alone (below)

It also bundles a small set of real questions: perlfaq8 ("System Interaction", from Debian's perl-doc), whose
entries are people-written questions with their answers. Each answer, without its question, becomes a domain
document (domain/en/perlfaq8-NN.txt), and data/sample/questions/perlfaq8.jsonl holds the questions with the id of
their answer's document, for `evaluation.real_questions` (the demo's "real questions" table).

Needs `man` and the man pages (Debian: apt-get install man-db manpages manpages-{de,fr,es,...}), and perl-doc.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

MAN_ROOT = Path("/usr/share/man")
OUT = Path(__file__).resolve().parents[1] / "data" / "sample"

# Language folder under /usr/share/man ("" is English) -> ISO code used in our folder names.
LANGUAGES = {
    "": "en", "de": "de", "fr": "fr", "es": "es", "ru": "ru", "ja": "ja", "pt_BR": "pt", "it": "it",
    "pl": "pl", "tr": "tr", "uk": "uk", "zh_CN": "zh", "nl": "nl", "cs": "cs", "sv": "sv", "ko": "ko",
}
# DESCRIPTION in the languages above, as the translated pages spell the heading.
DESCRIPTION_HEADINGS = {
    "DESCRIPTION", "BESCHREIBUNG", "DESCRIPCIÓN", "DESCRIPCION", "ОПИСАНИЕ", "説明", "DESCRIÇÃO", "DESCRIZIONE",
    "OPIS", "AÇIKLAMA", "ОПИС", "描述", "说明", "BESCHRIJVING", "POPIS", "BESKRIVNING", "설명", "TANIM",
}
PERLFAQ8 = Path("/usr/share/perl/5.36/pod/perlfaq8.pod")
DOMAIN_SECTIONS = ("man1",)
GENERAL_SECTIONS = ("man5", "man7", "man8")
MIN_CHARS = 300
MAX_CHARS = 5000  # long pages are cut at a paragraph boundary to keep the sample small


def render(page: Path) -> str:
    """The page as plain text, or '' when man cannot render it."""
    env = dict(os.environ, MANWIDTH="100000", LANG="C.UTF-8", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="0")
    try:
        result = subprocess.run(["man", "-l", str(page)], capture_output=True, env=env, timeout=30, check=False)
    except subprocess.TimeoutExpired:
        return ""
    text = result.stdout.decode("utf-8", errors="replace")
    return re.sub(r".\x08", "", text)  # drop overstrike bold/underline


def description(rendered: str) -> str:
    """The DESCRIPTION section's paragraphs, unwrapped and dedented."""
    lines = rendered.splitlines()
    headings = [i for i, line in enumerate(lines) if line and not line[0].isspace()]
    for position, start in enumerate(headings):
        if lines[start].strip().upper() in DESCRIPTION_HEADINGS:
            end = headings[position + 1] if position + 1 < len(headings) else len(lines)
            break
    else:
        return ""
    paragraphs, current = [], []
    for line in lines[start + 1 : end]:
        stripped = line.strip()
        if not stripped:
            if current:
                paragraphs.append(" ".join(current))
                current = []
            continue
        current.append(stripped)
    if current:
        paragraphs.append(" ".join(current))
    kept, size = [], 0
    for paragraph in paragraphs:
        paragraph = unicodedata.normalize("NFC", re.sub(r"\s+", " ", paragraph))
        if size + len(paragraph) > MAX_CHARS and kept:
            break
        kept.append(paragraph)
        size += len(paragraph) + 2
    return "\n\n".join(kept)


def pages(lang_dir: str, sections: tuple[str, ...]) -> list[Path]:
    root = MAN_ROOT / lang_dir if lang_dir else MAN_ROOT
    found = []
    for section in sections:
        folder = root / section
        if folder.is_dir():
            found.extend(p for p in folder.iterdir() if p.is_file() and not p.is_symlink())
    # A stable pseudo-random order, so a per-language cap keeps a varied but reproducible selection.
    return sorted(found, key=lambda p: hashlib.sha256(p.name.encode()).hexdigest())


def is_stub(page: Path) -> bool:
    """A '.so other-page' redirect (rendered elsewhere) rather than a page of its own."""
    try:
        head = (gzip.open(page, "rt", errors="replace") if page.suffix == ".gz" else page.open(errors="replace")).read(200)
    except OSError:
        return True
    return head.lstrip().startswith(".so ")


def collect(lang_dir: str, sections: tuple[str, ...], limit: int) -> dict[str, str]:
    texts: dict[str, str] = {}
    seen: set[str] = set()
    for page in pages(lang_dir, sections):
        if len(texts) >= limit:
            break
        if is_stub(page):
            continue
        text = description(render(page))
        if len(text) < MIN_CHARS or text in seen:
            continue
        seen.add(text)
        name = page.name.removesuffix(".gz")
        texts[f"{page.parent.name}-{name}.txt"] = text
    return texts


def perlfaq_questions() -> tuple[dict[Path, str], str]:
    """perlfaq8's answers as domain documents, and the questions file pointing at them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from faq_sets import MIN_ANSWER_WORDS, perlfaq_entries

    documents, lines = {}, []
    for entry in perlfaq_entries(PERLFAQ8):
        if len(entry.answer.split()) < MIN_ANSWER_WORDS:
            continue
        documents[OUT / "domain" / "en" / f"{entry.name}.txt"] = entry.answer + "\n"
        lines.append(json.dumps({"text": entry.question, "doc_id": f"en/{entry.name}.txt"}, ensure_ascii=False))
    return documents, "".join(line + "\n" for line in lines)


def write_perlfaq(check: bool) -> int:
    if not PERLFAQ8.is_file():
        print(f"{PERLFAQ8} is missing: apt-get install perl-doc", file=sys.stderr)
        return 1
    documents, questions = perlfaq_questions()
    print(f"perlfaq8: {len(documents)} answers (domain/en), {questions.count(chr(10))} questions")
    if not check:
        for path in (OUT / "domain" / "en").glob("perlfaq8-*.txt"):
            path.unlink()
        for path, text in documents.items():
            path.write_text(text, encoding="utf-8")
        (OUT / "questions").mkdir(exist_ok=True)
        (OUT / "questions" / "perlfaq8.jsonl").write_text(questions, encoding="utf-8")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain-per-language", type=int, default=45)
    parser.add_argument("--general-per-language", type=int, default=25)
    parser.add_argument("--check", action="store_true", help="report counts and sizes without writing")
    parser.add_argument("--only-questions", action="store_true", help="write the perlfaq8 documents and questions only")
    args = parser.parse_args()
    if args.only_questions:
        return write_perlfaq(args.check)
    if shutil.which("man") is None:
        print("man(1) is not installed: apt-get install man-db", file=sys.stderr)
        return 1
    plan: dict[Path, str] = {}
    for lang_dir, code in LANGUAGES.items():
        domain = collect(lang_dir, DOMAIN_SECTIONS, args.domain_per_language)
        general = collect(lang_dir, GENERAL_SECTIONS, args.general_per_language)
        # A page may appear in both parts only if its text differs; never the same text twice.
        general = {name: text for name, text in general.items() if text not in set(domain.values())}
        print(f"{code}: {len(domain)} domain, {len(general)} general documents")
        for part, texts in (("domain", domain), ("general", general)):
            for name, text in texts.items():
                plan[OUT / part / code / name] = text + "\n"
    total = sum(len(text.encode()) for text in plan.values())
    print(f"{len(plan)} documents, {total / 1e6:.2f} MB")
    if args.check:
        return 0
    for part in ("domain", "general"):
        shutil.rmtree(OUT / part, ignore_errors=True)
    for path, text in plan.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return write_perlfaq(check=False)


if __name__ == "__main__":
    sys.exit(main())
