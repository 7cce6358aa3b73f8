"""Fast encoding: token-budget batches, reduced precision, and the teacher cache and dev evaluation that use them."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from m3distill.config import SpeedConfig, TeacherConfig, TrainingConfig
from m3distill.encoding import (
    cpu_computes_bf16,
    encode_texts,
    resolve_precision,
    token_budget_batches,
    token_lengths,
)
from m3distill.errors import M3DistillError
from m3distill.models import attention_implementation, load_sentence_transformer, process_device
from m3distill.stages import TeacherStage
from m3distill.teacher.cache import CACHE_MANIFEST_FILE, CACHE_TEACHER_FILE, TeacherCache, build_teacher_cache


def _texts() -> list[str]:
    """Short questions, paragraphs, one text far beyond the maximum sequence length, and a duplicate."""
    rng = random.Random(0)
    words = "the man page says that a daemon reads its configuration file once when it starts".split()
    texts = [" ".join(rng.choices(words, k=rng.randint(2, 60))) for _ in range(40)]
    texts.append(" ".join(words * 40))  # longer than max_seq_length: truncated
    texts.append(texts[3])
    return texts


@pytest.fixture(scope="module")
def tiny_model(tiny_xlmr_path):
    return load_sentence_transformer(tiny_xlmr_path, device="cpu")


def _padded_batches(model, run) -> list[tuple[int, int]]:
    """(texts, padded tokens per text) of every batch the model's transformer sees while ``run()`` runs."""
    shapes = []
    handle = model[0].register_forward_pre_hook(
        lambda module, args: shapes.append(tuple(args[0]["input_ids"].shape))
    )
    try:
        run()
    finally:
        handle.remove()
    return shapes


# --- token_budget_batches ---------------------------------------------------------------------------------------


def test_batches_stay_within_the_token_budget_and_cover_every_text_once():
    lengths = [random.Random(seed).randint(1, 300) for seed in range(500)]
    batches = token_budget_batches(lengths, 2048, max_texts=64)
    assert sorted(index for batch in batches for index in batch) == list(range(500))
    for batch in batches:
        assert max(lengths[i] for i in batch) * len(batch) <= 2048 and len(batch) <= 64
    # Longest first, and texts of similar length together: little padding.
    assert batches[0][0] == max(range(500), key=lambda i: (lengths[i], -i))
    padded = sum(max(lengths[i] for i in batch) * len(batch) for batch in batches)
    assert padded < 1.1 * sum(lengths)


def test_batches_are_deterministic_and_ties_keep_the_input_order():
    lengths = [5, 9, 5, 9, 5, 1]
    assert token_budget_batches(lengths, 18) == token_budget_batches(list(lengths), 18)
    assert token_budget_batches(lengths, 18) == [[1, 3], [0, 2, 4], [5]]
    assert token_budget_batches(lengths, 100, max_texts=2) == [[1, 3], [0, 2], [4, 5]]
    assert token_budget_batches([], 10) == []


def test_a_text_longer_than_the_budget_gets_a_batch_of_its_own():
    assert token_budget_batches([3, 500, 3, 4], 16) == [[1], [3, 0, 2]]


@pytest.mark.parametrize("bad", [{"max_tokens": 0}, {"max_tokens": -5}, {"max_tokens": 8, "max_texts": 0},
                                 {"max_tokens": 8, "max_texts": -1}, {"max_tokens": 2.5}])
def test_bad_budgets_are_refused(bad):
    with pytest.raises(ValueError, match="must be a positive"):
        token_budget_batches([1, 2, 3], **bad)
    with pytest.raises(ValueError, match="negative"):
        token_budget_batches([1, -2], 8)


# --- encode_texts -----------------------------------------------------------------------------------------------


def test_token_lengths_count_special_tokens_and_stop_at_the_maximum_length(tiny_model):
    texts = _texts()
    lengths = token_lengths(tiny_model, texts)
    assert lengths[-2] == tiny_model.max_seq_length  # truncated
    assert lengths[0] == len(tiny_model.tokenizer(texts[0])["input_ids"])  # <s> ... </s> included


def test_token_budget_encoding_equals_model_encode_in_the_input_order(tiny_model):
    texts = _texts()
    reference = tiny_model.encode(texts, batch_size=8, convert_to_numpy=True)
    seen: list[int] = []
    shapes = _padded_batches(tiny_model, lambda: seen.append(encode_texts(
        tiny_model, texts, batch_size=16, max_tokens_per_batch=100, precision="fp32", on_batch=seen.append)))
    got = seen.pop()
    assert got.dtype == np.float32 and got.shape == reference.shape
    np.testing.assert_allclose(got, reference, atol=1e-5)
    np.testing.assert_allclose(got[-1], got[3], atol=1e-5)  # a duplicate gets its own row
    assert sum(seen) == len(texts) and len(seen) == len(shapes)
    for n_texts, padded_length in shapes:
        assert n_texts <= 16 and (n_texts * padded_length <= 100 or n_texts == 1)
    assert (1, tiny_model.max_seq_length) in shapes  # the long text alone, beyond the budget


def test_features_it_cannot_pad_go_through_model_encode_batch_by_batch(tiny_model, monkeypatch):
    import m3distill.encoding as encoding

    texts = _texts()
    padded_here = encode_texts(tiny_model, texts, batch_size=16, max_tokens_per_batch=100, precision="fp32")
    monkeypatch.setattr(encoding, "_can_pad_itself", lambda tokenised: False)
    by_model_encode: list[np.ndarray] = []
    tiny_model.train()  # a model in training (the dev evaluation) is put back in training mode afterwards
    try:
        shapes = _padded_batches(tiny_model, lambda: by_model_encode.append(
            encode_texts(tiny_model, texts, batch_size=16, max_tokens_per_batch=100, precision="fp32")))
        assert tiny_model.training
    finally:
        tiny_model.eval()
    np.testing.assert_allclose(by_model_encode[0], padded_here, atol=1e-5)
    assert all(n * length <= 100 or n == 1 for n, length in shapes)


def test_without_a_budget_the_batches_are_model_encode_s_own(tiny_model):
    texts = _texts()
    expected = _padded_batches(tiny_model, lambda: tiny_model.encode(texts, batch_size=8))
    reference = tiny_model.encode(texts, batch_size=8, convert_to_numpy=True)
    got: list[np.ndarray] = []
    assert _padded_batches(tiny_model, lambda: got.append(encode_texts(tiny_model, texts, batch_size=8))) == expected
    assert np.array_equal(got[0], reference)
    assert encode_texts(tiny_model, [], batch_size=8).shape == (0, 64)


def test_bf16_on_the_cpu_stays_close_to_fp32_and_returns_float32(minilm_teacher):
    texts = _texts()
    full = encode_texts(minilm_teacher, texts, batch_size=16, precision="fp32")
    half = encode_texts(minilm_teacher, texts, batch_size=16, max_tokens_per_batch=512, precision="bf16")
    assert half.dtype == np.float32
    cosines = np.sum(full * half, axis=1) / np.linalg.norm(full, axis=1) / np.linalg.norm(half, axis=1)
    assert cosines.min() > 0.99
    assert not np.allclose(full, half, atol=1e-6)  # it really ran in bf16
    # The caller's model is untouched: autocast, not a cast of its weights.
    assert {parameter.dtype for parameter in minilm_teacher.parameters()} == {torch.float32}
    assert not torch.is_autocast_enabled("cpu")


def test_bad_encoding_settings_are_refused(tiny_model):
    for bad in ({"batch_size": 0}, {"batch_size": 4, "max_tokens_per_batch": 0},
                {"batch_size": 4, "max_tokens_per_batch": -3}):
        with pytest.raises(ValueError, match="must be a positive"):
            encode_texts(tiny_model, ["a text"], **bad)
    with pytest.raises(ValueError, match="precision must be one of"):
        encode_texts(tiny_model, ["a text"], batch_size=4, precision="fp8")
    with pytest.raises(M3DistillError, match="fp16 needs a CUDA GPU"):
        encode_texts(tiny_model, ["a text"], batch_size=4, precision="fp16")
    assert resolve_precision("auto", "cpu") == "fp32" and resolve_precision("bf16", "cpu") == "bf16"


@pytest.mark.parametrize("found, trains_in", [
    ({"avx512_bf16": True, "amx_bf16": False}, "bf16"),
    ({"avx512_bf16": False, "amx_bf16": True}, "bf16"),
    ({"avx512_bf16": False, "amx_bf16": False}, "fp32"),
    ({}, "fp32"),
])
def test_auto_trains_in_bf16_only_on_a_cpu_that_computes_it_natively(monkeypatch, found, trains_in):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: found)
    assert cpu_computes_bf16() is (trains_in == "bf16")
    assert resolve_precision("auto", "cpu", bf16_on_cpu=True) == trains_in
    # Encoding keeps fp32 on any CPU: the teacher's cached targets and the measured models stay exact.
    assert resolve_precision("auto", "cpu") == "fp32"
    # An explicit choice wins over the hardware either way.
    assert resolve_precision("fp32", "cpu", bf16_on_cpu=True) == "fp32"
    assert resolve_precision("bf16", "cpu", bf16_on_cpu=True) == "bf16"


def test_a_torch_that_cannot_tell_trains_in_fp32(monkeypatch):
    monkeypatch.delattr(torch.cpu, "get_capabilities")
    assert not cpu_computes_bf16() and resolve_precision("auto", "cpu", bf16_on_cpu=True) == "fp32"

    def failing_probe():
        raise RuntimeError("cpuinfo unavailable")

    monkeypatch.setattr(torch.cpu, "get_capabilities", failing_probe, raising=False)
    assert not cpu_computes_bf16()


@pytest.mark.parametrize("section, field", [(TeacherConfig, "max_tokens_per_batch"),
                                            (TrainingConfig, "dev_max_tokens_per_batch"),
                                            (SpeedConfig, "max_tokens_per_batch")])
@pytest.mark.parametrize("value", [0, -1])
def test_config_refuses_budgets_below_one(section, field, value):
    with pytest.raises(ValidationError, match="greater than or equal to 1"):
        section(**{field: value})
    assert getattr(section(), field) is None  # unset by default: batches of batch_size texts


def test_config_precision_defaults_and_choices():
    assert TeacherConfig().precision == "auto" and SpeedConfig().precision == "auto"
    with pytest.raises(ValidationError):
        TeacherConfig(precision="fp8")


def test_models_load_with_sdpa_attention(minilm_teacher, monkeypatch):
    # transformers 5 picks PyTorch's scaled-dot-product attention by default wherever the architecture has it.
    assert attention_implementation(minilm_teacher) == "sdpa"
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert process_device("cpu") == "cpu"
    assert process_device(None) == ("cuda:1" if torch.cuda.is_available() else None)


# --- the teacher cache ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def few_texts_dataset(small_dataset, tmp_path_factory):
    from test_teacher_cache import write_dataset_subset

    return write_dataset_subset(small_dataset, tmp_path_factory.mktemp("few") / "dataset", 6)


def test_a_token_budget_cache_equals_the_fixed_batch_cache(few_texts_dataset, tiny_xlmr_path, tmp_path):
    fixed = TeacherConfig(model=str(tiny_xlmr_path), shard_size=12, batch_size=4, device="cpu")
    budget = fixed.model_copy(update={"max_tokens_per_batch": 300, "batch_size": 64})
    build_teacher_cache(few_texts_dataset, fixed, tmp_path / "fixed", show_progress=False)
    build_teacher_cache(few_texts_dataset, budget, tmp_path / "budget", show_progress=False)
    one, other = TeacherCache.open(tmp_path / "fixed"), TeacherCache.open(tmp_path / "budget")
    from m3distill.data.dataset import load_synth_dataset

    texts = load_synth_dataset(few_texts_dataset).texts()
    np.testing.assert_allclose(one.get(texts), other.get(texts), atol=1e-5)
    assert one.precision == other.precision == "fp32"
    # Batching is not part of what the cache records: the same manifest either way but for its timing-free parts.
    assert json.loads((tmp_path / "fixed" / CACHE_MANIFEST_FILE).read_text())["fingerprint"] == \
        json.loads((tmp_path / "budget" / CACHE_MANIFEST_FILE).read_text())["fingerprint"]


def test_a_bf16_cache_records_its_precision_and_is_never_extended_in_fp32(few_texts_dataset, tiny_xlmr_path, tmp_path):
    half = TeacherConfig(model=str(tiny_xlmr_path), shard_size=12, batch_size=4, device="cpu", precision="bf16")
    stage = TeacherStage(half, few_texts_dataset, tmp_path / "cache")
    summary = stage.run(show_progress=False)
    assert summary.precision == "bf16" and TeacherCache.open(tmp_path / "cache").precision == "bf16"
    assert json.loads((tmp_path / "cache" / CACHE_TEACHER_FILE).read_text())["precision"] == "bf16"
    assert stage.teacher_parts["teacher.precision"] == "bf16" and stage.status().current

    full = half.model_copy(update={"precision": "auto"})  # fp32 on this CPU
    fp32_stage = TeacherStage(full, few_texts_dataset, tmp_path / "cache")
    assert "teacher.precision" not in fp32_stage.teacher_parts  # fp32 caches keep the fingerprint they always had
    status = fp32_stage.status()
    assert status.state == "stale" and "teacher.precision" in status.reason
    with pytest.raises(M3DistillError, match='out of date: teacher.precision is null now, "bf16" when it was made'):
        fp32_stage.run(show_progress=False)
    assert fp32_stage.run(replace_stale=True, show_progress=False).precision == "fp32"  # the pipeline rebuilds it
    assert TeacherCache.open(tmp_path / "cache").precision == "fp32" and fp32_stage.status().current


def test_the_dev_evaluation_encodes_with_a_token_budget(tiny_model):
    from m3distill.training.dev_set import _EncodingMemo

    texts = _texts()
    memo = _EncodingMemo(8, max_tokens_per_batch=120)
    shapes = _padded_batches(tiny_model, lambda: memo.encode(tiny_model, texts))
    assert all(n * length <= 120 or n == 1 for n, length in shapes)
    np.testing.assert_allclose(memo.encode(tiny_model, texts), tiny_model.encode(texts, batch_size=8), atol=1e-5)
