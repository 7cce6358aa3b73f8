"""Distillation training: students get closer to the teacher, resume from checkpoints, and save plain folders."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sentence_transformers import SentenceTransformer
from sentence_transformers.sentence_transformer.evaluation import MSEEvaluator

from m3distill.cli import main
from m3distill.config import StudentsConfig, TeacherConfig, TrainingConfig
from m3distill.data.dataset import load_synth_dataset
from m3distill.errors import M3DistillError
from m3distill.models import count_parameters
from m3distill.students.build import build_student
from m3distill.teacher.cache import TeacherCache, build_teacher_cache
from m3distill.stages.train import train_students
from m3distill.training import STUDENT_METADATA_FILE, distil_students, is_trained_student, read_student_metadata
from m3distill.training import dev_set, distill
from m3distill.training.dev_set import CachedMSEEvaluator, build_dev_set, dev_evaluator, dev_metrics


@pytest.fixture(scope="module")
def minilm_cache(small_dataset, minilm_teacher, minilm_path, tmp_path_factory) -> Path:
    """The MiniLM teacher's cache of the small dataset (~460 texts)."""
    out = tmp_path_factory.mktemp("minilm-cache") / "teacher_cache"
    build_teacher_cache(small_dataset, TeacherConfig(model=str(minilm_path), batch_size=32), out,
                        model=minilm_teacher, show_progress=False)
    return out


@pytest.fixture(scope="module")
def tiny_cache(small_dataset, tiny_xlmr_path, tmp_path_factory) -> Path:
    """The tiny XLM-R stand-in's cache of the small dataset: training on it takes milliseconds per step."""
    out = tmp_path_factory.mktemp("tiny-cache") / "teacher_cache"
    build_teacher_cache(small_dataset, TeacherConfig(model=str(tiny_xlmr_path), device="cpu"), out, show_progress=False)
    return out


@pytest.mark.slow
def test_two_layer_student_gets_closer_to_the_teacher(small_dataset, minilm_cache, minilm_teacher, minilm_path, tmp_path):
    students = StudentsConfig(layers=[2], strategy="search", search_candidates=3)
    training = TrainingConfig(max_steps=100, batch_size=16, max_seq_length=64, learning_rate=2e-4, eval_steps=50)
    [result] = distil_students(small_dataset, minilm_cache, teacher=TeacherConfig(model=str(minilm_path)),
                               students=students, training=training, out_dir=tmp_path, show_progress=False)
    before, after = result.dev_before, result.dev_after
    assert after["mse"] < before["mse"]
    assert after["spearman_cosine"] > before["spearman_cosine"]
    assert after["mean_cosine"] > before["mean_cosine"]
    assert result.global_step == 100 and result.name == "student-2L" and result.path == tmp_path / "student-2L"

    # The search scored every candidate by dev top-10 agreement (ties by MSE), best first; the student keeps the best.
    search = result.search
    scores = [(-candidate["top_k"], candidate["mse"]) for candidate in search["candidates"]]
    assert len(scores) == 3 and scores == sorted(scores) and list(result.layers) == search["best"]
    assert all(0 <= candidate["top_k"] <= 1 for candidate in search["candidates"])

    # The folder is a plain sentence-transformers model that gives the evaluated embeddings.
    folder = result.path
    reloaded = SentenceTransformer(str(folder), device="cpu")
    assert reloaded.max_seq_length == 64
    dev = build_dev_set(load_synth_dataset(small_dataset), TeacherCache.open(minilm_cache), max_texts=training.max_dev_texts,
                        seed=training.seed)
    again = dev_metrics(dev_evaluator(dev, batch_size=16)(reloaded))
    assert again == pytest.approx(after, abs=1e-6)

    metadata = read_student_metadata(folder)
    cut = build_student(minilm_teacher, result.layers)
    assert metadata["parameters"]["student"] == count_parameters(reloaded) == count_parameters(cut)
    assert metadata["parameters"]["teacher"] == count_parameters(minilm_teacher)
    # By default the student also learnt the dev and test contexts (never their questions).
    dataset = load_synth_dataset(small_dataset)
    held_out_contexts = set(dataset.texts(["dev", "test"], ["contexts"])) - set(dataset.texts(["train"], training.texts))
    assert held_out_contexts and metadata["data"]["all_contexts"] is True
    assert metadata["data"]["train_texts"] == len(dataset.texts(["train"], training.texts)) + len(held_out_contexts)
    assert metadata["training"]["train_loss_last"] < metadata["training"]["train_loss_first"]
    card = (folder / "README.md").read_text()
    assert "before training" in card and f"{after['spearman_cosine']:.4f}" in card and "Layer search" in card
    assert f"of the train split, plus the dev and test contexts): {metadata['data']['train_texts']:,}" in card
    assert not (folder / "checkpoints").exists() and not (folder / "run.json").exists()
    assert list((folder / "logs").glob("events.out.tfevents.*"))

    # Loading needs nothing from m3distill.
    script = (
        "import sys, numpy as np; from sentence_transformers import SentenceTransformer; "
        f"model = SentenceTransformer({str(folder)!r}, device='cpu'); "
        f"np.save({str(tmp_path / 'plain.npy')!r}, model.encode({dev.texts[:8]!r})); "
        "assert not [name for name in sys.modules if name.startswith('m3distill')]"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    np.testing.assert_allclose(np.load(tmp_path / "plain.npy"), reloaded.encode(dev.texts[:8]), atol=1e-6)

    # The train stage reads a current student from its folder; the training itself never replaces a finished one.
    [again_result] = train_students(small_dataset, minilm_cache, teacher=TeacherConfig(model=str(minilm_path)),
                                    students=students, training=training, out_dir=tmp_path)
    assert again_result.skipped and again_result.dev_after == after
    with pytest.raises(M3DistillError, match="holds a finished student"):
        distil_students(small_dataset, minilm_cache, teacher=TeacherConfig(model=str(minilm_path)),
                        students=students, training=training, out_dir=tmp_path)


def test_cached_mse_evaluator_equals_sentence_transformers_mse_evaluator(small_dataset, minilm_cache, minilm_teacher):
    texts = load_synth_dataset(small_dataset).texts(["dev"])[:24]
    student = build_student(minilm_teacher, [0, 5])
    reference = MSEEvaluator(texts, texts, teacher_model=minilm_teacher, write_csv=False, name="dev")(student)
    cached = CachedMSEEvaluator(texts, TeacherCache.open(minilm_cache).get(texts), name="dev")(student)
    assert cached["dev_negative_mse"] == pytest.approx(reference["dev_negative_mse"], abs=1e-6)
    student_embeddings, teacher_embeddings = student.encode(texts), minilm_teacher.encode(texts)
    cosines = np.sum(student_embeddings * teacher_embeddings, axis=1)  # both are unit length
    assert cached["dev_mean_cosine"] == pytest.approx(float(cosines.mean()), abs=1e-5)


def test_only_process_zero_checks_the_student_folders_it_writes(small_dataset, tiny_cache, tiny_xlmr_path, tmp_path,
                                                                monkeypatch):
    # Under torchrun, process 1 can look in while process 0 writes run.json through a temporary file: to process 1
    # the folder then holds files that are not a student's. Only process 0, which writes the folders, checks them.
    folder = tmp_path / "student-2L"
    folder.mkdir()
    (folder / ".run.json.tmp").write_text("{")
    teacher = TeacherConfig(model=str(tiny_xlmr_path), device="cpu")
    monkeypatch.setattr(distill._TrainingJob, "train", lambda self, plan, student_dir, resume: plan.name)
    train = dict(teacher=teacher, students=[[0, 2]], training=TrainingConfig(max_steps=2), out_dir=tmp_path,
                 show_progress=False)
    monkeypatch.setenv("RANK", "1")
    assert distil_students(small_dataset, tiny_cache, **train) == ["student-2L"]
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(M3DistillError, match="not an m3distill student"):
        distil_students(small_dataset, tiny_cache, **train)


def test_interrupted_training_resumes_from_its_checkpoint(
    small_dataset, tiny_cache, tiny_xlmr_path, tmp_path, monkeypatch
):
    teacher = TeacherConfig(model=str(tiny_xlmr_path), device="cpu")
    training = TrainingConfig(max_steps=4, save_steps=2, batch_size=8, learning_rate=1e-3, max_dev_texts=40)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(distill._TrainingJob, "_write_student", killed)
        with pytest.raises(KeyboardInterrupt):
            distil_students(small_dataset, tiny_cache, teacher=teacher, students=[[0, 2]], training=training,
                           out_dir=tmp_path, show_progress=False)
    student_dir = tmp_path / "student-2L"
    assert not is_trained_student(student_dir)
    assert sorted(p.name for p in (student_dir / "checkpoints").glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]

    # Without --resume an unfinished student is a clear error, before anything is touched.
    with pytest.raises(M3DistillError, match="pass --resume"):
        distil_students(small_dataset, tiny_cache, teacher=teacher, students=[[0, 2]], training=training,
                       out_dir=tmp_path, show_progress=False)
    # Resuming with other layers would mix two students.
    with pytest.raises(M3DistillError, match="started with layers"):
        distil_students(small_dataset, tiny_cache, teacher=teacher, students=[[1, 3]], training=training,
                       out_dir=tmp_path, resume=True, show_progress=False)

    longer = training.model_copy(update={"max_steps": 6})
    [result] = distil_students(small_dataset, tiny_cache, teacher=teacher, students=[[0, 2]], training=longer,
                              out_dir=tmp_path, resume=True, show_progress=False)
    settings = result.metadata["training"]
    assert settings["resumed_from_step"] == 4 and settings["steps_this_run"] == 2 and result.global_step == 6
    assert is_trained_student(student_dir) and not (student_dir / "checkpoints").exists()


def test_cache_of_another_teacher_is_refused_for_training(small_dataset, tiny_cache, minilm_path, tmp_path):
    with pytest.raises(M3DistillError, match="made by another teacher: teacher.model contents changed"):
        train_students(small_dataset, tiny_cache, teacher=TeacherConfig(model=str(minilm_path)), students=[[0, 1]],
                       training=TrainingConfig(max_steps=1), out_dir=tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--layers", "3,9"], "cannot be cut from a 4-layer teacher"),
        (["--plan", "0,4"], "out of range"),
        (["--plan", "0,1", "--plan", "2,3"], "share the folder student-2L"),
        (["--layers", "2", "--data", "{tmp}/missing"], "dataset directory not found"),
        (["--layers", "2", "--cache", "{tmp}/missing"], "teacher cache not found"),
        (["--layers", "2", "--teacher", "{tmp}/missing"], "model folder not found"),
    ],
)
def test_train_cli_bad_inputs_are_one_line_errors(arguments, message, small_dataset, tiny_cache, tmp_path, capsys):
    arguments = [argument.replace("{tmp}", str(tmp_path)) for argument in arguments]
    base = ["-q", "train", "--data", str(small_dataset), "--cache", str(tiny_cache), "--out", str(tmp_path / "students"),
            "--max-steps", "1"]
    assert main(base + arguments) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]  # (transformers' loading bar may come first)
    assert error.startswith("m3distill train: error:") and message in error
    assert not (tmp_path / "students").exists()


def test_train_cli_trains_each_layer_count(small_dataset, tiny_cache, tmp_path, capsys):
    out = tmp_path / "students"
    assert main(["-q", "train", "--data", str(small_dataset), "--cache", str(tiny_cache), "--out", str(out),
                 "--layers", "2,1", "--max-steps", "3", "--batch-size", "8", "--lr", "1e-3"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("m3distill train:") and "student-2L (layers 0,3" in line and "student-1L (layers 3," in line
    assert sorted(p.name for p in out.iterdir()) == ["student-1L", "student-2L"]
    metadata = json.loads((out / "student-1L" / STUDENT_METADATA_FILE).read_text())
    assert metadata["layers"] == [3] and metadata["training"]["learning_rate"] == 1e-3  # spread: the last layer
    assert metadata["teacher"]["name"] == json.loads((tiny_cache / "manifest.json").read_text())["teacher"]["name"]


def test_length_grouped_batches_cover_every_text_once_with_less_padding():
    from datasets import Dataset

    from m3distill.training.sampler import LengthGroupedBatchSampler

    rng = np.random.default_rng(0)
    texts = ["x" * int(length) for length in rng.integers(5, 400, size=1000)]
    sampler = LengthGroupedBatchSampler(Dataset.from_dict({"text": texts}), batch_size=16, drop_last=False, seed=3)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 63
    assert sorted(i for batch in batches for i in batch) == list(range(1000))
    assert batches == list(sampler)  # the same order again: a resumed run replays it
    sampler.set_epoch(1)
    assert list(sampler) != batches

    def padding(groups):  # characters of padding to each batch's longest text
        return sum(max(len(texts[i]) for i in group) * len(group) - sum(len(texts[i]) for i in group) for group in groups)

    shuffled = rng.permutation(1000).tolist()
    assert padding(batches) < padding([shuffled[i : i + 16] for i in range(0, 1000, 16)]) / 5


def test_context_grouped_batches_keep_each_context_with_its_questions():
    from datasets import Dataset

    from m3distill.training.sampler import ContextGroupedBatchSampler, register_text_groups

    # 40 contexts, each with 2 questions and a crop, plus 40 general texts in groups of their own; shuffled rows.
    rng = np.random.default_rng(1)
    rows = [(f"context {c} text {kind}", c) for c in range(40) for kind in ("c", "q1", "q2", "crop")]
    rows += [(f"general {g}", 100 + g) for g in range(40)]
    rows = [rows[i] for i in rng.permutation(len(rows))]
    texts, groups = [text for text, _ in rows], [group for _, group in rows]
    register_text_groups(texts, groups)
    sampler = ContextGroupedBatchSampler(Dataset.from_dict({"text": texts}), batch_size=16, drop_last=False, seed=5)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 13
    assert sorted(i for batch in batches for i in batch) == list(range(len(texts)))
    # Every group lies in one batch unless a batch boundary cut it: at most 2 groups per batch are split.
    batch_of = {i: n for n, batch in enumerate(batches) for i in batch}
    split = [g for g in set(groups) if len({batch_of[i] for i, gi in enumerate(groups) if gi == g}) > 1]
    assert len(split) <= len(batches) - 1
    assert all(len({groups[i] for i in batch}) >= 4 for batch in batches[:-1])  # other contexts share the batch
    assert batches == list(sampler)  # the same order again: a resumed run replays it
    sampler.set_epoch(1)
    assert list(sampler) != batches
    # Texts never registered fall back to groups of one.
    lone = ContextGroupedBatchSampler(Dataset.from_dict({"text": ["a", "b", "c"]}), batch_size=2, drop_last=True)
    assert [len(batch) for batch in lone] == [2]


def test_every_loss_term_trains_through_the_cli(small_dataset, tiny_cache, tmp_path, capsys):
    out = tmp_path / "students"
    assert main(["-q", "train", "--data", str(small_dataset), "--cache", str(tiny_cache), "--out", str(out),
                 "--layers", "1", "--max-steps", "2", "--batch-size", "8", "--loss-mse", "1", "--loss-cosine", "0.5",
                 "--loss-in-batch-kl", "0.2", "--loss-anchor-kl", "0.3", "--loss-token", "2",
                 "--texts", "contexts,questions", "--best-metric", "spearman", "--no-all-contexts"]) == 0
    assert "dev spearman" in capsys.readouterr().out
    metadata = read_student_metadata(out / "student-1L")
    loss = metadata["training"]["loss"]
    assert (loss["mse"], loss["cosine"], loss["in_batch_kl"], loss["anchor_kl"], loss["token"]) == (1, 0.5, 0.2, 0.3, 2)
    assert metadata["training"]["texts"] == ["contexts", "questions"] and metadata["training"]["global_step"] == 2
    dataset = load_synth_dataset(small_dataset)
    assert metadata["data"]["train_texts"] == len(dataset.texts(["train"], ["contexts", "questions"]))
    assert metadata["data"]["all_contexts"] is False
    assert metadata["training"]["texts_seen"] == 16


def test_students_learn_every_context_of_the_corpus_but_no_dev_or_test_question(small_dataset):
    dataset = load_synth_dataset(small_dataset)
    contexts, questions = dataset.contexts, dataset.questions
    held_out = contexts["split"] != "train"
    assert held_out.any() and (questions["split"] != "train").any()

    texts = distill.training_texts(dataset, TrainingConfig(texts=["contexts", "questions", "general"]))
    assert set(texts) == set(contexts["text"]) | set(dataset.texts(["train"], ["questions", "general"]))
    assert len(texts) == len(set(texts))
    unseen_questions = set(questions.loc[questions["split"] != "train", "text"]) - set(contexts["text"])
    assert unseen_questions and not unseen_questions & set(texts)
    # The train split's texts come first, in the order they always had; the other contexts follow.
    train_only = dataset.texts(["train"], ["contexts", "questions", "general"])
    assert texts[: len(train_only)] == train_only

    # all_contexts off, or no contexts among the kinds: the train split alone.
    kept_out = TrainingConfig(texts=["contexts", "questions"], all_contexts=False)
    assert distill.training_texts(dataset, kept_out) == dataset.texts(["train"], ["contexts", "questions"])
    questions_only = TrainingConfig(texts=["questions"])
    assert distill.training_texts(dataset, questions_only) == dataset.texts(["train"], ["questions"])


def test_context_share_repeats_every_context_equally_until_they_make_up_the_share():
    texts = ["c1", "c2", "q1", "q2", "q3", "q4", "q5", "q6", "q7", "q8"]
    contexts = {"c1", "c2", "other"}
    assert distill.context_repeats(texts, contexts, None).tolist() == list(range(10))  # unset: each text once
    rows = distill.context_repeats(texts, contexts, 0.4)
    epoch = [texts[row] for row in rows]
    # 2 contexts against 8 questions: three copies each (6 of 14, 0.43), the fewest that reach 0.4.
    assert sorted(epoch) == sorted(texts + ["c1", "c2"] * 2)
    assert epoch[:10] == texts  # every text in its place first, the copies after
    assert distill.context_repeats(texts, contexts, 0.1).tolist() == list(range(10))  # already above the share
    assert distill.context_repeats(["q1", "q2"], contexts, 0.5).tolist() == [0, 1]  # no contexts to repeat
    with pytest.raises(ValueError, match="context_share"):
        TrainingConfig(context_share=1.0)


@pytest.mark.slow
def test_context_share_trains_on_the_repeated_contexts_and_records_it(small_dataset, tiny_cache, tmp_path,
                                                                      tiny_xlmr_path):
    dataset = load_synth_dataset(small_dataset)
    distinct = distill.training_texts(dataset, TrainingConfig())
    n_contexts = len(dataset.contexts)
    training = TrainingConfig(max_steps=2, batch_size=8, max_dev_texts=20, context_share=0.9)
    [result] = distil_students(small_dataset, tiny_cache, teacher=TeacherConfig(model=str(tiny_xlmr_path)),
                              students=StudentsConfig(layers=[1]), training=training, out_dir=tmp_path,
                              show_progress=False)
    metadata = read_student_metadata(result.path)
    copies = int(np.ceil(0.9 * (len(distinct) - n_contexts) / (0.1 * n_contexts)))
    assert copies > 1
    assert metadata["data"]["train_texts"] == len(distinct)
    assert metadata["data"]["epoch_texts"] == len(distinct) + (copies - 1) * n_contexts
    assert metadata["training"]["context_share"] == 0.9
    # The setting is part of the student's identity once set; unset, it leaves earlier students current.
    from m3distill.training.record import student_fingerprint
    plan = {"n_layers": 1}
    unset = student_fingerprint("d", {}, TrainingConfig(), plan)
    assert "training.context_share" not in unset.parts
    assert student_fingerprint("d", {}, TrainingConfig(context_share=0.5), plan).digest != unset.digest


def test_crops_asked_of_a_dataset_without_them_train_without_them_and_say_so(small_dataset, tiny_cache, tmp_path,
                                                                             caplog, tiny_xlmr_path):
    assert TrainingConfig().texts == ["contexts", "questions"]  # crops are off by default, in synth too
    dataset = load_synth_dataset(small_dataset)
    assert dataset.crops.empty
    training = TrainingConfig(max_steps=2, batch_size=8, max_dev_texts=20, texts=["contexts", "questions", "crops"])
    with caplog.at_level(logging.INFO, logger="m3distill"):
        [result] = distil_students(small_dataset, tiny_cache, teacher=TeacherConfig(model=str(tiny_xlmr_path)),
                                  students=StudentsConfig(layers=[1]), training=training, out_dir=tmp_path,
                                  show_progress=False)
    warnings = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("asks for crops" in line and "synth.crop_sentences" in line for line in warnings)
    metadata = read_student_metadata(result.path)
    assert metadata["data"]["train_texts"] == len(distill.training_texts(dataset, TrainingConfig()))


def test_training_shows_one_bar_per_student_and_one_dev_line_per_evaluation(small_dataset, tiny_cache, tmp_path,
                                                                            capsys, caplog, tiny_xlmr_path):
    training = TrainingConfig(max_steps=6, eval_steps=3, batch_size=8, max_dev_texts=20, early_stopping_patience=None)
    with caplog.at_level(logging.INFO, logger="m3distill"):
        distil_students(small_dataset, tiny_cache, teacher=TeacherConfig(model=str(tiny_xlmr_path)),
                       students=StudentsConfig(layers=[2]), training=training, out_dir=tmp_path, show_progress=True)
    captured = capsys.readouterr()
    output = captured.out + captured.err
    assert "student-2L: " in output and ("step/s" in output or "s/step" in output)  # the student's own bar
    dev_lines = [record.getMessage() for record in caplog.records if "student-2L step " in record.getMessage()]
    assert [line.split("student-2L step ")[1].split(":")[0] for line in dev_lines] == ["3/6", "6/6"]
    assert all("teacher_p@10" in line or "spearman_cosine" in line for line in dev_lines)
    assert "{'loss'" not in output and "'eval_" not in output  # none of the Trainer's raw log dicts


def test_students_train_without_dropout_by_default_and_keep_the_teachers_rate_on_disk(tiny_xlmr_path, monkeypatch,
                                                                                     small_dataset, tiny_cache,
                                                                                     tmp_path):
    assert TrainingConfig().dropout == 0.0
    seen: list[float] = []
    real_init = distill._HeadsTrainer.__init__

    def recording_init(self, *args, model, **kwargs):
        seen.extend(m.p for m in model.modules() if isinstance(m, torch.nn.Dropout))
        real_init(self, *args, model=model, **kwargs)

    monkeypatch.setattr(distill._HeadsTrainer, "__init__", recording_init)
    for rate, out in ((None, tmp_path / "teacher-rate"), (0.0, tmp_path / "off")):
        seen.clear()
        training = TrainingConfig(max_steps=2, batch_size=8, max_dev_texts=20, dropout=rate)
        [result] = distil_students(small_dataset, tiny_cache, teacher=TeacherConfig(model=str(tiny_xlmr_path)),
                                  students=StudentsConfig(layers=[1]), training=training, out_dir=out,
                                  show_progress=False)
        teacher_rate = SentenceTransformer(str(tiny_xlmr_path), device="cpu")[0].auto_model.config.hidden_dropout_prob
        assert teacher_rate > 0 and seen
        assert set(seen) == ({0.0} if rate == 0.0 else {teacher_rate})
        saved = json.loads((result.path / "config.json").read_text())
        assert saved["hidden_dropout_prob"] == teacher_rate


@pytest.mark.parametrize("native_bf16, expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_trains_in_bf16_where_the_cpu_computes_it_and_saves_fp32_weights(
    native_bf16, expected, small_dataset, tiny_cache, tiny_xlmr_path, tmp_path, monkeypatch, caplog
):
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": native_bf16, "amx_bf16": False})
    autocast_dtypes: list[torch.dtype | None] = []  # per training step
    dev_dtypes: list[torch.dtype | None] = []  # per batch of the dev evaluations
    real_build = distill.build_student

    def recording_build(*args, **kwargs):
        student = real_build(*args, **kwargs)

        def record(module, inputs):
            dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
            if module.training:
                autocast_dtypes.append(dtype)
            elif in_dev_evaluation:
                dev_dtypes.append(dtype)

        student[0].register_forward_pre_hook(record)
        return student

    monkeypatch.setattr(distill, "build_student", recording_build)
    in_dev_evaluation = False
    real_evaluate = dev_set._DevEvaluator.__call__

    def marked_evaluate(self, *args, **kwargs):
        nonlocal in_dev_evaluation
        in_dev_evaluation = True
        try:
            return real_evaluate(self, *args, **kwargs)
        finally:
            in_dev_evaluation = False

    monkeypatch.setattr(dev_set._DevEvaluator, "__call__", marked_evaluate)
    training = TrainingConfig(max_steps=2, batch_size=8, max_dev_texts=20)
    assert training.precision == "auto"
    with caplog.at_level(logging.INFO, logger="m3distill"):
        [result] = distil_students(small_dataset, tiny_cache, teacher=TeacherConfig(model=str(tiny_xlmr_path)),
                                  students=StudentsConfig(layers=[1]), training=training, out_dir=tmp_path,
                                  show_progress=False)
    assert result.metadata["training"]["precision"] == expected
    assert autocast_dtypes == [torch.bfloat16 if native_bf16 else None] * 2  # each step's forward pass
    # The dev evaluations, which pick the checkpoint kept, stay fp32 inside a bf16 Trainer too.
    assert dev_dtypes and set(dev_dtypes) == {None}
    assert any(f"computing in {expected}" in record.getMessage() for record in caplog.records)
    student = SentenceTransformer(str(result.path), device="cpu")
    assert {parameter.dtype for parameter in student.parameters()} == {torch.float32}
