"""Fidelity benchmark: how close do students stay to the teacher, per training recipe? Prints tables.

    python benchmarks/fidelity.py                         # seed vs default recipe (3, 2, 1 of 6 layers) + ablation
    python benchmarks/fidelity.py --rows default --layers 2
    python benchmarks/fidelity.py --max-steps 600 --work /tmp/fidelity
    python benchmarks/fidelity.py --rows default,ablation --layers 2 --seeds 42,1,2   # mean ± sd over seeds

On the bundled sample corpus with the packaged all-MiniLM-L6-v2 teacher (configs/demo.yaml's synth and teacher
settings, plus the general text and crops the demo leaves out), it trains students with

- ``seed``: the seed recipe: MSE on the cached sentence embeddings, learning rate 2e-4, linear decay, contexts +
  questions + general text of the train split, checkpoint picked by dev Spearman (as m3distill 0.1 trained the
  demo);
- ``default``: ``m3distill train``'s defaults (:class:`m3distill.config.TrainingConfig`);
- ``ablation``: the default with each ingredient removed in turn (the dev and test contexts among them, which the
  default learns while their questions stay unseen; on a CPU with native bf16, training in fp32 instead), and with
  crops, general text or the anchor KL added (2-layer student);
- ``additions`` (not run unless asked): the default plus the in-batch similarity KL, or plus the token-level loss
  with the online teacher (2-layer student),

all at the same step budget (``--max-steps``, the default recipe's when unset), and measures each on the test
split, as ``m3distill evaluate`` does: the test questions searched (exact cosine) among all contexts, P@10 and
P@50 of the student's top-k against the teacher's, the same with student-encoded questions searched among the
teacher's context embeddings (query-side stand-in), MRR@10 as a share of the teacher's, Spearman of
question-context cosines, mean cosine to the teacher, and training minutes.

With ``--seeds`` every row is trained once per training seed (data order, anchor sample) and the table gives the
mean and, in brackets, the spread (sample standard deviation) of each figure: a single run of a row moves by about
±0.01 P@10, as much as some ingredients are worth.

Everything goes into ``--work`` (a temporary folder by default): the dataset and teacher cache are reused across
rows, and a row whose student is already trained there with the same settings is not trained again.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402

from m3distill.config import (  # noqa: E402
    DEFAULT_TRAINING_STEPS,
    LossConfig,
    M3DistillConfig,
    StudentsConfig,
    SynthConfig,
    TrainingConfig,
    load_config,
)
from m3distill.data.dataset import load_synth_dataset  # noqa: E402
from m3distill.stages.synth import synthesize  # noqa: E402
from m3distill.encoding import resolve_precision  # noqa: E402
from m3distill.metrics import (  # noqa: E402
    MEAN_COSINE,
    SPEARMAN_COSINE,
    alignment_metrics,
    draw_similarity_pairs,
    ground_truth_metrics,
    mrr_metric,
    row_cosines,
    top_k_overlap,
)
from m3distill.models import load_sentence_transformer  # noqa: E402
from m3distill.teacher.cache import TeacherCache, build_teacher_cache, is_complete_cache  # noqa: E402
from m3distill.stages.train import train_students  # noqa: E402
from m3distill.training import is_trained_student  # noqa: E402
from m3distill.training.record import neutral_added_settings  # noqa: E402

from faq_sets import SETS as FAQ_SETS  # noqa: E402
from faq_sets import general_questions, write_sets  # noqa: E402
from real_questions import RealQuestionSearch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def seed_recipe(default: TrainingConfig) -> TrainingConfig:
    """The recipe m3distill 0.1 trained with: MSE only, lr 2e-4, no crops, Spearman picks the checkpoint."""
    return default.model_copy(update={
        "learning_rate": 2e-4, "lr_scheduler": "linear", "warmup_ratio": 0.1, "loss": LossConfig(),
        "texts": ["contexts", "questions", "general"], "best_metric": "spearman", "early_stopping_patience": None,
        "dropout": None, "all_contexts": False,
    })


def ablations(default: TrainingConfig) -> dict[str, TrainingConfig]:
    """The default recipe with one ingredient removed, or one option it leaves out added."""
    rows: dict[str, TrainingConfig] = {}
    loss = default.loss
    terms = ("mse", "cosine", "in_batch_kl", "anchor_kl", "token")
    for term in terms:
        if getattr(loss, term) and sum(bool(getattr(loss, other)) for other in terms) > 1:
            rows[f"- {term} loss"] = default.model_copy(update={"loss": loss.model_copy(update={term: 0.0})})
        elif getattr(loss, term) and term != "mse":  # the only term: the seed's MSE in its place
            rows[f"- {term} loss (MSE instead)"] = default.model_copy(
                update={"loss": loss.model_copy(update={term: 0.0, "mse": 1.0})})
    if not loss.anchor_kl:
        rows["+ anchor_kl loss (0.1)"] = default.model_copy(update={"loss": loss.model_copy(update={"anchor_kl": 0.1})})
    for kind, name in (("crops", "- crops"), ("general", "- general text")):
        if kind in default.texts:
            rows[name] = default.model_copy(update={"texts": [k for k in default.texts if k != kind]})
    if default.all_contexts and "contexts" in default.texts:
        rows["- dev/test contexts (train split only)"] = default.model_copy(update={"all_contexts": False})
    if default.learning_rate != 2e-4:
        rows["- high lr (2e-4)"] = default.model_copy(update={"learning_rate": 2e-4})
    rows[f"+ higher lr ({2 * default.learning_rate:g})"] = default.model_copy(
        update={"learning_rate": 2 * default.learning_rate})
    steps = default.max_steps or DEFAULT_TRAINING_STEPS
    rows[f"- half budget ({steps // 2} steps)"] = default.model_copy(update={"max_steps": steps // 2})
    rows[f"+ double budget ({steps * 2} steps)"] = default.model_copy(update={"max_steps": steps * 2})
    if default.dropout is not None:
        rows["- dropout 0 (teacher's rate)"] = default.model_copy(update={"dropout": None})
    if default.best_metric != "spearman":
        rows["- top-k selection (spearman)"] = default.model_copy(update={"best_metric": "spearman"})
    if resolve_precision(default.precision, "cpu", bf16_on_cpu=True) == "bf16":  # auto on a CPU with native bf16
        rows["- bf16 on this CPU (fp32)"] = default.model_copy(update={"precision": "fp32"})
    for kind, name in (("crops", "+ crops"), ("general", "+ general text")):
        if kind not in default.texts:
            rows[name] = default.model_copy(update={"texts": [*default.texts, kind]})
    return rows


def additions(default: TrainingConfig) -> dict[str, TrainingConfig]:
    """The default recipe plus a loss term it leaves out (slower rows: the token loss runs the teacher each step)."""
    loss = default.loss
    return {f"+ {term} loss": default.model_copy(update={"loss": loss.model_copy(update={term: weight})})
            for term, weight in (("in_batch_kl", 0.1), ("token", 1.0)) if not getattr(loss, term)}


# Synth settings a row may change (the dataset variants): the previous default's copied sentences, and the
# query-shaped texts of the offline generator. Each variant gets a dataset of its own; one teacher cache serves all.
PREVIOUS_DEFAULT_SYNTH = {"query_shapes": ["sentence"], "questions_per_context": 2}


def synth_variants(default: SynthConfig) -> dict[str, dict]:
    """Ablation rows that change what synth writes: each query shape of the default left out, and the copied
    sentences added (the recipe's training settings stay the default's)."""
    rows: dict[str, dict] = {}
    shapes = list(default.query_shapes)
    if len(shapes) > 1:
        for shape in shapes:
            rows[f"- {shape} texts"] = {"query_shapes": [s for s in shapes if s != shape]}
    for shape in ("span", "sentence"):
        if shape not in shapes:
            rows[f"+ {shape} texts"] = {"query_shapes": [*shapes, shape],
                                        "questions_per_context": default.questions_per_context + 1}
    rows[f"+ queries per context ({2 * default.questions_per_context})"] = {
        "questions_per_context": 2 * default.questions_per_context}
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, help="working folder (default: a new temporary folder)")
    parser.add_argument("--corpus", choices=("faq", "sample"), default="faq",
                        help="faq: the real-question sets of faq_sets.py (scored on real and pseudo-questions); "
                        "sample: the bundled sample corpus (pseudo-questions only, the tables before issue 22)")
    parser.add_argument("--rows", default="seed,previous,default,ablation",
                        help="which of seed,previous,default,ablation,additions,ceiling to run (ceiling: a diagnostic that "
                        "trains on the test questions themselves)")
    parser.add_argument("--layers", default="3,2,1", help="student layer counts for the seed and default rows")
    parser.add_argument("--ablation-layers", type=int, default=2, help="layer count of the ablation rows")
    parser.add_argument("--max-steps", type=int, help="step budget of every row (default: the default recipe's)")
    parser.add_argument("--only", help="keep only rows whose recipe name contains one of these comma-separated words")
    parser.add_argument("--seeds", default="42", help="training seeds, comma-separated; each row is trained per seed")
    parser.add_argument("--crop-spans", type=int, default=2,
                        help="random spans per training context that synth adds to the crops (synth.crop_spans)")
    parser.add_argument("--per-set", action="store_true", help="also print real-question P@10 per set")
    parser.add_argument("--vocabulary", choices=("full", "corpus", "corpus+languages"), default="full",
                        help="the students' vocabulary (students.vocabulary) in every row; a trimmed one names its rows")
    parser.add_argument("--vocabulary-budget", type=int, help="students.vocabulary_budget, with --vocabulary")
    args = parser.parse_args(argv)

    work = args.work or Path(tempfile.mkdtemp(prefix="m3distill-fidelity-"))
    config = load_config(REPO / "configs" / "demo.yaml")
    default = TrainingConfig(max_steps=args.max_steps) if args.max_steps else TrainingConfig()
    default = default.model_copy(update={"max_seq_length": config.training.max_seq_length})
    budget = default.max_steps or DEFAULT_TRAINING_STEPS
    wanted = set(args.rows.split(","))
    counts = [int(n) for n in args.layers.split(",")]
    faq = args.corpus == "faq"
    default_synth = {}

    # The seed recipe kept evenly spaced layers from the first one up; the default uses StudentsConfig's strategy.
    seed_layers, default_layers = "uniform", StudentsConfig().strategy
    runs: list[tuple[str, int, str, TrainingConfig, dict]] = []
    for n in counts:
        if "seed" in wanted:
            runs.append(("seed recipe", n, seed_layers, seed_recipe(default), PREVIOUS_DEFAULT_SYNTH if faq else {}))
        if "previous" in wanted and faq:
            runs.append(("previous default", n, default_layers, default, PREVIOUS_DEFAULT_SYNTH))
        if "default" in wanted:
            runs.append(("default", n, default_layers, default, default_synth))
    if "ablation" in wanted:
        runs += [(name, args.ablation_layers, default_layers, training, default_synth)
                 for name, training in ablations(default).items()]
        if default_layers != seed_layers:
            runs.append((f"- {default_layers} layers ({seed_layers})", args.ablation_layers, seed_layers, default,
                         default_synth))
        if faq:
            runs += [(name, args.ablation_layers, default_layers, default, synth)
                     for name, synth in synth_variants(SynthConfig()).items()]
            # Real questions from outside the corpus as general text: other tools' FAQs (faq_sets.general_questions).
            runs.append(("+ general questions (other FAQs)", args.ablation_layers, default_layers,
                         default.model_copy(update={"texts": [*default.texts, "general"]}),
                         {"general": str(work / "faq" / "general-questions.jsonl"), "general_ratio": 1.0}))
            # More questions per context without fewer passage steps: the contexts repeat within each epoch to the
            # share they have in the default (4,168 of 10,418 texts on this corpus, 0.40).
            many = 3 * SynthConfig().questions_per_context
            runs.append((f"+ queries per context ({many}), contexts kept at 0.4 (context_share)",
                         args.ablation_layers, default_layers, default.model_copy(update={"context_share": 0.4}),
                         {"questions_per_context": many}))
    if "additions" in wanted:
        runs += [(name, args.ablation_layers, default_layers, training, default_synth)
                 for name, training in additions(default).items()]
    if "ceiling" in wanted and faq:
        # Not recipes: the test questions themselves as general text. How close 2 layers come to the teacher on
        # these questions once they are seen tells a capacity limit from a gap in what the students see; with half
        # of them seen (every other question of each set, as a query log would give), the other half shows how far
        # real questions of the same documents carry. The default row is printed beside them on that other half.
        with_general = default.model_copy(update={"texts": [*default.texts, "general"]})
        runs += [("default", args.ablation_layers, default_layers, default, default_synth),
                 ("ceiling: the test questions seen (diagnostic)", args.ablation_layers, default_layers, with_general,
                  {"general": str(work / "faq" / "test-questions-as-general.jsonl"), "general_ratio": 1.0}),
                 ("ceiling: half the test questions seen (diagnostic)", args.ablation_layers, default_layers,
                  with_general,
                  {"general": str(work / "faq" / "test-questions-half-as-general.jsonl"), "general_ratio": 1.0})]
    if args.only:
        runs = [run for run in runs if any(word in run[0] for word in args.only.split(","))]
    runs = list({(run[0], run[1]): run for run in runs}.values())  # --rows default,ceiling: the default row once
    vocabulary = {"vocabulary": args.vocabulary, "vocabulary_budget": args.vocabulary_budget}
    if args.vocabulary != "full":
        trimmed = f" (vocabulary {args.vocabulary}{f' {args.vocabulary_budget}' if args.vocabulary_budget else ''})"
        runs = [(name + trimmed, *rest) for name, *rest in runs]

    if faq:
        bench = FaqBenchmark(config, work, crop_spans=args.crop_spans)
    else:
        dataset_dir, cache_dir = prepare_sample_run(config, work, crop_spans=args.crop_spans)
        evaluation = TestSearch(config, dataset_dir, cache_dir)
    # Rows measured before in this work folder are reused while their student is still there (trained students are
    # skipped by train_students, and measuring one again gives the same figures).
    measured_file = work / "rows.json"
    measured = json.loads(measured_file.read_text()) if measured_file.is_file() else {}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    results = []
    for (name, n_layers, strategy, base_training, synth), seed in itertools.product(runs, seeds):
        training = base_training.model_copy(update={"seed": seed})
        slug = name.replace("- ", "minus ").replace("+ ", "plus ")
        # The recipe's settings name the folder too: a row whose recipe changed (a new default) trains afresh.
        # Settings added since at their neutral value are left out, so the rows measured before them are still found.
        recipe_settings = training.model_copy(update={"seed": 0}).model_dump_json(
            exclude=neutral_added_settings(training))
        if faq:
            recipe_settings += json.dumps(bench.synth(synth).model_dump(mode="json"), sort_keys=True)
        recipe = hashlib.sha256(recipe_settings.encode()).hexdigest()[:8]
        folder = work / "students" / f"{''.join(char if char.isalnum() else '_' for char in slug)}_{recipe}"
        if seed != TrainingConfig().seed:  # the default seed keeps the folder names of runs without --seeds
            folder = folder.with_name(f"{folder.name}_seed{seed}")
        key = f"{folder.name}/{n_layers}"
        if key in measured and is_trained_student(folder / measured[key]["student"]):
            row = measured[key]
            if faq and "real_odd_half" not in row:  # measured before that figure existed: measured again
                row = {**row, **bench.measure(folder / row["student"])}
                _save_row(measured_file, key, row)
        else:
            students = StudentsConfig(layers=[n_layers], strategy=strategy, **vocabulary)
            dataset_dir, cache_dir = bench.prepare(synth) if faq else (dataset_dir, cache_dir)
            result = train_students(dataset_dir, cache_dir, teacher=config.teacher, students=students,
                                    training=training, out_dir=folder, resume=True, show_progress=False)[0]
            row = {"recipe": name, "layers": n_layers, "kept": list(result.layers), "steps": result.global_step,
                   "minutes": result.train_seconds / 60, "student": result.path.name,
                   **(bench.measure(result.path) if faq else evaluation.measure(result.path))}
            _save_row(measured_file, key, row)
        results.append({**row, "seed": seed})
        print(json.dumps(results[-1]), flush=True)

    if faq:
        print_faq_tables(results, seeds, bench, budget, default.batch_size, per_set=args.per_set)
        return 0
    print(f"\nsample corpus, all-MiniLM-L6-v2 teacher (6 layers), {budget} steps x {default.batch_size} texts per "
          f"student; test split: {evaluation.n_questions} questions among {evaluation.n_contexts} contexts"
          + (f"; mean (sd) over seeds {args.seeds}" if len(seeds) > 1 else "") + "\n")
    print("| recipe | student | steps | P@10 | P@50 | P@10 query-side | MRR@10 / teacher's | Spearman | mean cosine | minutes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for start in range(0, len(results), len(seeds)):
        group = results[start : start + len(seeds)]
        first = group[0]
        cells = [_cell([row[key] for row in group], share=key == "mrr_share")
                 for key in ("p@10", "p@50", "query_side_p@10", "mrr_share", "spearman", "mean_cosine")]
        print(f"| {first['recipe']} | {first['layers']}L {first['kept']} | {first['steps']} | {' | '.join(cells)} | "
              f"{np.mean([row['minutes'] for row in group]):.1f} |")
    return 0


def _save_row(measured_file: Path, key: str, row: dict) -> None:
    # Re-read before writing: another fidelity.py on the same work folder may have added rows meanwhile.
    measured = json.loads(measured_file.read_text()) if measured_file.is_file() else {}
    measured[key] = row
    partial = measured_file.with_name(f"{measured_file.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(measured, indent=1))
    partial.replace(measured_file)


def print_faq_tables(results: list[dict], seeds: list[int], bench: FaqBenchmark, budget: int, batch_size: int, *,
                     per_set: bool) -> None:
    groups = [results[start : start + len(seeds)] for start in range(0, len(results), len(seeds))]
    over = f"; mean (sd) over seeds {','.join(map(str, seeds))}" if len(seeds) > 1 else ""
    print(f"\nreal questions: {bench.real.n_questions} people-written questions of {len(bench.real.set_names)} FAQ "
          f"sets, each searched among all {len(bench.real.contexts)} contexts (mean over the sets); all-MiniLM-L6-v2 "
          f"teacher, {budget} steps x {batch_size} texts per student{over}\n")
    print("| recipe | student | steps | P@10 | P@50 | P@10 query-side | MRR@10 / teacher's | R@10 / teacher's | "
          "cos questions | cos passages | pseudo P@10 (sentences) | pseudo P@10 (queries) | minutes |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for group in groups:
        first = group[0]
        cells = [_cell([row["real"]["mean"][key] for row in group], share=key.endswith("share"))
                 for key in ("p@10", "p@50", "query_side_p@10", "mrr_share", "recall_share", "cos_questions",
                             "cos_passages")]
        pseudo = [_cell([row["pseudo"][kind]["p@10"] for row in group]) if kind in first.get("pseudo", {}) else ""
                  for kind in ("sentences", "queries")]
        print(f"| {first['recipe']} | {first['layers']}L {first['kept']} | {first['steps']} | {' | '.join(cells)} | "
              f"{' | '.join(pseudo)} | {np.mean([row['minutes'] for row in group]):.1f} |")
    if per_set:
        names = bench.real.set_names
        print("\nreal-question P@10 per set (questions in brackets)\n")
        print("| recipe | student | " + " | ".join(f"{name} ({len([s for s in bench.real.sets if s == name])})"
                                                  for name in names) + " | mean |")
        print("|---|---|" + "---:|" * (len(names) + 1))
        for group in groups:
            first = group[0]
            cells = [_cell([row["real"][name]["p@10"] for row in group]) for name in (*names, "mean")]
            print(f"| {first['recipe']} | {first['layers']}L {first['kept']} | {' | '.join(cells)} |")
    halves = [group for group in groups if "real_odd_half" in group[0]]
    if any("half the test questions" in group[0]["recipe"] for group in halves):
        print(f"\nthe half of the real questions the 'half seen' ceiling never trained on "
              f"({halves[0][0]['real_odd_half']['questions']} questions; every other one of each set)\n")
        print("| recipe | student | P@10 | P@50 | P@10 query-side | MRR@10 / teacher's | cos questions |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for group in halves:
            first = group[0]
            cells = [_cell([row["real_odd_half"][key] for row in group], share=key.endswith("share"))
                     for key in ("p@10", "p@50", "query_side_p@10", "mrr_share", "cos_questions")]
            print(f"| {first['recipe']} | {first['layers']}L {first['kept']} | {' | '.join(cells)} |")


def _cell(values: list[float], share: bool = False) -> str:
    """A figure over seeds: the mean, and the sample standard deviation in brackets when there are several."""
    scale, digits, unit = (100, 1, "%") if share else (1, 3, "")
    text = f"{np.mean(values) * scale:.{digits}f}{unit}"
    if len(values) > 1:
        text += f" ({np.std(values, ddof=1) * scale:.{digits}f})"
    return text


def prepare_sample_run(config: M3DistillConfig, work: Path, crop_spans: int = 2) -> tuple[Path, Path]:
    sample = REPO / "data" / "sample"
    # The demo leaves general text and crops out; the benchmark makes both (the seed recipe trains on general text,
    # the ablation adds either), at the ratio and crop settings its earlier tables were measured with.
    synth = config.synth.model_copy(update={"corpus": str(sample / "domain"), "general": str(sample / "general"),
                                            "general_ratio": 0.5, "crop_sentences": True, "crop_spans": crop_spans})
    dataset_dir, cache_dir = work / "dataset", work / "teacher_cache"
    synthesize(synth, dataset_dir, tokenizer=config.teacher.model, show_progress=False)
    if not is_complete_cache(cache_dir):
        build_teacher_cache(dataset_dir, config.teacher, cache_dir, show_progress=False)
    return dataset_dir, cache_dir


class TestSearch:
    """The test questions and every context, with the teacher's top-k from the cache (also used by serving.py)."""

    def __init__(self, config: M3DistillConfig, dataset_dir: Path, cache_dir: Path):
        dataset = load_synth_dataset(dataset_dir)
        cache = TeacherCache.open(cache_dir)
        questions = dataset.split_questions("test")
        self.contexts = list(dataset.contexts["text"])
        row_of = {context_id: row for row, context_id in enumerate(dataset.contexts["context_id"])}
        self.questions = list(questions["text"])
        self.own = np.array([row_of[context_id] for context_id in questions["context_id"]])
        self.teacher_q, self.teacher_c = cache.get(self.questions), cache.get(self.contexts)
        self.teacher_top = top_k_rows(self.teacher_q, self.teacher_c)
        self.teacher_mrr = ground_truth_metrics(self.teacher_top, self.own, [10], "exact")[mrr_metric("exact")]
        test_rows = np.flatnonzero(dataset.contexts["split"].to_numpy() == "test")
        n = len(self.questions)
        self.pairs = draw_similarity_pairs(np.arange(n), n + self.own, n + test_rows, 4, seed=42)
        self.test_text_rows = np.concatenate([np.arange(n), n + test_rows])
        self.n_questions, self.n_contexts = n, len(self.contexts)
        self.batch_size = config.evaluation.batch_size

    def top(self, encoded: np.ndarray, k: int = 50) -> np.ndarray:
        """The top-k contexts of every test question, from a model's embeddings of questions + contexts."""
        return top_k_rows(encoded[: self.n_questions], encoded[self.n_questions :], k)

    def fidelity(self, encoded: np.ndarray, reference: np.ndarray, reference_top: np.ndarray) -> dict[str, float]:
        """P@10 against the teacher and against a reference model (its fp32 self), MRR@10 as a share of the
        teacher's, and the mean cosine to the reference's embeddings, from embeddings of questions + contexts."""
        top = self.top(encoded)
        mrr = ground_truth_metrics(top, self.own, [10], "exact")[mrr_metric("exact")]
        return {
            "p@10": top_k_overlap(top, self.teacher_top, 10), "p@10_self": top_k_overlap(top, reference_top, 10),
            "mrr_share": mrr / self.teacher_mrr, "cosine_to_fp32": float(np.mean(row_cosines(encoded, reference))),
        }

    def speed_texts(self) -> list[str]:
        """The test texts: the test questions and the test contexts."""
        return self.questions + [self.contexts[row - self.n_questions] for row in self.test_text_rows[self.n_questions :]]

    def measure(self, student_dir: Path) -> dict[str, float]:
        student = load_sentence_transformer(student_dir, device="cpu")
        encoded = student.encode(self.questions + self.contexts, batch_size=self.batch_size, convert_to_numpy=True,
                                 show_progress_bar=False)
        q, c = encoded[: self.n_questions], encoded[self.n_questions :]
        top = top_k_rows(q, c)
        query_side = top_k_rows(q, self.teacher_c)
        teacher_all = np.concatenate([self.teacher_q, self.teacher_c])
        aligned = alignment_metrics(encoded, teacher_all, self.pairs, text_rows=self.test_text_rows)
        mrr = ground_truth_metrics(top, self.own, [10], "exact")[mrr_metric("exact")]
        return {
            "p@10": top_k_overlap(top, self.teacher_top, 10), "p@50": top_k_overlap(top, self.teacher_top, 50),
            "query_side_p@10": top_k_overlap(query_side, self.teacher_top, 10),
            "mrr_share": mrr / self.teacher_mrr, "spearman": aligned[SPEARMAN_COSINE],
            "mean_cosine": aligned[MEAN_COSINE],
        }


class FaqBenchmark:
    """The FAQ corpus of :mod:`faq_sets` (built into ``work/faq`` once), its dataset variants, one teacher cache
    for all of them, and the scoring of a student on the real questions and on two fixed pseudo-question test sets:
    the copied sentences of the previous default and the query-shaped texts of the current one (the test contexts
    are the same in every variant: splits depend on the context ids and the seed only)."""

    def __init__(self, config: M3DistillConfig, work: Path, crop_spans: int = 2):
        self.config, self.work = config, work
        faq = work / "faq"
        if not (faq / "questions.jsonl").is_file():
            write_sets(faq, list(FAQ_SETS))
        if not (faq / "general-questions.jsonl").is_file():
            (faq / "general-questions.jsonl").write_text(
                "".join(json.dumps({"text": text}) + "\n" for text in general_questions()), encoding="utf-8")
        if not (faq / "test-questions-as-general.jsonl").is_file():  # the --rows ceiling diagnostic only
            texts = [json.loads(line)["text"] for line in (faq / "questions.jsonl").read_text().splitlines()]
            (faq / "test-questions-as-general.jsonl").write_text(
                "".join(json.dumps({"text": text}) + "\n" for text in texts), encoding="utf-8")
        sample = REPO / "data" / "sample"
        # demo.yaml's chunking and splits on the FAQ corpus; general text and crops are made so that the ablation
        # can add them; the generator's settings are m3distill's defaults unless a variant changes them.
        defaults = SynthConfig()
        self.base = config.synth.model_copy(update={
            "corpus": str(faq / "corpus"), "general": str(sample / "general"), "general_ratio": 0.5,
            "crop_sentences": True, "crop_spans": crop_spans,
            "questions_per_context": defaults.questions_per_context, "query_shapes": defaults.query_shapes})
        self.cache_dir = work / "teacher_cache"
        self.questions_file = faq / "questions.jsonl"
        dataset_dir, _ = self.prepare({})
        self.real = RealQuestionSearch(self.questions_file, dataset_dir, self.cache_dir, config.teacher, work,
                                       batch_size=config.evaluation.batch_size)
        self.real.n_questions = len(self.real.questions)
        half = faq / "test-questions-half-as-general.jsonl"  # the --rows ceiling diagnostic only
        if not half.is_file():
            half.write_text("".join(json.dumps({"text": text}) + "\n" for text in self.real.even_half_texts()),
                            encoding="utf-8")
        self.pseudo = {"sentences": self._pseudo_questions(PREVIOUS_DEFAULT_SYNTH)}
        if "sentence" not in defaults.query_shapes:
            self.pseudo["queries"] = self._pseudo_questions({})

    def synth(self, overrides: dict) -> SynthConfig:
        return self.base.model_copy(update=overrides)

    def prepare(self, overrides: dict) -> tuple[Path, Path]:
        """The dataset of a variant (made once) and the shared teacher cache, extended with its texts."""
        synth = self.synth(overrides)
        digest = hashlib.sha256(json.dumps(synth.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()[:8]
        dataset_dir = self.work / "datasets" / digest
        synthesize(synth, dataset_dir, tokenizer=self.config.teacher.model, show_progress=False)
        build_teacher_cache(dataset_dir, self.config.teacher, self.cache_dir, show_progress=False)
        return dataset_dir, self.cache_dir

    def _pseudo_questions(self, overrides: dict) -> dict:
        dataset_dir, _ = self.prepare(overrides)
        dataset = load_synth_dataset(dataset_dir)
        questions = dataset.split_questions("test")
        row_of = {context_id: row for row, context_id in enumerate(self.real.contexts_ids)}
        texts = list(questions["text"])
        teacher_q = TeacherCache.open(self.cache_dir).get(texts)
        return {"texts": texts, "own": np.array([row_of[c] for c in questions["context_id"]]),
                "teacher_q": teacher_q, "teacher_top": top_k_rows(teacher_q, self.real.teacher_c)}

    def measure(self, student_dir: Path) -> dict:
        student = load_sentence_transformer(student_dir, device="cpu")
        encode = lambda texts: student.encode(texts, batch_size=self.config.evaluation.batch_size,  # noqa: E731
                                              convert_to_numpy=True, show_progress_bar=False)
        contexts = encode(self.real.contexts)
        questions = encode(self.real.questions)
        figures = {"real": self.real.measure(questions, contexts), "pseudo": {},
                   "real_odd_half": self.real.measure(questions, contexts, only=self.real.odd_half())["mean"]}
        for kind, pseudo in self.pseudo.items():
            q = encode(pseudo["texts"])
            figures["pseudo"][kind] = {
                "questions": len(pseudo["texts"]),
                "p@10": top_k_overlap(top_k_rows(q, contexts), pseudo["teacher_top"], 10),
                "query_side_p@10": top_k_overlap(top_k_rows(q, self.real.teacher_c), pseudo["teacher_top"], 10),
                "cos_questions": float(np.mean(row_cosines(q, pseudo["teacher_q"]))),
            }
        return figures


def top_k_rows(queries: np.ndarray, contexts: np.ndarray, k: int = 50) -> np.ndarray:
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = contexts / np.linalg.norm(contexts, axis=1, keepdims=True)
    return np.argsort(-(q @ c.T), axis=1, kind="stable")[:, :k]


if __name__ == "__main__":
    sys.exit(main())
