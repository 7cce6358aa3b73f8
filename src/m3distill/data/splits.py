"""Train/dev/test splits by context, and the sample of general texts mixed into training.

Both are deterministic by seed and independent of input order: each context (or general text) gets a rank from
a hash of the seed and its id, and the lowest ranks go to test, then dev; the rest is train. A context and all its
questions therefore always land in the same split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

from m3distill.config import SplitConfig
from m3distill.errors import M3DistillError


def split_sizes(n_contexts: int, splits: SplitConfig) -> dict[str, int]:
    """Contexts per split for ``n_contexts`` contexts.

    A value below 1 is a fraction of the contexts (rounded, and at least one context when it is above zero and
    there are enough contexts); a value of 1 or more is a number of contexts. Train gets the rest.

    Raises:
        M3DistillError: dev and test leave no training contexts.
    """
    sizes = {name: _size(getattr(splits, name), n_contexts) for name in ("dev", "test")}
    train = n_contexts - sizes["dev"] - sizes["test"]
    if train < 1:
        raise M3DistillError(
            f"dev ({sizes['dev']}) and test ({sizes['test']}) contexts leave no training contexts of the "
            f"{n_contexts} the corpus gave: lower the dev/test sizes or give a larger corpus"
        )
    return {"train": train, **sizes}


def assign_splits(context_ids: Sequence[str], splits: SplitConfig, seed: int) -> list[str]:
    """The split (``train``, ``dev`` or ``test``) of each context, aligned with ``context_ids`` (unique ids)."""
    sizes = split_sizes(len(context_ids), splits)
    order = sorted(range(len(context_ids)), key=lambda index: _rank(seed, "split", context_ids[index]))
    assigned = ["train"] * len(context_ids)
    for position, index in enumerate(order):
        if position < sizes["test"]:
            assigned[index] = "test"
        elif position < sizes["test"] + sizes["dev"]:
            assigned[index] = "dev"
    return assigned


def general_budget(n_domain_train_texts: int, general_ratio: float) -> int:
    """How many general texts to mix in: ``general_ratio`` per domain training text (contexts plus questions)."""
    return round(n_domain_train_texts * general_ratio)


def sample_general(general_ids: Sequence[str], n_wanted: int, seed: int) -> list[int]:
    """Indices of ``min(n_wanted, len(general_ids))`` general texts, sampled by seed, in their original order."""
    if n_wanted >= len(general_ids):
        return list(range(len(general_ids)))
    order = sorted(range(len(general_ids)), key=lambda index: _rank(seed, "general", general_ids[index]))
    return sorted(order[: max(n_wanted, 0)])


def _size(value: float, n_contexts: int) -> int:
    if value >= 1:  # a whole number: SplitConfig refuses other values before any input is read
        return int(value)
    if value <= 0:
        return 0
    # A wanted split should not vanish by rounding on a small corpus, but it must leave training data.
    return max(round(value * n_contexts), 1 if n_contexts >= 3 else 0)


def _rank(seed: int, purpose: str, item_id: str) -> bytes:
    return hashlib.sha256(f"{seed}\0{purpose}\0{item_id}".encode()).digest()
