"""Vocabulary trimming: a student that carries only the tokens its corpus needs.

The token-embedding table is most of a small student: 256M of an 8-layer bge-m3 student's ~366M parameters, 11.7M
of a 2-layer MiniLM student's 15.6M. A trimmed student keeps the rows of the tokens it will meet and a tokenizer
rebuilt with just those pieces, renumbered in the teacher's order; the teacher is never changed.

What is kept (:func:`choose_vocabulary`, the ``students.vocabulary`` setting):

- ``full``: everything (no trimming);
- ``corpus``: the pieces the training texts tokenize into;
- ``corpus+languages``: those, plus every piece written in the scripts the corpus uses (its letters' Unicode
  scripts; pieces of digits and punctuation alone count for every script), so unseen words of those languages still
  tokenize as the teacher tokenizes them as far as the kept pieces allow.

Always kept: the special tokens and every single-character piece of the kept scripts (for WordPiece also its
``##``-continuation; for SentencePiece the word-start piece ``▁``), so any text in those scripts tokenizes without
new unknown tokens. ``budget`` keeps the most frequent corpus pieces (then, for ``corpus+languages``, the script's
pieces in the tokenizer's own order) up to that many, besides the ones always kept.

Trimming by a subset keeps the teacher's segmentation of every text whose pieces are all kept: WordPiece's greedy
longest match and Unigram's best-scoring segmentation both pick among the pieces still there, and the teacher's
choice is still there. Texts with dropped pieces are segmented into smaller kept pieces.

A trimmed student's folder holds :data:`~m3distill.layout.VOCABULARY_MAP_FILE`: the teacher's id of each of its
token ids. Its sparse weights are reported under the teacher's ids through it, and the online teacher reads the
student's batches through it.
"""

from __future__ import annotations

import json
import logging
import tempfile
import unicodedata
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from m3distill.atomic import write_json_atomic
from m3distill.errors import M3DistillError
from m3distill.layout import VOCABULARY_MAP_FILE
from m3distill.m3_outputs import read_vocabulary_map as vocabulary_map
from m3distill.models import transformer_backbone

logger = logging.getLogger(__name__)

VOCABULARY_MODES = ("full", "corpus", "corpus+languages")
# The script of pieces made of digits, punctuation, symbols and marks alone: they belong to every script.
COMMON_SCRIPT = "Common"
_SUPPORTED_MODELS = ("WordPiece", "Unigram")
_CONFIG_TOKEN_IDS = ("pad_token_id", "bos_token_id", "eos_token_id", "sep_token_id", "cls_token_id")


@dataclass
class VocabularyChoice:
    """Which of the teacher's tokens a student keeps, and why.

    Attributes:
        mode: ``corpus`` or ``corpus+languages`` (see the module's docstring).
        kept_ids: the teacher's ids of the kept tokens, increasing: the student's id ``i`` is the teacher's
            ``kept_ids[i]``.
        teacher_size: the teacher's vocabulary size.
        budget: the cap on the pieces kept besides the special and single-character ones (None: no cap).
        corpus_tokens: how many distinct pieces the corpus texts tokenize into.
        scripts: the Unicode scripts of the corpus's letters.
    """

    mode: str
    kept_ids: list[int]
    teacher_size: int
    budget: int | None = None
    corpus_tokens: int = 0
    scripts: list[str] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.kept_ids)

    def record(self) -> dict[str, Any]:
        """What a student's metadata and model card say of its vocabulary (everything but the ids)."""
        return {key: value for key, value in asdict(self).items() if key != "kept_ids"} | {"size": self.size}


def full_vocabulary_record(tokenizer) -> dict[str, Any]:
    """The vocabulary record of an untrimmed student."""
    size = len(tokenizer)
    return {"mode": "full", "size": size, "teacher_size": size}


def char_script(char: str) -> str:
    """The Unicode script of a letter (the first word of its name: LATIN, CYRILLIC, CJK, HANGUL, ...), or
    :data:`COMMON_SCRIPT` for digits, punctuation, symbols, marks and spaces."""
    if not unicodedata.category(char).startswith("L"):
        return COMMON_SCRIPT
    name = unicodedata.name(char, "")
    return name.split(" ", 1)[0] if name else COMMON_SCRIPT


def piece_scripts(piece: str) -> set[str]:
    """The scripts of a piece's letters (empty for a piece of digits and punctuation alone); the WordPiece ``##``
    and the SentencePiece ``▁`` markers are not part of the text."""
    text = _piece_text(piece)
    return {script for script in map(char_script, text) if script != COMMON_SCRIPT}


def _piece_text(piece: str) -> str:
    return piece.removeprefix("##").replace("▁", "")


def choose_vocabulary(tokenizer, texts: Iterable[str], mode: str, *, budget: int | None = None) -> VocabularyChoice:
    """The teacher's tokens a student of ``texts`` keeps (see the module's docstring).

    Args:
        tokenizer: the teacher's (fast) tokenizer.
        texts: the corpus: every text the student trains on.
        mode: ``corpus`` or ``corpus+languages``.
        budget: keep at most this many pieces besides the special and single-character ones (None: all).

    Raises:
        ValueError: an unknown mode or a budget below 1.
        M3DistillError: a tokenizer other than a fast WordPiece or Unigram one.
    """
    if mode not in VOCABULARY_MODES[1:]:
        raise ValueError(f"vocabulary mode must be one of {', '.join(VOCABULARY_MODES[1:])} to trim, got {mode!r}")
    if budget is not None and budget < 1:
        raise ValueError(f"the vocabulary budget must be at least 1 token, got {budget}")
    spec = _tokenizer_json(tokenizer)
    pieces = _pieces(spec)
    counts: Counter[int] = Counter()
    letters: set[str] = set()
    for ids in _token_ids(tokenizer, texts):
        counts.update(ids)
    for token_id in counts:
        letters.update(_piece_text(pieces[token_id]))
    scripts = {char_script(char) for char in letters} - {COMMON_SCRIPT}
    required = _special_ids(spec) | {
        token_id for token_id, piece in enumerate(pieces)
        if _is_single_char(piece, spec) and piece_scripts(piece) <= scripts
    }
    ranked = [token_id for token_id, _ in counts.most_common() if token_id not in required]
    if mode == "corpus+languages":
        seen = set(ranked)
        # Unigram's pieces are in score order already; WordPiece's in the vocabulary's order.
        ranked += [token_id for token_id, piece in enumerate(pieces)
                   if token_id not in required and token_id not in seen and piece_scripts(piece) <= scripts]
    kept = sorted(required | set(ranked[:budget] if budget is not None else ranked))
    choice = VocabularyChoice(mode=mode, kept_ids=kept, teacher_size=len(pieces), budget=budget,
                              corpus_tokens=len(counts), scripts=sorted(scripts))
    logger.info("vocabulary %s: %d of %d tokens kept (%d used by the corpus; scripts %s)", mode, choice.size,
                choice.teacher_size, len(counts), ", ".join(choice.scripts) or "none")
    return choice


def _token_ids(tokenizer, texts: Iterable[str]) -> list[list[int]]:
    """Each text's token ids, whole (a tokenizer.json may carry a truncation setting) and without special tokens."""
    from tokenizers import Tokenizer

    backend = Tokenizer.from_str(tokenizer.backend_tokenizer.to_str())
    backend.no_truncation()
    backend.no_padding()
    return [encoding.ids for encoding in backend.encode_batch(list(texts), add_special_tokens=False)]


def _is_single_char(piece: str, spec: dict) -> bool:
    # "a", "##a" (WordPiece) or "▁a", "a", "▁" (Unigram): one character of text, or the word-start marker alone.
    if spec["model"]["type"] == "WordPiece":
        return len(piece.removeprefix("##")) == 1
    return len(piece) == 1 or (piece.startswith("▁") and len(piece) == 2)


def _tokenizer_json(tokenizer) -> dict:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise M3DistillError("vocabulary trimming needs a fast tokenizer (one with a tokenizer.json); set "
                             "students.vocabulary to full")
    spec = json.loads(backend.to_str())
    kind = spec.get("model", {}).get("type")
    if kind not in _SUPPORTED_MODELS:
        raise M3DistillError(f"vocabulary trimming supports WordPiece and Unigram tokenizers; this one is {kind}: "
                             "set students.vocabulary to full")
    return spec


def _pieces(spec: dict) -> list[str]:
    """Each token id's piece, in id order."""
    model = spec["model"]
    if model["type"] == "Unigram":
        pieces = [piece for piece, _ in model["vocab"]]
    else:
        pieces = [""] * (max(model["vocab"].values()) + 1)
        for piece, token_id in model["vocab"].items():
            pieces[token_id] = piece
    for added in spec.get("added_tokens") or []:
        if added["id"] >= len(pieces):
            pieces.extend([""] * (added["id"] + 1 - len(pieces)))
        pieces[added["id"]] = pieces[added["id"]] or added["content"]
    return pieces


def _special_ids(spec: dict) -> set[int]:
    ids = {int(added["id"]) for added in spec.get("added_tokens") or []}
    model = spec["model"]
    if model["type"] == "Unigram" and model.get("unk_id") is not None:
        ids.add(int(model["unk_id"]))
    elif model["type"] == "WordPiece" and model.get("unk_token") in model["vocab"]:
        ids.add(int(model["vocab"][model["unk_token"]]))
    return ids


def trim_tokenizer_json(spec: dict, kept_ids: Sequence[int]) -> dict:
    """A copy of a tokenizer.json (parsed) that holds only ``kept_ids``, renumbered 0, 1, ... in their order, with
    every id it mentions (unknown token, added tokens, the post-processor's special tokens, padding) renumbered."""
    new_id = {old: new for new, old in enumerate(kept_ids)}
    missing = sorted(_special_ids(spec) - new_id.keys())
    if missing:
        raise ValueError(f"the special tokens {missing} must be kept")
    spec = json.loads(json.dumps(spec))
    model = spec["model"]
    if model["type"] == "Unigram":
        model["vocab"] = [model["vocab"][old] for old in kept_ids if old < len(model["vocab"])]
        if model.get("unk_id") is not None:
            model["unk_id"] = new_id[model["unk_id"]]
    else:
        model["vocab"] = {piece: new_id[old] for piece, old in model["vocab"].items() if old in new_id}
    for added in spec.get("added_tokens") or []:
        added["id"] = new_id[added["id"]]
    if spec.get("post_processor"):
        spec["post_processor"] = _renumber_ids(spec["post_processor"], new_id)
    if spec.get("padding") and spec["padding"].get("pad_id") is not None:
        spec["padding"]["pad_id"] = new_id[spec["padding"]["pad_id"]]
    return spec


def _renumber_ids(node: Any, new_id: dict[int, int]) -> Any:
    # TemplateProcessing: special_tokens[name]["ids"]; BertProcessing / RobertaProcessing: "sep" / "cls" pairs;
    # Sequence: "processors".
    if isinstance(node, list):
        return [_renumber_ids(item, new_id) for item in node]
    if not isinstance(node, dict):
        return node
    renumbered = {}
    for key, value in node.items():
        if key == "ids" and isinstance(value, list):
            renumbered[key] = [new_id[int(token_id)] for token_id in value]
        elif key in ("sep", "cls") and isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
            renumbered[key] = [value[0], new_id[value[1]]]
        else:
            renumbered[key] = _renumber_ids(value, new_id)
    return renumbered


def trim_student(student: SentenceTransformer, choice: VocabularyChoice) -> SentenceTransformer:
    """Trim ``student`` (a fresh copy of the teacher's modules) in place to ``choice``: its token-embedding rows,
    its tokenizer and its config; returns it."""
    module = student[0]
    tokenizer = module.tokenizer
    kept = list(choice.kept_ids)
    if len(tokenizer) != choice.teacher_size:
        raise M3DistillError(f"the vocabulary choice is for a tokenizer of {choice.teacher_size} tokens; this "
                             f"student's has {len(tokenizer)}")
    spec = trim_tokenizer_json(_tokenizer_json(tokenizer), kept)
    trimmed = _load_trimmed_tokenizer(tokenizer, spec, len(kept))
    if getattr(module, "processor", None) is tokenizer:  # sentence-transformers 5.2+: the tokenizer is the processor
        module.processor = trimmed
    else:
        module.tokenizer = trimmed
    new_id = {old: new for new, old in enumerate(kept)}
    backbone = transformer_backbone(student)
    old = backbone.get_input_embeddings()
    pad = backbone.config.pad_token_id
    embedding = torch.nn.Embedding(len(kept), old.embedding_dim,
                                   padding_idx=new_id.get(old.padding_idx) if old.padding_idx is not None else None)
    with torch.no_grad():
        embedding.weight.copy_(old.weight[torch.tensor(kept, dtype=torch.long)])
    embedding.to(old.weight.device, old.weight.dtype)
    backbone.set_input_embeddings(embedding)
    backbone.config.vocab_size = len(kept)
    for name in _CONFIG_TOKEN_IDS:
        value = getattr(backbone.config, name, None)
        if isinstance(value, int) and value in new_id:
            setattr(backbone.config, name, new_id[value])
    embeddings = getattr(backbone, "embeddings", None)
    if isinstance(pad, int) and isinstance(getattr(embeddings, "padding_idx", None), int):
        embeddings.padding_idx = new_id[pad]  # XLM-R numbers positions from its padding id
    logger.info("trimmed the student's vocabulary to %d of %d tokens", len(kept), choice.teacher_size)
    return student


def _load_trimmed_tokenizer(tokenizer, spec: dict, size: int):
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="m3distill-vocabulary-") as folder:
        tokenizer.save_pretrained(folder)
        # The slow tokenizer's files (vocab.txt, sentencepiece.bpe.model) would still hold every piece: a tokenizer
        # loading them would disagree with tokenizer.json, so the trimmed student ships the fast one alone.
        for path in Path(folder).iterdir():
            if path.name not in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                path.unlink()
        Path(folder, "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False), encoding="utf-8")
        config_file = Path(folder, "tokenizer_config.json")
        config = json.loads(config_file.read_text(encoding="utf-8"))
        if isinstance(config.get("added_tokens_decoder"), dict):
            contents = {added["content"]: added["id"] for added in spec.get("added_tokens") or []}
            config["added_tokens_decoder"] = {str(contents[entry["content"]]): entry
                                              for entry in config["added_tokens_decoder"].values()
                                              if entry.get("content") in contents}
            config_file.write_text(json.dumps(config, ensure_ascii=False, indent=2), encoding="utf-8")
        trimmed = AutoTokenizer.from_pretrained(folder)
    if len(trimmed) != size:
        raise M3DistillError(f"the trimmed tokenizer has {len(trimmed)} tokens, not the {size} kept: this tokenizer "
                             "class does not load from tokenizer.json alone; set students.vocabulary to full")
    return trimmed


def write_vocabulary_map(folder: str | Path, choice: VocabularyChoice) -> None:
    """Write ``folder``'s :data:`~m3distill.layout.VOCABULARY_MAP_FILE`: the choice's record and the teacher's id
    of each of the student's token ids."""
    write_json_atomic(Path(folder) / VOCABULARY_MAP_FILE, {**choice.record(), "teacher_ids": list(choice.kept_ids)})


def read_teacher_ids(folder: str | Path | None) -> np.ndarray | None:
    """The teacher's id of each token id of the trimmed student in ``folder`` (None for an untrimmed model)."""
    record = vocabulary_map(folder)
    return None if record is None else record["teacher_ids"]


def tokenization_changes(teacher_tokenizer, student_tokenizer, teacher_ids: np.ndarray | None,
                         texts: Sequence[str]) -> dict[str, float]:
    """How the student's tokenizer differs from the teacher's on ``texts``: the share of the teacher's tokens that
    the student lacks (each is segmented into smaller kept pieces) and the share of texts tokenized identically."""
    texts = list(texts)
    if teacher_ids is None:
        return {"changed_token_share": 0.0, "identical_text_share": 1.0}
    teacher, student = _token_ids(teacher_tokenizer, texts), _token_ids(student_tokenizer, texts)
    kept = set(teacher_ids.tolist())
    total = sum(len(ids) for ids in teacher)
    dropped = sum(token_id not in kept for ids in teacher for token_id in ids)
    identical = sum(list(teacher_ids[ids]) == theirs if ids else not theirs for ids, theirs in zip(student, teacher))
    return {"changed_token_share": dropped / total if total else 0.0,
            "identical_text_share": identical / len(texts) if texts else 1.0}
