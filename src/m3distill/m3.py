"""bge-m3's three outputs: the dense vector, sparse lexical weights and ColBERT multi-vectors, from one forward pass.

A model folder is an **M3 model** when it holds, beside its sentence-transformers files, the two head files that
FlagEmbedding's ``BGEM3FlagModel`` loads: ``sparse_linear.pt`` (``Linear(hidden, 1)``) and ``colbert_linear.pt``
(``Linear(hidden, colbert_dim)``, ``colbert_dim = hidden`` for bge-m3). From the encoder's last hidden states ``h``:

- **dense**: the sentence-transformers embedding (for bge-m3: the normalised CLS vector, as FlagEmbedding's);
- **sparse**: ``relu(sparse_linear(h))``, one weight per token; per text, the largest weight of each token id,
  with the CLS, EOS, padding and unknown tokens left out and only weights above zero kept;
- **ColBERT**: ``colbert_linear(h[:, 1:])`` (every token but the first), padding masked, each vector normalised
  (as ``BGEM3FlagModel`` with its default ``normalize_embeddings=True``); one vector per token after the first, up
  to and including the closing special token.

The math is FlagEmbedding's (``M3Embedder``), so a student folder with the two head files loads in
``BGEM3FlagModel`` and gives the same outputs; ``scripts/check_flagembedding.py`` checks that against
FlagEmbedding itself. Scores, as FlagEmbedding computes them: dense cosine; sparse = the sum over shared token ids
of the product of the weights; ColBERT = MaxSim averaged over the query's vectors (:func:`colbert_score`).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from sentence_transformers import SentenceTransformer
from torch import Tensor, nn
from tqdm.auto import tqdm

from m3distill.atomic import atomic_dir, atomic_path
from m3distill.errors import M3DistillError
from m3distill.layout import COLBERT_HEAD_FILE, HEAD_FILES, MULTI_VECTOR_DIRNAME, SPARSE_HEAD_FILE
from m3distill.m3_outputs import (  # noqa: F401 (the M3 vocabulary, importable from here as before)
    COLBERT,
    DENSE,
    M3_OUTPUTS,
    SPARSE,
    UNUSED_SPECIAL_TOKENS,
    M3Embeddings,
    colbert_score,
    hybrid_score,
    max_weight_per_id,
    sparse_score,
)

logger = logging.getLogger(__name__)



def is_m3_model(folder: str | Path | None) -> bool:
    """Whether ``folder`` holds both of bge-m3's head files (an M3 model: dense, sparse and ColBERT outputs)."""
    if folder is None:
        return False
    path = Path(folder)
    return path.is_dir() and all((path / name).is_file() for name in HEAD_FILES)


class M3Heads(nn.Module):
    """bge-m3's sparse and ColBERT heads over an encoder's last hidden states.

    Args:
        hidden_size: the encoder's hidden size.
        colbert_dim: width of the ColBERT vectors (``hidden_size`` when ``None``, as in bge-m3).
    """

    def __init__(self, hidden_size: int, colbert_dim: int | None = None) -> None:
        super().__init__()
        self.sparse_linear = nn.Linear(hidden_size, 1)
        self.colbert_linear = nn.Linear(hidden_size, colbert_dim or hidden_size)
        # A student with a trimmed vocabulary (m3distill.students.vocabulary): the teacher's id of each of its token
        # ids, so that its sparse weights are keyed as the teacher's are. Not a parameter, and not in the head files.
        self.teacher_token_ids: Tensor | None = None

    @classmethod
    def load(cls, folder: str | Path, *, hidden_size: int | None = None) -> M3Heads:
        """The heads saved in ``folder`` (its ``sparse_linear.pt`` and ``colbert_linear.pt``), on the CPU.

        The files are read with ``weights_only=True``: a head file can hold tensors only, never code.

        Raises:
            M3DistillError: a head file is missing, unreadable, or does not hold a ``Linear`` of the expected
                shape (input width ``hidden_size`` when given; one output for the sparse head).
        """
        folder = Path(folder)
        states = {}
        for name in HEAD_FILES:
            path = folder / name
            if not path.is_file():
                raise M3DistillError(f"{folder} has no {name}; an M3 model needs both {' and '.join(HEAD_FILES)}")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as error:  # noqa: BLE001 (pickle, zip and unpickling errors all mean "not a head file")
                # torch's own message advises weights_only=False, which would run whatever code the file holds.
                raise M3DistillError(
                    f"{path} is not a readable head file (a torch file holding only a Linear layer's tensors, as "
                    f"FlagEmbedding saves them; {type(error).__name__}): copy it again from the model it came from"
                ) from error
            if not isinstance(state, dict) or not isinstance(state.get("weight"), Tensor) or state["weight"].ndim != 2:
                raise M3DistillError(f"{path} does not hold a Linear layer's weights (a 'weight' matrix)")
            states[name] = state
        sparse, colbert = states[SPARSE_HEAD_FILE]["weight"], states[COLBERT_HEAD_FILE]["weight"]
        width = sparse.shape[1]
        if sparse.shape[0] != 1:
            raise M3DistillError(f"{folder / SPARSE_HEAD_FILE} has {sparse.shape[0]} outputs; the sparse head has 1")
        if colbert.shape[1] != width or (hidden_size is not None and width != hidden_size):
            raise M3DistillError(
                f"the head files in {folder} take inputs of width {width} and {colbert.shape[1]}, but the encoder's "
                f"hidden size is {hidden_size if hidden_size is not None else width}"
            )
        heads = cls(width, colbert.shape[0])
        heads.sparse_linear.load_state_dict(states[SPARSE_HEAD_FILE])
        heads.colbert_linear.load_state_dict(states[COLBERT_HEAD_FILE])
        return heads

    def save(self, folder: str | Path) -> None:
        """Write the two head files into ``folder`` (each atomically), as FlagEmbedding saves them."""
        folder = Path(folder)
        for name, layer in ((SPARSE_HEAD_FILE, self.sparse_linear), (COLBERT_HEAD_FILE, self.colbert_linear)):
            state = {key: value.detach().cpu().clone() for key, value in layer.state_dict().items()}
            with atomic_path(folder / name) as tmp:
                torch.save(state, tmp)

    def sparse_weights(self, hidden: Tensor) -> Tensor:
        """One weight per token, ``relu(sparse_linear(h))``: shape (batch, tokens)."""
        return torch.relu(self.sparse_linear(hidden)).squeeze(-1)

    def colbert_vectors(self, hidden: Tensor, attention_mask: Tensor) -> Tensor:
        """ColBERT vectors of every token but the first, padding zeroed, normalised: (batch, tokens - 1, dim)."""
        vectors = self.colbert_linear(hidden[:, 1:]) * attention_mask[:, 1:, None].to(hidden.dtype)
        # F.normalize's arithmetic (x / max(|x|, 1e-12)) in operators whose traced form (Mul, ReduceSum, Clip, Sqrt,
        # a broadcasting Div) onnxruntime's shape inference follows: F.normalize's Expand and ReduceL2 it cannot,
        # and where it fails the exported graph stays unfused. Clamped before the root: padding rows are zero, and
        # the root's gradient at zero would turn the ColBERT loss into NaN.
        norms = (vectors * vectors).sum(dim=-1, keepdim=True).clamp_min(1e-24).sqrt()
        return vectors / norms


def unused_token_ids(tokenizer) -> set[int]:
    """Token ids FlagEmbedding leaves out of sparse weights: the tokenizer's CLS, EOS, padding and unknown tokens."""
    ids = set()
    for name in UNUSED_SPECIAL_TOKENS:
        token = getattr(tokenizer, name, None)
        if token is not None:
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None:
                ids.add(int(token_id))
    return ids


class M3Model:
    """A sentence-transformers model with bge-m3's heads: all three outputs from one forward pass.

    Args:
        model: the sentence-transformers model (its embedding is the dense output).
        heads: the sparse and ColBERT heads over its last hidden states.
    """

    def __init__(self, model: SentenceTransformer, heads: M3Heads) -> None:
        self.model = model
        self.heads = heads.to(model.device)
        self.unused_ids = torch.tensor(sorted(unused_token_ids(model.tokenizer)), dtype=torch.long)

    def forward(self, features: dict[str, Tensor]) -> dict[str, Tensor]:
        """The model's outputs for tokenized ``features``, plus ``sparse_weights`` (batch, tokens) and
        ``colbert_vectors`` (batch, tokens - 1, dim)."""
        output = self.model(dict(features))
        hidden = output["token_embeddings"]
        output["sparse_weights"] = self.heads.sparse_weights(hidden)
        output["colbert_vectors"] = self.heads.colbert_vectors(hidden, output["attention_mask"])
        return output

    @torch.no_grad()
    def encode(self, texts: Sequence[str], *, batch_size: int = 32, show_progress: bool = False,
               desc: str = "M3 encode") -> M3Embeddings:
        """Dense, sparse and ColBERT outputs of ``texts`` (see the module's docstring for the math)."""
        texts = list(texts)
        was_training = self.model.training
        self.model.eval()
        self.heads.eval()
        # Longest first, as FlagEmbedding does: fewer padded tokens per batch.
        order = np.argsort([-len(text) for text in texts], kind="stable")
        dense: list[np.ndarray | None] = [None] * len(texts)
        sparse: list[dict[int, float] | None] = [None] * len(texts)
        colbert: list[np.ndarray | None] = [None] * len(texts)
        starts = range(0, len(texts), batch_size)
        try:
            for start in tqdm(starts, desc=desc, unit="batch", disable=not show_progress):
                rows = order[start : start + batch_size]
                features = self.model.preprocess([texts[row] for row in rows])
                features = {key: value.to(self.model.device) if isinstance(value, Tensor) else value
                            for key, value in features.items()}
                output = self.forward(features)
                ids, mask = features["input_ids"], features["attention_mask"]
                weights = output["sparse_weights"].float()
                keep = (weights > 0) & (mask > 0) & ~torch.isin(ids, self.unused_ids.to(ids.device))
                if self.heads.teacher_token_ids is not None:
                    ids = self.heads.teacher_token_ids.to(ids.device)[ids]
                vectors = output["colbert_vectors"].float().cpu().numpy()
                lengths = mask.sum(dim=1).cpu().tolist()
                embeddings = output["sentence_embedding"].float().cpu().numpy()
                for position, row in enumerate(rows):
                    dense[row] = embeddings[position]
                    sparse[row] = max_weight_per_id(ids[position][keep[position]].cpu().tolist(),
                                                    weights[position][keep[position]].cpu().tolist())
                    colbert[row] = np.ascontiguousarray(vectors[position, : int(lengths[position]) - 1])
        finally:
            self.model.train(was_training)
        return M3Embeddings(dense=np.stack(dense).astype(np.float32) if texts else np.zeros((0, 0), np.float32),
                            sparse=sparse, colbert=colbert)


def _hidden_size(model: SentenceTransformer) -> int | None:
    from m3distill.models import transformer_backbone

    config = getattr(transformer_backbone(model), "config", None)
    return getattr(config, "hidden_size", None)


def load_m3_heads(model: SentenceTransformer, folder: str | Path | None) -> M3Heads | None:
    """The heads in ``folder`` when it is an M3 model (checked against ``model``'s hidden size), else ``None``."""
    if not is_m3_model(folder):
        return None
    from m3distill.students.vocabulary import read_teacher_ids

    heads = M3Heads.load(folder, hidden_size=_hidden_size(model))
    teacher_ids = read_teacher_ids(folder)
    if teacher_ids is not None:
        heads.teacher_token_ids = torch.from_numpy(teacher_ids)
    return heads


def encode_m3(model: SentenceTransformer, heads: M3Heads | None, texts: Sequence[str], *, batch_size: int = 32,
              show_progress: bool = False, desc: str = "encode") -> M3Embeddings:
    """All outputs ``model`` has for ``texts``: dense only without heads, dense + sparse + ColBERT with them."""
    if heads is None:
        dense = model.encode(list(texts), batch_size=batch_size, show_progress_bar=show_progress,
                             convert_to_numpy=True)
        return M3Embeddings(dense=np.asarray(dense, dtype=np.float32))
    return M3Model(model, heads).encode(texts, batch_size=batch_size, show_progress=show_progress, desc=desc)


def write_multi_vector_folder(folder: str | Path, heads: M3Heads) -> Path:
    """Write ``folder/multi_vector``: the M3 model in ``folder``'s ColBERT output as a sentence-transformers
    ``MultiVectorEncoder`` of its own native modules (no remote code), so that
    ``MultiVectorEncoder(folder / "multi_vector").encode(texts)`` gives the vectors :func:`encode_m3` gives.

    The modules: the Transformer; ``colbert_linear`` as a token-level ``Dense`` (bias, no activation); a
    ``MultiVectorMask`` whose skip list holds the CLS token for queries and documents alike (bge-m3 scores every token
    but the first, which is the CLS token); a token-level ``Normalize``. The encoder weights are a hard link to
    ``folder``'s own file where the file system allows one (no second copy on disk), else a copy.
    """
    from sentence_transformers import MultiVectorEncoder
    from sentence_transformers.base.modules import Normalize, Transformer
    from sentence_transformers.base.modules.dense import Dense
    from sentence_transformers.multi_vector_encoder.modules import MultiVectorMask

    folder = Path(folder)
    transformer = Transformer(str(folder))
    linear = heads.colbert_linear
    dense = Dense(linear.in_features, linear.out_features, bias=True, activation_function=None,
                  init_weight=linear.weight.detach().clone().cpu(), init_bias=linear.bias.detach().clone().cpu(),
                  module_input_name="token_embeddings")
    mask = MultiVectorMask(skiplist_words=[transformer.tokenizer.cls_token], skiplist_tasks=["query", "document"])
    encoder = MultiVectorEncoder(modules=[transformer, dense, mask, Normalize(module_input_name="token_embeddings")],
                                 device="cpu")
    out = folder / MULTI_VECTOR_DIRNAME
    encoder.save(str(out), create_model_card=False)
    for weights in out.glob("*.safetensors"):
        if (folder / weights.name).is_file():
            weights.unlink()
            try:
                weights.hardlink_to(folder / weights.name)
            except OSError:
                shutil.copyfile(folder / weights.name, weights)
    return out


def attach_random_heads(folder: str | Path, *, seed: int = 0, colbert_dim: int | None = None) -> M3Heads:
    """Write seeded random M3 heads into a sentence-transformers ``folder``, making it an M3 model.

    For tests and demos: an M3 teacher from any sentence-transformers folder (the packaged all-MiniLM-L6-v2 or
    the bge-m3-shaped stand-in), the same for the same ``seed``. The sparse head's bias is set so that about
    half of the tokens get a weight above zero, as in a trained bge-m3.
    """
    import json

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    hidden = int(config["hidden_size"])
    generator = torch.Generator().manual_seed(seed)
    heads = M3Heads(hidden, colbert_dim)
    with torch.no_grad():
        for layer in (heads.sparse_linear, heads.colbert_linear):
            bound = 1 / np.sqrt(hidden)
            layer.weight.copy_((torch.rand(layer.weight.shape, generator=generator) * 2 - 1) * bound * 4)
            layer.bias.zero_()
    heads.save(folder)
    return heads


def make_m3_test_teacher(out_dir: str | Path, *, base: str | Path = "sentence-transformers/all-MiniLM-L6-v2",
                         seed: int = 0) -> Path:
    """The M3 test teacher: a copy of the sentence-transformers folder ``base`` (by default the packaged
    all-MiniLM-L6-v2) in ``out_dir`` with seeded random heads (:func:`attach_random_heads`). ``out_dir`` must not
    exist yet."""
    from m3distill.models import local_model_folder

    out_dir = Path(out_dir)
    source = local_model_folder(base)
    if source is None:
        raise M3DistillError(f"no local copy of {base} to build the M3 test teacher from")
    if out_dir.exists():
        raise M3DistillError(f"{out_dir} exists; the M3 test teacher is written to a new folder")
    with atomic_dir(out_dir) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)
        _name_sep_as_eos(tmp)
        attach_random_heads(tmp, seed=seed)
    return out_dir


def _name_sep_as_eos(folder: Path) -> None:
    """Give a BERT tokenizer (no EOS token) ``[SEP]`` as its EOS token, as bge-m3's ``</s>`` is both.

    FlagEmbedding's ``compute_score`` indexes by the EOS token's id and fails on a tokenizer without one; with it,
    the closing ``[SEP]`` is left out of the sparse weights as bge-m3 leaves out ``</s>``.
    """
    import json

    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if not path.is_file():
            continue
        settings = json.loads(path.read_text(encoding="utf-8"))
        if settings.get("eos_token") is None and settings.get("sep_token") is not None:
            settings["eos_token"] = settings["sep_token"]
            path.chmod(0o644)
            path.write_text(json.dumps(settings, indent=2) + "\n", encoding="utf-8")


def head_files_sha256(folder: str | Path | None) -> str | None:
    """SHA-256 over an M3 model's two head files, or ``None`` for a folder that is not an M3 model.

    Students trained against a teacher's heads are current only for those heads; the teacher cache (dense) does not
    depend on them, so they are fingerprinted here, apart from the model's other files.
    """
    import hashlib

    if not is_m3_model(folder):
        return None
    digest = hashlib.sha256()
    for name in HEAD_FILES:
        digest.update(name.encode() + b"\0" + (Path(folder) / name).read_bytes())
    return digest.hexdigest()


def copy_head_files(source: str | Path, target: str | Path) -> None:
    """Copy an M3 model's two head files from ``source`` into ``target`` (each atomically)."""
    for name in HEAD_FILES:
        with atomic_path(Path(target) / name) as tmp:
            shutil.copyfile(Path(source) / name, tmp)
