"""The `llm` question generator against a real chat-completions HTTP server on 127.0.0.1."""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from m3distill.cli import main
from m3distill.config import LLMConfig, SplitConfig, SynthConfig
from m3distill.data.dataset import load_synth_dataset
from m3distill.data.questions import parse_questions
from m3distill.data.questions.base import is_copied
from m3distill.errors import M3DistillError
from m3distill.stages.synth import synthesize

SECRET = "sk-test-Do-Not-Leak-0123456789abcdef"
KEY_ENV = "M3D_TEST_LLM_KEY"
MODEL = "test-model"


def _context_of(prompt: str) -> str:
    return prompt.split("Text:\n", 1)[1]  # the default template ends with the context


def _marker(prompt: str) -> str:
    return hashlib.sha1(_context_of(prompt).encode()).hexdigest()[:8]


def good_answer(prompt: str) -> str:
    marker = _marker(prompt)
    return f"1. Which subject does passage {marker} explain?\n2. What problem does passage {marker} solve?"


# A reply is (HTTP status, answer text, seconds to wait first); the server numbers requests from 0. An answer text
# starting with RAW is sent as the whole response body instead of inside a chat completion.
RAW = "RAW:"
Reply = tuple[int, str, float]


class ChatServer:
    """A minimal OpenAI-compatible server: POST /v1/chat/completions, replies chosen by ``respond``."""

    def __init__(self) -> None:
        self.respond: Callable[[int, str], Reply] = lambda number, prompt: (200, good_answer(prompt), 0.0)
        self.requests: list[dict] = []
        self.successes: Counter[str] = Counter()
        self._lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server names it so
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                prompt = body["messages"][-1]["content"]
                with server._lock:
                    number = len(server.requests)
                    server.requests.append(
                        {"path": self.path, "auth": self.headers.get("Authorization"), "model": body["model"],
                         "prompt": prompt}
                    )
                status, content, delay = server.respond(number, prompt)
                time.sleep(delay)
                if content.startswith("<html>"):  # a web page, as a wrong base URL gives
                    payload = None
                elif content.startswith(RAW):  # a body of the test's own making (e.g. JSON of the wrong shape)
                    payload, content = None, content[len(RAW):]
                elif status == 200:
                    payload = {
                        "id": f"chatcmpl-{number}", "object": "chat.completion", "created": 0, "model": body["model"],
                        "choices": [{"index": 0, "finish_reason": "stop",
                                     "message": {"role": "assistant", "content": content}}],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                    with server._lock:
                        server.successes[prompt] += 1
                else:
                    payload = {"error": {"message": f"status {status} from the test server", "type": "server_error"}}
                data = content.encode() if payload is None else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    if status == 429:  # as rate limiters do; the openai client waits this long before retrying
                        self.send_header("retry-after-ms", "10")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout)

            def log_message(self, *args) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self.base_url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


@pytest.fixture
def server():
    chat = ChatServer()
    yield chat
    chat.close()


@pytest.fixture
def corpus(tmp_path) -> Path:
    folder = tmp_path / "corpus"
    folder.mkdir()
    topics = ["backups", "printers", "networks", "passwords", "disks", "kernels"]
    for number, topic in enumerate(topics):
        (folder / f"{topic}.txt").write_text(
            f"This page is about {topic}. Document {number} explains how {topic} are configured on a server. "
            f"Administrators change the {topic} settings with care.",
            encoding="utf-8",
        )
    return folder


@pytest.fixture
def with_key(monkeypatch):
    monkeypatch.setenv(KEY_ENV, SECRET)


def _config(corpus: Path, server: ChatServer, **llm_changes) -> SynthConfig:
    llm = {"base_url": server.base_url, "model": MODEL, "api_key_env": KEY_ENV, "concurrency": 3, "timeout_s": 5.0,
           "max_retries": 3, "backoff_s": 0.01, **llm_changes}
    return SynthConfig(corpus=str(corpus), generator="llm", llm=LLMConfig(**llm), max_tokens=64, overlap_tokens=8,
                       detect_language=False, splits=SplitConfig(dev=1, test=1))


def _run(config: SynthConfig, out: Path, tokenizer: Path, **kwargs):
    return synthesize(config, out, tokenizer=tokenizer, show_progress=False, **kwargs)


def test_questions_come_from_the_endpoint_for_the_right_context_and_the_key_is_never_written(
    tmp_path, corpus, server, with_key, minilm_path, caplog
):
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "run" / "dataset"

    summary = _run(_config(corpus, server), out, minilm_path)

    dataset = load_synth_dataset(out)
    assert len(dataset.contexts) == 6 and len(dataset.questions) == 12
    text_of = dict(zip(dataset.contexts["context_id"], dataset.contexts["text"]))
    for context_id, question in zip(dataset.questions["context_id"], dataset.questions["question_id"]):
        assert question.startswith(context_id)
    for context_id, question in zip(dataset.questions["context_id"], dataset.questions["text"]):
        assert hashlib.sha1(text_of[context_id].encode()).hexdigest()[:8] in question
    assert set(dataset.questions["generator"]) == {"llm"}
    assert {request["path"] for request in server.requests} == {"/v1/chat/completions"}
    assert {request["auth"] for request in server.requests} == {f"Bearer {SECRET}"}
    assert {request["model"] for request in server.requests} == {MODEL}
    assert summary.generator_stats["requests"] == 6 and summary.generator_stats["cache_hits"] == 0

    generator = dataset.manifest["generator"]
    assert (generator["name"], generator["model"], generator["api_key_env"]) == ("llm", MODEL, KEY_ENV)
    written = [path for path in tmp_path.rglob("*") if path.is_file() and "corpus" not in path.parts]
    assert any(path.name.endswith(".llm-cache.sqlite") for path in written)
    for path in written:
        assert SECRET.encode() not in path.read_bytes(), path
    assert SECRET not in caplog.text


def test_the_default_prompt_asks_for_short_varied_queries_in_the_text_s_language(tmp_path, corpus, server, minilm_path):
    _run(_config(corpus, server), tmp_path / "dataset", minilm_path)
    prompt = server.requests[0]["prompt"]
    instructions = prompt.split("Text:\n", 1)[0]
    # What people type: short queries of several forms, not sentences lifted from the text.
    for asked in ("search queries", "short", "3 to 12 words", "how do I", "keywords", "same language",
                  "Do not copy"):
        assert asked in instructions, asked
    assert _context_of(prompt) in load_synth_dataset(tmp_path / "dataset").contexts["text"].tolist()


def test_a_rerun_is_served_wholly_from_the_cache(tmp_path, corpus, server, minilm_path):
    out = tmp_path / "dataset"
    _run(_config(corpus, server), out, minilm_path)
    first_questions = (out / "questions.parquet").read_bytes()
    asked = len(server.requests)

    summary = _run(_config(corpus, server), out, minilm_path, overwrite=True)

    assert len(server.requests) == asked == 6
    assert summary.generator_stats == {"requests": 0, "retries": 0, "cache_hits": 6, "missing": 0}
    assert (out / "questions.parquet").read_bytes() == first_questions


def test_a_crashed_run_resumes_without_repeating_finished_requests(tmp_path, corpus, server, minilm_path):
    out = tmp_path / "dataset"
    server.respond = lambda number, prompt: (200, good_answer(prompt), 0.0) if number < 2 else (500, "", 0.0)
    with pytest.raises(M3DistillError, match="still failed after 1 attempts"):
        _run(_config(corpus, server, concurrency=1, max_retries=0), out, minilm_path)
    assert not out.exists()

    server.respond = lambda number, prompt: (200, good_answer(prompt), 0.0)
    summary = _run(_config(corpus, server), out, minilm_path)

    assert summary.generator_stats["cache_hits"] == 2
    assert set(server.successes.values()) == {1}, "a finished request was repeated"
    assert len(load_synth_dataset(out).questions) == 12


def test_429_and_timeouts_are_retried_by_the_client_and_counted(tmp_path, corpus, server, minilm_path):
    def flaky(number: int, prompt: str) -> Reply:
        if number == 0:
            return 200, good_answer(prompt), 1.5  # longer than the client's timeout
        if number < 3:
            return 429, "", 0.0
        return 200, good_answer(prompt), 0.0

    server.respond = flaky
    summary = _run(_config(corpus, server, concurrency=1, timeout_s=0.5), tmp_path / "dataset", minilm_path)

    assert summary.generator_stats["retries"] == 3
    assert summary.generator_stats["requests"] == 6 + 3
    assert sum(summary.questions.values()) == 12


def test_500_forever_is_a_clear_error_with_no_partial_dataset(tmp_path, corpus, server, minilm_path, capsys):
    server.respond = lambda number, prompt: (500, "", 0.0)
    config_file = tmp_path / "config.yaml"
    config_file.write_text("synth:\n  llm:\n    max_retries: 2\n    backoff_s: 0.01\n    concurrency: 2\n",
                           encoding="utf-8")
    out = tmp_path / "run" / "dataset"

    code = main(["-q", "synth", "--config", str(config_file), "--corpus", str(corpus), "--out", str(out),
                 "--tokenizer", str(minilm_path), "--generator", "llm", "--llm-base-url", server.base_url,
                 "--llm-model", MODEL, "--no-language-detection", "--dev", "1", "--test", "1"])

    stderr = capsys.readouterr().err.strip()
    assert code == 2
    assert len(stderr.splitlines()) == 1 and "still failed after 3 attempts" in stderr and server.base_url in stderr
    assert not out.exists()
    assert [path.name for path in out.parent.iterdir()] == ["dataset.llm-cache.sqlite"]
    tries = Counter(request["prompt"] for request in server.requests)
    assert max(tries.values()) == 3


def test_a_refused_request_is_not_retried(tmp_path, corpus, server, minilm_path):
    server.respond = lambda number, prompt: (401, "", 0.0)
    with pytest.raises(M3DistillError, match=rf"HTTP 401.*\${KEY_ENV}"):
        _run(_config(corpus, server, concurrency=1), tmp_path / "dataset", minilm_path)
    assert len(server.requests) == 1


def test_a_reply_that_is_not_a_chat_completion_is_a_clear_error(tmp_path, corpus, server, minilm_path):
    server.respond = lambda number, prompt: (200, "<html><body>Welcome</body></html>", 0.0)
    with pytest.raises(M3DistillError, match="other than a chat completion: is the base URL right"):
        _run(_config(corpus, server), tmp_path / "dataset", minilm_path)
    assert not (tmp_path / "dataset").exists()


def test_garbage_output_is_filtered_and_counted(tmp_path, corpus, server, minilm_path):
    def garbage(number: int, prompt: str) -> Reply:
        marker = _marker(prompt)
        copied = _context_of(prompt).split(". ")[0]
        lines = [
            "Here are the questions:",           # preamble
            f"1. {copied}",                      # copied from the context
            "2. ",                               # empty
            "3. Why " + "really " * 80 + "?",    # too long
            f"4. What is marker {marker}?",
            f"5. what is MARKER {marker}",       # duplicate of 4
            f"6. **Where is marker {marker} used?**",
            f"7. How old is marker {marker}?",   # surplus: two are asked for
        ]
        return 200, "\n".join(lines), 0.0

    server.respond = garbage
    out = tmp_path / "dataset"
    summary = _run(_config(corpus, server), out, minilm_path)

    dataset = load_synth_dataset(out)
    assert summary.dropped_questions == {"copied": 6, "duplicate": 6, "empty": 6, "preamble": 6, "surplus": 6,
                                         "too_long": 6}
    assert dataset.manifest["generator"]["dropped"] == summary.dropped_questions
    kept = dataset.questions.groupby("context_id")["text"].apply(list)
    for questions in kept:
        assert [q.split(" marker ")[0] for q in questions] == ["What is", "Where is"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("1. First?\n2) Second?\n- Third?\n* Fourth?\nQ5: Fifth?", ["First?", "Second?", "Third?", "Fourth?", "Fifth?"]),
        ('["Eins?", "Zwei?"]', ["Eins?", "Zwei?"]),
        ('```json\n{"questions": ["Un ?", "Deux ?"]}\n```', ["Un ?", "Deux ?"]),
        ('"Quoted question?"\n\n「引用された質問ですか？」', ["Quoted question?", "引用された質問ですか？"]),
    ],
)
def test_parse_questions_accepts_common_answer_shapes(answer, expected):
    assert parse_questions(answer)[0] == expected


def test_copied_questions_are_recognised_but_rewordings_are_not():
    context = "The chfn command changes the full name, office room and phone numbers of a user account."
    assert is_copied("the CHFN command changes the full name", context)
    assert is_copied("The chfn command changes the full name, office room and phone numbers of a user?", context)
    assert not is_copied("Which command changes the office phone number of a user?", context)
    assert is_copied("これは日本語の文です", "前置き。これは日本語の文です。")
    assert not is_copied("日本語で書かれた質問は何ですか", "前置き。これは日本語の文です。")


_WRONG_SHAPES = [
    # A completions-API body (no message), a completion without choices, and a message without content.
    json.dumps({"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "1. A question?"}]}),
    json.dumps({"id": "x", "object": "chat.completion", "choices": []}),
    json.dumps({"id": "x", "object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant"}}]}),
]


@pytest.mark.parametrize("body", _WRONG_SHAPES, ids=["completions-body", "no-choices", "no-content"])
def test_a_200_of_the_wrong_shape_is_an_error_after_retries_and_is_never_cached(tmp_path, corpus, server, minilm_path,
                                                                               body):
    server.respond = lambda number, prompt: (200, RAW + body, 0.0)
    out = tmp_path / "dataset"
    with pytest.raises(M3DistillError, match="answered 3 times without a question"):
        _run(_config(corpus, server, concurrency=1, max_retries=2), out, minilm_path)
    assert not out.exists()
    assert len(server.requests) == 3

    # Against a working server the rerun asks for every context: nothing empty was cached.
    server.respond = lambda number, prompt: (200, good_answer(prompt), 0.0)
    summary = _run(_config(corpus, server), out, minilm_path)
    assert summary.generator_stats["cache_hits"] == 0 and sum(summary.questions.values()) == 12


def test_an_empty_answer_is_retried_and_an_empty_cached_answer_is_asked_again(tmp_path, corpus, server, minilm_path):
    from m3distill.data.questions.cache import AnswerCache, default_cache_path

    server.respond = lambda number, prompt: (200, "", 0.0) if number < 2 else (200, good_answer(prompt), 0.0)
    out = tmp_path / "dataset"
    summary = _run(_config(corpus, server, concurrency=1), out, minilm_path)
    assert summary.generator_stats["retries"] == 2 and sum(summary.questions.values()) == 12

    # An empty answer cached by an older m3distill counts as not asked yet.
    with AnswerCache(default_cache_path(out)) as cache:
        key = cache._connection.execute("SELECT key FROM answers LIMIT 1").fetchone()[0]
        cache.put(key, "")
    again = _run(_config(corpus, server), out, minilm_path, overwrite=True)
    assert again.generator_stats["cache_hits"] == 5 and again.generator_stats["requests"] == 1
    assert sum(again.questions.values()) == 12


def test_mostly_identical_questions_warn_loudly(tmp_path, corpus, server, minilm_path, caplog):
    server.respond = lambda number, prompt: (200, "1. What is this page about?\n2. How is it configured?", 0.0)
    with caplog.at_level(logging.WARNING, logger="m3distill"):
        _run(_config(corpus, server), tmp_path / "dataset", minilm_path)
    assert any("most are identical" in message for message in caplog.messages)
