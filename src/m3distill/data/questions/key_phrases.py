"""Salient terms, key phrases, headings and action phrases of a context, with no model and no network.

Salience is corpus statistics: a term's frequency in the context times its inverse document frequency among the
contexts of the same language (so "und" or "the" weigh nothing however often they occur), with a short list of
function words per language for languages too rare in a corpus for their statistics to tell. Key phrases are runs
of one to three salient terms that stand next to each other in a sentence ("package management system").
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

from m3distill.data.questions.base import written_without_spaces

# Words: letters or digits, with inner ".", "-", "_", "+", "/" or "'" ("dpkg-divert", "apt.conf", "C++"), and an
# option's leading dashes ("--force").
_WORD = re.compile(r"-{0,2}[^\W_](?:[\w.+/'’-]*[\w+])?")
# Scripts without spaces: runs of katakana, of kanji / hanzi, and Latin words.
_UNSPACED_TERM = re.compile(r"[\u30a0-\u30ff\u31f0-\u31ff\uff66-\uff9f]{2,}|[\u3400-\u4dbf\u4e00-\u9fff]{2,6}|[A-Za-z][A-Za-z0-9_.+-]*")
# A phrase never crosses these.
_BREAK = re.compile(r"[.,;:!?()\[\]{}\"“”«»„。、，；：！？（）「」『』]")
# Korean particles (josa) written onto the word before them: "패키지를" is the term "패키지".
_KOREAN_PARTICLES = ("에서는", "으로는", "에서", "으로", "에게", "까지", "부터", "처럼", "보다", "와", "과", "을", "를", "이", "가",
                     "은", "는", "의", "에", "로", "도", "만", "나")

# Function words of the languages of the sample corpus: too common to be what a question is about. Corpus
# statistics find the rest; these lists matter where a language has too few contexts for statistics.
STOPWORDS: dict[str, frozenset[str]] = {
    language: frozenset(words.split())
    for language, words in {
        "en": "a an the and or but if then else of to in on at by for with from as is are was were be been being it its "
              "this that these those there here which who whom whose what when where why how not no nor so than too "
              "very can could may might must shall should will would do does did has have had having i you he she we "
              "they me him her us them my your his our their all any both each few more most other some such only own "
              "same also into over under about after before between through during without within up down out off "
              "again further once one two e.g i.e etc via per it's don't doesn't can't isn't aren't won't we'll you'll "
              "i'm you're we're they're that's there's let's just like even still yet already always never often "
              "usually however instead rather quite maybe perhaps probably hopefully thus hence therefore whether "
              "while because since although though unless until whatever whenever something anything nothing "
              "everything someone anyone somebody anybody way ways thing things lot lots much many well now then "
              "else sure really actually simply ok okay yes",
        "de": "der die das den dem des ein eine einen einem einer eines und oder aber wenn dann als wie so auch nicht "
              "kein keine ist sind war waren wird werden wurde wurden sein hat haben hatte kann können muss müssen soll "
              "sollen darf es er sie wir ihr ich du man sich zu zum zur im in an am auf aus bei mit nach von vor über "
              "unter durch für gegen ohne um bis dass ob diese dieser dieses diesem jeder jede alle auch nur noch schon "
              "hier dort wo was wer welche welcher sowie bzw z.b",
        "fr": "le la les l un une des du de d et ou mais si alors comme que qui quoi dont où ne pas plus est sont était "
              "être été a ont avait avoir peut peuvent doit il elle ils elles on nous vous je tu se sa son ses leur "
              "leurs ce cet cette ces au aux en dans sur sous par pour avec sans entre vers chez tout tous toute toutes "
              "aussi seulement très y",
        "es": "el la los las lo un una unos unas y o u pero si entonces como que quien cual cuyo donde no ni más es son "
              "era ser sido está están ha han había puede pueden debe se su sus le les él ella ellos nosotros usted "
              "este esta estos estas ese esa al del de en a por para con sin sobre entre hasta desde también solo muy "
              "todo todos",
        "it": "il lo la i gli le un uno una e o ma se allora come che chi cui dove non più è sono era essere stato ha "
              "hanno può possono deve si suo sua suoi sue questo questa questi queste quello al allo alla ai agli alle "
              "del dello della dei degli delle di a da in con su per tra fra anche solo molto tutto tutti",
        "pt": "o a os as um uma uns umas e ou mas se então como que quem qual onde não mais é são era ser sido está "
              "estão tem têm pode podem deve seu sua seus suas ele ela eles este esta estes estas esse essa ao aos à "
              "às do da dos das de em no na nos nas por para com sem sobre entre até também só muito todo todos",
        "nl": "de het een en of maar als dan zoals dat die wie wat waar niet geen meer is zijn was waren wordt worden "
              "werd kan kunnen moet moeten zal hij zij ze wij we jij je u men zich zijn haar hun dit deze dat die aan "
              "in op bij met naar van voor over onder door om tot uit ook alleen nog al er",
        "sv": "en ett den det de och eller men om så som att vem vad var när inte ingen mer är var vara varit blir "
              "blev kan kunna måste ska skall han hon vi ni jag du man sig sin sitt sina denna detta dessa till i på "
              "av för med från över under genom utan mot hos också bara även",
        "pl": "i a o w we z ze na do od po za przez dla przy bez nad pod jest są był była było być może mogą musi ten "
              "ta to te tego tej tym się nie tak jak że który która które czy lub albo ale jeśli gdy oraz także tylko "
              "jego jej ich",
        "cs": "a i o v ve z ze na do od po za pro při bez nad pod je jsou byl byla bylo být může mohou musí ten ta to "
              "ty toho této tím se si ne tak jak že který která které zda nebo ale pokud když také pouze jeho její "
              "jejich",
        "ru": "и в во не что он на я с со как а то все она так его но да ты к у же вы за бы по только ее мне было "
              "вот от меня еще нет о из ему для при без до под над об это этот эта эти быть был была были есть или "
              "ли если также который которая которые чтобы может можно их его её",
        "uk": "і й та в у на з із зі до від по за для при без над під про це цей ця ці бути був була були є або чи "
              "якщо також який яка які що щоб може можна не так як його її їх він вона вони ми ви я ти",
        "tr": "ve veya ile bir bu şu o da de için gibi daha çok en ama fakat ki mi mı mu mü ne olan olarak ise her "
              "kadar sonra önce",
    }.items()
}

# A term that occurs in more than this share of its language's contexts is a function word of the corpus.
_COMMON_SHARE = 0.25
# Statistics of a language need this many contexts; below, only the stopword lists and length decide.
_MIN_CONTEXTS_FOR_STATISTICS = 20


@dataclass(frozen=True)
class Term:
    """A term as written in the context (``text``) and its comparison key (``key``: casefolded, particles off)."""

    text: str
    key: str
    start: int


def terms(text: str, language: str) -> list[Term]:
    """The words of ``text`` in order (kana and kanji runs in scripts without spaces)."""
    pattern = _UNSPACED_TERM if written_without_spaces(text) else _WORD
    found = []
    for match in pattern.finditer(text):
        word = match.group().rstrip(".'’-")
        if not word:
            continue
        key = word.casefold()
        if language == "ko":
            key = _strip_particle(key)
        found.append(Term(word, key, match.start()))
    return found


def _strip_particle(word: str) -> str:
    for particle in _KOREAN_PARTICLES:
        if word.endswith(particle) and len(word) > len(particle) + 1:
            return word[: -len(particle)]
    return word


class TermStatistics:
    """Document frequencies of terms per language, over all contexts of a corpus."""

    def __init__(self, texts: Sequence[str], languages: Sequence[str]):
        self.contexts: Counter[str] = Counter(languages)
        self.frequency: dict[str, Counter[str]] = {}
        for text, language in zip(texts, languages):
            self.frequency.setdefault(language, Counter()).update({term.key for term in terms(text, language)})

    def is_function_word(self, key: str, language: str) -> bool:
        """True for a word no query is about: a function word of its language (listed, or found in more than a
        quarter of the language's contexts), one character, or mostly digits (versions, numbers)."""
        digits = sum(char.isdigit() for char in key)
        if key in STOPWORDS.get(language, ()) or len(key) < 2 or digits * 2 >= len(key):
            return True
        n = self.contexts[language]
        return n >= _MIN_CONTEXTS_FOR_STATISTICS and self.frequency[language][key] > _COMMON_SHARE * n

    def idf(self, key: str, language: str) -> float:
        n = self.contexts[language]
        return math.log((n + 1) / (self.frequency.get(language, Counter())[key] + 1)) + 1.0


@dataclass(frozen=True)
class Salience:
    """What a context is about: its salient terms and key phrases, best first, and its heading lines."""

    terms: list[str]
    phrases: list[str]
    headings: list[str]


def salience(text: str, language: str, statistics: TermStatistics, *, max_phrase_terms: int = 3) -> Salience:
    """The salient terms (by tf-idf), key phrases (runs of 1 to ``max_phrase_terms`` salient terms within a
    sentence, scored by the sum of their terms' tf-idf) and heading-like lines of ``text``."""
    found = terms(text, language)
    counts = Counter(term.key for term in found)
    score = {key: count * statistics.idf(key, language) for key, count in counts.items()
             if not statistics.is_function_word(key, language)}
    first_form: dict[str, str] = {}
    for term in found:
        first_form.setdefault(term.key, term.key if language == "ko" else term.text)
    ranked_terms = [first_form[key] for key, _ in sorted(score.items(), key=lambda item: (-item[1], item[0]))]

    phrases: dict[str, float] = {}
    run: list[Term] = []
    for term in [*found, None]:
        breaks = term is None or term.key not in score or (run and _BREAK.search(text[run[-1].start : term.start]))
        if breaks:
            for length in range(1, max_phrase_terms + 1):
                for start in range(len(run) - length + 1):
                    words = run[start : start + length]
                    if language == "ko":  # the words without their particles: "백업을 진행" -> "백업 진행"
                        phrase = " ".join(word.key for word in words)
                    else:
                        phrase = text[words[0].start : words[-1].start + len(words[-1].text)]
                    phrases[phrase] = max(phrases.get(phrase, 0.0), sum(score[w.key] for w in words))
            run = []
        if term is not None and term.key in score:
            run.append(term)
    ranked_phrases = [phrase for phrase, _ in sorted(phrases.items(), key=lambda item: (-item[1], item[0]))]
    return Salience(terms=ranked_terms, phrases=ranked_phrases, headings=heading_lines(text))


def heading_lines(text: str) -> list[str]:
    """Lines of ``text`` that read as headings: short, followed by more text, not ending like a sentence."""
    lines = [line.strip() for line in text.split("\n")]
    headings = []
    for index, line in enumerate(lines[:-1]):
        if not line or not any(rest for rest in lines[index + 1 :]):
            continue
        short = len(line) <= 60 if written_without_spaces(line) else len(line.split()) <= 8 and len(line) <= 80
        # A heading has words (not code: no sigils or brackets), and more than a letter or two.
        wordy = sum(char.isalpha() for char in line) >= 4 and not _CODE_CHARS.search(line)
        if short and wordy and not line.endswith((".", ",", ";", ":", "。", "、")):
            headings.append(line)
    return headings


_CODE_CHARS = re.compile(r"[$@%=;{}<>\[\]()\\|#&*^~`]")


# Phrases after which an infinitive says what a reader wants to do: "to remove a package" -> "remove a package".
_ACTION = {
    "en": re.compile(r"\b(?:to|To) ((?!the |a |an |be |this |that |which |its |their |your |see )[a-z][a-z-]+"
                     r"(?: [^\s.,;:()]+){1,5})"),
    "fr": re.compile(r"\b(?:pour|Pour|afin de) ((?:[a-zéèêàâîôûç-]+(?:er|ir|re))(?: [^\s.,;:()]+){1,5})"),
    "es": re.compile(r"\b(?:para|Para) ((?:[a-záéíóúñ]+(?:ar|er|ir))(?: [^\s.,;:()]+){1,5})"),
    "it": re.compile(r"\b(?:per|Per) ((?:[a-zàèéìòù]+(?:are|ere|ire))(?: [^\s.,;:()]+){1,5})"),
    "pt": re.compile(r"\b(?:para|Para) ((?:[a-záéíóúãõç]+(?:ar|er|ir))(?: [^\s.,;:()]+){1,5})"),
}


# Function words an action phrase may hold before its object ("remove *the* package", "afficher *la* liste"); any
# other function word ends it ("join video files *may* mean" -> "join video files").
_OBJECT_WORDS = {
    "en": frozenset("a an the your my this that these those all some any of its their each every".split()),
    "fr": frozenset("le la les l un une des du de d votre vos ce cet cette ces tous toutes".split()),
    "es": frozenset("el la los las un una unos unas de del su sus este esta estos estas todos".split()),
    "it": frozenset("il lo la i gli le un uno una di del dello della dei degli delle suo sua questo questa".split()),
    "pt": frozenset("o a os as um uma de do da dos das seu sua este esta todos".split()),
}


def action_phrases(text: str, language: str) -> list[str]:
    """Infinitive phrases of ``text`` that name a task ("remove a package"), in order; languages of :data:`_ACTION`."""
    pattern = _ACTION.get(language)
    if pattern is None:
        return []
    stop, inner = STOPWORDS.get(language, frozenset()), _OBJECT_WORDS.get(language, frozenset())
    found = []
    for match in pattern.finditer(text):
        words = match.group(1).split()
        # The first word is the verb: not a function word ("to our knowledge"), a participle or code.
        if words[0].casefold() in stop or words[0].endswith(("ed", "ing")) or _CODE_CHARS.search(match.group(1)):
            continue
        kept = words[:1]
        for word in words[1:]:
            if word.casefold() in stop and word.casefold() not in inner:
                break
            kept.append(word)
        while kept and kept[-1].casefold() in stop:  # "remove a package from the" -> "remove a package"
            kept.pop()
        if len(kept) >= 2:
            found.append(" ".join(kept))
    return list(dict.fromkeys(found))
