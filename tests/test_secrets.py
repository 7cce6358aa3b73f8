"""Secrets never reach a record: a credential written into any setting that can hold one (the LLM endpoint's URL,
the Qdrant URL) or given in an API-key variable is in none of the files a finished run leaves, nor in what the
commands print; the settings go through one redaction before anything is written, logged or hashed."""

from __future__ import annotations

import json

import pytest
import yaml
from test_llm import ChatServer

from m3distill.cli import main
from m3distill.config import LLMConfig, SynthConfig, settings_record
from m3distill.data.synth import hash_synth_inputs, synth_inputs
from m3distill.evaluation import evaluate as evaluate_module
from m3distill.layout import DATASET_MANIFEST_FILE, RunLayout

pytestmark = pytest.mark.slow

SECRET = "s3cr3tpw-Never-Written"
KEY_ENV = "M3D_SECRET_TEST_KEY"


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


def _with_credentials(url: str) -> str:
    """``url`` with the secret both as user info and as an ``api_key`` query parameter."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://bob:{SECRET}@{rest}?api_key={SECRET}&model=x"


def test_a_secret_in_every_setting_that_can_hold_one_is_in_no_file_of_a_finished_run(
    server, few_documents, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv(KEY_ENV, SECRET)
    # The Qdrant URL is recorded as set, but searched with the embedded engine: no Qdrant server here.
    embedded = evaluate_module.make_search_backend
    monkeypatch.setattr(evaluate_module, "make_search_backend",
                        lambda config, client=None: embedded(config.model_copy(update={"qdrant_url": None})))
    run_dir = tmp_path / "run"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump({
        "run_dir": str(run_dir),
        "synth": {"corpus": str(few_documents), "generator": "llm", "max_tokens": 64, "overlap_tokens": 8,
                  "questions_per_context": 2, "detect_language": False, "splits": {"dev": 0.2, "test": 0.2},
                  "llm": {"base_url": _with_credentials(server.base_url), "model": "test-model",
                          "api_key_env": KEY_ENV, "concurrency": 2, "timeout_s": 5.0}},
        "teacher": {"model": "sentence-transformers/all-MiniLM-L6-v2", "max_seq_length": 64},
        "students": {"layers": [1]},
        "training": {"max_steps": 2, "eval_steps": 1, "batch_size": 8, "max_dev_texts": 10},
        "evaluation": {"k": [5], "qdrant_url": _with_credentials("http://127.0.0.1:6333"),
                       "qdrant_api_key_env": KEY_ENV, "onnx_variants": False,
                       "speed": {"n_texts": 8, "batch_size": 8, "repeats": 1, "warmup_batches": 0,
                                 "min_seconds_per_repeat": 0}},
    }), encoding="utf-8")

    assert main(["run", str(config_file)]) == 0
    printed = capsys.readouterr()

    written = [path for path in run_dir.rglob("*") if path.is_file()]
    names = {path.relative_to(run_dir).as_posix() for path in written}
    assert {"config.yaml", "m3distill.log", "dataset/manifest.json", "dataset.llm-cache.sqlite",
            "teacher_cache/manifest.json", "students/student-1L/m3distill_student.json", "report/report.json",
            "report/report.md", "report/inputs.json"} <= names
    assert server.requests, "the questions did not come from the endpoint"
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), f"{path} holds the secret"
    assert SECRET not in printed.out + printed.err
    # The settings were written, without their credentials.
    manifest = json.loads((RunLayout(run_dir).dataset / DATASET_MANIFEST_FILE).read_text(encoding="utf-8"))
    assert manifest["inputs"]["settings"]["llm"]["base_url"] == f"{server.base_url}?api_key=***&model=x"
    report = json.loads((RunLayout(run_dir).report / "report.json").read_text(encoding="utf-8"))
    assert report["config"]["evaluation"]["qdrant_url"] == "http://127.0.0.1:6333?api_key=***&model=x"


def test_the_dataset_s_input_hash_follows_the_endpoint_s_host_not_its_credentials(few_documents, minilm_path):
    def input_hash(base_url: str) -> str:
        config = SynthConfig(corpus=str(few_documents), generator="llm", llm=LLMConfig(base_url=base_url))
        return hash_synth_inputs(synth_inputs(config, tokenizer=minilm_path))

    plain = input_hash("http://127.0.0.1:18777/v1")
    assert input_hash(f"http://bob:{SECRET}@127.0.0.1:18777/v1") == plain
    assert input_hash("http://bob:another-password@127.0.0.1:18777/v1") == plain
    assert input_hash("http://10.0.0.2:18777/v1") != plain


def test_a_settings_record_redacts_a_url_in_any_field_and_leaves_text_alone():
    llm = LLMConfig(base_url=f"https://me:{SECRET}@llm.example.com/v1?token={SECRET}",
                    prompt_template="Questions about {context} ({n}); see https://example.com/?key=docs for more")
    record = settings_record(llm)
    assert SECRET not in json.dumps(record)
    assert record["base_url"] == "https://llm.example.com/v1?token=***"
    assert record["prompt_template"] == llm.prompt_template
