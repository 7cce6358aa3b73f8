"""Real questions from an LLM behind any OpenAI-compatible chat-completions endpoint (vLLM, Ollama, llama.cpp, OpenAI).

The API key is read from the environment variable *named* in the config and handed to the client only: it is
never written to the manifest, the cache or a log line (error messages are scrubbed of it too). When the variable
is unset the dummy key ``EMPTY`` is sent, which local servers accept.

Requests run ``concurrency`` at a time. Failed requests (429, 408/409, 5xx, timeouts, lost connections) are retried
by the openai client itself: ``max_retries`` times, each attempt limited to ``timeout_s``, with the client's
exponential backoff (which honours the server's Retry-After). A refused request (401, 404...) is not retried.
Answers are cached on disk as they arrive (see :mod:`m3distill.data.questions.cache`). An answer in which no
question can be found (an empty reply, or a 200 whose body has the wrong shape) is asked again, up to
``max_retries`` times, ``backoff_s`` apart (doubling); it is an error once those run out, and is never cached: a
cached answer without a question is asked again.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from m3distill.config import LLMConfig, redact_url
from m3distill.data.chunking import Context
from m3distill.data.questions.base import (
    EMPTY,
    PREAMBLE,
    GenerationResult,
    comparable,
    filter_questions,
)
from m3distill.data.questions.cache import AnswerCache, answer_key
from m3distill.errors import M3DistillError

logger = logging.getLogger(__name__)

DEFAULT_PROMPT_TEMPLATE = (
    "Write {n} different search queries that people would type to find the text below.\n"
    "- Write every query in the same language as the text.\n"
    "- Keep them short, the way people type into a search box: mostly 3 to 12 words.\n"
    "- Vary their form: questions (how do I ..., what is ..., why does ... not ...), a problem as a user would "
    "describe it, and bare keywords.\n"
    "- Each query must make sense on its own, to someone who has not seen the text.\n"
    "- Do not copy sentences or long phrases from the text; use the words a user would know before reading it.\n"
    "Reply with the queries only, one per line, without numbering or any other text.\n\n"
    "Text:\n{context}"
)
DUMMY_API_KEY = "EMPTY"
_MAX_BACKOFF_S = 60.0
_BULLET = re.compile(r"^(?:[-*•·‣▪–—>]+|\(?\d{1,3}[.):\]]|\(?[a-zA-Z][.)]|[QqFf]\d*\s*[:.)])\s*")
_CODE_FENCE = re.compile(r"^```[\w-]*\s*|\s*```$")
_QUOTES = "\"'“”„«»「」『』`"


class LLMQuestionGenerator:
    """Questions written by an LLM, filtered and cached.

    Args:
        config: the endpoint, model, key variable name, prompt, concurrency, timeout and retry settings.
        questions_per_context: questions asked for (and kept at most) per context.
        cache_path: the SQLite answer cache (see :func:`m3distill.data.questions.cache.default_cache_path`).
        client: an ``openai.OpenAI``-like client to use instead of building one (for embedding in other tools).
    """

    name = "llm"

    def __init__(
        self, config: LLMConfig, questions_per_context: int, cache_path: str | Path, *, client: Any | None = None
    ) -> None:
        self.config = config
        self.questions_per_context = questions_per_context
        self.cache_path = Path(cache_path)
        self.prompt_template = config.prompt_template or DEFAULT_PROMPT_TEMPLATE
        missing = [field for field in ("{context}", "{n}") if field not in self.prompt_template]
        if missing:
            raise M3DistillError(f"the LLM prompt template lacks {' and '.join(missing)}; put them where they belong")
        self._api_key = os.environ.get(config.api_key_env) or DUMMY_API_KEY
        self._client = client
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._stats: Counter[str] = Counter()

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "questions_per_context": self.questions_per_context,
            "base_url": redact_url(self.config.base_url),
            "model": self.config.model,
            "api_key_env": self.config.api_key_env,
            "prompt_template": self.prompt_template,
            "temperature": self.config.temperature,
            "max_question_chars": self.config.max_question_chars,
            "note": "questions written by an LLM from each context; empty, too long, duplicate and copied ones dropped",
        }

    def prompt(self, context_text: str) -> str:
        """The prompt for one context (``{n}`` first, so braces inside the context are never substituted)."""
        return self.prompt_template.replace("{n}", str(self.questions_per_context)).replace("{context}", context_text)

    def generate(self, contexts: Sequence[Context], *, languages: Sequence[str] | None = None,
                 show_progress: bool = True) -> GenerationResult:
        self._stats = Counter(requests=0, retries=0, cache_hits=0)
        self._stop.clear()
        answers: list[str | None] = [None] * len(contexts)
        keys = [answer_key(self.config.model, self.prompt_template, c.text, self.questions_per_context) for c in contexts]
        with AnswerCache(self.cache_path) as cache, tqdm(
            total=len(contexts), desc="LLM questions", unit="ctx", disable=not show_progress
        ) as progress:
            todo: list[int] = []
            for index, key in enumerate(keys):
                answers[index] = cache.get(key)
                # Older versions cached answers without a question (a misbehaving endpoint): ask again.
                if answers[index] is None or not _has_question(answers[index]):
                    answers[index] = None
                    todo.append(index)
            self._stats["cache_hits"] = len(contexts) - len(todo)
            progress.update(len(contexts) - len(todo))
            if todo:
                logger.info("asking %s at %s for questions on %d contexts (%d cached)", self.config.model,
                            redact_url(self.config.base_url), len(todo), len(contexts) - len(todo))
                self._ask_all(contexts, todo, keys, answers, cache, progress)
        return self._filtered(contexts, [answer or "" for answer in answers])

    def _ask_all(
        self,
        contexts: Sequence[Context],
        todo: list[int],
        keys: list[str],
        answers: list[str | None],
        cache: AnswerCache,
        progress: tqdm,
    ) -> None:
        client = self._client or self._make_client()
        executor = ThreadPoolExecutor(max_workers=self.config.concurrency, thread_name_prefix="m3distill-llm")
        pending: dict[Future[str], int] = {}
        queue = iter(todo)
        try:
            # Submit only as many as run at once, so a failure or Ctrl-C leaves no queue of requests to cancel.
            for index in queue:
                pending[executor.submit(self._ask, client, self.prompt(contexts[index].text))] = index
                if len(pending) >= self.config.concurrency:
                    break
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                failure: BaseException | None = None
                for future in done:
                    index = pending.pop(future)
                    if future.exception() is not None:
                        failure = failure or future.exception()
                        continue
                    answers[index] = future.result()
                    cache.put(keys[index], answers[index])
                    progress.update(1)
                    following = next(queue, None) if failure is None else None
                    if following is not None:
                        pending[executor.submit(self._ask, client, self.prompt(contexts[following].text))] = following
                if failure is not None:
                    raise failure
        except M3DistillError:
            # Requests in flight ask no more once their call (with the client's retries) ends; wait for them and
            # keep the answers that did arrive.
            self._stop.set()
            executor.shutdown(wait=True, cancel_futures=True)
            for future, index in pending.items():
                if not future.cancelled() and future.exception() is None:
                    cache.put(keys[index], future.result())
            pending.clear()
            raise
        finally:
            # Ctrl-C: do not wait here. Requests in flight ask no more after their current call, but that call runs
            # to its end, the openai client's retries included (at most max_retries timeouts and backoffs).
            if pending:
                self._stop.set()
            executor.shutdown(wait=not pending, cancel_futures=True)

    def _make_client(self) -> Any:
        import openai

        return openai.OpenAI(
            base_url=self.config.base_url, api_key=self._api_key, max_retries=self.config.max_retries,
            timeout=self.config.timeout_s,
        )

    def _ask(self, client: Any, prompt: str) -> str:
        """One answer that holds a question; raises M3DistillError when the client's retries or ours run out.

        The client retries failed requests itself (see the module docstring); this loop only asks again when an
        answer arrived without a question in it.
        """
        import openai

        endpoint = redact_url(self.config.base_url)
        last_problem = ""
        for attempt in range(self.config.max_retries + 1):
            if attempt:
                self._stop.wait(min(self.config.backoff_s * 2 ** (attempt - 1), _MAX_BACKOFF_S))
            if self._stop.is_set():
                raise M3DistillError("LLM request cancelled")
            if attempt:
                self._count(retries=1)
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=self.config.model,
                    messages=[{"role": "user", "content": prompt}],
                    temperature=self.config.temperature,
                )
                self._count_attempts(getattr(raw, "retries_taken", 0))
                response = raw.parse()
            except (openai.APITimeoutError, openai.APIConnectionError, openai.APIStatusError) as error:
                refused = isinstance(error, openai.APIStatusError) and not _is_transient(error.status_code)
                retries = _retries_taken(error)
                if retries is None:  # a client that does not say: it retries transient failures max_retries times
                    retries = 0 if refused else self.config.max_retries
                self._count_attempts(retries)
                if refused:
                    raise M3DistillError(self._scrub(
                        f"the LLM endpoint {endpoint} refused the request with HTTP {error.status_code}: "
                        f"{_first_line(error)}{_status_hint(error.status_code, self.config)}"
                    )) from None
                raise M3DistillError(self._scrub(
                    f"the LLM endpoint {endpoint} still failed after {retries + 1} attempts "
                    f"({_first_line(error)}); check the server and rerun: finished answers are kept in "
                    f"{self.cache_path}"
                )) from None
            except (openai.OpenAIError, ValueError) as error:  # e.g. a reply that is not JSON at all
                raise M3DistillError(self._scrub(
                    f"the LLM endpoint {endpoint} replied with something other than a chat completion: is the base "
                    f"URL right (it usually ends in /v1)? ({_first_line(error)})"
                )) from None
            if not hasattr(response, "choices"):
                raise M3DistillError(
                    f"the LLM endpoint {endpoint} replied with something other than a chat completion: is the base "
                    "URL right (it usually ends in /v1)?"
                )
            choices = response.choices or []
            message = getattr(choices[0], "message", None) if choices else None
            answer = (getattr(message, "content", None) or "") if message is not None else ""
            if _has_question(answer):
                return answer
            last_problem = "the reply held no question" if choices else "the reply held no choices"
            logger.debug("LLM answer without a question (%s); asking again", last_problem)
        raise M3DistillError(self._scrub(
            f"the LLM endpoint {endpoint} answered {self.config.max_retries + 1} times without a question "
            f"({last_problem}): is it an OpenAI-compatible chat endpoint and {self.config.model!r} a chat model? "
            f"Fix it and rerun: finished answers are kept in {self.cache_path}"
        ))

    def _count_attempts(self, retries_taken: int) -> None:
        """Count one call to the client, which sent ``retries_taken`` more requests than one."""
        self._count(requests=1 + retries_taken, retries=retries_taken)

    def _count(self, **counts: int) -> None:
        with self._lock:
            self._stats.update(counts)

    def _scrub(self, message: str) -> str:
        if self._api_key != DUMMY_API_KEY and len(self._api_key) >= 4:
            message = message.replace(self._api_key, "***")
        return message

    def _filtered(self, contexts: Sequence[Context], answers: list[str]) -> GenerationResult:
        questions: list[list[str]] = []
        dropped: Counter[str] = Counter()
        for context, answer in zip(contexts, answers):
            candidates, preambles = parse_questions(answer)
            dropped[PREAMBLE] += preambles
            if not candidates:
                dropped[EMPTY] += 1
            kept, rejected = filter_questions(
                candidates,
                context.text,
                n=self.questions_per_context,
                max_chars=self.config.max_question_chars,
                reject_copies=True,
            )
            questions.append(kept)
            dropped.update(rejected)
        stats = dict(self._stats)
        stats["missing"] = self.questions_per_context * len(contexts) - sum(map(len, questions))
        _warn_if_mostly_unusable(questions, self.config.model)
        return GenerationResult(questions=questions, dropped=+dropped, stats=stats)


def _has_question(answer: str) -> bool:
    return any(question.strip() for question in parse_questions(answer)[0])


def _warn_if_mostly_unusable(questions: list[list[str]], model: str) -> None:
    """Warn loudly when most contexts got no usable question, or most questions are the same few."""
    if not questions:
        return
    without = sum(not kept for kept in questions)
    if without * 2 > len(questions):
        logger.warning(
            "%d of %d contexts got no usable question from %s (all dropped by the filters): check the model and "
            "the prompt template before training on this dataset", without, len(questions), model,
        )
    kept = [comparable(question) for kept in questions for question in kept]
    if len(kept) >= 4 and len(set(kept)) * 2 < len(kept):
        logger.warning(
            "only %d distinct questions among the %d that %s wrote: most are identical; check the model and the "
            "prompt template before training on this dataset", len(set(kept)), len(kept), model,
        )


def parse_questions(answer: str) -> tuple[list[str], int]:
    """Questions in an LLM answer, and how many preamble lines (``Here are three questions:``) were skipped.

    Accepts one question per line (numbered, bulleted or quoted), a JSON list of strings, or a JSON object with a
    list of strings (``{"questions": [...]}``), with or without a Markdown code fence.
    """
    text = _CODE_FENCE.sub("", answer.strip()).strip()
    if text[:1] in "[{":
        parsed = _json_questions(text)
        if parsed is not None:
            return parsed, 0
    questions, preambles = [], 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        if line.endswith((":", "：")):
            preambles += 1
            continue
        line = _BULLET.sub("", line, count=1).strip().strip(_QUOTES).strip()
        line = re.sub(r"^\*\*(.*)\*\*$", r"\1", line)  # Markdown bold around a whole question
        questions.append(line)
    return questions, preambles


def _json_questions(text: str) -> list[str] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    if isinstance(value, dict):
        value = next((item for item in value.values() if isinstance(item, list)), None)
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def _is_transient(status: int) -> bool:
    """Statuses the openai client retries by itself (so it already has, when they reach us)."""
    return status in (408, 409, 429) or status >= 500


def _retries_taken(error: Exception) -> int | None:
    """How many times the openai client retried the request that failed, from the retry number it sends."""
    request = getattr(error, "request", None)
    try:
        return int(request.headers["x-stainless-retry-count"])
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _first_line(error: BaseException | None) -> str:
    if error is None:
        return "no attempt made"
    return (str(error).splitlines() or [type(error).__name__])[0][:300]


def _status_hint(status: int, config: LLMConfig) -> str:
    if status in (401, 403):
        return f" (is the key in ${config.api_key_env} right?)"
    if status == 404:
        return f" (is the base URL right, and does it serve model {config.model!r}?)"
    return ""
