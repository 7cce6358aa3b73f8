"""Batches of similar text length: questions with questions, contexts with contexts, so little compute goes to padding."""

from __future__ import annotations

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
