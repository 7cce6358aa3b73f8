"""Encoding many texts fast: length-sorted batches cut by a token budget, and reduced-precision compute.

sentence-transformers' ``encode`` cuts a fixed number of texts per batch, sorted by characters, so one batch of long
texts needs as much memory as the longest text times the batch size, a batch size that fits long texts leaves short
ones underusing the device, and for multilingual text characters are a poor guide to tokens: on 1,000 texts of the
demo's 16-language dataset its batches of 32 held 1.48 times the tokens of the texts. :func:`encode_texts`
can cut by padded tokens instead: the texts are tokenised once (by the model's own preprocessing, unpadded), sorted
by token count (longest first, so a budget that does not fit fails at once, not at the end) and cut so that each
batch's longest text times its number of texts stays within ``max_tokens_per_batch`` (and its texts within
``batch_size``); each batch is padded from that one tokenisation and run through the model, and the embeddings come
back in the input order, as float32. On that sample (the packaged MiniLM, one thread of a busy 2-core machine) a
budget of 4,096 tokens (batches of up to 256 texts, 1.05 times the texts' tokens) encoded 37-47 texts/s against
24-25 for batches of 32; tokenising all 4,564 demo texts once took 0.6 s.

Precision: ``fp32`` runs the model as loaded; ``bf16`` and ``fp16`` run it under :func:`torch.autocast` (matrix
products in the reduced type, normalisations and softmax in float32), which leaves the caller's model untouched.
Autocast was measured against encoding with a bfloat16 copy of the model on the CPU (the packaged MiniLM, 460 texts
in 16 languages): mean cosine to fp32 0.99998 with autocast and 0.99994 with the copy, worst text 0.99993 against
0.99982 (the copy runs LayerNorm and pooling in bfloat16 too), and the copy needs a second model in memory while it
exists. ``auto`` is bf16 on a CUDA GPU that supports it, fp16 on an older CUDA GPU, and fp32 elsewhere (bf16 is
slower than fp32 on CPUs without bfloat16 instructions: 13.8 s against 10.1 s for those 460 texts here).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Literal, get_args

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.util import batch_to_device, truncate_embeddings
from tqdm.auto import tqdm

from m3distill.errors import M3DistillError

logger = logging.getLogger(__name__)

Precision = Literal["auto", "fp32", "bf16", "fp16"]
PRECISIONS: tuple[str, ...] = get_args(Precision)
_AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
# Texts tokenised per call while measuring lengths: large enough for the fast tokenizers' batching, small enough
# that the unpadded token lists of one call stay small.
_LENGTH_CHUNK = 1024
# Token features padded per batch (with the tokenizer's pad id, 0, its pad token type), and the features
# sentence-transformers' preprocessing shares across a batch. Anything else is left to sentence-transformers.
_PER_TEXT_FEATURES = ("input_ids", "attention_mask", "token_type_ids")
_SHARED_FEATURES = {"modality", "prompt_length"}


def token_budget_batches(lengths: Sequence[int], max_tokens: int, max_texts: int | None = None) -> list[list[int]]:
    """Cut texts into batches of at most ``max_tokens`` padded tokens: the batches' positions in ``lengths``.

    The texts are taken longest first (ties in input order), and a batch grows while its longest text times its
    number of texts stays within ``max_tokens`` and, when given, its number of texts within ``max_texts``. A text
    longer than ``max_tokens`` gets a batch of its own. The same lengths always give the same batches.

    Args:
        lengths: tokens of each text (after truncation, special tokens included).
        max_tokens: the most padded tokens (longest text x texts) a batch may hold; at least 1.
        max_texts: the most texts a batch may hold; no limit when ``None``.

    Raises:
        ValueError: ``max_tokens`` or ``max_texts`` is below 1, or a length is negative.
    """
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens must be a positive number of tokens, got {max_tokens!r}")
    if max_texts is not None and (isinstance(max_texts, bool) or not isinstance(max_texts, int) or max_texts < 1):
        raise ValueError(f"max_texts must be a positive number of texts or None, got {max_texts!r}")
    if any(length < 0 for length in lengths):
        raise ValueError("token lengths cannot be negative")
    order = sorted(range(len(lengths)), key=lambda index: (-lengths[index], index))
    batches: list[list[int]] = []
    batch: list[int] = []
    longest = 0
    for index in order:
        # Longest first: the batch's first text fixes its padded length.
        longest = longest if batch else max(1, lengths[index])
        full = max_texts is not None and len(batch) >= max_texts
        if batch and (full or (len(batch) + 1) * longest > max_tokens):
            batches.append(batch)
            batch, longest = [], max(1, lengths[index])
        batch.append(index)
    if batch:
        batches.append(batch)
    return batches


def cpu_computes_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX-BF16 instructions).

    On such a CPU, bf16 autocast trains a student about twice as fast as fp32 (the README's "bf16 on the CPU" has
    the measurements); a CPU without them emulates bfloat16 and gains nothing. False when this torch cannot tell
    (``torch.cpu.get_capabilities`` is recent).
    """
    capabilities = getattr(torch.cpu, "get_capabilities", None)
    if capabilities is None:
        return False
    try:
        found = capabilities()
    except Exception:  # noqa: BLE001 - a probe of the hardware: any failure means "not known to be there"
        return False
    return bool(found.get("avx512_bf16") or found.get("amx_bf16"))


def resolve_precision(precision: str, device: str | torch.device, *, bf16_on_cpu: bool = False) -> str:
    """The precision work on ``device`` runs in: ``fp32``, ``bf16`` or ``fp16`` (``auto`` resolved).

    ``auto`` is bf16 on a CUDA GPU that supports it, fp16 on an older CUDA GPU, and fp32 on anything else, except
    that with ``bf16_on_cpu`` it is bf16 on a CPU that computes bfloat16 natively (:func:`cpu_computes_bf16`).
    Training asks for that (the student's weights stay fp32, and its fidelity to the teacher measured the same);
    encoding does not: the teacher's cached targets and the measured models stay exact on a CPU.

    Raises:
        ValueError: ``precision`` is not one of auto, fp32, bf16, fp16.
        M3DistillError: fp16 off a CUDA GPU, or bf16 on a CUDA GPU without bfloat16 support.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    kind = torch.device(device).type
    on_cuda = kind == "cuda" and torch.cuda.is_available()
    bf16_gpu = on_cuda and torch.cuda.is_bf16_supported()
    if precision == "auto":
        if kind == "cuda":
            return "bf16" if bf16_gpu else "fp16"
        return "bf16" if bf16_on_cpu and kind == "cpu" and cpu_computes_bf16() else "fp32"
    if precision == "fp16" and kind != "cuda":
        raise M3DistillError(f"precision fp16 needs a CUDA GPU, but this runs on {kind}; use auto, fp32 or bf16")
    if precision == "bf16" and on_cuda and not bf16_gpu:
        raise M3DistillError("precision bf16 asked for, but this GPU has no bfloat16 support; use auto, fp16 or fp32")
    return precision


@contextlib.contextmanager
def compute_precision(precision: str, device: str | torch.device) -> Iterator[str]:
    """Run the block in ``precision`` on ``device`` (autocast for bf16/fp16; nothing for fp32); yields the
    resolved precision. See :func:`resolve_precision` for ``auto`` and what is refused."""
    resolved = resolve_precision(precision, device)
    if resolved == "fp32":
        yield resolved
        return
    with torch.autocast(device_type=torch.device(device).type, dtype=_AUTOCAST_DTYPES[resolved]):
        yield resolved


def token_lengths(model: SentenceTransformer, texts: Sequence[str]) -> list[int]:
    """Tokens of each text as ``model`` feeds it to its transformer: truncated to its maximum sequence length,
    special tokens (and the model's default prompt) included, without padding."""
    return [len(ids) for ids in _tokenise(model, texts)["input_ids"]]


def _tokenise(model: SentenceTransformer, texts: Sequence[str]) -> dict[str, Any]:
    """Every text tokenised once by the model's own preprocessing (its truncation, prompt, lower-casing), unpadded:
    feature name -> one list of token values per text, plus the features shared by the batch (``modality``...)."""
    prompt = model.prompts.get(model.default_prompt_name) if model.default_prompt_name else None
    merged: dict[str, Any] = {}
    for start in range(0, len(texts), _LENGTH_CHUNK):
        features = model.preprocess(list(texts[start : start + _LENGTH_CHUNK]), prompt=prompt,
                                    processing_kwargs={"text": {"padding": False}, "common": {"return_tensors": None}})
        for name, value in features.items():
            if name in _PER_TEXT_FEATURES:
                merged.setdefault(name, []).extend(value)
            else:
                merged[name] = value
    return merged


def _can_pad_itself(tokenised: dict[str, Any]) -> bool:
    """Whether the tokenised texts are plain text features this module can pad into batches itself."""
    return {"input_ids", "attention_mask"} <= tokenised.keys() <= set(_PER_TEXT_FEATURES) | _SHARED_FEATURES


def _padded_batch(model: SentenceTransformer, tokenised: dict[str, Any], batch: list[int]) -> dict[str, Any]:
    """The features of the texts ``batch``, padded to the longest as the model's tokenizer pads."""
    tokenizer = model.tokenizer
    longest = max(len(tokenised["input_ids"][index]) for index in batch)
    left = getattr(tokenizer, "padding_side", "right") == "left"
    fills = {"input_ids": tokenizer.pad_token_id or 0, "attention_mask": 0,
             "token_type_ids": getattr(tokenizer, "pad_token_type_id", 0) or 0}
    features: dict[str, Any] = {name: value for name, value in tokenised.items() if name in _SHARED_FEATURES}
    for name in _PER_TEXT_FEATURES:
        if name not in tokenised:
            continue
        padded = torch.full((len(batch), longest), fills[name], dtype=torch.long)
        for row, index in enumerate(batch):
            values = torch.tensor(tokenised[name][index], dtype=torch.long)
            if left:
                padded[row, longest - len(values) :] = values
            else:
                padded[row, : len(values)] = values
        features[name] = padded
    return features


@torch.inference_mode()
def _forward(model: SentenceTransformer, features: dict[str, Any]) -> np.ndarray:
    """Sentence embeddings of one padded batch, as ``model.encode`` computes them."""
    embeddings = model(batch_to_device(features, model.device))["sentence_embedding"]
    if model.truncate_dim is not None:
        embeddings = truncate_embeddings(embeddings, model.truncate_dim)
    return embeddings.float().cpu().numpy()


def encode_texts(
    model: SentenceTransformer,
    texts: Sequence[str],
    *,
    batch_size: int,
    max_tokens_per_batch: int | None = None,
    precision: Precision = "auto",
    show_progress: bool = False,
    on_batch: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Sentence embeddings of ``texts`` as a float32 array of shape (len(texts), dim), in the input order.

    The same numbers as ``model.encode(texts, batch_size=batch_size, convert_to_numpy=True)`` up to float error
    (exactly those, with ``max_tokens_per_batch`` unset and fp32).

    Args:
        model: the sentence-transformers model; it runs on its own device, in inference mode, and is left as it
            was (its weights untouched, in training mode again if it was).
        texts: the texts to encode.
        batch_size: the most texts per batch.
        max_tokens_per_batch: cut length-sorted batches of at most this many padded tokens (see
            :func:`token_budget_batches`), each also at most ``batch_size`` texts; ``None`` keeps
            sentence-transformers' batches of ``batch_size`` texts.
        precision: ``auto``, ``fp32``, ``bf16`` or ``fp16`` (see :func:`resolve_precision`).
        show_progress: show a bar over the texts.
        on_batch: called with the number of texts of each batch once it is encoded (with ``max_tokens_per_batch``
            unset: once, with all of them, at the end).

    Raises:
        ValueError: ``batch_size`` or ``max_tokens_per_batch`` is below 1, or ``precision`` is unknown.
        M3DistillError: a precision the model's device cannot run (see :func:`resolve_precision`).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive number of texts, got {batch_size!r}")
    if max_tokens_per_batch is not None and (
        isinstance(max_tokens_per_batch, bool) or not isinstance(max_tokens_per_batch, int) or max_tokens_per_batch < 1
    ):
        raise ValueError(f"max_tokens_per_batch must be a positive number of tokens or None, got {max_tokens_per_batch!r}")
    texts = list(texts)
    if not texts:
        resolve_precision(precision, model.device)
        return np.empty((0, model.get_embedding_dimension() or 0), dtype=np.float32)
    # Inference mode for the call; a model in training (the dev evaluation's student) goes back to training after.
    was_training = model.training
    try:
        with compute_precision(precision, model.device):
            if max_tokens_per_batch is None:
                encoded = model.encode(texts, batch_size=batch_size, convert_to_numpy=True,
                                       show_progress_bar=show_progress)
                if on_batch is not None:
                    on_batch(len(texts))
                return np.asarray(encoded, dtype=np.float32)
            model.eval()
            tokenised = _tokenise(model, texts)
            batches = token_budget_batches([len(ids) for ids in tokenised["input_ids"]], max_tokens_per_batch,
                                           max_texts=batch_size)
            pads_itself = _can_pad_itself(tokenised)
            parts: list[np.ndarray] = []
            with tqdm(total=len(texts), unit="text", desc="encoding", disable=not show_progress) as bar:
                for batch in batches:
                    if pads_itself:  # the texts were tokenised once, above
                        parts.append(_forward(model, _padded_batch(model, tokenised, batch)))
                    else:  # features this module does not know how to pad: sentence-transformers tokenises again
                        parts.append(model.encode([texts[index] for index in batch], batch_size=len(batch),
                                                  convert_to_numpy=True, show_progress_bar=False))
                    bar.update(len(batch))
                    if on_batch is not None:
                        on_batch(len(batch))
    finally:
        model.train(was_training)
    out = np.empty((len(texts), parts[0].shape[1]), dtype=np.float32)
    for batch, part in zip(batches, parts):
        out[batch] = part
    return out
