"""Real questions in the evaluation (`evaluation.real_questions`): people's questions searched like the test ones."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pandas as pd
import pytest
from sentence_transformers import SentenceTransformer

from m3distill.config import EvaluationConfig, M3DistillConfig, SpeedConfig, TeacherConfig, load_config
from m3distill.data.dataset import load_synth_dataset
from m3distill.data.real_questions import load_real_questions
from m3distill.errors import M3DistillError
from m3distill.evaluation.evaluate import evaluate_models
from m3distill.layout import REPORT_MD_FILE
from m3distill.report import load_report
from m3distill.stages import EvaluateStage
from m3distill.students.build import build_student

TINY_SPEED = SpeedConfig(n_texts=8, batch_size=8, repeats=1, warmup_batches=0, min_seconds_per_repeat=0)


@pytest.fixture(scope="module")
def student_1l(minilm_teacher, tmp_path_factory):
    folder = tmp_path_factory.mktemp("real-q-student") / "student-1L"
    build_student(minilm_teacher, [5]).save(str(folder))
    return folder


def _questions_file(dataset_dir, folder):
    """Questions about the dataset's English documents (with their doc_id), two without one, one of another corpus."""
    contexts = load_synth_dataset(dataset_dir).contexts
    english = contexts[contexts["language"] == "en"].drop_duplicates("doc_id")
    lines = [{"text": f"How does {' '.join(text.split()[:3])} work?", "doc_id": doc_id}
             for text, doc_id in zip(english["text"], english["doc_id"])]
    lines += [{"text": "how do I see free memory"}, {"text": "Which packages are installed?", "doc_id": ""},
              {"text": "Where is the shadow password file?", "doc_id": "en/not-in-this-corpus.txt"}]
    path = folder / "questions.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path, lines


def test_real_questions_match_an_independent_numpy_search(minilm_path, student_1l, small_dataset, tmp_path):
    questions_file, lines = _questions_file(small_dataset, tmp_path)
    config = EvaluationConfig(k=[5, 10], speed=TINY_SPEED, real_questions=str(questions_file), onnx_variants=False)
    report = evaluate_models(small_dataset, TeacherConfig(model=str(minilm_path)), [student_1l], config,
                             tmp_path / "report", show_progress=False)

    answered = [row for row, line in enumerate(lines) if line.get("doc_id", "").startswith("en/man")]
    assert len(answered) >= 3 and report.real_questions.n_questions == len(lines)
    # The two without a doc_id and the one of another corpus are not answered.
    assert report.real_questions.n_answered == len(answered) == len(lines) - 3
    # The same search in numpy, with every context indexed (distractors: all).
    contexts = load_synth_dataset(small_dataset).contexts.drop_duplicates("context_id").reset_index(drop=True)
    texts = [line["text"] for line in lines]
    rows_of = {doc: np.flatnonzero(contexts["doc_id"].to_numpy() == doc) for doc in contexts["doc_id"]}
    teacher, student = (SentenceTransformer(str(path), device="cpu") for path in (minilm_path, student_1l))
    t_q, t_c = teacher.encode(texts, normalize_embeddings=True), teacher.encode(list(contexts["text"]),
                                                                                normalize_embeddings=True)
    s_q, s_c = student.encode(texts, normalize_embeddings=True), student.encode(list(contexts["text"]),
                                                                               normalize_embeddings=True)
    t_top, s_top, side_top = (np.argsort(-(q @ c.T), axis=1) for q, c in ((t_q, t_c), (s_q, s_c), (s_q, t_c)))
    metrics = report.students[0].metrics
    for k in (5, 10):
        expected = np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(s_top, t_top)])
        assert metrics[f"real_questions_exact_overlap@{k}"] == pytest.approx(expected, abs=0.02)
        expected_side = np.mean([len(set(a[:k]) & set(b[:k])) / k for a, b in zip(side_top, t_top)])
        assert metrics[f"real_questions_query_side_exact_overlap@{k}"] == pytest.approx(expected_side, abs=0.02)

    def mrr(top):
        ranks = [next((rank for rank, row in enumerate(top[q][:10], 1) if row in set(rows_of[lines[q]["doc_id"]])),
                      None) for q in answered]
        return np.mean([1 / rank if rank else 0.0 for rank in ranks])

    assert report.teacher.metrics["real_questions_exact_mrr@10"] == pytest.approx(mrr(t_top), abs=0.02)
    assert metrics["real_questions_exact_mrr@10"] == pytest.approx(mrr(s_top), abs=0.02)
    assert metrics["real_questions_mean_cosine"] == pytest.approx(float(np.mean(np.sum(s_q * t_q, axis=1))), abs=1e-4)

    markdown = (tmp_path / "report" / REPORT_MD_FILE).read_text()
    assert markdown.index("## Real questions") < markdown.index("## Top-k overlap between models")
    assert f"| student-1L | {metrics['real_questions_exact_overlap@10']:.3f} |" in markdown
    assert load_report(tmp_path / "report").real_questions == report.real_questions


def test_a_report_without_real_questions_reads_as_before(minilm_path, student_1l, small_dataset, tmp_path):
    config = EvaluationConfig(k=[5], distractors="test", speed=TINY_SPEED, onnx_variants=False)
    report = evaluate_models(small_dataset, TeacherConfig(model=str(minilm_path)), [student_1l], config,
                             tmp_path / "report", show_progress=False)
    assert report.real_questions is None
    assert not any(name.startswith("real_questions") for name in report.students[0].metrics)
    assert "## Real questions" not in (tmp_path / "report" / REPORT_MD_FILE).read_text()
    # A version-4 report (before real questions) still loads.
    data = json.loads((tmp_path / "report" / "report.json").read_text())
    data["schema_version"] = 4
    del data["real_questions"]
    (tmp_path / "report" / "report.json").write_text(json.dumps(data))
    assert load_report(tmp_path / "report").real_questions is None


@pytest.mark.parametrize("content, suffix, message", [
    ('{"question": "no text column"}\n', ".jsonl", "no 'text' column"),
    ('{"text": 12}\n{"text": 13}\n', ".jsonl", "must hold strings"),
    ("text\n\n", ".csv", "holds no question"),
    ("what?\n", ".txt", "must be one of"),
])
def test_unusable_question_files_are_refused_in_one_line(tmp_path, content, suffix, message):
    path = tmp_path / f"questions{suffix}"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(M3DistillError, match=message) as error:
        load_real_questions(path)
    assert "\n" not in str(error.value)
    with pytest.raises(M3DistillError, match="not found"):
        load_real_questions(tmp_path / "missing.jsonl")


def test_csv_and_parquet_questions_read_like_jsonl(tmp_path):
    frame = pd.DataFrame({"text": ["How do I  list files?", "what is dpkg"], "doc_id": ["en/ls.txt", None]})
    frame.to_parquet(tmp_path / "q.parquet")
    frame.fillna("").to_csv(tmp_path / "q.csv", index=False)
    for name in ("q.parquet", "q.csv"):
        questions = load_real_questions(tmp_path / name)
        assert questions.texts == ["How do I list files?", "what is dpkg"]
        assert questions.doc_ids == ["en/ls.txt", None]


def test_the_report_is_stale_when_the_questions_change_not_when_they_move(small_dataset, student_1l, minilm_path,
                                                                           tmp_path):
    questions_file, _ = _questions_file(small_dataset, tmp_path)
    config = M3DistillConfig(teacher=TeacherConfig(model=str(minilm_path)),
                             evaluation=EvaluationConfig(k=[5], speed=TINY_SPEED, real_questions=str(questions_file)))
    stage = EvaluateStage(config, small_dataset, tmp_path / "report", students=[student_1l])
    before = stage.fingerprint()
    moved = tmp_path / "elsewhere.jsonl"
    shutil.copy(questions_file, moved)
    moved_config = config.model_copy(update={"evaluation": config.evaluation.model_copy(
        update={"real_questions": str(moved)})})
    moved_stage = EvaluateStage(moved_config, small_dataset, tmp_path / "report", students=[student_1l])
    assert moved_stage.fingerprint().digest == before.digest
    with questions_file.open("a", encoding="utf-8") as handle:
        handle.write('{"text": "one more question"}\n')
    changed = stage.fingerprint()
    assert changed.digest != before.digest and "real_questions" in changed.change(before.parts)


def test_a_relative_questions_path_in_a_config_file_is_taken_from_its_folder(tmp_path):
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "run.yaml").write_text("evaluation:\n  real_questions: q/questions.jsonl\n")
    config = load_config(tmp_path / "conf" / "run.yaml")
    assert config.evaluation.real_questions == str(tmp_path / "conf" / "q" / "questions.jsonl")
