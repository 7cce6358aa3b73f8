#!/usr/bin/env python3
"""Check m3distill's M3 outputs against FlagEmbedding itself, the reference client for bge-m3.

For each M3 model folder (a sentence-transformers folder with ``sparse_linear.pt`` and ``colbert_linear.pt``),
the same texts are encoded twice: by ``m3distill.m3.encode_m3`` here, and by FlagEmbedding's ``BGEM3FlagModel``
in a separate virtual environment (FlagEmbedding 1.4.2 does not import next to transformers 5.x: it imports
``transformers.modeling_attn_mask_utils``, which 5.x removed). The script prints, per model, the largest absolute
difference of the dense vectors, the sparse weights (over the union of token ids, a missing id counting as 0) and
the ColBERT vectors, plus the three FlagEmbedding scores of neighbouring text pairs, and exits 1 when any of them
is above the tolerance.

    python scripts/check_flagembedding.py MODEL_DIR [MODEL_DIR ...] [--venv PATH] [--texts N] [--tolerance T]
    python scripts/check_flagembedding.py STUDENT_DIR --variant onnx     # its ONNX export (m3distill export) instead

With ``--variant onnx`` or ``int8`` m3distill's side is the folder's ONNX export, served by
``m3distill.onnx_encoder(folder, variant).encode_m3`` (onnxruntime), against ``BGEM3FlagModel`` on the torch folder.

The venv is built on first use (torch CPU first, so pip never pulls a CUDA build) and reused afterwards; a
marker file inside it records the recipe, and a venv built from another recipe is rebuilt beside it and swapped
in. Exit status: 0 all within tolerance, 1 a difference above it, 2 an error (one line on stderr).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from dataclasses import dataclass
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "data" / "sample"
DEFAULT_VENV = Path("~/.cache/m3distill/flagembedding-venv").expanduser()
DEFAULT_TOLERANCE = 1e-4

# The recipe of the reference venv. torch goes in alone and first: the CPU wheel is on disk, and installing it
# with the rest would let pip pick a multi-GB CUDA build. transformers 4.57.6 is the newest release FlagEmbedding
# 1.4.2 imports with; the others are what pip resolves next to it, pinned so every build computes the same.
TORCH_REQUIREMENT = "torch==2.13.0"
REFERENCE_REQUIREMENTS = (
    "FlagEmbedding==1.4.2",
    "transformers==4.57.6",
    "tokenizers==0.22.2",
    "sentence-transformers==5.7.0",
    "huggingface-hub==0.36.2",
)
VENV_MARKER = "m3distill-flagembedding-venv.json"  # written last: a venv without it is incomplete or not ours
PIP_TAIL_LINES = 15

# Run inside the reference venv: python child.py MODEL_DIR TEXTS_JSON OUT_DIR POOLING NORMALIZE MAX_LENGTH
_CHILD_SCRIPT = textwrap.dedent('''
    import json, sys
    import numpy as np
    from FlagEmbedding import BGEM3FlagModel

    folder, texts_file, out_dir, pooling, normalize, max_length = sys.argv[1:7]
    texts = json.load(open(texts_file, encoding="utf-8"))
    max_length = int(max_length)
    model = BGEM3FlagModel(folder, use_fp16=False, pooling_method=pooling, normalize_embeddings=normalize == "1",
                           devices="cpu")
    output = model.encode(texts, batch_size=16, max_length=max_length, return_dense=True, return_sparse=True,
                          return_colbert_vecs=True)
    colbert = output["colbert_vecs"]
    np.savez(out_dir + "/flag.npz", dense=np.asarray(output["dense_vecs"], dtype=np.float32),
             colbert=np.concatenate(colbert).astype(np.float32) if colbert else np.zeros((0, 0), np.float32),
             colbert_lengths=np.array([len(vectors) for vectors in colbert], dtype=np.int64))
    sparse = [{str(token): float(weight) for token, weight in weights.items()} for weights in output["lexical_weights"]]

    # Scores of neighbouring pairs, one pair per batch so no padding enters the ColBERT max.
    pairs = [(texts[i], texts[i + 1]) for i in range(len(texts) - 1)]
    scores, score_source = {"dense": [], "sparse": [], "colbert": []}, "compute_score"
    try:
        for pair in pairs:
            result = model.compute_score([pair], batch_size=1, max_query_length=max_length,
                                         max_passage_length=max_length)
            for key in scores:
                scores[key].append(float(result[key][0]))
    except Exception as error:  # FlagEmbedding's compute_score needs an eos token; fall back to its encode-side scores
        reason = "%s: %s" % (type(error).__name__, str(error).splitlines()[0])
        score_source = "encode outputs (compute_score failed: %s)" % reason
        scores = {"dense": [], "sparse": [], "colbert": []}
        dense, weights = output["dense_vecs"], output["lexical_weights"]
        for i in range(len(pairs)):
            scores["dense"].append(float(dense[i] @ dense[i + 1]))
            scores["sparse"].append(float(model.compute_lexical_matching_score(weights[i], weights[i + 1])))
            scores["colbert"].append(float(model.colbert_score(colbert[i], colbert[i + 1])))
    json.dump({"sparse": sparse, "scores": scores, "score_source": score_source},
              open(out_dir + "/flag.json", "w", encoding="utf-8"))
''')


class CheckError(Exception):
    """A problem the user can fix; printed as one line, exit status 2."""


# --- the texts ---------------------------------------------------------------------------------------------------

_LANGUAGES = ("en", "de", "fr", "es", "ru", "ja", "zh", "ko", "pl", "uk", "tr", "cs")
_EDGE_CASES = ("", "the the the the cat sat on the the mat", "[UNK] [PAD] [MASK] ok")


def sample_texts(count: int, sample_dir: Path = SAMPLE_DIR) -> list[str]:
    """``count`` texts from the sample corpus: many languages, short, medium and long (beyond any model's 512
    tokens, to test truncation), plus a few edge cases (the empty string, repeated tokens, special-token names)."""
    if count < 1:
        raise CheckError(f"--texts must be at least 1, got {count}")
    documents = {}
    for language in _LANGUAGES:
        folder = sample_dir / "domain" / language
        if folder.is_dir():
            documents[language] = [path.read_text(encoding="utf-8").strip() for path in sorted(folder.glob("*.txt"))]
    if not documents:
        raise CheckError(f"no sample texts found under {sample_dir}/domain")
    texts = list(_EDGE_CASES[:count])
    kinds = ("short", "medium", "long")
    step = 0
    while len(texts) < count:
        language = list(documents)[step % len(documents)]
        kind = kinds[(step // len(documents)) % len(kinds)]
        docs = documents[language]
        doc = docs[step % len(docs)]
        if kind == "short":
            texts.append(doc.split("\n")[0][:80])
        elif kind == "medium":
            texts.append(doc[:500])
        else:  # several documents joined: far more tokens than max_seq_length
            joined, index = doc, step
            while len(joined) < 4000 and index < step + len(docs):
                index += 1
                joined += "\n" + docs[index % len(docs)]
            texts.append(joined)
        step += 1
    return texts


# --- the model folder --------------------------------------------------------------------------------------------

@dataclass
class FolderSettings:
    """What BGEM3FlagModel needs to be told to compute the folder's sentence-transformers dense output."""

    pooling: str  # "cls" or "mean"
    normalize: bool


def folder_settings(folder: Path) -> FolderSettings:
    """Pooling and normalisation of a sentence-transformers folder, from its modules.json."""
    from m3distill.m3 import HEAD_FILES, is_m3_model

    if not folder.is_dir():
        raise CheckError(f"{folder} is not a folder")
    if not is_m3_model(folder):
        raise CheckError(f"{folder} is not an M3 model: it needs both {' and '.join(HEAD_FILES)}")
    modules_file = folder / "modules.json"
    if not modules_file.is_file():
        raise CheckError(f"{folder} is not a sentence-transformers folder (no modules.json)")
    modules = json.loads(modules_file.read_text())
    kinds = [module["type"].rsplit(".", 1)[-1] for module in modules]
    extra = [kind for kind in kinds if kind not in ("Transformer", "Pooling", "Normalize")]
    if extra:
        raise CheckError(f"{folder} has modules FlagEmbedding cannot reproduce ({', '.join(extra)}); "
                         "its dense output is pooling (+ Normalize) of the encoder only")
    pooling_modules = [module for module in modules if module["type"].endswith("Pooling")]
    if len(pooling_modules) != 1:
        raise CheckError(f"{folder} has {len(pooling_modules)} Pooling modules; expected one")
    config = json.loads((folder / pooling_modules[0]["path"] / "config.json").read_text())
    mode = config.get("pooling_mode")
    if mode is None:
        enabled = [key for key, value in config.items() if key.startswith("pooling_mode_") and value is True]
        mode = {"pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean"}.get(enabled[0]) \
            if len(enabled) == 1 else None
    if mode not in ("cls", "mean"):
        raise CheckError(f"{folder} pools with {mode or config}; FlagEmbedding's M3 model pools with cls or mean")
    return FolderSettings(pooling=mode, normalize="Normalize" in kinds)


# --- the reference venv ------------------------------------------------------------------------------------------

def _recipe() -> dict:
    return {"python": f"{sys.version_info.major}.{sys.version_info.minor}", "torch": TORCH_REQUIREMENT,
            "requirements": list(REFERENCE_REQUIREMENTS)}


def _venv_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def _is_current(venv: Path) -> bool:
    marker = venv / VENV_MARKER
    try:
        return json.loads(marker.read_text()) == _recipe() and _venv_python(venv).exists()
    except (OSError, ValueError):
        return False


def ensure_venv(venv: Path) -> Path:
    """The reference venv at ``venv``, built first when missing or built from another recipe. Returns its python.

    A folder at ``venv`` that this script did not build (no marker) is the user's and is never touched.
    """
    if _is_current(venv):
        return _venv_python(venv)
    if venv.exists() and not (venv / VENV_MARKER).is_file():
        raise CheckError(f"{venv} exists but is not a FlagEmbedding venv built by this script "
                         f"(no {VENV_MARKER}); pass another --venv or remove it")
    venv.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the target and rename: a failed build leaves any old venv whole. Called through bin/python
    # only, a venv works after the rename (pyvenv.cfg names the base interpreter, not the venv's own path).
    building = Path(tempfile.mkdtemp(prefix=f".{venv.name}.building-", dir=venv.parent))
    try:
        print(f"building the FlagEmbedding venv in {venv} (once; a few minutes)...", file=sys.stderr)
        _run_build_step([sys.executable, "-m", "venv", str(building)], "python -m venv")
        python = str(_venv_python(building))
        _run_build_step([python, "-m", "pip", "install", "-q", TORCH_REQUIREMENT], f"pip install {TORCH_REQUIREMENT}")
        _run_build_step([python, "-m", "pip", "install", "-q", *REFERENCE_REQUIREMENTS],
                        f"pip install {' '.join(REFERENCE_REQUIREMENTS)}")
        (building / VENV_MARKER).write_text(json.dumps(_recipe()))
        if venv.exists():
            old = venv.with_name(f".{venv.name}.old-{os.getpid()}")
            venv.rename(old)
            building.rename(venv)
            shutil.rmtree(old, ignore_errors=True)
        else:
            building.rename(venv)
    finally:
        if building.exists():
            shutil.rmtree(building, ignore_errors=True)
    return _venv_python(venv)


def _run_build_step(command: list[str], what: str) -> None:
    result = subprocess.run(command, check=False, capture_output=True, text=True,
                            env={**os.environ, "PIP_NO_INPUT": "1"})
    if result.returncode != 0:
        lines = [line for line in (result.stdout + result.stderr).splitlines()
                 if line.strip() and "is ignored: it is neither a file nor a directory" not in line]
        tail = " | ".join(lines[-PIP_TAIL_LINES:])
        raise CheckError(f"building the FlagEmbedding venv failed at `{what}` (exit {result.returncode}): {tail}")


# --- the two encodings and their comparison ----------------------------------------------------------------------

@dataclass
class Encoded:
    dense: np.ndarray
    sparse: list[dict[int, float]]
    colbert: list[np.ndarray]
    scores: dict[str, list[float]]
    score_source: str = "m3distill.m3"


def encode_with_m3distill(folder: Path, texts: list[str], variant: str = "torch") -> tuple[Encoded, int]:
    """m3distill's outputs for ``texts`` (the torch folder's, or its ONNX export's ``variant``), and the model's
    max_seq_length (both sides truncate there)."""
    from m3distill.errors import M3DistillError
    from m3distill.m3 import colbert_score, encode_m3, load_m3_heads, sparse_score
    from m3distill.models import load_sentence_transformer

    try:
        model = load_sentence_transformer(folder, device="cpu")
        heads = load_m3_heads(model, folder)
        if heads is None:
            raise CheckError(f"{folder} is not an M3 model")
        if variant == "torch":
            out = encode_m3(model, heads, texts, batch_size=16)
        else:
            from m3distill.onnx_serving import onnx_encoder

            encoder = onnx_encoder(folder, variant)
            if encoder.outputs != ("dense", "sparse", "colbert"):
                raise CheckError(f"the {variant} export of {folder} has the dense output alone: export it again with "
                                 "this m3distill (m3distill export --force)")
            out = encoder.encode_m3(texts, batch_size=16)
    except M3DistillError as error:
        raise CheckError(str(error)) from error
    scores = {"dense": [], "sparse": [], "colbert": []}
    for i in range(len(texts) - 1):
        scores["dense"].append(float(out.dense[i] @ out.dense[i + 1]))
        scores["sparse"].append(sparse_score(out.sparse[i], out.sparse[i + 1]))
        scores["colbert"].append(colbert_score(out.colbert[i], out.colbert[i + 1]))
    return Encoded(out.dense, out.sparse, out.colbert, scores), int(model.max_seq_length)


def encode_with_flagembedding(python: Path, folder: Path, texts: list[str], settings: FolderSettings,
                              max_length: int) -> Encoded:
    """FlagEmbedding's outputs for ``texts``, computed in the reference venv."""
    with tempfile.TemporaryDirectory(prefix="m3-flag-check-") as work:
        work_dir = Path(work)
        (work_dir / "child.py").write_text(_CHILD_SCRIPT)
        (work_dir / "texts.json").write_text(json.dumps(texts, ensure_ascii=False), encoding="utf-8")
        command = [str(python), str(work_dir / "child.py"), str(folder.resolve()), str(work_dir / "texts.json"),
                   str(work_dir), settings.pooling, "1", str(max_length)]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env.pop("PYTHONPATH", None)  # nothing of the dev venv may leak into the reference run
        result = subprocess.run(command, check=False, capture_output=True, text=True, env=env, cwd=work_dir)
        if result.returncode != 0:
            lines = [line for line in result.stderr.splitlines() if line.strip()]
            raise CheckError(f"FlagEmbedding could not encode with {folder}: {lines[-1] if lines else 'no output'}")
        arrays = np.load(work_dir / "flag.npz", allow_pickle=False)
        data = json.loads((work_dir / "flag.json").read_text(encoding="utf-8"))
    ends = np.cumsum(arrays["colbert_lengths"])
    colbert = [arrays["colbert"][end - length : end] for end, length in zip(ends, arrays["colbert_lengths"])]
    sparse = [{int(token): weight for token, weight in weights.items()} for weights in data["sparse"]]
    # BGEM3FlagModel keys a trimmed student's sparse weights by the student's own token ids; m3distill reports them
    # under the teacher's (m3distill_vocabulary.json): compare under the teacher's.
    vocabulary = folder / "m3distill_vocabulary.json"
    if vocabulary.is_file():
        teacher_ids = json.loads(vocabulary.read_text(encoding="utf-8"))["teacher_ids"]
        sparse = [{teacher_ids[token]: weight for token, weight in weights.items()} for weights in sparse]
    return Encoded(arrays["dense"], sparse, colbert, data["scores"], data["score_source"])


def compare(ours: Encoded, flag: Encoded) -> list[tuple[str, float, float, str]]:
    """(quantity, max |difference|, its scale for the tolerance, note) rows."""
    if len(ours.sparse) != len(flag.sparse) or len(ours.colbert) != len(flag.colbert):
        return [("texts", float("inf"), 1.0, f"{len(ours.sparse)} encoded here, {len(flag.sparse)} by FlagEmbedding")]
    rows = []
    if ours.dense.shape != flag.dense.shape:
        rows.append(("dense", float("inf"), 1.0, f"shapes differ: {ours.dense.shape} vs {flag.dense.shape}"))
    else:
        # BGEM3FlagModel runs with its default normalize_embeddings=True (m3distill's ColBERT vectors are always
        # unit vectors, as there); a folder without a Normalize module gives an unnormalised dense vector, so it is
        # compared after normalising it.
        dense = ours.dense / np.maximum(np.linalg.norm(ours.dense, axis=1, keepdims=True), 1e-12)
        difference = float(np.abs(dense - flag.dense).max(initial=0.0))
        rows.append(("dense", difference, 1.0, f"dim {ours.dense.shape[1]}"))

    sparse_diff, id_mismatch, ids = 0.0, 0, 0
    for mine, theirs in zip(ours.sparse, flag.sparse):
        union = set(mine) | set(theirs)
        ids += len(union)
        id_mismatch += set(mine) != set(theirs)
        for token in union:
            sparse_diff = max(sparse_diff, abs(mine.get(token, 0.0) - theirs.get(token, 0.0)))
    rows.append(("sparse weights", sparse_diff, 1.0,
                 f"{ids} ids; id sets " + ("equal" if not id_mismatch else f"DIFFER in {id_mismatch} texts")))

    colbert_diff, count_mismatch = 0.0, 0
    for mine, theirs in zip(ours.colbert, flag.colbert):
        if mine.shape != theirs.shape:
            count_mismatch += 1
            continue
        colbert_diff = max(colbert_diff, float(np.abs(mine - theirs).max(initial=0.0)))
    vectors = sum(len(vectors) for vectors in ours.colbert)
    counts = "equal" if not count_mismatch else f"DIFFER in {count_mismatch} texts"
    rows.append(("colbert vectors", float("inf") if count_mismatch else colbert_diff, 1.0,
                 f"{vectors} vectors; counts {counts}"))

    for kind in ("dense", "sparse", "colbert"):
        mine, theirs = np.array(ours.scores[kind]), np.array(flag.scores[kind])
        difference = float(np.abs(mine - theirs).max(initial=0.0))
        # Sparse scores are sums of products of weights (tens at times): compare relative to their size.
        largest = float(np.abs(theirs).max(initial=0.0))
        rows.append((f"{kind} score", difference, max(1.0, largest), f"{len(mine)} pairs, max |score| {largest:.3g}"))
    return rows


def check_model(folder: Path, python: Path, texts: list[str], tolerance: float, variant: str = "torch") -> bool:
    """Print the comparison table of one model; True when every difference is within ``tolerance``."""
    settings = folder_settings(folder)
    ours, max_length = encode_with_m3distill(folder, texts, variant)
    flag = encode_with_flagembedding(python, folder, texts, settings, max_length)
    rows = compare(ours, flag)
    print(f"\n{folder}  (m3distill side: {variant}; pooling {settings.pooling}, normalize {settings.normalize}, "
          f"max_length {max_length}, {len(texts)} texts)")
    print(f"  FlagEmbedding scores from: {flag.score_source}")
    print(f"  {'quantity':<16} {'max |diff|':>11}  {'ok':<4} note")
    passed = True
    for name, difference, scale, note in rows:
        ok = difference <= tolerance * scale
        passed &= ok
        print(f"  {name:<16} {difference:>11.3g}  {'ok' if ok else 'FAIL':<4} {note}")
    return passed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("models", nargs="+", type=Path, metavar="MODEL_DIR", help="M3 model folders to check")
    parser.add_argument("--venv", type=Path, default=DEFAULT_VENV, help=f"FlagEmbedding venv (default {DEFAULT_VENV})")
    parser.add_argument("--texts", type=int, default=50, help="how many sample texts to encode (default 50)")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"largest allowed absolute difference, times max(1, |score|) for the scores "
                             f"(default {DEFAULT_TOLERANCE:g})")
    parser.add_argument("--variant", choices=("torch", "onnx", "int8"), default="torch",
                        help="m3distill's side: the torch folder (default) or its ONNX export's float32 / int8 graph")
    args = parser.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    try:
        texts = sample_texts(args.texts)
        for folder in args.models:
            folder_settings(folder)  # fail on a wrong folder before a venv build of minutes
        python = ensure_venv(args.venv.expanduser())
        results = [check_model(folder, python, texts, args.tolerance, args.variant) for folder in args.models]
    except CheckError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    failed = results.count(False)
    print(f"\n{len(results) - failed} of {len(results)} models within tolerance {args.tolerance:g}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
