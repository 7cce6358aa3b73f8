"""Batches of similar text length: questions with questions, contexts with contexts, so little compute goes to padding."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from sentence_transformers.base.sampler import DefaultBatchSampler

# Texts are shuffled, then sorted by length within windows of this many batches: batches stay random across the
# epoch but each holds texts of similar length.
_WINDOW_BATCHES = 50


class LengthGroupedBatchSampler(DefaultBatchSampler):
    """A shuffled batch sampler whose batches hold texts of similar length (from the dataset's ``text`` column).

    The order depends only on ``seed`` and the epoch, so a resumed run replays the same batches. Windows are whole
    multiples of the batch size, so only the very last batch can be short and ``len()`` matches a plain sampler.
    """

    def __init__(
        self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None, seed: int = 0
    ):
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns,
                         generator=generator, seed=seed)
        self._lengths = [len(text) for text in dataset["text"]]

    def __len__(self) -> int:
        count = len(self._lengths)
        return count // self.batch_size if self.drop_last else -(-count // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(len(self._lengths), generator=generator).tolist()
        window = self.batch_size * _WINDOW_BATCHES
        batches = []
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=self._lengths.__getitem__)
            batches += [chunk[i : i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        for position in torch.randperm(len(batches), generator=generator).tolist():
            yield batches[position]


# Groups of the training texts, keyed by the texts themselves. The Trainer builds its sampler from a class and the
# dataset alone (and pickles its arguments with each checkpoint), so the groups travel here rather than as a
# dataset column, which the data collator would tokenize as a second input.
_GROUPS: dict[str, list[int]] = {}


def _texts_key(texts) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8") + b"\0")
    return digest.hexdigest()


def register_text_groups(texts: list[str], groups: list[int]) -> None:
    """Record the group of each training text (e.g. the context a question or crop belongs to), in dataset order."""
    if len(groups) != len(texts):
        raise ValueError(f"{len(groups)} groups for {len(texts)} texts")
    _GROUPS[_texts_key(texts)] = list(groups)


class ContextGroupedBatchSampler(DefaultBatchSampler):
    """Batches of whole groups: a context, its questions and its crops arrive together, among other contexts' groups.

    With an in-batch similarity loss, each question then meets its own context and other contexts in its batch.
    Groups are shuffled (by ``seed`` and the epoch, so a resumed run replays the same batches) and packed in order;
    a group larger than a batch is split. Groups come from :func:`register_text_groups`; rows without one form
    their own group.
    """

    def __init__(
        self, dataset, batch_size: int, drop_last: bool, valid_label_columns=None, generator=None, seed: int = 0
    ):
        super().__init__(dataset, batch_size=batch_size, drop_last=drop_last, valid_label_columns=valid_label_columns,
                         generator=generator, seed=seed)
        groups = _GROUPS.get(_texts_key(dataset["text"])) or list(range(len(dataset)))
        members: dict[int, list[int]] = {}
        for row, group in enumerate(groups):
            members.setdefault(group, []).append(row)
        self._members = list(members.values())
        self._count = len(groups)

    def __len__(self) -> int:
        return self._count // self.batch_size if self.drop_last else -(-self._count // self.batch_size)

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = [row for position in torch.randperm(len(self._members), generator=generator).tolist()
                 for row in self._members[position]]
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            if len(batch) == self.batch_size or not self.drop_last:
                yield batch
