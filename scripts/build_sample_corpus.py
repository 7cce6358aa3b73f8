#!/usr/bin/env python3
"""Build data/sample/: the multilingual sample corpus bundled with m3distill.

The texts are the DESCRIPTION sections of Debian's manual pages in many languages (/usr/share/man), rendered
with man(1) and stripped of formatting. Section-1 pages (user commands) form the *domain* part, the corpus a
user would distil for; pages of sections 5, 7 and 8 (file formats, overviews, admin commands) form the *general*
part that is mixed into training. Rerunnable and deterministic for a given set of installed man pages:

    python scripts/build_sample_corpus.py            # writes data/sample/{domain,general}/<lang>/*.txt
    python scripts/build_sample_corpus.py --check    # prints what it would write, touches nothing

Needs `man` and the man pages (Debian: apt-get install man-db manpages manpages-{de,fr,es,...}).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
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


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domain-per-language", type=int, default=45)
    parser.add_argument("--general-per-language", type=int, default=25)
    parser.add_argument("--check", action="store_true", help="report counts and sizes without writing")
    args = parser.parse_args()
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
    return 0


if __name__ == "__main__":
    sys.exit(main())
