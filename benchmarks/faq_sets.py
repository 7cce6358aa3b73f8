"""Real-question sets for the fidelity benchmark, built from FAQ-style documents that Debian packages install.

Each set is a list of people-written questions, each with the document that answers it, plus the documents
themselves. The questions are the FAQ's own headings (written by the documents' authors for their readers); the
answers are the text under them, with the question itself removed so that a passage never contains its question
word for word. Where a help system mixes question pages with others (GNOME's), the other pages stay in the corpus
as passages without a question.

    python benchmarks/faq_sets.py OUT_DIR            # writes OUT_DIR/corpus/<set>/*.txt and OUT_DIR/questions.jsonl
    python benchmarks/faq_sets.py --list             # the sets, their packages and whether they are installed

The sets and the Debian packages they need (``apt-get install perl-doc zsh-doc ffmpeg-doc sqlite3-doc valgrind
git-doc gnome-user-docs``):

- ``perlfaq``: perlfaq1-9 (perl-doc), English;
- ``zsh``: the Z-Shell FAQ (zsh-doc), English;
- ``ffmpeg``: the FFmpeg FAQ (ffmpeg-doc), English;
- ``tools``: the SQLite (sqlite3-doc), Valgrind (valgrind) and Git (git-doc, gitfaq) FAQs, English;
- ``gnome-de``, ``gnome-es``, ``gnome-ru``, ``gnome-ko``: GNOME Help (gnome-user-docs) in German, Spanish, Russian
  and Korean: the translated pages titled with a question give the questions and their passages, and as many other
  translated pages (the first by name) are passages without a question.

Apart from the sets, :func:`general_questions` gathers the questions (only) of other FAQs, of tools none of the
sets is about (lsof, sed, xz, procps), as general text to train on: real questions from outside the corpus.

The Python FAQ and the Debian FAQ are kept for independent checks and are never used here. The output is
deterministic: the same installed packages give byte-identical files.
"""

from __future__ import annotations

import argparse
import gzip
import html
import json
import re
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

PERLFAQ_DIR = Path("/usr/share/perl/5.36/pod")
ZSH_FAQ = Path("/usr/share/doc/zsh-common/FAQ.gz")
FFMPEG_FAQ = Path("/usr/share/doc/ffmpeg/manual/faq.html")
SQLITE_FAQ = Path("/usr/share/doc/sqlite3/faq.html")
VALGRIND_FAQ = Path("/usr/share/doc/valgrind/FAQ.txt.gz")
GIT_FAQ = Path("/usr/share/doc/git-doc/gitfaq.txt")
GNOME_HELP = Path("/usr/share/help")
# An answer shorter than this many words is a pointer elsewhere ("See perlfunc"), not a passage.
MIN_ANSWER_WORDS = 12


@dataclass(frozen=True)
class FaqEntry:
    """One question and the text that answers it (``answer`` is empty for a passage without a question)."""

    name: str
    question: str
    answer: str


@dataclass(frozen=True)
class FaqSet:
    name: str
    language: str
    packages: tuple[str, ...]
    sources: tuple[Path, ...]
    description: str


SETS = {
    "perlfaq": FaqSet("perlfaq", "en", ("perl-doc",), (PERLFAQ_DIR / "perlfaq4.pod",), "perlfaq1-9"),
    "zsh": FaqSet("zsh", "en", ("zsh-doc",), (ZSH_FAQ,), "the Z-Shell FAQ"),
    "ffmpeg": FaqSet("ffmpeg", "en", ("ffmpeg-doc",), (FFMPEG_FAQ,), "the FFmpeg FAQ"),
    "tools": FaqSet("tools", "en", ("sqlite3-doc", "valgrind", "git-doc"), (SQLITE_FAQ, VALGRIND_FAQ, GIT_FAQ),
                    "the SQLite, Valgrind and Git FAQs"),
    **{f"gnome-{short}": FaqSet(f"gnome-{short}", short, ("gnome-user-docs",), (GNOME_HELP / folder / "gnome-help",),
                                f"GNOME Help ({short})")
       for short, folder in (("de", "de"), ("es", "es"), ("ru", "ru"), ("ko", "ko"))},
}


GENERAL_FAQS = (Path("/usr/share/doc/lsof/00FAQ.gz"), Path("/usr/share/doc/sed/sedfaq.txt.gz"),
                Path("/usr/share/doc/xz-utils/faq.txt.gz"), Path("/usr/share/doc/procps/FAQ.gz"))


def general_questions() -> list[str]:
    """The questions of the FAQs of :data:`GENERAL_FAQS` that this machine has, deduplicated, in file order."""
    found: dict[str, None] = {}
    for path in GENERAL_FAQS:
        if not path.is_file():
            continue
        for line in gzip.decompress(path.read_bytes()).decode("utf-8", "replace").splitlines():
            # "1.2.3  How ...?" (lsof), "2.1. What is sed?" (sed), "Q:  What ...?" (xz), "Why ...?" (procps)
            match = re.match(r"^(?:\d+(?:\.\d+)*\.?\s+|Q:\s+)?([A-Z][^\t]{8,160}\?)$", line.strip())
            if match and not line.startswith((" ", "\t")):
                found.setdefault(" ".join(match.group(1).split()), None)
    return list(found)


def missing_packages(names: list[str]) -> list[str]:
    """The Debian packages the named sets need and this machine lacks."""
    return sorted({package for name in names for package, source in zip(SETS[name].packages, SETS[name].sources)
                   if not source.exists()})


def build_set(name: str) -> list[FaqEntry]:
    """The entries of one set, in document order; passages without a question have an empty ``question``."""
    if name == "perlfaq":
        return [entry for number in range(1, 10) for entry in perlfaq_entries(PERLFAQ_DIR / f"perlfaq{number}.pod")]
    if name == "zsh":
        return _zsh(gzip.decompress(ZSH_FAQ.read_bytes()).decode("utf-8", "replace"))
    if name == "ffmpeg":
        return _ffmpeg(FFMPEG_FAQ.read_text(encoding="utf-8"))
    if name == "tools":
        return (_sqlite(SQLITE_FAQ.read_text(encoding="utf-8"))
                + _valgrind(gzip.decompress(VALGRIND_FAQ.read_bytes()).decode("utf-8", "replace"))
                + _gitfaq(GIT_FAQ.read_text(encoding="utf-8")))
    if name.startswith("gnome-"):
        return _gnome(SETS[name].sources[0], SETS[name].language)
    raise ValueError(f"unknown set {name!r}; expected one of {', '.join(SETS)}")


def write_sets(out_dir: Path, names: list[str]) -> dict[str, int]:
    """Write ``out_dir/corpus/<set>/<entry>.txt`` and ``out_dir/questions.jsonl``; the question count per set.

    Each question line holds ``set``, ``language``, ``text`` and ``doc_id``: the answer's document id as
    ``m3distill synth --corpus out_dir/corpus`` names it (``<set>/<entry>.txt``).
    """
    missing = missing_packages(names)
    if missing:
        raise SystemExit(f"the sets need these Debian packages: apt-get install {' '.join(missing)}")
    lines, counts = [], {}
    for name in names:
        folder = out_dir / "corpus" / name
        folder.mkdir(parents=True, exist_ok=True)
        counts[name] = 0
        for entry in build_set(name):
            if len(entry.answer.split()) < MIN_ANSWER_WORDS and not _unspaced(entry.answer):
                continue
            (folder / f"{entry.name}.txt").write_text(entry.answer + "\n", encoding="utf-8")
            if entry.question:
                counts[name] += 1
                lines.append({"set": name, "language": SETS[name].language, "text": entry.question,
                              "doc_id": f"{name}/{entry.name}.txt"})
    (out_dir / "questions.jsonl").write_text(
        "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")
    return counts


# --- perlfaq (POD) ---------------------------------------------------------------------------------------------

_POD_CODE = re.compile(r"([A-Z])<(<+)\s(.*?)\s\2>|([A-Z])<([^<>]*)>", re.S)


def _pod_inline(text: str) -> str:
    for _ in range(6):  # nested codes: innermost first
        new = _POD_CODE.sub(_pod_code, text)
        if new == text:
            break
        text = new
    return text


def _pod_code(match: re.Match) -> str:
    code, body = (match.group(1), match.group(3)) if match.group(1) else (match.group(4), match.group(5))
    if code == "E":
        return {"lt": "<", "gt": ">", "sol": "/", "verbar": "|"}.get(body, html.unescape(f"&{body};"))
    if code in "XZ":
        return ""
    if code == "L":
        # L<text|target> shows text; L<perlfaq4/"How do I ...?"> shows the page only, so that no passage quotes
        # another entry's question word for word.
        if "|" in body:
            return body.split("|", 1)[0]
        return body.split("/", 1)[0] or body.split("/", 1)[-1].strip('"')
    return body


def perlfaq_entries(path: Path) -> list[FaqEntry]:
    entries, question, paragraphs = [], None, []

    def close() -> None:
        if question:
            answer = "\n\n".join(paragraphs).strip()
            answer = re.sub(r"^\(contributed by [^)]*\)\s*", "", answer)
            entries.append(FaqEntry(f"{path.stem}-{len(entries) + 1:02d}", question, answer))

    for paragraph in re.split(r"\n\s*\n", path.read_text(encoding="utf-8")):
        if paragraph.startswith("=head1"):
            close()
            question, paragraphs = None, []
        elif paragraph.startswith("=head2"):
            close()
            question, paragraphs = " ".join(_pod_inline(paragraph[6:]).split()), []
        elif paragraph.startswith("=item"):
            paragraphs.append(_pod_inline(paragraph[5:].strip()))
        elif paragraph.startswith(("=", "#")):
            continue
        elif paragraph[:1] in " \t":  # verbatim code: kept as written
            paragraphs.append(paragraph.rstrip())
        else:
            paragraphs.append(" ".join(_pod_inline(paragraph).split()))
    close()
    return entries


# --- plain-text FAQs ------------------------------------------------------------------------------------------


def _zsh(text: str) -> list[FaqEntry]:
    body = text[text.find("Chapter 1:"):]
    entries = []
    parts = re.split(r"^(\d+\.\d+): (.*)$", body, flags=re.M)
    for number, title, answer in zip(parts[1::3], parts[2::3], parts[3::3]):
        answer = re.split(r"^-{5,}|^Chapter \d+:", answer, flags=re.M)[0]
        question = " ".join(title.split())
        if "?" not in question:  # a heading ("Differences from sh and ksh"), kept as a passage only
            question = ""
        entries.append(FaqEntry(f"zsh-{number.replace('.', '-')}", question, _dedent(answer)))
    return entries


def _valgrind(text: str) -> list[FaqEntry]:
    entries = []
    for block in re.split(r"^-{20,}$", text, flags=re.M):
        match = re.match(r"\s*(\d+\.\d+)\. (.*?)\n(?=\S|\n)(.*)", block, re.S)
        if not match:
            continue
        number, rest = match.group(1), block[match.end(1) + 2:]
        # The question runs to its first line ending in "?", ":" or "."; the answer follows.
        question_lines = []
        lines = rest.strip("\n").split("\n")
        while lines:
            line = lines.pop(0).strip()
            question_lines.append(line)
            if line.endswith(("?", ":", ".")) or not lines:
                break
        entries.append(FaqEntry(f"valgrind-{number.replace('.', '-')}", " ".join(question_lines),
                                _dedent("\n".join(lines))))
    return entries


def _gitfaq(text: str) -> list[FaqEntry]:
    entries = []
    parts = re.split(r"^(\S.*)::$", text, flags=re.M)
    for number, (title, answer) in enumerate(zip(parts[1::2], parts[2::2]), start=1):
        answer = re.split(r"^[A-Z][A-Za-z ]+\n-{3,}$|^\[\[", answer, flags=re.M)[0]
        question = " ".join(title.replace("`", "").split())
        entries.append(FaqEntry(f"git-{number:02d}", question, _dedent(answer.replace("`", ""))))
    return entries


def _dedent(text: str) -> str:
    paragraphs = [" ".join(paragraph.split()) for paragraph in re.split(r"\n\s*\n", text)]
    return "\n\n".join(paragraph for paragraph in paragraphs if paragraph)


# --- HTML FAQs ------------------------------------------------------------------------------------------------


class _Text(HTMLParser):
    """Visible text of an HTML fragment, one paragraph per block element."""

    _BLOCKS = {"p", "pre", "li", "dt", "dd", "div", "blockquote", "tr", "h1", "h2", "h3", "h4", "br", "table"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style"):
            self._skip += 1
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag in self._BLOCKS:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)


def _html_text(fragment: str) -> str:
    parser = _Text()
    parser.feed(fragment)
    parser.close()
    return _dedent("".join(parser.parts))


def _ffmpeg(text: str) -> list[FaqEntry]:
    entries = []
    heads = list(re.finditer(r"<h([234])[^>]*>(.*?)</h\1>", text, re.S))
    for index, head in enumerate(heads):
        if head.group(1) != "3":
            continue
        title = re.sub(r"\s*#\s*TOC\s*$", "", _html_text(head.group(2)))
        number, _, question = title.partition(" ")
        # The h4 subsections of an entry belong to its answer: it ends at the next h2 or h3.
        following = next((h for h in heads[index + 1:] if h.group(1) in "23"), None)
        end = following.start() if following else text.find("</body>")
        answer = re.sub(r"#\s*TOC", "", _html_text(text[head.end():end]))
        entries.append(FaqEntry(f"ffmpeg-{number.rstrip('.').replace('.', '-')}", question.strip(), answer))
    return entries


def _sqlite(text: str) -> list[FaqEntry]:
    entries = []
    for match in re.finditer(r'<a name="q(\d+)"></a>\s*<p><b>\(\d+\)\s*(.*?)</b></p>(.*?)(?=<a name="q\d+"></a>|</body>|<hr)',
                             text, re.S):
        number, question, answer = match.groups()
        entries.append(FaqEntry(f"sqlite-{int(number):02d}", _html_text(question).replace("\n", " "),
                                _html_text(answer)))
    return entries


# --- GNOME Help (Mallard) -------------------------------------------------------------------------------------

_MAL = "{http://projectmallard.org/1.0/}"
_MAL_BLOCKS = {"p", "title", "item", "code", "screen", "td", "th", "desc"}


def _gnome(folder: Path, language: str) -> list[FaqEntry]:
    import py3langid

    entries = []
    for page in sorted(folder.glob("*.page")):
        root = ET.parse(page).getroot()
        if root.get("type") == "guide":  # link lists, hardly any text
            continue
        title_element = root.find(f"{_MAL}title")
        title = " ".join("".join(title_element.itertext()).split()) if title_element is not None else ""
        paragraphs: list[str] = []
        _mallard_text(root, paragraphs, top=True)
        body = "\n\n".join(paragraphs)
        if not body or py3langid.classify(body)[0] != language:  # an untranslated page
            continue
        is_question = title.endswith(("?", "？")) and py3langid.classify(title)[0] == language
        # A question page's passage leaves its question out; any other page keeps its title, as help pages do.
        answer = body if is_question else f"{title}\n\n{body}"
        entries.append(FaqEntry(f"{language}-{page.stem}", title if is_question else "", answer))
    # Every question page, and as many other pages (the first by name): enough passages to search among, without
    # letting one help system outweigh the other sets (Cyrillic and Hangul text takes many MiniLM tokens).
    others = [entry for entry in entries if not entry.question][: sum(bool(entry.question) for entry in entries)]
    return [entry for entry in entries if entry.question or entry in others]


def _mallard_text(element: ET.Element, out: list[str], *, top: bool = False) -> None:
    for child in element:
        tag = child.tag.replace(_MAL, "")
        if tag in ("info", "comment") or (top and tag == "title"):
            continue
        if tag in _MAL_BLOCKS and child.tag.startswith(_MAL):
            text = " ".join("".join(child.itertext()).split())
            if text:
                out.append(text)
        else:
            _mallard_text(child, out)


def _unspaced(text: str) -> bool:
    return len(re.findall(r"[\u3040-\u30ff\u4e00-\u9fff]", text)) > 40


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", nargs="?", type=Path, help="output folder")
    parser.add_argument("--sets", default=",".join(SETS), help="comma-separated sets")
    parser.add_argument("--list", action="store_true", help="list the sets and exit")
    args = parser.parse_args(argv)
    names = args.sets.split(",")
    if args.list or not args.out:
        for name in names:
            state = "missing: apt-get install " + " ".join(missing_packages([name])) if missing_packages([name]) else "installed"
            print(f"{name:10} {SETS[name].language}  {SETS[name].description} ({state})")
        return 0
    counts = write_sets(args.out, names)
    print(json.dumps(counts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
