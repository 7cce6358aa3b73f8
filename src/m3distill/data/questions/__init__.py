"""Question generators: one interface (:class:`QuestionGenerator`), two implementations.

- ``pseudo`` (default, offline): queries shaped like what people type (questions on key phrases, keywords,
  headings) or sentences copied from each context (``synth.query_shapes``).
- ``llm``: real questions from any OpenAI-compatible chat-completions endpoint, cached on disk.
"""

from __future__ import annotations

from pathlib import Path

from m3distill.config import SynthConfig
from m3distill.data.questions.base import GenerationResult, QuestionGenerator, filter_questions
from m3distill.data.questions.cache import default_cache_path
from m3distill.data.questions.llm import LLMQuestionGenerator, parse_questions
from m3distill.data.questions.pseudo import PseudoQueryGenerator
from m3distill.errors import M3DistillError

__all__ = [
    "GenerationResult",
    "LLMQuestionGenerator",
    "PseudoQueryGenerator",
    "QuestionGenerator",
    "default_cache_path",
    "filter_questions",
    "make_question_generator",
    "parse_questions",
]


def make_question_generator(config: SynthConfig, out_dir: str | Path) -> QuestionGenerator:
    """The generator ``config.generator`` names, set up from ``config``.

    Args:
        config: the synth settings (generator, questions per context, seed, LLM endpoint).
        out_dir: the dataset directory being written; the LLM answer cache goes beside it unless
            ``config.llm.cache_path`` says otherwise.
    """
    if config.generator == "pseudo":
        return PseudoQueryGenerator(
            config.questions_per_context, config.seed, max_question_chars=config.llm.max_question_chars,
            query_shapes=config.query_shapes,
        )
    cache_path = Path(config.llm.cache_path) if config.llm.cache_path else default_cache_path(out_dir)
    if cache_path.resolve().is_relative_to(Path(out_dir).resolve()):
        # The dataset directory is replaced as a whole when a run finishes; a cache inside it would be lost.
        raise M3DistillError(f"the LLM answer cache {cache_path} must lie outside the dataset directory {out_dir}")
    return LLMQuestionGenerator(config.llm, config.questions_per_context, cache_path)
