"""The distillation loss: a weighted sum of terms that each pull the student towards the teacher.

Every term is a field of :class:`m3distill.config.LossConfig` with a weight (0 switches it off):

- ``mse``: sentence-transformers' MSELoss between the student's and the teacher's sentence embeddings (the seed
  recipe, kept as the baseline);
- ``cosine``: 1 - cosine(student, teacher), the angle alone (what cosine search sees);
- ``in_batch_kl``: KL divergence between the teacher's and the student's softmaxed cosine-similarity rows over the
  texts of the batch (relational distillation: the student ranks its batch-mates as the teacher does);
- ``anchor_kl``: the same, but each row ranks a fixed bank of the teacher's cached embeddings (the anchors, drawn
  from the training texts) instead of the batch: the student's text must sit among the corpus where the
  teacher's sits. It needs no extra forward pass, so thousands of anchors cost one small matrix product;
- ``token``: MSE between the student's and the teacher's last hidden states, token by token (needs the teacher's
  forward pass in every step: the online teacher).

The cached teacher sentence embeddings arrive as the ``label`` column; only ``token`` needs the teacher model.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.losses import MSELoss
from torch import Tensor, nn

from m3distill.config import LossConfig


class DistillationLoss(nn.Module):
    """Weighted sum of the distillation terms switched on in ``config``.

    Args:
        model: the student being trained.
        config: the term weights and temperatures.
        anchors: the teacher's embeddings of the anchor texts, one row each (needed when ``config.anchor_kl > 0``).
        teacher: the teacher model, run without gradients on each batch (needed when ``config.token > 0``).
    """

    def __init__(
        self,
        model: SentenceTransformer,
        config: LossConfig,
        *,
        anchors: np.ndarray | None = None,
        teacher: SentenceTransformer | None = None,
    ) -> None:
        super().__init__()
        if config.anchor_kl > 0 and (anchors is None or len(anchors) == 0):
            raise ValueError("loss.anchor_kl > 0 needs the teacher's embeddings of the anchor texts")
        if config.token > 0 and teacher is None:
            raise ValueError("loss.token > 0 needs the teacher model (the online teacher)")
        self.model = model
        self.config = config
        self.mse = MSELoss(model)
        self.teacher = teacher
        if teacher is not None:
            # Not frozen with requires_grad_(False): students are deep copies of the teacher and would inherit it.
            teacher.eval()
        bank = torch.as_tensor(np.asarray(anchors, dtype=np.float32)) if anchors is not None else torch.empty(0)
        # A buffer follows the student to its device; it is not saved with the student (the loss is not saved).
        self.register_buffer("anchors", F.normalize(bank, dim=-1) if bank.numel() else bank, persistent=False)

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        features = list(sentence_features)
        if len(features) != 1:
            raise ValueError(f"DistillationLoss takes one text column, got {len(features)}")
        config = self.config
        inputs = dict(features[0])  # the student's forward adds its outputs to the dict it is given
        output = self.model(features[0])
        student = output["sentence_embedding"]
        teacher = labels.to(student.dtype).detach()
        loss = student.new_zeros(())
        if config.mse:
            loss = loss + config.mse * F.mse_loss(student, teacher)
        if config.cosine:
            loss = loss + config.cosine * (1 - F.cosine_similarity(student, teacher, dim=-1)).mean()
        if config.in_batch_kl or config.anchor_kl:
            student_unit, teacher_unit = F.normalize(student, dim=-1), F.normalize(teacher, dim=-1)
            if config.in_batch_kl:
                loss = loss + config.in_batch_kl * similarity_kl(
                    student_unit @ student_unit.T, teacher_unit @ teacher_unit.T, config.temperature
                )
            if config.anchor_kl:
                anchors = self.anchors.to(student.device, student.dtype)
                loss = loss + config.anchor_kl * similarity_kl(
                    student_unit @ anchors.T, teacher_unit @ anchors.T, config.anchor_temperature
                )
        if config.token:
            loss = loss + config.token * self._token_loss(inputs, output["token_embeddings"])
        return loss

    def _token_loss(self, features: dict[str, Tensor], student_tokens: Tensor) -> Tensor:
        with torch.no_grad():
            teacher_tokens = self.teacher(dict(features))["token_embeddings"]
        mask = features["attention_mask"].unsqueeze(-1).to(student_tokens.dtype)
        squared = ((student_tokens - teacher_tokens.to(student_tokens.dtype)) ** 2) * mask
        return squared.sum() / (mask.sum() * student_tokens.shape[-1])


def similarity_kl(student_scores: Tensor, teacher_scores: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) between row-wise softmaxes of two similarity matrices, averaged over rows."""
    student_log = F.log_softmax(student_scores / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_scores / temperature, dim=-1)
    return F.kl_div(student_log, teacher_log, log_target=True, reduction="batchmean")
