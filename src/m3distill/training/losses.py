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
  forward pass in every step: the online teacher);
- ``sparse`` and ``colbert`` (M3 teachers, see :mod:`m3distill.m3`): the student's own heads, trained with it,
  against the teacher's heads on the teacher's hidden states, token by token: MSE of the sparse weights
  (``relu(sparse_linear(h))``) and 1 - cosine of the ColBERT vectors. The student shares the teacher's tokenizer,
  so token i of one is token i of the other. Online teacher too: ColBERT vectors (a vector per token, 4 KB per
  token for bge-m3) do not fit a cache of a corpus, and the sparse weights come from the same forward pass.

The cached teacher sentence embeddings arrive as the ``label`` column; the token-level terms need the teacher model.
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
from m3distill.encoding import compute_precision
from m3distill.m3 import M3Heads


class DistillationLoss(nn.Module):
    """Weighted sum of the distillation terms switched on in ``config``.

    Args:
        model: the student being trained.
        config: the term weights and temperatures.
        anchors: the teacher's embeddings of the anchor texts, one row each (needed when ``config.anchor_kl > 0``).
        teacher: the teacher model, run without gradients on each batch (needed by ``token``, and by ``sparse`` and
            ``colbert`` when there are heads).
        heads: the student's M3 heads (trained with it: they are this loss's parameters, so the Trainer's
            optimizer updates them); ``None`` for a dense-only teacher, which switches ``sparse`` and ``colbert`` off.
        teacher_heads: the teacher's M3 heads (needed with ``heads``).
        teacher_precision: what the online teacher computes in: the training's resolved precision (``fp32``,
            ``bf16`` or ``fp16``), so that it runs under the same autocast as the student's forward pass, which the
            Trainer wraps (the loss's own code runs outside it).
        teacher_token_ids: a student with a trimmed vocabulary: the teacher's id of each of its token ids, through
            which the online teacher reads the student's batches (None: the same vocabulary).
    """

    def __init__(
        self,
        model: SentenceTransformer,
        config: LossConfig,
        *,
        anchors: np.ndarray | None = None,
        teacher: SentenceTransformer | None = None,
        heads: M3Heads | None = None,
        teacher_heads: M3Heads | None = None,
        teacher_precision: str = "fp32",
        teacher_token_ids: Tensor | None = None,
    ) -> None:
        super().__init__()
        if config.anchor_kl > 0 and (anchors is None or len(anchors) == 0):
            raise ValueError("loss.anchor_kl > 0 needs the teacher's embeddings of the anchor texts")
        if needs_online_teacher(config, has_heads=heads is not None) and teacher is None:
            raise ValueError("loss.token, or loss.sparse / loss.colbert with heads, needs the teacher model "
                             "(the online teacher)")
        if heads is not None and teacher_heads is None:
            raise ValueError("the student's heads are trained against the teacher's: pass teacher_heads")
        self.model = model
        self.config = config
        self.mse = MSELoss(model)
        self.heads = heads  # a submodule: the optimizer trains its parameters with the student's
        # The teacher sits in a tuple so that its parameters are not this module's (the optimizer must not see them).
        # Not frozen with requires_grad_(False): students are deep copies of the teacher and would inherit it.
        self._teacher = (teacher, teacher_heads)
        self.teacher_precision = teacher_precision
        self.teacher_token_ids = teacher_token_ids
        for frozen in self._teacher:
            if frozen is not None:
                frozen.eval()
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
        if needs_online_teacher(config, has_heads=self.heads is not None):
            loss = loss + self._token_level_loss(inputs, output["token_embeddings"])
        return loss

    @property
    def teacher(self) -> SentenceTransformer | None:
        return self._teacher[0]

    def _token_level_loss(self, features: dict[str, Tensor], student_tokens: Tensor) -> Tensor:
        """The online-teacher terms: hidden states, sparse weights and ColBERT vectors, token by token."""
        config, (teacher, teacher_heads) = self.config, self._teacher
        attention = features["attention_mask"]
        teacher_features = dict(features)
        if self.teacher_token_ids is not None:
            ids = features["input_ids"]
            teacher_features["input_ids"] = self.teacher_token_ids.to(ids.device)[ids]
        with torch.no_grad(), compute_precision(self.teacher_precision, student_tokens.device):
            teacher_tokens = teacher(teacher_features)["token_embeddings"].to(student_tokens.dtype)
        mask = attention.to(student_tokens.dtype)
        loss = student_tokens.new_zeros(())
        if config.token:
            squared = ((student_tokens - teacher_tokens) ** 2) * mask.unsqueeze(-1)
            loss = loss + config.token * squared.sum() / (mask.sum() * student_tokens.shape[-1])
        if self.heads is None:
            return loss
        if config.sparse:
            with torch.no_grad():
                teacher_weights = teacher_heads.sparse_weights(teacher_tokens)
            squared = (self.heads.sparse_weights(student_tokens) - teacher_weights) ** 2
            loss = loss + config.sparse * (squared * mask).sum() / mask.sum()
        if config.colbert:
            with torch.no_grad():
                teacher_vectors = teacher_heads.colbert_vectors(teacher_tokens, attention)
            student_vectors = self.heads.colbert_vectors(student_tokens, attention)
            # Both are unit vectors (zero at padding), so the dot product is the cosine.
            distance = 1 - (student_vectors * teacher_vectors).sum(dim=-1)
            token_mask = mask[:, 1:]
            loss = loss + config.colbert * (distance * token_mask).sum() / token_mask.sum().clamp(min=1)
        return loss


def needs_online_teacher(config: LossConfig, *, has_heads: bool) -> bool:
    """Whether the loss runs the teacher on every batch: the token-level terms that are switched on."""
    return bool(config.token or (has_heads and (config.sparse or config.colbert)))


def similarity_kl(student_scores: Tensor, teacher_scores: Tensor, temperature: float) -> Tensor:
    """KL(teacher || student) between row-wise softmaxes of two similarity matrices, averaged over rows."""
    student_log = F.log_softmax(student_scores / temperature, dim=-1)
    teacher_log = F.log_softmax(teacher_scores / temperature, dim=-1)
    return F.kl_div(student_log, teacher_log, log_target=True, reduction="batchmean")
