"""Token-aware chunking of documents into contexts, with the teacher's own (fast) tokenizer.

A context holds at most ``max_tokens`` tokens **counted without special tokens** ([CLS]/[SEP], <s>/</s>): the
model adds its own (two for BERT and XLM-R), so keep ``max_tokens`` at or below the model's maximum sequence
length minus those. Contexts are cut at paragraph breaks where that still fills at least half a context, else at
sentence ends (``.!?…`` before whitespace, and ``。！？`` and their kin anywhere); a single sentence longer than
``max_tokens`` is cut at word (or, failing that, token) boundaries. Consecutive contexts of a document share whole
sentences worth at most ``overlap_tokens`` tokens (pieces of an over-long sentence share ``overlap_tokens`` tokens).

Every context keeps its span in the normalised document: ``document[char_start:char_end] == context.text``.
Token counts come from one tokenizer call per document (its offsets), and every finished context is re-tokenised
on its own to guarantee the limit: a cut that would let the standalone text exceed it is shortened.
"""

from __future__ import annotations

import bisect
import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from m3distill.data.corpus import Document
from m3distill.errors import M3DistillError

logger = logging.getLogger(__name__)

_PARAGRAPH_BREAK = re.compile(r"\n\s*\n")
# A sentence ends after .!?… followed by whitespace, or after CJK/Arabic/Indic full stops even without whitespace;
# closing quotes and brackets stay with the sentence they close.
_SENTENCE_END = re.compile(r"""(?:[.!?…]+["'”’»)\]]*(?=\s)|[。！？｡︒﹒．؟۔।॥]+["'”’»)\]」』）】]*)""")
_DOCUMENTS_PER_TOKENIZER_CALL = 64


@dataclass(frozen=True)
class Context:
    """A chunk of a document: ``text == document.text[char_start:char_end]``, ``n_tokens`` without specials."""

    context_id: str
    doc_id: str
    chunk_index: int
    char_start: int
    char_end: int
    n_tokens: int
    text: str


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    opens_paragraph: bool


@dataclass(frozen=True)
class _Token:
    start: int
    end: int
    word: int | None


def context_id_for(doc_id: str, chunk_index: int) -> str:
    """The id of a document's ``chunk_index``-th context (unique because document ids are)."""
    return f"{doc_id}#{chunk_index}"


def load_tokenizer(name_or_path: str | Path) -> Any:
    """Load the fast (Rust) tokenizer of a model folder, a sentence-transformers folder or a hub id.

    Raises:
        M3DistillError: the folder does not exist, holds no tokenizer, the hub id cannot be fetched, or the
            tokenizer has no fast version (its character offsets are needed for chunking).
    """
    from transformers import AutoTokenizer

    from m3distill.models import resolve_model_name

    name = resolve_model_name(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise M3DistillError(f"tokenizer path {path} is a file; expected a model folder")
        name = str(_transformer_folder(path))
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise M3DistillError(f"tokenizer folder not found: {name}")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError, KeyError) as error:
        first_line = (str(error).splitlines() or [type(error).__name__])[0]
        raise M3DistillError(
            f"could not load the tokenizer of {name_or_path!s}: not a model folder with a tokenizer, or the hub "
            f"could not be reached. Pass a local model folder with --tokenizer. Cause: {first_line}"
        ) from error
    if not getattr(tokenizer, "is_fast", False):
        raise M3DistillError(
            f"the tokenizer of {name_or_path!s} has no fast (Rust) version; chunking needs its character offsets"
        )
    return tokenizer


def model_token_limit(name_or_path: str | Path, tokenizer: Any) -> int | None:
    """Most non-special tokens the model reads: its ``max_seq_length`` (sentence-transformers config) or the
    tokenizer's ``model_max_length``, minus the special tokens it adds; ``None`` when unknown."""
    limit = None
    path = Path(str(name_or_path)).expanduser()
    config_file = path / "sentence_bert_config.json"
    if config_file.is_file():
        try:
            limit = json.loads(config_file.read_text(encoding="utf-8")).get("max_seq_length")
        except json.JSONDecodeError:
            limit = None
    if limit is None:
        limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(limit, int) or limit > 1_000_000:  # transformers' "no limit" sentinel is ~1e30
        return None
    return limit - tokenizer.num_special_tokens_to_add()


def sentence_spans(text: str) -> list[tuple[int, int]]:
    """``(start, end)`` character spans of the sentences of ``text``, whitespace trimmed, in order."""
    return [(unit.start, unit.end) for unit in _units(text)]


def chunk_documents(
    documents: Sequence[Document],
    tokenizer: Any,
    *,
    max_tokens: int,
    overlap_tokens: int,
    show_progress: bool = True,
    description: str = "chunking",
) -> list[Context]:
    """Cut every document into contexts of at most ``max_tokens`` tokens (without special tokens).

    Args:
        documents: normalised documents with unique ids.
        tokenizer: a fast Hugging Face tokenizer, e.g. from :func:`load_tokenizer`.
        max_tokens: the most tokens a context may hold, special tokens not counted.
        overlap_tokens: the most tokens consecutive contexts of a document share (whole sentences).
        show_progress: show a progress bar over the documents.
        description: label of the progress bar.
    """
    if max_tokens < 1 or not 0 <= overlap_tokens < max_tokens:
        raise ValueError(f"need 0 <= overlap_tokens ({overlap_tokens}) < max_tokens ({max_tokens})")
    contexts: list[Context] = []
    with tqdm(total=len(documents), desc=description, unit="doc", disable=not show_progress) as progress:
        for first in range(0, len(documents), _DOCUMENTS_PER_TOKENIZER_CALL):
            batch = documents[first : first + _DOCUMENTS_PER_TOKENIZER_CALL]
            encoding = tokenizer(
                [document.text for document in batch],
                add_special_tokens=False,
                return_offsets_mapping=True,
                verbose=False,
            )
            spans: list[tuple[Document, int, int]] = []
            for position, document in enumerate(batch):
                tokens = _tokens(encoding["offset_mapping"][position], encoding.word_ids(position))
                for start, end in _pack(document.text, tokens, max_tokens, overlap_tokens):
                    spans.append((document, start, end))
            contexts.extend(_enforce_limit(spans, tokenizer, max_tokens))
            progress.update(len(batch))
    return contexts


def _transformer_folder(path: Path) -> Path:
    """The folder holding the tokenizer: a sentence-transformers model may keep it in its Transformer module's."""
    modules_file = path / "modules.json"
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError:
            return path
        for module in modules:
            if str(module.get("type", "")).endswith("Transformer") and module.get("path"):
                return path / module["path"]
    return path


def _units(text: str) -> list[_Unit]:
    units: list[_Unit] = []
    paragraph_start = 0
    for paragraph_end, next_start in [(m.start(), m.end()) for m in _PARAGRAPH_BREAK.finditer(text)] + [
        (len(text), len(text))
    ]:
        sentence_start = paragraph_start
        opens_paragraph = True
        ends = [m.end() for m in _SENTENCE_END.finditer(text, paragraph_start, paragraph_end)] + [paragraph_end]
        for sentence_end in ends:
            start, end = _trim(text, sentence_start, sentence_end)
            if start < end:
                units.append(_Unit(start, end, opens_paragraph))
                opens_paragraph = False
            sentence_start = sentence_end
        paragraph_start = next_start
    return units


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _tokens(offsets: Sequence[tuple[int, int]], words: Sequence[int | None]) -> list[_Token]:
    # Zero-width tokens carry no text, so they can neither fill a context nor be cut between.
    return [_Token(start, end, word) for (start, end), word in zip(offsets, words) if end > start]


class _TokenCounter:
    """Tokens of a document whose last character falls in a character span, by binary search over token ends."""

    def __init__(self, tokens: Sequence[_Token]) -> None:
        self._ends = [token.end for token in tokens]

    def count(self, start: int, end: int) -> int:
        return bisect.bisect_right(self._ends, end) - bisect.bisect_right(self._ends, start)

    def index_range(self, start: int, end: int) -> tuple[int, int]:
        return bisect.bisect_right(self._ends, start), bisect.bisect_right(self._ends, end)


def _pack(text: str, tokens: Sequence[_Token], max_tokens: int, overlap_tokens: int) -> list[tuple[int, int]]:
    """Character spans of one document's contexts, packed greedily from whole sentences."""
    units = _units(text)
    counter = _TokenCounter(tokens)
    spans: list[tuple[int, int]] = []

    def fits(first: int, last: int) -> bool:
        return counter.count(units[first].start, units[last].end) <= max_tokens

    i = 0
    while i < len(units):
        if not fits(i, i):
            spans.extend(_split_long_unit(units[i], tokens, counter, max_tokens, overlap_tokens))
            i += 1
            continue
        j = i
        while j + 1 < len(units) and fits(i, j + 1):
            j += 1
        if j + 1 < len(units):
            j = _prefer_paragraph_end(units, counter, i, j, max_tokens)
        spans.append((units[i].start, units[j].end))
        if j + 1 >= len(units):
            break
        i = _next_start(units, counter, i, j, overlap_tokens, fits)
    return spans


def _prefer_paragraph_end(units: Sequence[_Unit], counter: _TokenCounter, i: int, j: int, max_tokens: int) -> int:
    """End the context at the last paragraph break inside it when that still fills half of it."""
    for k in range(j + 1, i, -1):
        if units[k].opens_paragraph:
            if 2 * counter.count(units[i].start, units[k - 1].end) >= max_tokens:
                return k - 1
            break
    return j


def _next_start(units: Sequence[_Unit], counter: _TokenCounter, i: int, j: int, overlap_tokens: int, fits: Any) -> int:
    """First sentence of the next context: back up over whole sentences worth at most ``overlap_tokens``, but never
    so far that the sentence after this context no longer fits (the next context must add new text)."""
    start = j + 1
    k = j
    while k > i and counter.count(units[k].start, units[j].end) <= overlap_tokens:
        start = k
        k -= 1
    while start <= j and not fits(start, j + 1):
        start += 1
    return start


def _split_long_unit(
    unit: _Unit, tokens: Sequence[_Token], counter: _TokenCounter, max_tokens: int, overlap_tokens: int
) -> list[tuple[int, int]]:
    """Windows of at most ``max_tokens`` tokens over one over-long sentence, cut between words where possible."""
    first, stop = counter.index_range(unit.start, unit.end)
    spans = []
    begin = first
    while True:
        end = stop if begin + max_tokens >= stop else _cut_before(tokens, begin, begin + max_tokens)
        spans.append((max(tokens[begin].start, unit.start), min(tokens[end - 1].end, unit.end)))
        if end >= stop:
            return spans
        following = max(end - overlap_tokens, begin + 1)
        while following < end and not _is_word_cut(tokens, following):
            following += 1
        begin = following


def _is_clean_cut(tokens: Sequence[_Token], position: int) -> bool:
    # Several tokens can map to one character (a Hangul syllable split into jamo): never cut between them.
    return tokens[position].start >= tokens[position - 1].end


def _is_word_cut(tokens: Sequence[_Token], position: int) -> bool:
    return _is_clean_cut(tokens, position) and tokens[position].word != tokens[position - 1].word


def _cut_before(tokens: Sequence[_Token], begin: int, limit: int) -> int:
    """Where to end a window starting at token ``begin``: the last word boundary in its second half, else the last
    clean token boundary, else ``limit`` itself."""
    for position in range(limit, begin + (limit - begin) // 2, -1):
        if _is_word_cut(tokens, position):
            return position
    for position in range(limit, begin, -1):
        if _is_clean_cut(tokens, position):
            return position
    return limit


def _enforce_limit(spans: list[tuple[Document, int, int]], tokenizer: Any, max_tokens: int) -> list[Context]:
    """Re-tokenise each context on its own; split the rare one that exceeds ``max_tokens`` that way.

    A context's standalone tokenisation can differ from its slice of the document's at the edges (a word piece
    that now starts a word, a SentencePiece space marker).
    """
    texts = [document.text[start:end] for document, start, end in spans]
    counts = [len(ids) for ids in tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]] if texts else []
    contexts: list[Context] = []
    chunk_index: dict[str, int] = {}
    for position, ((document, start, end), n_tokens) in enumerate(zip(spans, counts)):
        pieces = [(start, end, n_tokens)]
        if n_tokens > max_tokens:
            following = spans[position + 1] if position + 1 < len(spans) else None
            covered_from = following[1] if following is not None and following[0] is document else end
            pieces = _fit(document.text, start, end, tokenizer, max_tokens, covered_from)
            logger.debug("split a context of %s that re-tokenised to %d tokens", document.doc_id, n_tokens)
        for piece_start, piece_end, piece_tokens in pieces:
            index = chunk_index.get(document.doc_id, 0)
            chunk_index[document.doc_id] = index + 1
            contexts.append(
                Context(
                    context_id=context_id_for(document.doc_id, index),
                    doc_id=document.doc_id,
                    chunk_index=index,
                    char_start=piece_start,
                    char_end=piece_end,
                    n_tokens=piece_tokens,
                    text=document.text[piece_start:piece_end],
                )
            )
    return contexts


def _fit(
    text: str, start: int, end: int, tokenizer: Any, max_tokens: int, covered_from: int
) -> list[tuple[int, int, int]]:
    """``(start, end, n_tokens)`` pieces of ``text[start:end]`` that each re-tokenise to at most ``max_tokens``;
    a rest starting at or after ``covered_from`` (where the next context begins) is left to that context."""

    def count(piece_start: int, piece_end: int) -> int:
        return len(tokenizer(text[piece_start:piece_end], add_special_tokens=False, verbose=False)["input_ids"])

    pieces = []
    while start < end:
        offsets = tokenizer(text[start:end], add_special_tokens=False, return_offsets_mapping=True, verbose=False)[
            "offset_mapping"
        ]
        if len(offsets) <= max_tokens:
            pieces.append((start, end, len(offsets)))
            break
        keep = max_tokens
        while True:
            _, cut = _trim(text, start, start + max(offsets[max(keep, 1) - 1][1], 1))
            n_tokens = count(start, cut)
            if keep <= 1 or (n_tokens <= max_tokens and cut > start):
                break
            keep -= max(1, n_tokens - max_tokens)
        pieces.append((start, cut, n_tokens))
        start, _ = _trim(text, cut, end)
        if start >= covered_from:
            break
    return pieces
