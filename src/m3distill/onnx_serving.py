"""Serve an exported student with onnxruntime alone: tokenizer.json, the ONNX graph, pooling and normalisation.

A student that ``m3distill export`` has exported holds, beside its sentence-transformers files::

    onnx/model.onnx                     the encoder in float32 (input ids -> last hidden state)
    onnx/model_qint8_quantized.onnx     the same, with dynamic int8 weights
    onnx/m3distill_export.json          what was exported, from which student, and how close each variant stays

The file names are sentence-transformers' own (its default ONNX file and its default quantised suffix), so
``SentenceTransformer(path, backend="onnx", model_kwargs={"file_name": "onnx/model_qint8_quantized.onnx"})`` loads
them where sentence-transformers' ONNX backend is installed. :class:`OnnxEncoder` needs only numpy, onnxruntime and
the ``tokenizers`` library (no torch, transformers or sentence-transformers): it tokenizes as the student does
(same truncation), runs the graph, and pools and normalises outside it, as the student's modules do::

    encoder = m3distill.onnx_encoder("runs/x/students/student-4L", "int8")
    embeddings = encoder.encode(["a question", "a passage"])     # float32 (2, dim)

The graph outputs token embeddings (``last_hidden_state``); pooling (``1_Pooling/config.json``) and ``Normalize``
are applied here, which is also what sentence-transformers' ONNX backend expects of such a file.

The export of a student of an M3 teacher (bge-m3's sparse and ColBERT heads beside it) returns, from the same run,
bge-m3's other two outputs as well: ``sparse_weights`` (``relu(sparse_linear(h))``, one per token) and
``colbert_vectors`` (``colbert_linear(h[:, 1:])``, padding zeroed, normalised). :meth:`OnnxEncoder.encode_m3` turns
them into what :func:`m3distill.encode_m3` returns (:class:`~m3distill.m3_outputs.M3Embeddings`), with numpy alone::

    outputs = m3distill.onnx_encoder("runs/x/students/student-2L", "int8").encode_m3(texts)
    outputs.dense, outputs.sparse[0], outputs.colbert[0]        # (n, dim); {token id: weight}; (tokens, dim)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime
from tokenizers import Tokenizer

from m3distill.errors import M3DistillError
from m3distill.m3_outputs import UNUSED_SPECIAL_TOKENS, M3Embeddings, max_weight_per_id, read_vocabulary_map

logger = logging.getLogger(__name__)

ONNX_DIR = "onnx"
ONNX_VARIANT_FILES = {"onnx": "onnx/model.onnx", "int8": "onnx/model_qint8_quantized.onnx"}
EXPORT_RECORD_FILE = "onnx/m3distill_export.json"
VARIANTS = tuple(ONNX_VARIANT_FILES)

# What the graph is fed, by the names the tokenizer gives them.
_GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# What it returns: the token embeddings, and for a student of an M3 teacher bge-m3's other two outputs.
GRAPH_OUTPUT = "last_hidden_state"
SPARSE_OUTPUT = "sparse_weights"
COLBERT_OUTPUT = "colbert_vectors"
M3_GRAPH_OUTPUTS = (GRAPH_OUTPUT, SPARSE_OUTPUT, COLBERT_OUTPUT)
_POOLING_MODES = ("cls", "max", "mean", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")
_LEGACY_POOLING_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max", "pooling_mode_mean_tokens": "mean",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len_tokens",
    "pooling_mode_weightedmean_tokens": "weightedmean", "pooling_mode_lasttoken": "lasttoken",
}
# A tokenizer without a real limit says so with a huge model_max_length (transformers' VERY_LARGE_INTEGER).
_NO_LIMIT = 1_000_000


@dataclass(frozen=True)
class ServingSpec:
    """What turns a sentence-transformers folder's token embeddings into its sentence embeddings.

    Read from the folder's own files, the way sentence-transformers reads them: ``modules.json`` (Transformer ->
    Pooling -> optional Normalize), ``sentence_bert_config.json`` (``max_seq_length``, ``do_lower_case``),
    ``tokenizer_config.json`` and ``config.json`` (the length limit when the former sets none),
    ``1_Pooling/config.json`` and ``config_sentence_transformers.json`` (the default prompt).

    Attributes:
        tokenizer_file: the folder's ``tokenizer.json``.
        max_seq_length: tokens per text after truncation, special tokens included.
        pooling_modes: the Pooling module's modes, concatenated in this order (bge-m3: ``("cls",)``).
        normalize: whether a Normalize module ends the model (unit-length embeddings).
        dim: the embedding dimension.
        lowercase: whether texts are lowercased before tokenizing (``do_lower_case``).
        prompt: the default prompt put before every text ("" when none).
        padding_side: ``right`` or ``left``, as the tokenizer pads.
        truncation_side: ``right`` or ``left``, as the tokenizer truncates.
        pad_token: the padding token.
    """

    tokenizer_file: Path
    max_seq_length: int
    pooling_modes: tuple[str, ...]
    normalize: bool
    dim: int
    lowercase: bool = False
    prompt: str = ""
    padding_side: str = "right"
    truncation_side: str = "right"
    pad_token: str | None = None


def serving_spec(model_dir: str | Path) -> ServingSpec:
    """The :class:`ServingSpec` of a sentence-transformers folder.

    Raises :class:`M3DistillError` when the folder is not one, or has modules that run outside the graph other than
    Pooling and Normalize (a Dense layer, for one): those cannot be served from the ONNX file.
    """
    root = Path(model_dir)
    modules = _read_json(root / "modules.json")
    if not isinstance(modules, list) or not modules:
        raise M3DistillError(f"{root} is not a sentence-transformers folder (no modules.json)")
    kinds = [str(entry.get("type", "")).rsplit(".", 1)[-1] for entry in modules]
    if kinds[0] != "Transformer" or len(kinds) < 2 or kinds[1] != "Pooling" or kinds[2:] not in ([], ["Normalize"]):
        raise M3DistillError(
            f"{root} has modules {' -> '.join(kinds)}; only Transformer -> Pooling [-> Normalize] models can be "
            "served from ONNX"
        )
    transformer_dir = root / modules[0].get("path", "")
    tokenizer_file = transformer_dir / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise M3DistillError(f"{root} has no tokenizer.json (a fast tokenizer is needed to serve it without torch)")
    settings = _read_json(transformer_dir / "sentence_bert_config.json") or {}
    tokenizer_config = _read_json(transformer_dir / "tokenizer_config.json") or {}
    pooling = _read_json(root / modules[1].get("path", "") / "config.json") or {}
    modes = _pooling_modes(pooling, root)
    dim = pooling.get("embedding_dimension", pooling.get("word_embedding_dimension"))
    if not isinstance(dim, int):
        raise M3DistillError(f"{root}: the Pooling config names no embedding dimension")
    return ServingSpec(
        tokenizer_file=tokenizer_file,
        max_seq_length=_max_seq_length(settings, tokenizer_config, _read_json(transformer_dir / "config.json") or {}),
        pooling_modes=modes,
        normalize=kinds[2:] == ["Normalize"],
        dim=dim * len(modes),
        lowercase=bool(settings.get("do_lower_case", False)),
        prompt=_default_prompt(root, pooling),
        padding_side=str(tokenizer_config.get("padding_side") or "right"),
        truncation_side=str(tokenizer_config.get("truncation_side") or "right"),
        pad_token=_token_text(tokenizer_config.get("pad_token")),
    )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise M3DistillError(f"cannot read {path}: {error}") from error


def _pooling_modes(pooling: dict[str, Any], root: Path) -> tuple[str, ...]:
    mode = pooling.get("pooling_mode")
    if mode is None:  # the sentence-transformers < 6 form: one boolean per mode
        modes = tuple(name for key, name in _LEGACY_POOLING_KEYS.items() if pooling.get(key))
    else:
        modes = (mode,) if isinstance(mode, str) else tuple(mode)
    unknown = [mode for mode in modes if mode not in _POOLING_MODES]
    if not modes or unknown:
        raise M3DistillError(f"{root}: unsupported pooling mode {unknown or modes}; supported: {', '.join(_POOLING_MODES)}")
    return modes


def _max_seq_length(settings: dict[str, Any], tokenizer_config: dict[str, Any], config: dict[str, Any]) -> int:
    """sentence-transformers' rule: the module's max_seq_length, else the tokenizer's limit capped by the model's
    position embeddings."""
    if isinstance(settings.get("max_seq_length"), int):
        return settings["max_seq_length"]
    limits = [value for value in (tokenizer_config.get("model_max_length"), config.get("max_position_embeddings"))
              if isinstance(value, int) and 0 < value < _NO_LIMIT]
    if not limits:
        raise M3DistillError("cannot tell the maximum sequence length: set max_seq_length in sentence_bert_config.json")
    return min(limits)


def _default_prompt(root: Path, pooling: dict[str, Any]) -> str:
    settings = _read_json(root / "config_sentence_transformers.json") or {}
    name = settings.get("default_prompt_name")
    if not name:
        return ""
    prompt = str((settings.get("prompts") or {}).get(name, ""))
    if prompt and not pooling.get("include_prompt", pooling.get("pooling_mode_include_prompt", True)):
        raise M3DistillError(f"{root}: a default prompt left out of the pooling is not supported outside torch")
    return prompt


def _token_text(token: Any) -> str | None:
    if isinstance(token, dict):  # an AddedToken written out in full
        token = token.get("content")
    return token if isinstance(token, str) else None


class OnnxEncoder:
    """A student's ONNX export as an encoder: ``encode(texts)`` gives what ``SentenceTransformer(model_dir).encode``
    gives, up to float error (fp32) or quantisation error (int8).

    Attributes:
        model_dir: the student folder.
        variant: ``onnx`` (float32) or ``int8`` (dynamic int8 weights).
        file: the ONNX file in use.
        max_seq_length: tokens per text after truncation.
        dim: the embedding dimension.
        normalize: whether embeddings are L2-normalised.
        outputs: ``("dense",)``, or ``("dense", "sparse", "colbert")`` for the export of an M3 student.
    """

    def __init__(self, model_dir: str | Path, variant: str = "onnx", *, threads: int | None = None,
                 max_seq_length: int | None = None, file: str | Path | None = None,
                 providers: Sequence[str] | None = None) -> None:
        """Load the tokenizer and the ONNX graph of one variant.

        Args:
            model_dir: a student folder holding an export (see :data:`ONNX_VARIANT_FILES`).
            variant: ``onnx`` for the float32 graph, ``int8`` for the quantised one.
            threads: onnxruntime's intra-op threads; onnxruntime's default (all cores) when None.
            max_seq_length: truncate texts to this many tokens instead of the student's own limit.
            file: an ONNX file to use instead of the variant's (an export being verified before it is in place).
            providers: onnxruntime execution providers, in order of preference; the CPU when None.
        """
        if variant not in ONNX_VARIANT_FILES:
            raise M3DistillError(f"unknown ONNX variant {variant!r}; choose from {', '.join(VARIANTS)}")
        self.model_dir = Path(model_dir)
        self.variant = variant
        self.file = Path(file) if file is not None else self.model_dir / ONNX_VARIANT_FILES[variant]
        if not self.file.is_file():
            raise M3DistillError(
                f"{self.file} not found: export the student first (m3distill export {self.model_dir})"
                + (f"; exported here: {', '.join(exported_variants(self.model_dir))}"
                   if exported_variants(self.model_dir) else "")
            )
        self._spec = serving_spec(self.model_dir)
        if max_seq_length is not None and max_seq_length < 2:
            raise M3DistillError(f"max_seq_length must be at least 2, not {max_seq_length}")
        self.max_seq_length = int(max_seq_length or self._spec.max_seq_length)
        self.dim = self._spec.dim
        self.normalize = self._spec.normalize
        self._tokenizer = self._load_tokenizer()
        options = onnxruntime.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        options.log_severity_level = 3  # onnxruntime's own warnings (unused initializers...) are not the user's
        self._session = onnxruntime.InferenceSession(str(self.file), sess_options=options,
                                                     providers=list(providers or ["CPUExecutionProvider"]))
        self._inputs = [node.name for node in self._session.get_inputs()]
        unknown = [name for name in self._inputs if name not in _GRAPH_INPUTS]
        if unknown or "input_ids" not in self._inputs:
            raise M3DistillError(f"{self.file} takes inputs {self._inputs}; expected some of {', '.join(_GRAPH_INPUTS)}")
        names = [node.name for node in self._session.get_outputs()]
        self._output = GRAPH_OUTPUT if GRAPH_OUTPUT in names else names[0]
        self.outputs = ("dense", "sparse", "colbert") if set(M3_GRAPH_OUTPUTS) <= set(names) else ("dense",)
        self._unused_ids = np.array(sorted(self._special_ids()), dtype=np.int64)
        trimmed = read_vocabulary_map(self.model_dir)  # a trimmed student: sparse ids mapped to the teacher's
        self._teacher_ids = trimmed["teacher_ids"] if trimmed is not None else None

    def _special_ids(self) -> set[int]:
        """The ids FlagEmbedding leaves out of sparse weights (CLS, EOS, padding, unknown), as the tokenizer names
        them in its config files."""
        transformer_dir = self._spec.tokenizer_file.parent
        named = {**(_read_json(transformer_dir / "special_tokens_map.json") or {}),
                 **(_read_json(transformer_dir / "tokenizer_config.json") or {})}
        ids = {self._tokenizer.token_to_id(token) for token in map(_token_text, (named.get(name)
                                                                                  for name in UNUSED_SPECIAL_TOKENS))
               if token}
        return {int(token_id) for token_id in ids if token_id is not None}

    def _load_tokenizer(self) -> Tokenizer:
        tokenizer = Tokenizer.from_file(str(self._spec.tokenizer_file))
        tokenizer.no_padding()  # batches are padded here, after sorting by length
        tokenizer.enable_truncation(max_length=self.max_seq_length, strategy="longest_first",
                                    direction=self._spec.truncation_side)
        pad = self._spec.pad_token
        pad_id = tokenizer.token_to_id(pad) if pad else None
        if pad_id is None:  # no pad token in tokenizer_config.json: the tokenizer file's own padding settings
            pad_id = ((_read_json(self._spec.tokenizer_file) or {}).get("padding") or {}).get("pad_id", 0)
        self._pad_id = int(pad_id)
        return tokenizer

    @property
    def weights_bytes(self) -> int:
        """Bytes of the variant's ONNX file(s) on disk, external data included."""
        return sum(path.stat().st_size for path in _variant_files(self.model_dir, self.file))

    def encode(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Embed ``texts``: float32 array (len(texts), dim), rows in input order.

        Texts are tokenized and truncated as the student does, sorted by length into batches of ``batch_size``
        (less padding), run through the graph, pooled and (when the student normalises) L2-normalised.
        """
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for rows, feed, mask in self._batches(texts, batch_size):
            hidden = self._session.run([self._output], feed)[0]
            out[rows] = self._pool(hidden.astype(np.float32, copy=False), mask)
        return out

    def encode_m3(self, texts: Sequence[str], batch_size: int = 32) -> M3Embeddings:
        """All the outputs the export has for ``texts``, as :func:`m3distill.encode_m3` gives them for the torch
        student: dense (as :meth:`encode`); for an M3 student also sparse (per text, the largest weight of each
        token id above zero, CLS, EOS, padding and unknown tokens left out; a trimmed student's ids mapped to the
        teacher's) and ColBERT (per text, one unit vector per token after the first). One graph run per batch."""
        if self.outputs == ("dense",):
            return M3Embeddings(dense=self.encode(texts, batch_size=batch_size))
        dense = np.zeros((len(texts), self.dim), dtype=np.float32)
        sparse: list[dict[int, float]] = [{} for _ in texts]
        colbert: list[np.ndarray] = [np.zeros((0, 0), np.float32) for _ in texts]
        for rows, feed, mask in self._batches(texts, batch_size):
            hidden, weights, vectors = self._session.run(list(M3_GRAPH_OUTPUTS), feed)
            dense[rows] = self._pool(hidden.astype(np.float32, copy=False), mask)
            ids = feed["input_ids"]
            keep = (weights > 0) & (mask > 0) & ~np.isin(ids, self._unused_ids)
            for position, row in enumerate(rows):
                kept_ids = ids[position][keep[position]]
                if self._teacher_ids is not None:
                    kept_ids = self._teacher_ids[kept_ids]
                sparse[row] = max_weight_per_id(kept_ids.tolist(),
                                                weights[position][keep[position]].astype(np.float32).tolist())
                colbert[row] = np.ascontiguousarray(vectors[position][mask[position, 1:] > 0], dtype=np.float32)
        return M3Embeddings(dense=dense, sparse=sparse, colbert=colbert)

    def _batches(self, texts: Sequence[str], batch_size: int):
        """``(rows, graph feed, attention mask)`` per batch: the texts tokenized as the student does (prompt,
        lowercasing, truncation), sorted by length so that a batch holds little padding."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not one string: encode([text])")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, not {batch_size}")
        texts = [self._spec.prompt + text for text in texts]
        if self._spec.lowercase:
            texts = [text.lower() for text in texts]
        if not texts:
            return
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=True)
        order = sorted(range(len(texts)), key=lambda index: -len(encodings[index].ids))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            feed, mask = self._batch([encodings[index] for index in rows])
            yield rows, feed, mask

    def _batch(self, encodings: list) -> tuple[dict[str, np.ndarray], np.ndarray]:
        length = max(len(encoding.ids) for encoding in encodings)
        ids = np.full((len(encodings), length), self._pad_id, dtype=np.int64)
        types = np.zeros((len(encodings), length), dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        for row, encoding in enumerate(encodings):
            n = len(encoding.ids)
            span = slice(length - n, length) if self._spec.padding_side == "left" else slice(0, n)
            ids[row, span] = encoding.ids
            types[row, span] = encoding.type_ids
            mask[row, span] = 1
        arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
        return {name: arrays[name] for name in self._inputs}, mask

    def _pool(self, hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """The Pooling module's arithmetic (sentence-transformers' ``Pooling.forward``), then Normalize."""
        weights = mask[:, :, None].astype(np.float32)
        pooled = []
        for mode in self._spec.pooling_modes:
            if mode == "cls":
                pooled.append(hidden[np.arange(len(hidden)), mask.argmax(axis=1)])
            elif mode == "max":
                pooled.append(np.where(weights > 0, hidden, -np.inf).max(axis=1))
            elif mode in ("mean", "mean_sqrt_len_tokens"):
                count = np.maximum(weights.sum(axis=1), 1e-9)
                pooled.append((hidden * weights).sum(axis=1) / (count if mode == "mean" else np.sqrt(count)))
            elif mode == "weightedmean":
                positions = np.arange(1, hidden.shape[1] + 1, dtype=np.float32)[None, :] - mask.argmax(axis=1)[:, None]
                weighted = weights * positions[:, :, None]
                pooled.append((hidden * weighted).sum(axis=1) / np.maximum(weighted.sum(axis=1), 1e-9))
            else:  # lasttoken
                last = hidden.shape[1] - 1 - mask[:, ::-1].argmax(axis=1)
                pooled.append(hidden[np.arange(len(hidden)), last] * mask[np.arange(len(hidden)), last][:, None])
        vectors = np.concatenate(pooled, axis=1) if len(pooled) > 1 else pooled[0]
        if self.normalize:
            vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return vectors.astype(np.float32, copy=False)

    def __repr__(self) -> str:
        return f"OnnxEncoder({str(self.model_dir)!r}, {self.variant!r}, dim={self.dim})"


def read_export_record(model_dir: str | Path) -> dict[str, Any] | None:
    """The export record (``onnx/m3distill_export.json``) of a folder, or None when it has none or it is unreadable."""
    try:
        record = json.loads((Path(model_dir) / EXPORT_RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return record if isinstance(record, dict) else None


def export_files(model_dir: str | Path) -> list[str]:
    """What m3distill wrote in a folder's ``onnx/``, by its export record: the record and each variant's files, as
    names inside ``onnx/``; [] when there is no record (an ``onnx/`` folder of the user's)."""
    record = read_export_record(model_dir)
    if record is None:
        return []
    files = {Path(EXPORT_RECORD_FILE).name}
    for entry in (record.get("variants") or {}).values():
        files.update(Path(file).name for file in (entry.get("files") or []) if isinstance(file, str))
    return sorted(files)


def exported_variants(model_dir: str | Path) -> list[str]:
    """The variants the export record lists whose files exist, in ``("onnx", "int8")`` order; [] when none."""
    record = read_export_record(model_dir)
    if record is None:
        return []
    listed = record.get("variants") or {}
    return [variant for variant in VARIANTS
            if variant in listed and (Path(model_dir) / ONNX_VARIANT_FILES[variant]).is_file()]


def _variant_files(model_dir: Path, file: Path) -> list[Path]:
    """The files that make up one ONNX model: the .onnx file and its external data, as the record lists them (or,
    without a record, the data files named after it)."""
    record = read_export_record(model_dir) or {}
    for entry in (record.get("variants") or {}).values():
        if isinstance(entry, dict) and (model_dir / str(entry.get("file", ""))) == file:
            listed = [model_dir / name for name in entry.get("files") or []]
            if listed and all(path.is_file() for path in listed):
                return listed
    beside = [file.with_name(file.name + suffix) for suffix in ("_data", ".data")]
    return [file, *(path for path in beside if path.is_file())]


def onnx_encoder(model_dir: str | Path, variant: str = "onnx", **kwargs: Any) -> OnnxEncoder:
    """An :class:`OnnxEncoder` of ``model_dir``'s exported ``variant`` (``onnx`` or ``int8``); ``kwargs`` go to it
    (``threads``, ``max_seq_length``)."""
    return OnnxEncoder(model_dir, variant, **kwargs)
