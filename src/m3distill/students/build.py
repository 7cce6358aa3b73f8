"""Building a student: the teacher's embeddings, a subset of its layers in order, and the same pooling."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
from sentence_transformers import SentenceTransformer

from m3distill.models import find_layer_stack, transformer_backbone
from m3distill.students.layer_plan import validate_layers

logger = logging.getLogger(__name__)


def build_student(teacher: SentenceTransformer, layers: Sequence[int]) -> SentenceTransformer:
    """A copy of ``teacher`` that keeps only ``layers`` (0-based, increasing) of its transformer layers.

    The embeddings, pooling, normalisation and tokenizer are the teacher's; the teacher is left untouched.
    The copy's config says the new layer count, so the saved folder loads with plain ``SentenceTransformer``.
    """
    backbone = transformer_backbone(teacher)
    _, _, teacher_stack = find_layer_stack(backbone)
    layers = validate_layers(layers, len(teacher_stack))

    # Deep-copy everything except the layers we drop, so a 24-layer teacher is never copied whole.
    dropped = {id(module): None for index, module in enumerate(teacher_stack) if index not in set(layers)}
    student = copy.deepcopy(teacher, memo=dropped)
    student_backbone = transformer_backbone(student)
    parent, attribute, stack = find_layer_stack(student_backbone)
    kept = torch.nn.ModuleList([stack[index] for index in layers])
    setattr(parent, attribute, kept)
    for new_index, layer in enumerate(kept):
        _renumber(layer, new_index)
    _shrink_config(student_backbone.config, layers)
    student.requires_grad_(True)  # a student is built to be trained, whatever the teacher's flags were
    logger.info("built a %d-layer student from layers %s", len(layers), layers)
    return student


def _renumber(layer: torch.nn.Module, index: int) -> None:
    # Some architectures store their own position in the stack (used for KV caches); keep it consistent.
    for module in layer.modules():
        if isinstance(getattr(module, "layer_idx", None), int):
            module.layer_idx = index


def _shrink_config(config, layers: list[int]) -> None:
    config.num_hidden_layers = len(layers)
    layer_types = getattr(config, "layer_types", None)
    if isinstance(layer_types, list) and layer_types:
        config.layer_types = [layer_types[index] for index in layers]
