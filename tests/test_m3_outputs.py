"""bge-m3's three outputs from ``encode_m3`` agree with FlagEmbedding's math, written out here in plain torch.

The reference below does not use m3.py: it loads the encoder with transformers' ``AutoModel``, the two head
files with ``torch.load(weights_only=True)`` into ``nn.Linear`` layers, and follows FlagEmbedding's
``M3Embedder.encode`` (1.4.2) step by step, one text at a time so no padding is involved. The M3 test teacher
is the packaged all-MiniLM-L6-v2 with seeded random heads (mean pooling, normalised, max_seq_length 256).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

from m3distill.errors import M3DistillError
from m3distill.m3 import M3Heads, encode_m3, is_m3_model, load_m3_heads
from m3distill.models import load_sentence_transformer

TOLERANCE = 1e-5
LONG_TEXT = " ".join(f"paragraph{i} says something different" for i in range(200))  # ~1,000 tokens
TEXTS = [
    "",  # [CLS] [SEP] only
    "[CLS] [SEP] [PAD] [UNK]",  # special-token names, which the tokenizer maps to the special ids
    "the cat and the dog and the bird and the cat",  # repeated ids: the largest weight of each id is kept
    "Hello world",
    "Die Katze schläft auf dem Sofa, während es draußen regnet.",
    "猫はソファで寝ています。外は雨が降っています。",
    "apt-get install --no-install-recommends build-essential",
    LONG_TEXT,
]


@pytest.fixture(scope="module")
def m3_teacher(m3_teacher_path) -> Path:
    return m3_teacher_path


@pytest.fixture(scope="module")
def m3_outputs(m3_teacher):
    model = load_sentence_transformer(m3_teacher, device="cpu")
    heads = load_m3_heads(model, m3_teacher)
    assert heads is not None
    return encode_m3(model, heads, TEXTS, batch_size=3)  # batches of mixed lengths: padding inside each


def _flagembedding_reference(folder: Path, texts: list[str]) -> list[tuple[np.ndarray, dict[int, float], np.ndarray]]:
    """(dense, lexical weights, ColBERT vectors) per text, as FlagEmbedding's M3Embedder computes them."""
    sentence_config = json.loads((folder / "sentence_bert_config.json").read_text())
    pooling_config = json.loads((folder / "1_Pooling" / "config.json").read_text())
    assert pooling_config["pooling_mode_mean_tokens"], "the reference below pools like all-MiniLM-L6-v2: mean"
    max_length = sentence_config["max_seq_length"]

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    encoder = AutoModel.from_pretrained(str(folder)).eval()
    hidden_size = encoder.config.hidden_size
    sparse_linear, colbert_linear = nn.Linear(hidden_size, 1), nn.Linear(hidden_size, hidden_size)
    sparse_linear.load_state_dict(torch.load(folder / "sparse_linear.pt", map_location="cpu", weights_only=True))
    colbert_linear.load_state_dict(torch.load(folder / "colbert_linear.pt", map_location="cpu", weights_only=True))
    # M3Embedder.encode's _process_token_weights: the special tokens the tokenizer *has* among these four.
    unused = {
        tokenizer.convert_tokens_to_ids(tokenizer.special_tokens_map[name])
        for name in ("cls_token", "eos_token", "pad_token", "unk_token")
        if name in tokenizer.special_tokens_map
    }

    results = []
    with torch.no_grad():
        for text in texts:
            features = tokenizer([text], truncation=True, max_length=max_length, return_tensors="pt")
            hidden = encoder(**features, return_dict=True).last_hidden_state
            mask = features["attention_mask"]
            # dense: mean pooling over the mask, then normalised (normalize_embeddings=True)
            dense = (hidden * mask[..., None].float()).sum(1) / mask.sum(1, keepdim=True).float()
            dense = F.normalize(dense, dim=-1)[0].numpy()
            # sparse: relu(sparse_linear(h)), the largest weight per id, unused ids and zero weights left out
            token_weights = torch.relu(sparse_linear(hidden)).squeeze(-1)[0].tolist()
            lexical: dict[int, float] = {}
            for weight, token_id in zip(token_weights, features["input_ids"][0].tolist()):
                if token_id not in unused and weight > 0 and weight > lexical.get(token_id, 0):
                    lexical[token_id] = weight
            # ColBERT: colbert_linear(h[:, 1:]) masked, normalised, the first (tokens - 1) vectors
            colbert = colbert_linear(hidden[:, 1:]) * mask[:, 1:][:, :, None].float()
            colbert = F.normalize(colbert, dim=-1)[0].numpy()
            results.append((dense, lexical, colbert[: int(mask.sum()) - 1]))
    return results


@pytest.fixture(scope="module")
def reference(m3_teacher):
    return _flagembedding_reference(m3_teacher, TEXTS)


@pytest.mark.parametrize("row", range(len(TEXTS)), ids=lambda row: repr(TEXTS[row][:20]))
def test_encode_m3_matches_flagembedding_math(m3_outputs, reference, row):
    dense, lexical, colbert = reference[row]
    np.testing.assert_allclose(m3_outputs.dense[row], dense, atol=TOLERANCE)

    assert set(m3_outputs.sparse[row]) == set(lexical)
    for token_id, weight in lexical.items():
        assert m3_outputs.sparse[row][token_id] == pytest.approx(weight, abs=TOLERANCE)

    assert m3_outputs.colbert[row].shape == colbert.shape
    np.testing.assert_allclose(m3_outputs.colbert[row], colbert, atol=TOLERANCE)


def test_sparse_weights_leave_out_cls_pad_and_unk_and_keep_only_positive_weights(m3_outputs, minilm_path):
    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path))
    special = {tokenizer.cls_token_id, tokenizer.pad_token_id, tokenizer.unk_token_id}
    for weights in m3_outputs.sparse:
        assert not special & set(weights)
        assert all(weight > 0 for weight in weights.values())
    # the special-token text keeps at most [SEP]: BERT has no eos token, so FlagEmbedding keeps [SEP]'s weight
    assert set(m3_outputs.sparse[1]) <= {tokenizer.sep_token_id}


def test_repeated_tokens_keep_their_largest_weight(m3_outputs, m3_teacher):
    # The check above only means something if a repeated id gets different weights at its positions.
    tokenizer = AutoTokenizer.from_pretrained(str(m3_teacher))
    features = tokenizer([TEXTS[2]], return_tensors="pt")
    model = AutoModel.from_pretrained(str(m3_teacher)).eval()
    sparse_linear = nn.Linear(model.config.hidden_size, 1)
    sparse_linear.load_state_dict(torch.load(m3_teacher / "sparse_linear.pt", weights_only=True))
    with torch.no_grad():
        weights = torch.relu(sparse_linear(model(**features).last_hidden_state))[0, :, 0].tolist()
    the = tokenizer.convert_tokens_to_ids("the")
    at_the = [weight for weight, token in zip(weights, features["input_ids"][0].tolist()) if token == the]
    assert len(at_the) == 4 and len(set(at_the)) > 1
    assert m3_outputs.sparse[2][the] == pytest.approx(max(at_the), abs=TOLERANCE)


def test_colbert_has_one_unit_vector_per_token_after_the_first_up_to_max_seq_length(m3_outputs):
    assert len(m3_outputs.colbert[0]) == 1  # "" -> [CLS] [SEP]: the [SEP] vector alone
    assert len(m3_outputs.colbert[-1]) == 256 - 1  # the long text, truncated at max_seq_length
    for vectors in m3_outputs.colbert:
        np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


# --- the head files ----------------------------------------------------------------------------------------------

class _RunsCodeWhenUnpickled:
    """A pickle that would create a folder when loaded with weights_only=False."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return os.makedirs, (str(self.target),)


def _folder_with_heads(tmp_path: Path, sparse_state, colbert_state) -> Path:
    folder = tmp_path / "heads"
    folder.mkdir()
    torch.save(sparse_state, folder / "sparse_linear.pt")
    torch.save(colbert_state, folder / "colbert_linear.pt")
    return folder


def _linear_state(out_features: int, in_features: int) -> dict[str, torch.Tensor]:
    return {"weight": torch.zeros(out_features, in_features), "bias": torch.zeros(out_features)}


def test_heads_load_refuses_a_pickle_with_code_and_never_runs_it(tmp_path):
    target = tmp_path / "created-by-the-pickle"
    folder = _folder_with_heads(tmp_path, {"weight": _RunsCodeWhenUnpickled(target)}, _linear_state(8, 8))
    with pytest.raises(M3DistillError, match=r"sparse_linear\.pt is not a readable head file"):
        M3Heads.load(folder)
    assert not target.exists()


def test_heads_load_refuses_a_file_that_is_not_a_linear_layer(tmp_path):
    folder = _folder_with_heads(tmp_path, _linear_state(1, 8), [torch.zeros(8, 8)])
    with pytest.raises(M3DistillError, match=r"colbert_linear\.pt does not hold a Linear layer"):
        M3Heads.load(folder)


def test_heads_load_refuses_a_sparse_head_with_more_than_one_output(tmp_path):
    folder = _folder_with_heads(tmp_path, _linear_state(2, 8), _linear_state(8, 8))
    with pytest.raises(M3DistillError, match="has 2 outputs; the sparse head has 1"):
        M3Heads.load(folder)


def test_heads_load_refuses_heads_of_another_width_than_the_encoder(tmp_path):
    folder = _folder_with_heads(tmp_path, _linear_state(1, 8), _linear_state(8, 8))
    with pytest.raises(M3DistillError, match="hidden size is 384"):
        M3Heads.load(folder, hidden_size=384)
    mismatched = tmp_path / "mismatched"
    shutil.copytree(folder, mismatched)
    torch.save(_linear_state(8, 16), mismatched / "colbert_linear.pt")
    with pytest.raises(M3DistillError, match="width 8 and 16"):
        M3Heads.load(mismatched)


def test_heads_load_reads_back_what_save_wrote(tmp_path):
    heads = M3Heads(8, colbert_dim=4)
    heads.save(tmp_path)
    loaded = M3Heads.load(tmp_path, hidden_size=8)
    assert torch.equal(loaded.colbert_linear.weight, heads.colbert_linear.weight)
    assert loaded.colbert_linear.out_features == 4


def test_is_m3_model_needs_both_head_files_in_a_folder(tmp_path, m3_teacher, minilm_path):
    assert is_m3_model(m3_teacher)
    assert not is_m3_model(minilm_path)
    assert not is_m3_model(None)
    assert not is_m3_model(tmp_path / "missing")
    one_head = tmp_path / "one-head"
    one_head.mkdir()
    shutil.copyfile(m3_teacher / "sparse_linear.pt", one_head / "sparse_linear.pt")
    assert not is_m3_model(one_head)
    assert not is_m3_model(m3_teacher / "sparse_linear.pt")  # a file, not a folder
    with pytest.raises(M3DistillError, match="has no colbert_linear.pt"):
        M3Heads.load(one_head)
