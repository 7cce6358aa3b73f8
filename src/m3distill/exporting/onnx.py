"""The torch side of the export: the student's encoder traced into ONNX, quantised to int8, and both checked
against the torch student.

The graph is the Hugging Face model inside the student's Transformer module: it takes the inputs the student's
tokenizer gives (``input_ids``, ``attention_mask`` and, for BERT-style tokenizers, ``token_type_ids``) with dynamic
batch and sequence axes, and returns ``last_hidden_state``; pooling and normalisation stay outside the graph
(:class:`m3distill.onnx_serving.OnnxEncoder`). It is traced on a batch that holds padding: on a batch without any,
transformers skips the attention mask altogether and the trace would ignore it (a cosine of 0.989 instead of 1.0).

With ``export.graph_fusions`` (the default) the encoder is traced with eager attention (the SDPA trace masks every
attention score with a Where/IsNaN pass that took a fifth of the int8 graph's time on documentation passages) and
the graph is then fused by onnxruntime's transformer optimizer (GELU, LayerNorm, skip-LayerNorm kernels). A fused
graph that misses the tolerances below is replaced by the plain one, so fusing never costs fidelity.

A student of an M3 teacher (bge-m3's sparse and ColBERT head files beside it) is exported with its heads: the same
graph also returns ``sparse_weights`` and ``colbert_vectors`` (see :mod:`m3distill.m3`), and the float32 graph must
match the torch student on all three: dense mean cosine and every ColBERT vector's cosine at least
``export.min_cosine``, sparse weights within :data:`SPARSE_TOLERANCE` with the same token ids, else nothing is
written. The int8 graph's figures are measured and recorded.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from sentence_transformers import SentenceTransformer

from m3distill.config import ExportConfig, QuantizationConfig
from m3distill.errors import M3DistillError
from m3distill.m3 import M3Embeddings, M3Heads, encode_m3, load_m3_heads
from m3distill.metrics import row_cosines
from m3distill.models import load_sentence_transformer, transformer_backbone
from m3distill.onnx_serving import (
    COLBERT_OUTPUT,
    GRAPH_OUTPUT,
    ONNX_DIR,
    ONNX_VARIANT_FILES,
    SPARSE_OUTPUT,
    OnnxEncoder,
    serving_spec,
)

logger = logging.getLogger(__name__)

# The float32 graph's sparse weights may differ from the torch student's by this much at most.
SPARSE_TOLERANCE = 1e-4
_GRAPH_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
# Protobuf cannot hold an ONNX file over 2 GiB: above this many bytes of weights they go into a data file beside it.
EXTERNAL_DATA_ABOVE_BYTES = 1_500_000_000
# Texts of the trace batch: two lengths, so that the batch holds padding.
_TRACE_TEXTS = ("short", "a longer text of several words, so that the short one is padded to its length")
_WEIGHT_TYPES = {"qint8": "QInt8", "quint8": "QUInt8"}


@dataclass(frozen=True)
class BuiltVariant:
    """One variant written into the temporary export folder and measured against the torch student.

    Attributes:
        files: its files, relative to the student folder (the .onnx file first, then any external data).
        mean_cosine: mean cosine of its embeddings to the torch student's on the verification texts.
        min_cosine: the lowest of those cosines.
        seconds: time to write and verify it.
        m3: an M3 student's sparse and ColBERT figures against the torch student (:func:`m3_agreement`).
    """

    files: list[str]
    mean_cosine: float
    min_cosine: float
    seconds: float
    m3: dict[str, float] | None = None


def build_variants(student_dir: Path, out_dir: Path, config: ExportConfig, texts: list[str], *,
                   step: Callable[[str], None] = lambda _: None) -> tuple[dict[str, BuiltVariant], dict[str, Any]]:
    """Write the variants of ``config.variants`` into ``out_dir`` (the future ``onnx/`` folder) and verify them.

    Args:
        student_dir: the student folder (a sentence-transformers folder).
        out_dir: an empty folder beside ``student_dir/onnx`` that becomes it once everything is verified.
        config: the export settings.
        texts: verification texts; the float32 graph must reach ``config.min_cosine`` on them.
        step: called with the name of each step as it starts (progress).

    Returns the variants by name and the facts the export record keeps about the graph (inputs, opset, exporter,
    maximum sequence length). Raises :class:`M3DistillError` when the float32 graph misses ``config.min_cosine``.
    """
    step("loading the student")
    spec = serving_spec(student_dir)
    model = load_sentence_transformer(str(student_dir), device="cpu")  # a damaged folder is one line, not a traceback
    model.float().eval()
    if int(model.max_seq_length) != spec.max_seq_length:
        raise M3DistillError(
            f"{student_dir}: its files give max_seq_length {spec.max_seq_length} but sentence-transformers uses "
            f"{model.max_seq_length}; set max_seq_length in sentence_bert_config.json"
        )
    heads = load_m3_heads(model, student_dir)
    m3_reference = encode_m3(model, heads, texts, batch_size=config.batch_size) if heads is not None else None
    reference = (m3_reference.dense if m3_reference is not None else
                 model.encode(texts, batch_size=config.batch_size, convert_to_numpy=True, show_progress_bar=False))
    threads = torch.get_num_threads()

    step("exporting float32")
    started = time.perf_counter()
    fp32 = out_dir / Path(ONNX_VARIANT_FILES["onnx"]).name
    external = _weights_bytes(model) > EXTERNAL_DATA_ABOVE_BYTES
    graph_inputs = export_graph(model, fp32, opset=config.opset, external_data=external, heads=heads,
                                fused=config.graph_fusions)
    fusions = _fused_or_none(model, fp32, external) if config.graph_fusions else None
    step("verifying float32")
    encoder = OnnxEncoder(student_dir, "onnx", file=fp32, threads=threads)
    try:
        mean, low, m3 = _verified(student_dir, encoder, texts, reference, m3_reference, config)
    except M3DistillError as error:
        if not config.graph_fusions:
            raise
        logger.warning("%s: the fused graph departs from the torch student (%s); exporting the plain graph instead",
                       student_dir.name, error)
        _remove_graph(fp32, out_dir)
        graph_inputs = export_graph(model, fp32, opset=config.opset, external_data=external, heads=heads)
        fusions = None
        encoder = OnnxEncoder(student_dir, "onnx", file=fp32, threads=threads)
        mean, low, m3 = _verified(student_dir, encoder, texts, reference, m3_reference, config)
    built = {"onnx": BuiltVariant(_files_of(fp32, out_dir), mean, low, time.perf_counter() - started, m3)}
    logger.info("%s: float32 ONNX export, mean cosine %.7f (lowest %.7f) to the torch student", student_dir.name,
                mean, low)

    if "int8" in config.variants:
        step("quantising to int8")
        started = time.perf_counter()
        int8 = out_dir / Path(ONNX_VARIANT_FILES["int8"]).name
        quantize_int8(fp32, int8, config.quantization, external_data=external)
        step("verifying int8")
        encoder = OnnxEncoder(student_dir, "int8", file=int8, threads=threads)
        mean, low = _agreement(encoder, texts, reference, config.batch_size)
        m3 = m3_agreement(encoder, texts, m3_reference, config.batch_size) if m3_reference is not None else None
        built["int8"] = BuiltVariant(_files_of(int8, out_dir), mean, low, time.perf_counter() - started, m3)
        logger.info("%s: int8 ONNX export, mean cosine %.5f (lowest %.5f) to the torch student", student_dir.name,
                    mean, low)
    if "onnx" not in config.variants:  # written only to quantise and verify from
        for name in built.pop("onnx").files:
            (out_dir / Path(name).name).unlink()
    facts = {
        "graph_inputs": graph_inputs,
        "graph_output": GRAPH_OUTPUT,
        "graph_outputs": [GRAPH_OUTPUT, SPARSE_OUTPUT, COLBERT_OUTPUT] if heads is not None else [GRAPH_OUTPUT],
        "opset": config.opset,
        "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
        # None: the plain graph (fusions off, or the fused graph missed the tolerances); else fused operator counts.
        "graph_fusions": fusions,
        "max_seq_length": spec.max_seq_length,
        "pooling": list(spec.pooling_modes),
        "normalize": spec.normalize,
        "dim": spec.dim,
        "external_data": external,
    }
    return built, facts


def _verified(student_dir: Path, encoder: OnnxEncoder, texts: list[str], reference: np.ndarray,
              m3_reference: M3Embeddings | None, config: ExportConfig) -> tuple[float, float, dict[str, float] | None]:
    """The float32 graph's mean and lowest cosine to the torch student (and its M3 figures); raises
    :class:`M3DistillError` when it misses the tolerances."""
    mean, low = _agreement(encoder, texts, reference, config.batch_size)
    if mean < config.min_cosine:
        raise M3DistillError(
            f"the ONNX export of {student_dir.name} gives a mean cosine of {mean:.6f} to the torch student (lowest "
            f"{low:.6f}), below export.min_cosine {config.min_cosine}; nothing was written"
        )
    m3 = m3_agreement(encoder, texts, m3_reference, config.batch_size) if m3_reference is not None else None
    if m3 is not None:
        _check_m3_agreement(student_dir, m3, config.min_cosine)
    return mean, low, m3


def _fused_or_none(model: SentenceTransformer, graph_file: Path, external_data: bool) -> dict[str, int] | None:
    """Fuse ``graph_file`` in place (:func:`fuse_graph`); None, the plain graph kept, when the optimizer fails."""
    config = transformer_backbone(model).config
    try:
        return fuse_graph(graph_file, num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
                          hidden_size=int(getattr(config, "hidden_size", 0) or 0), external_data=external_data)
    except Exception as error:  # noqa: BLE001 - the optimizer is best effort; the plain graph still serves
        logger.warning("onnxruntime's transformer optimizer failed on %s (%s); the graph stays unfused",
                       graph_file.name, error)
        return None


def fuse_graph(graph_file: Path, *, num_heads: int = 0, hidden_size: int = 0,
               external_data: bool = False) -> dict[str, int]:
    """Fuse an encoder graph in place with onnxruntime's transformer optimizer (``model_type="bert"``, its Python
    fusions only; onnxruntime applies its own graph optimisations when it loads the file).

    Args:
        graph_file: the float32 ONNX file (with its external data beside it when ``external_data``).
        num_heads: attention heads (0: the optimizer reads them from the graph).
        hidden_size: hidden size (0: read from the graph).
        external_data: keep the weights in a data file beside the graph, named as torch names it.

    Returns the fused operators and their counts (those that occur).
    """
    from onnxruntime.transformers.optimizer import optimize_model

    with _quiet_exporter():
        optimized = optimize_model(str(graph_file), model_type="bert", num_heads=num_heads, hidden_size=hidden_size,
                                   opt_level=0)
    fused = {name: int(count) for name, count in optimized.get_fused_operator_statistics().items() if count}
    staging = graph_file.parent / f".fusing-{graph_file.stem}"
    staging.mkdir()
    try:
        # The data file is named after the graph file, as torch.onnx names it (<name>.data).
        optimized.save_model_to_file(str(staging / graph_file.name), use_external_data_format=external_data,
                                     all_tensors_to_one_file=True)
        _remove_graph(graph_file, graph_file.parent)
        for path in staging.iterdir():
            path.rename(graph_file.parent / path.name)
    finally:
        for path in staging.iterdir():
            path.unlink()
        staging.rmdir()
    return fused


def _remove_graph(graph_file: Path, out_dir: Path) -> None:
    for name in _files_of(graph_file, out_dir):
        (out_dir / Path(name).name).unlink()


def m3_agreement(encoder: OnnxEncoder, texts: list[str], reference: M3Embeddings,
                 batch_size: int) -> dict[str, float]:
    """How close an export's sparse and ColBERT outputs are to the torch student's (``reference``) on ``texts``:
    the largest sparse weight difference (a token id one side lacks counts as weight 0), the share of texts whose
    sparse token ids are the same, and the lowest and mean cosine of ColBERT vectors of the same token."""
    found = encoder.encode_m3(texts, batch_size=batch_size)
    differences, same_ids, cosines = [0.0], 0, []
    for mine, theirs in zip(found.sparse, reference.sparse):
        same_ids += mine.keys() == theirs.keys()
        differences += [abs(mine.get(token, 0.0) - theirs.get(token, 0.0)) for token in mine.keys() | theirs.keys()]
    for mine, theirs in zip(found.colbert, reference.colbert):
        if mine.shape != theirs.shape:
            cosines.append(0.0)  # a vector too many or too few: as far from the student as it gets
        elif len(mine):
            cosines += row_cosines(mine, theirs).tolist()
    return {"sparse_max_abs_diff": float(max(differences)), "sparse_same_ids": same_ids / max(len(texts), 1),
            "colbert_min_cosine": float(min(cosines, default=1.0)),
            "colbert_mean_cosine": float(np.mean(cosines)) if cosines else 1.0}


def _check_m3_agreement(student_dir: Path, m3: dict[str, float], min_cosine: float) -> None:
    if (m3["sparse_max_abs_diff"] > SPARSE_TOLERANCE or m3["sparse_same_ids"] < 1.0
            or m3["colbert_min_cosine"] < min_cosine):
        raise M3DistillError(
            f"the ONNX export of {student_dir.name} departs from the torch student's M3 outputs: sparse weights up to "
            f"{m3['sparse_max_abs_diff']:.2e} apart (tolerance {SPARSE_TOLERANCE:g}), the same token ids in "
            f"{m3['sparse_same_ids']:.1%} of the texts, ColBERT cosine down to {m3['colbert_min_cosine']:.6f} "
            f"(export.min_cosine {min_cosine}); nothing was written"
        )


def _weights_bytes(model: torch.nn.Module) -> int:
    return sum(parameter.numel() * parameter.element_size() for parameter in model.parameters())


def _agreement(encoder: OnnxEncoder, texts: list[str], reference: np.ndarray, batch_size: int) -> tuple[float, float]:
    cosines = row_cosines(encoder.encode(texts, batch_size=batch_size), reference)
    return float(cosines.mean()), float(cosines.min())


def _files_of(file: Path, out_dir: Path) -> list[str]:
    """The model file and its external data files, as paths relative to the student folder."""
    data = sorted(path for path in out_dir.iterdir() if path.name.startswith(file.name) and path != file)
    return [f"{ONNX_DIR}/{path.name}" for path in (file, *data)]


class _Encoder(torch.nn.Module):
    """The student's Hugging Face model as ``(input_ids, attention_mask[, token_type_ids]) -> last_hidden_state``."""

    def __init__(self, backbone: torch.nn.Module, input_names: list[str]) -> None:
        super().__init__()
        self.backbone = backbone
        self.input_names = input_names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.backbone(**{name: inputs[name] for name in self.input_names}).last_hidden_state


class _M3Encoder(_Encoder):
    """The encoder plus an M3 student's heads: ``-> (last_hidden_state, sparse_weights, colbert_vectors)``."""

    def __init__(self, backbone: torch.nn.Module, input_names: list[str], heads: M3Heads) -> None:
        super().__init__(backbone, input_names)
        self.heads = heads

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hidden = super().forward(input_ids, attention_mask, token_type_ids)
        return hidden, self.heads.sparse_weights(hidden), self.heads.colbert_vectors(hidden, attention_mask)


def export_graph(model: SentenceTransformer, out_file: Path, *, opset: int, external_data: bool = False,
                 heads: M3Heads | None = None, fused: bool = False) -> list[str]:
    """Export ``model``'s encoder to ``out_file`` (weights in ``<name>.data`` beside it when ``external_data``);
    returns the graph's input names, those the model's tokenizer gives. With ``heads`` (an M3 student's) the graph
    also returns the sparse weights and the ColBERT vectors. With ``fused`` the encoder is traced with eager
    attention (a graph :func:`fuse_graph` then fuses; the model is left with its own attention afterwards)."""
    backbone = transformer_backbone(model)
    accepted = set(inspect.signature(backbone.forward).parameters)
    features = model.preprocess(list(_TRACE_TEXTS))
    names = [name for name in _GRAPH_INPUTS if name in features and name in accepted]
    if names[:2] != ["input_ids", "attention_mask"]:
        raise M3DistillError(f"the student's tokenizer gives {sorted(features)}; exporting needs input_ids and "
                             "attention_mask")
    example = tuple(features[name].to("cpu") for name in names)
    if bool(example[1].all()):  # cannot happen with _TRACE_TEXTS; without padding the trace would drop the mask
        raise RuntimeError("the trace batch holds no padding")
    batch, sequence = torch.export.Dim("batch"), torch.export.Dim("sequence")
    wrapper = (_Encoder(backbone, names) if heads is None else _M3Encoder(backbone, names, heads)).eval()
    outputs = [GRAPH_OUTPUT] if heads is None else [GRAPH_OUTPUT, SPARSE_OUTPUT, COLBERT_OUTPUT]
    with torch.no_grad(), _quiet_exporter(), (_eager_attention(backbone) if fused else contextlib.nullcontext()):
        program = torch.onnx.export(
            wrapper, example, dynamo=True, input_names=names, output_names=outputs, opset_version=opset,
            dynamic_shapes={name: {0: batch, 1: sequence} for name in names}, verbose=False, optimize=True,
        )
    program.save(out_file, external_data=external_data)  # torch names the data file <name>.data
    return names


@contextlib.contextmanager
def _eager_attention(backbone: torch.nn.Module) -> Iterator[None]:
    """The Hugging Face model with eager attention while it is traced (no change for models without the choice)."""
    previous = getattr(getattr(backbone, "config", None), "_attn_implementation", None)
    switch = getattr(backbone, "set_attn_implementation", None)
    changed = False
    if switch is not None and previous not in (None, "eager"):
        try:
            switch("eager")
            changed = True
        except (ValueError, ImportError, NotImplementedError) as error:
            logger.info("keeping %s attention for the trace: %s", previous, error)
    try:
        yield
    finally:
        if changed:
            switch(previous)


def quantize_int8(fp32: Path, int8: Path, settings: QuantizationConfig, *, external_data: bool = False) -> None:
    """Dynamic int8 quantisation of the float32 graph ``fp32`` into ``int8`` (onnxruntime's ``quantize_dynamic``).

    An M3 student's head MatMuls (those fed by the last hidden state) stay float32 unless ``settings.heads``: they
    are a small share of the weights, and the sparse weights pass through a ReLU whose threshold int8 noise moves.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    with _quiet_exporter():
        quantize_dynamic(
            fp32, int8, op_types_to_quantize=list(settings.op_types), per_channel=settings.per_channel,
            reduce_range=settings.reduce_range, weight_type=getattr(QuantType, _WEIGHT_TYPES[settings.weight_type]),
            use_external_data_format=external_data,
            nodes_to_exclude=[] if settings.heads else head_nodes(fp32),
            # Fused operators (onnxruntime's contrib domain) escape ONNX shape inference: their outputs are float.
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )


def head_nodes(graph_file: Path) -> list[str]:
    """The names of the nodes downstream of the graph's ``last_hidden_state``: an M3 student's heads ([] for an
    encoder alone)."""
    import onnx

    graph = onnx.load(str(graph_file), load_external_data=False).graph
    reached, names = {GRAPH_OUTPUT}, []
    for node in graph.node:  # ONNX nodes are in topological order
        if reached.intersection(node.input):
            reached.update(node.output)
            names.append(node.name)
    return names


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """The exporter's and quantiser's chatter (missing torchvision ops, deprecations, pre-processing advice) is not
    the user's business; their errors still surface."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._export", "onnxscript",
                                                    "onnx_ir")]
    levels = [log.level for log in loggers]
    root_level = logging.root.level
    try:
        for log in loggers:
            log.setLevel(logging.ERROR)
        logging.root.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level in zip(loggers, levels):
            log.setLevel(level)
        logging.root.setLevel(root_level)
