"""The one configuration model, shared by the CLI and the Python API.

A YAML file maps onto :class:`M3DistillConfig` section by section; CLI flags override single fields with
:func:`apply_overrides`. Every field has a default, so an empty file is a valid config (bge-m3 -> 8/6/4 layers).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from m3distill.errors import M3DistillError

DEFAULT_TEACHER = "BAAI/bge-m3"


class _Section(BaseModel):
    # Unknown keys are typos in a user's YAML: refuse them instead of silently ignoring them. No setting means
    # anything as nan or inf (a weight, a rate, a size): refuse those too, before any work, not after it.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class LLMConfig(_Section):
    """An OpenAI-compatible chat-completions endpoint (vLLM, Ollama, llama.cpp server, OpenAI)."""

    base_url: str = Field("http://127.0.0.1:8000/v1", description="Endpoint base URL, ending in /v1 for most servers.")
    model: str = Field("Qwen/Qwen2.5-7B-Instruct", description="Model name the endpoint serves.")
    api_key_env: str = Field(
        "OPENAI_API_KEY",
        description="NAME of the environment variable holding the API key; the key itself is never stored.",
    )
    prompt_template: str | None = Field(None, description="Custom prompt; must contain {context} and {n}.")
    concurrency: int = Field(8, ge=1, description="Requests in flight at once.")
    timeout_s: float = Field(60.0, gt=0, description="Per-request timeout in seconds.")
    max_retries: int = Field(
        5, ge=0, description="Retries on 429/5xx/timeouts (by the openai client, with its exponential backoff), "
        "and times an answer without a question is asked again.",
    )
    backoff_s: float = Field(1.0, ge=0, description="Wait before asking again after an answer without a question; "
                             "doubles each time.")
    temperature: float = Field(0.7, ge=0, description="Sampling temperature of the generated questions.")
    max_question_chars: int = Field(300, ge=10, description="Longer generated questions are dropped.")
    cache_path: str | None = Field(
        None,
        description="SQLite cache of the endpoint's answers, so a rerun repeats no finished call; "
        "<out>.llm-cache.sqlite beside the dataset directory when unset.",
    )


class SplitConfig(_Section):
    """How contexts are split; each value is a fraction (< 1) or an absolute number of contexts (>= 1)."""

    dev: float = Field(0.1, ge=0, description="Dev contexts: a fraction (< 1) or a count (>= 1).")
    test: float = Field(0.1, ge=0, description="Test contexts: a fraction (< 1) or a count (>= 1).")

    @field_validator("dev", "test")
    @classmethod
    def _fraction_or_count(cls, value: float, info: ValidationInfo) -> float:
        if value >= 1 and value != int(value):
            raise ValueError(f"{info.field_name} size {value} is neither a fraction below 1 nor a whole number of "
                             "contexts")
        return value

    @model_validator(mode="after")
    def _some_training_left(self) -> SplitConfig:
        if self.dev < 1 and self.test < 1 and self.dev + self.test >= 1:
            raise ValueError(f"the dev ({self.dev}) and test ({self.test}) fractions add up to 1 or more and leave no "
                             "training contexts")
        return self


class SynthConfig(_Section):
    """``m3distill synth``: corpus -> contexts -> questions -> splits."""

    corpus: str | None = Field(
        None, description="File or folder (.txt/.md/.jsonl/.csv/.parquet), saved Hugging Face dataset dir or HF "
        "dataset id.",
    )
    general: str | None = Field(None, description="Optional general-text corpus mixed into training.")
    text_column: str = Field("text", description="Text column for .jsonl/.csv/.parquet/HF inputs.")
    id_column: str | None = Field(None, description="Document-id column; row numbers when unset.")
    hf_split: str = Field("train", description="Split to read from a Hugging Face dataset.")
    skip_bad_files: bool = Field(False, description="Turn undecodable files / missing columns into warnings.")
    tokenizer: str | None = Field(None, description="Tokenizer for chunking; the teacher's when unset.")
    max_tokens: int = Field(256, ge=8, description="Maximum tokens per context (teacher tokenizer, no specials).")
    overlap_tokens: int = Field(32, ge=0, description="Tokens shared by consecutive contexts of a document.")
    generator: Literal["pseudo", "llm"] = Field("pseudo", description="Question generator.")
    questions_per_context: int = Field(2, ge=1, description="Questions generated per context.")
    query_shapes: list[Literal["question", "keywords", "heading", "span", "sentence"]] = Field(
        default_factory=lambda: ["question", "keywords", "heading"],
        description="What the offline (pseudo) generator writes for each context, taken in turn: question "
        "(an interrogative on one of the context's key phrases, in its language), keywords (2-6 of its salient "
        "terms), heading (a heading or title line of its document, else a key phrase), span (2-8 consecutive words "
        "of the context), sentence (a sentence or long word span copied from the context, the inverse-cloze mode "
        "of earlier versions).",
    )
    llm: LLMConfig = Field(default_factory=LLMConfig)
    splits: SplitConfig = Field(default_factory=SplitConfig)
    general_ratio: float = Field(
        1.0, ge=0, description="General texts per domain training text (contexts + questions); 0 = none."
    )
    crop_sentences: bool = Field(
        False, description="Add each sentence of every training context as an extra training text (crops; train on "
        "them with training.texts: [contexts, questions, crops]). Off by default: once the students learn every "
        "context (training.all_contexts) crops cost top-10 agreement in benchmarks/fidelity.py; with the dev and "
        "test contexts held out they were worth +0.024.",
    )
    crop_spans: int = Field(
        0, ge=0, description="Random word spans (a few words to 3/4 of the context) added per training context "
        "(crops, as crop_sentences; 0 = none; 2 when crops are wanted).",
    )
    detect_language: bool = Field(True, description="Detect each context's language (py3langid).")
    max_documents: int | None = Field(None, ge=1, description="Use only the first N documents of the corpus.")
    seed: int = Field(42, description="Random seed of the splits, questions, crops and general-text sample.")

    @model_validator(mode="after")
    def _overlap_below_max(self) -> SynthConfig:
        if self.overlap_tokens >= self.max_tokens:
            raise ValueError(f"overlap_tokens ({self.overlap_tokens}) must be smaller than max_tokens ({self.max_tokens})")
        return self


class TeacherConfig(_Section):
    """The teacher model and ``m3distill teacher`` (the embedding cache)."""

    model: str = Field(DEFAULT_TEACHER, description="sentence-transformers folder or hub id.")
    revision: str | None = Field(None, description="Hub revision (commit, tag or branch).")
    trust_remote_code: bool = Field(False, description="Run the model repository's own code (only for models you trust).")
    max_seq_length: int | None = Field(None, ge=8, description="Override the model's max sequence length.")
    batch_size: int = Field(32, ge=1, description="Texts per batch while embedding the dataset.")
    dtype: Literal["float32", "float16"] = Field("float32", description="Storage dtype of cached embeddings.")
    shard_size: int = Field(2048, ge=1, description="Texts per cache shard (the unit of resumption).")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, mps; auto when unset.")
    max_tokens_per_batch: int | None = Field(
        None, ge=1, description="Token budget: batches of texts sorted by token length, each at most this many "
        "padded tokens (longest text x texts) and at most batch_size texts (raise batch_size to let short texts "
        "fill a batch); batches of batch_size texts when unset. Changes the embeddings only at float-error level.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision of the teacher: auto = bf16 on a CUDA GPU (fp16 on one without "
        "bf16), fp32 elsewhere. Recorded in the cache, which is only ever extended in the same precision.",
    )


LayerStrategy = Literal["spread", "uniform", "first", "last", "search"]


class StudentsConfig(_Section):
    """Which students to build: layer counts plus a strategy, or explicit layer lists."""

    layers: list[int] = Field(default_factory=lambda: [8, 6, 4], description="Layer counts, one student each.")
    strategy: LayerStrategy = Field(
        "spread", description="spread: evenly spaced, first and last layer kept; uniform: evenly spaced from the "
        "first, last dropped; first; last; search: scored by dev top-10 agreement with the teacher.",
    )
    explicit: list[list[int]] | None = Field(None, description="Explicit 0-based layer lists; overrides layers.")
    search_candidates: int = Field(6, ge=1, description="Candidate plans scored per student with strategy=search.")
    search_steps: int = Field(0, ge=0, description="Training steps per candidate before scoring (0 = none).")
    search_dev_texts: int = Field(500, ge=10, description="Dev texts each search candidate is scored on.")
    vocabulary: Literal["full", "corpus", "corpus+languages"] = Field(
        "full", description="The students' token vocabulary: full (the teacher's); corpus (the tokens the training "
        "texts use, plus special and single-character tokens of their scripts); corpus+languages (those, plus every "
        "token of the corpus's scripts). See m3distill.students.vocabulary.",
    )
    vocabulary_budget: int | None = Field(
        None, ge=1, description="Keep at most this many tokens (the most frequent first) besides the special and "
        "single-character ones; needs vocabulary corpus or corpus+languages.",
    )

    @field_validator("layers")
    @classmethod
    def _positive(cls, value: list[int]) -> list[int]:
        if not value or any(n < 1 for n in value):
            raise ValueError("layers must be a non-empty list of positive layer counts, e.g. [8, 6, 4]")
        return value

    @model_validator(mode="after")
    def _budget_needs_trimming(self) -> StudentsConfig:
        if self.vocabulary_budget is not None and self.vocabulary == "full":
            raise ValueError("vocabulary_budget trims the vocabulary: set vocabulary to corpus or corpus+languages")
        return self


class LossConfig(_Section):
    """Weights of the distillation loss terms (0 switches a term off); see :mod:`m3distill.training.losses`."""

    mse: float = Field(0.0, ge=0, description="MSE between student and teacher sentence embeddings (the seed recipe).")
    cosine: float = Field(1.0, ge=0, description="1 - cosine(student, teacher) of the sentence embeddings.")
    in_batch_kl: float = Field(
        0.0, ge=0, description="KL between teacher and student softmaxed similarity rows over the batch."
    )
    anchor_kl: float = Field(
        0.0, ge=0, description="KL between teacher and student softmaxed similarities to a bank of cached teacher "
        "embeddings of training texts (the anchors).",
    )
    token: float = Field(
        0.0, ge=0, description="MSE of the last hidden states, token by token (online teacher: one teacher "
        "forward pass per step).",
    )
    sparse: float = Field(
        1.0, ge=0, description="M3 teachers only: MSE between the student's and the teacher's sparse weights, token "
        "by token (online teacher). Ignored for a dense-only teacher.",
    )
    colbert: float = Field(
        1.0, ge=0, description="M3 teachers only: 1 - cosine between the student's and the teacher's ColBERT "
        "vectors, token by token (online teacher). Ignored for a dense-only teacher.",
    )
    temperature: float = Field(0.05, gt=0, description="Softmax temperature of in_batch_kl.")
    anchor_temperature: float = Field(0.05, gt=0, description="Softmax temperature of anchor_kl.")
    n_anchors: int = Field(4096, ge=1, description="Anchors for anchor_kl: a seeded sample of the training texts.")

    @model_validator(mode="after")
    def _some_term(self) -> LossConfig:
        if not any((self.mse, self.cosine, self.in_batch_kl, self.anchor_kl, self.token)):
            raise ValueError("every loss weight is 0: give at least one term a positive weight")
        return self


DEFAULT_TRAINING_STEPS = 2000


class TrainingConfig(_Section):
    """``m3distill train``: distillation on the cached teacher embeddings.

    The defaults are the recipe benchmarks/fidelity.py measured best (see the README's fidelity table): the
    student keeps the teacher's first and last layers (``students.strategy: spread``), learns from the training
    contexts and questions, plus the dev and test contexts (the rest of the corpus it will index;
    ``all_contexts``), with the cosine loss (plus, for an M3
    teacher, its sparse and ColBERT heads) at a learning rate of 1e-3 for a budget of optimizer steps, and keeps the
    checkpoint whose dev top-10 agreement with the teacher is highest.
    """

    max_steps: int | None = Field(
        None, ge=1, description=f"Optimizer steps to train (the budget); {DEFAULT_TRAINING_STEPS} when neither "
        "max_steps nor epochs is set. Wins over epochs.",
    )
    epochs: float | None = Field(None, gt=0, description="Passes over the training texts, when max_steps is unset.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate, reached after the warm-up.")
    batch_size: int = Field(32, ge=1, description="Texts per batch and process.")
    warmup_ratio: float = Field(0.1, ge=0, le=1, description="Fraction of the steps that warm the learning rate up.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    dropout: float | None = Field(
        0.0, ge=0, lt=1, description="Dropout in the student while it trains; null keeps the teacher's own rate. Off "
        "by default: the student regresses exact teacher outputs, and dropout's noise cost top-k agreement.",
    )
    max_seq_length: int | None = Field(None, ge=8, description="Student max sequence length; the teacher's when unset.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto = bf16 on a CUDA GPU (fp16 on one without bf16), bf16 on a CPU with native bf16 "
        "(AVX512-BF16 or AMX: about twice as fast, the same fidelity), fp32 elsewhere. The student's weights stay fp32.",
    )
    eval_steps: int | None = Field(
        None, ge=1, description="Dev evaluation every N steps; every save_steps, else 8 times per run, when unset."
    )
    save_steps: int | None = Field(
        None, ge=1, description="Checkpoint every N steps (a multiple of eval_steps); with each evaluation when unset."
    )
    save_total_limit: int = Field(2, ge=1, description="Checkpoints kept besides the best one.")
    best_metric: Literal["top_k", "spearman", "mse"] = Field(
        "top_k", description="Dev metric that picks the checkpoint kept: top-10 agreement with the teacher (P@10 of "
        "dev questions among dev and train contexts), cosine Spearman or MSE to the teacher.",
    )
    early_stopping_patience: int | None = Field(
        3, ge=1, description="Stop when the best_metric has not improved for this many dev evaluations; "
        "null trains every step.",
    )
    lr_scheduler: Literal["linear", "cosine", "constant_with_warmup"] = Field(
        "linear", description="Learning-rate schedule after the warm-up."
    )
    dev_corpus_size: int = Field(
        1000, ge=10, description="Contexts searched by the dev top-k agreement: the dev ones, topped up with train ones.",
    )
    group_by_length: bool = Field(True, description="Batch texts of similar length together (less padding, faster).")
    keep_checkpoints: bool = Field(False, description="Keep the checkpoints/ folder in each finished student.")
    max_dev_texts: int = Field(2000, ge=10, description="Dev texts used by the evaluators during training.")
    dev_max_tokens_per_batch: int | None = Field(
        None, ge=1, description="Token budget of the dev evaluation's batches, as teacher.max_tokens_per_batch, "
        "each at most batch_size texts; batches of batch_size texts when unset. The dev evaluation runs in fp32.",
    )
    seed: int = Field(42, description="Random seed of the data order and the anchor sample.")
    device: str | None = Field(None, description="cpu, cuda, cuda:1, mps; auto when unset.")
    loss: LossConfig = Field(default_factory=LossConfig)
    texts: list[Literal["contexts", "questions", "crops", "general"]] = Field(
        default_factory=lambda: ["contexts", "questions"],
        description="Kinds of training-split texts the students learn from: crops are those synth made "
        "(synth.crop_sentences / crop_spans; none, and a warning, when it made none; off by default: with every "
        "context learnt they cost top-10 agreement in all three seeds measured); general is synth.general's "
        "text from outside the corpus (off by default: on the sample corpus it cost top-10 agreement with the "
        "teacher in all three seeds measured).",
    )
    all_contexts: bool = Field(
        True, description="Also learn from the dev and test splits' contexts: the students learn every passage of "
        "the corpus they will index, never the questions or crops of those splits, which stay unseen. false holds "
        "those contexts out too, as for documents indexed after training. Only with contexts in texts.",
    )
    context_share: float | None = Field(
        None, gt=0, lt=1, description="Share of each epoch's texts that are contexts: the contexts repeat within an "
        "epoch until they make up at least this share, so more questions per context (synth.questions_per_context) "
        "add variety without taking steps from the passages. null: every distinct text once per epoch.",
    )

    @field_validator("texts")
    @classmethod
    def _some_texts(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("texts must name at least one kind: contexts, questions, crops, general")
        return list(dict.fromkeys(value))


class SpeedConfig(_Section):
    """Throughput measurement (see :mod:`m3distill.evaluation.speed`)."""

    n_texts: int = Field(512, ge=1, description="Texts in one timed pass (drawn from the test split).")
    batch_size: int = Field(32, ge=1, description="Texts per batch while timing.")
    repeats: int = Field(
        3, ge=1, description="Timed repeats; in each, the models take turns. The median and min-max are reported."
    )
    warmup_batches: int = Field(2, ge=0, description="Untimed batches each model encodes before it is timed.")
    min_seconds_per_repeat: float = Field(
        2.0, ge=0, description="Each model's turn in a repeat encodes the texts again until at least this many "
        "seconds have passed, so short timings do not turn scheduler noise into speed-ups; 0 = one pass.",
    )
    max_tokens_per_batch: int | None = Field(
        None, ge=1, description="Token budget of the timed batches, as teacher.max_tokens_per_batch (each at most "
        "batch_size texts); batches of batch_size texts when unset.",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision while timing (torch models): auto = bf16 on a CUDA GPU (fp16 on one "
        "without bf16), fp32 elsewhere.",
    )


class EvaluationConfig(_Section):
    """``m3distill evaluate``: alignment, Qdrant top-k overlap, ground truth, speed."""

    k: list[int] = Field(default_factory=lambda: [10, 20, 30, 40, 50], description="Top-k cut-offs of the metrics.")
    index: list[Literal["exact", "hnsw"]] = Field(
        default_factory=lambda: ["exact"],
        description="Searches measured: exact always; hnsw adds Qdrant's HNSW search, reported beside exact.",
    )
    qdrant_url: str | None = Field(
        None, description="Qdrant server/cluster URL (':memory:' for qdrant-client's local mode); embedded "
        "qdrant-edge when unset.",
    )
    qdrant_api_key_env: str | None = Field(None, description="NAME of the env var holding the Qdrant API key.")
    distractors: Literal["all", "test"] = Field(
        "all", description="Index every context (test ones plus train/dev as distractors) or only test contexts."
    )
    negatives_per_question: int = Field(4, ge=0, description="Non-matching contexts per question in the cosine pairs.")
    hnsw_m: int = Field(16, ge=2, description="HNSW graph edges per node (only with index hnsw).")
    hnsw_ef_construct: int = Field(100, ge=4, description="HNSW candidates while building the graph.")
    hnsw_ef: int = Field(128, ge=1, description="HNSW candidates while searching (Qdrant uses at least the top-k).")
    batch_size: int = Field(32, ge=1, description="Texts per batch when encoding for alignment and retrieval.")
    hybrid_weights: tuple[float, float, float] = Field(
        (1.0, 0.3, 1.0), description="M3 models: weights of the dense, sparse and ColBERT scores in the hybrid "
        "score (FlagEmbedding's default 1 : 0.3 : 1).",
    )
    device: str | None = Field(None, description="cpu, cuda, cuda:1, mps; auto when unset.")
    real_questions: str | None = Field(
        None, description="People's questions to measure on (never trained on): a .jsonl/.csv/.parquet file with "
        "a text column and optionally doc_id, the id of the document that answers each (its path under a corpus "
        "folder, e.g. en/faq-12.txt). They are searched among the indexed contexts like the test questions, and the "
        "report's first table gives each student's top-k agreement with the teacher on them.",
    )
    onnx_variants: bool = Field(
        True, description="Also evaluate each student's ONNX exports (fp32 and int8, made by `m3distill export`) "
        "as models of their own, on onnxruntime's CPU provider: speed, P@k with the teacher and with the torch "
        "student, ground truth.",
    )
    speed: SpeedConfig = Field(default_factory=SpeedConfig)
    seed: int = Field(42, description="Random seed of the negative pairs.")

    @field_validator("k")
    @classmethod
    def _k_positive(cls, value: list[int]) -> list[int]:
        if not value or any(k < 1 for k in value):
            raise ValueError("k must be a non-empty list of positive integers, e.g. [10, 20, 30, 40, 50]")
        return sorted(set(value))

    @field_validator("hybrid_weights")
    @classmethod
    def _weights_usable(cls, value: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(weight < 0 for weight in value) or sum(value) <= 0:
            raise ValueError("hybrid_weights must be three weights >= 0, not all 0, e.g. 1, 0.3, 1")
        return value

    @field_validator("index")
    @classmethod
    def _exact_always(cls, value: list[str]) -> list[str]:
        # HNSW is measured beside exact search, never instead of it: its recall is against the exact results.
        return ["exact", *(index for index in dict.fromkeys(value) if index != "exact")]


class QuantizationConfig(_Section):
    """The int8 variant: onnxruntime's dynamic quantisation (``quantize_dynamic``) of the float32 export."""

    weight_type: Literal["qint8", "quint8"] = Field(
        "qint8", description="Type of the quantised weights: signed (qint8) or unsigned (quint8) 8-bit integers.",
    )
    per_channel: bool = Field(
        True, description="One scale per output channel of each weight instead of one per tensor (the demo's 2-layer "
        "student's int8 gave a mean cosine to the torch student of 0.998 per channel, 0.980 per tensor).",
    )
    reduce_range: bool = Field(False, description="7-bit weights, for older x86 CPUs without VNNI that overflow.")
    op_types: list[str] = Field(
        default_factory=lambda: ["MatMul"], description="ONNX operator types whose weights are quantised.",
    )
    heads: bool = Field(
        False, description="Also quantise an M3 student's sparse and ColBERT heads (off: they stay float32, a small "
        "share of the weights).",
    )

    @field_validator("op_types")
    @classmethod
    def _some_op_types(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("op_types must name at least one ONNX operator type, e.g. MatMul")
        return list(dict.fromkeys(value))


class ExportConfig(_Section):
    """``m3distill export``: each student as ONNX (float32) and dynamic int8, verified against the torch student."""

    enabled: bool = Field(
        False, description="Export every student after training in `m3distill run` / `demo` (m3distill export "
        "exports on request either way).",
    )
    variants: list[Literal["onnx", "int8"]] = Field(
        default_factory=lambda: ["onnx", "int8"],
        description="Variants written into each student's onnx/ folder: onnx (float32, onnx/model.onnx) and int8 "
        "(dynamic int8 weights, onnx/model_qint8_quantized.onnx).",
    )
    opset: int = Field(18, ge=14, description="ONNX opset of the exported graphs.")
    min_cosine: float = Field(
        0.9999, gt=0, le=1, description="The float32 export must reach this mean cosine to the torch student on the "
        "verification texts, else nothing is written (int8 is measured and recorded, not held to it).",
    )
    verify_texts: int = Field(
        256, ge=1, description="Texts each variant is compared on with the torch student: the run's test texts, "
        "or the bundled sample corpus when no dataset is known (plus one text longer than max_seq_length).",
    )
    batch_size: int = Field(32, ge=1, description="Texts per batch while verifying.")
    graph_fusions: bool = Field(
        True, description="Trace the encoder with eager attention and fuse the graph with onnxruntime's transformer "
        "optimizer (GELU, LayerNorm and skip-LayerNorm kernels): the demo's 2-layer int8 student served documentation "
        "passages 1.3x faster than the plain graph (benchmarks/serving.py --texts passages). Off: the model's own "
        "attention, unfused. A fused graph that misses min_cosine is replaced by the plain one.",
    )
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)

    @field_validator("variants")
    @classmethod
    def _some_variants(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("variants must name at least one of onnx, int8")
        return [variant for variant in ("onnx", "int8") if variant in value]


class M3DistillConfig(_Section):
    """A whole run: every stage's settings and the run directory they share."""

    run_dir: str = Field("runs/m3distill", description="Directory all stages read from and write to.")
    synth: SynthConfig = Field(default_factory=SynthConfig)
    teacher: TeacherConfig = Field(default_factory=TeacherConfig)
    students: StudentsConfig = Field(default_factory=StudentsConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)


def _format_validation_error(error: ValidationError, source: str) -> str:
    first = error.errors()[0]
    where = ".".join(str(part) for part in first["loc"]) or "(top level)"
    more = f" (and {error.error_count() - 1} more)" if error.error_count() > 1 else ""
    return f"invalid config {source}: {where}: {first['msg']}{more}"


# Fields that name a file or folder: a relative one in a config file is relative to that file's folder (as in
# compose files), so a config works from any directory. PATH_OR_ID fields may also be a hub id ("BAAI/bge-m3"):
# they are taken as a path when they look like one or exist beside the config file, and left alone otherwise.
_PATH_FIELDS = ("run_dir", "synth.llm.cache_path", "evaluation.real_questions")
_PATH_OR_ID_FIELDS = ("synth.corpus", "synth.general", "synth.tokenizer", "teacher.model")


def load_config(path: str | Path | None = None) -> M3DistillConfig:
    """Load a YAML config file; ``None`` gives the defaults.

    Relative paths inside the file (``run_dir``, ``synth.corpus``, ``synth.general``, ``synth.tokenizer``,
    ``synth.llm.cache_path``, ``evaluation.real_questions``, ``teacher.model``) are taken from the file's own
    folder, and ``~`` is expanded, so the result does not depend on the directory the command runs in. A value that is a hub id rather than a path
    (``BAAI/bge-m3``, a dataset id) is left as written.

    Raises :class:`M3DistillError` naming the file and the first bad field.
    """
    if path is None:
        return M3DistillConfig()
    path = Path(path).expanduser()
    if not path.is_file():
        raise M3DistillError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as error:
        raise M3DistillError(f"config file {path} is not UTF-8 text (undecodable byte at offset {error.start}); save "
                             "it as UTF-8") from None
    except yaml.YAMLError as error:
        raise M3DistillError(f"config file {path} is not valid YAML: {error}".splitlines()[0]) from error
    if not isinstance(data, dict):
        raise M3DistillError(f"config file {path} must hold a mapping of sections, not {type(data).__name__}")
    _resolve_paths(data, path.parent.resolve())
    try:
        return M3DistillConfig.model_validate(data)
    except ValidationError as error:
        raise M3DistillError(_format_validation_error(error, str(path))) from error


def _resolve_paths(data: dict[str, Any], base: Path | None) -> None:
    """Expand ``~`` in the path fields of ``data`` (a config as nested dicts) and, when ``base`` is given, make
    relative ones relative to ``base``. Fields that are absent or not strings are left for validation to judge."""
    for dotted in (*_PATH_FIELDS, *_PATH_OR_ID_FIELDS):
        *parents, leaf = dotted.split(".")
        node: Any = data
        for part in parents:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or not isinstance(node.get(leaf), str):
            continue
        node[leaf] = _resolve_path(node[leaf], base, maybe_id=dotted in _PATH_OR_ID_FIELDS)


def _resolve_path(value: str, base: Path | None, *, maybe_id: bool) -> str:
    expanded = os.path.expanduser(value)  # a string operation: a hub id must keep its "/" on Windows too
    if not expanded or base is None or Path(expanded).is_absolute():
        return expanded
    beside = (base / expanded).resolve()
    # Two slashes or a backslash cannot be a hub id ("owner/name"); "./x" and "../x" are paths by intent.
    looks_like_path = value.startswith(".") or "\\" in value or value.count("/") > 1
    if maybe_id and not looks_like_path and not beside.exists():
        return value
    return str(beside)


def apply_overrides(config: M3DistillConfig, overrides: dict[str, Any]) -> M3DistillConfig:
    """Return a copy of ``config`` with dotted-key overrides applied, e.g. ``{"teacher.model": "x"}``.

    ``None`` values are skipped so unset CLI flags leave the file's value alone.
    """
    data = config.model_dump()
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    # Paths given as flags stay relative to the working directory; only "~" is expanded (for --out=~/x).
    _resolve_paths(data, None)
    try:
        return M3DistillConfig.model_validate(data)
    except ValidationError as error:
        raise M3DistillError(_format_validation_error(error, "(from command-line flags)")) from error


def config_to_yaml(config: M3DistillConfig) -> str:
    """The config as YAML, the form ``load_config`` reads back, with credentials removed from its URLs
    (:func:`settings_record`)."""
    return yaml.safe_dump(settings_record(config), sort_keys=False, allow_unicode=True)


def settings_record(settings: BaseModel, **dump_options: Any) -> dict[str, Any]:
    """``settings`` (the config or one of its sections) as every record m3distill writes or logs holds them:
    ``settings.model_dump(mode="json", **dump_options)`` with the credentials of each URL in it removed.

    The one way settings become a record (RUN_DIR/config.yaml, the dataset manifest, a student's metadata, the
    fingerprints, the report), so that none can hold a credential, whichever field a URL sits in: only key *names*
    (``api_key_env``) belong in a config, and a key written into a URL (``synth.llm.base_url``,
    ``evaluation.qdrant_url``: ``user:pass@``, ``?api_key=``) is redacted by :func:`redact_url`. Fingerprints are
    taken of the record too, so another host or path makes an output stale and another password does not.
    """
    return _without_credentials(settings.model_dump(mode="json", **dump_options))


# A URL with a scheme and no whitespace (a prompt template mentioning one is text, not a URL).
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://\S*$")


def _without_credentials(value: Any) -> Any:
    if isinstance(value, dict):
        return {key: _without_credentials(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_without_credentials(item) for item in value]
    if isinstance(value, str) and _URL.match(value):
        return redact_url(value)
    return value


# Query parameters whose value is a credential (api_key, key, token, access_token, secret, password, sig...).
_SECRET_QUERY_NAME = re.compile(r"key|token|secret|passw|auth|sig|credential", re.IGNORECASE)
REDACTED = "***"


def redact_url(url: str) -> str:
    """``url`` without the credentials it may carry, for anything m3distill writes or logs.

    The ``user:password@`` part is dropped and the values of query parameters named like a secret (``api_key``,
    ``token``, ``sig``...) become ``***``; everything else is kept as written.
    """
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL at all: drop anything that looks like user info
        return re.sub(r"//[^/@]*@", "//", url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    query = parts.query
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(_SECRET_QUERY_NAME.search(name) for name, _ in pairs):
        query = urlencode(
            [(name, REDACTED if _SECRET_QUERY_NAME.search(name) else value) for name, value in pairs], safe="*"
        )
    if (netloc, query) == (parts.netloc, parts.query):
        return url  # nothing to remove: kept exactly as written (fingerprints of it stay as they were)
    return urlunsplit(parts._replace(netloc=netloc, query=query))
