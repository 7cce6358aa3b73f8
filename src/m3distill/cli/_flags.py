"""Command-line flags made from the config model, so a flag's name, help, type and default are those of its field.

Every field of :class:`~m3distill.config.M3DistillConfig` has one flag: its dotted path without the stage section,
hyphenated (``training.max_steps`` -> ``--max-steps``, ``synth.llm.base_url`` -> ``--llm-base-url``,
``training.loss.mse`` -> ``--loss-mse``), except where :data:`FLAG_NAMES` names it otherwise. Its help is the field's
description with the config's default, its type and constraints are the field's (checked by pydantic while
parsing, so a bad value is one argparse line), and its argparse default is ``None``: an unset flag keeps the value of
the config file. A command declares which fields or sections it exposes with :func:`add_config_flags`;
:func:`flag_overrides` turns the parsed flags into the overrides :func:`m3distill.config.apply_overrides` applies.
"""

from __future__ import annotations

import argparse
import re
import types
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, TypeAdapter, ValidationError
from pydantic.fields import FieldInfo

from m3distill.config import M3DistillConfig

# Sections named after a stage: their flags leave the stage's name out; nested sections keep theirs (llm, loss...).
_STAGE_SECTIONS = ("synth", "teacher", "students", "training", "evaluation", "export")

# Flags whose names are not derived from their field (names users and scripts already rely on). The first name is
# the one shown first in help; every name is accepted.
FLAG_NAMES: dict[str, tuple[str, ...]] = {
    "teacher.model": ("--teacher",),
    "training.learning_rate": ("--lr", "--learning-rate"),
    "training.early_stopping_patience": ("--early-stopping", "--early-stopping-patience"),
    "students.explicit": ("--plan",),
    "synth.splits.dev": ("--dev",),
    "synth.splits.test": ("--test",),
    "synth.llm.cache_path": ("--llm-cache", "--llm-cache-path"),
    # BooleanOptionalAction adds the --no- forms: --no-language-detection is the flag from before.
    "synth.detect_language": ("--detect-language", "--language-detection"),
}


@dataclass(frozen=True)
class ConfigFlag:
    """One config field as a flag; ``field`` (the dotted path) is also its argparse ``dest``."""

    field: str
    names: tuple[str, ...]
    info: FieldInfo
    section: type[BaseModel]


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _walk(model: type[BaseModel], prefix: str = "") -> Iterator[ConfigFlag]:
    for name, info in model.model_fields.items():
        field = prefix + name
        if _is_section(info.annotation):
            yield from _walk(info.annotation, field + ".")
            continue
        parts = field.split(".")
        if parts[0] in _STAGE_SECTIONS:
            parts = parts[1:]
        derived = "--" + "-".join(parts).replace("_", "-")
        yield ConfigFlag(field, FLAG_NAMES.get(field, (derived,)), info, model)


# Every leaf field of the config, by dotted path.
CONFIG_FLAGS: dict[str, ConfigFlag] = {flag.field: flag for flag in _walk(M3DistillConfig)}


def _without_none(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, types.UnionType):
        rest = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(rest) == 1:
            return rest[0]
    return annotation


def _value_parser(annotation: Any, metadata: list[Any]) -> Callable[[str], Any]:
    """An argparse ``type``: the text (split on commas for a list) validated as ``annotation`` by pydantic."""
    # The sections' own rule (nan and inf are no settings), so a bad number is the flag's error, not a later one.
    config = ConfigDict(allow_inf_nan=False)
    adapter = TypeAdapter(Annotated[(annotation, *metadata)] if metadata else annotation, config=config)
    is_list = get_origin(annotation) in (list, tuple)

    def parse(text: str) -> Any:
        value = [part.strip() for part in text.split(",") if part.strip()] if is_list else text
        if get_origin(annotation) is tuple and len(value) != len(get_args(annotation)):
            raise argparse.ArgumentTypeError(
                f"{text!r}: expected {len(get_args(annotation))} comma-separated values, got {len(value)}")
        try:
            return adapter.validate_python(value)
        except ValidationError as error:
            message = error.errors()[0]["msg"]
            raise argparse.ArgumentTypeError(f"{text!r}: {message[0].lower()}{message[1:]}") from None

    return parse


def _metavar(annotation: Any, field: str) -> str | None:
    if get_origin(annotation) is list:
        item = get_args(annotation)[0]
        if get_origin(item) is Literal:
            return "{" + ",".join(map(str, get_args(item))) + "},..."
        return "N,N,..." if item is int else "X,X,..."
    if get_origin(annotation) is tuple:
        return ",".join("N" if item is int else "X" for item in get_args(annotation))
    if get_origin(annotation) is Literal:
        return None  # argparse shows the choices
    return {int: "N", float: "X"}.get(annotation, field.rsplit(".", 1)[-1].upper())


def _show_default(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


def flag_help(flag: ConfigFlag, default_note: str | None = None) -> str:
    """The help of a flag: the field's description and the config's default (or ``default_note`` instead)."""
    if not flag.info.description:
        raise ValueError(f"config field {flag.field} has no description: give it one in m3distill/config.py")
    default = default_note or _show_default(flag.info.get_default(call_default_factory=True))
    text = flag.info.description + (f" (default: {default})" if default else "")
    return text.replace("%", "%%")  # argparse formats help with %


def _argument_options(flag: ConfigFlag) -> dict[str, Any]:
    annotation = _without_none(flag.info.annotation)
    if annotation is bool:
        return {"action": argparse.BooleanOptionalAction}
    if get_origin(annotation) is list and get_origin(get_args(annotation)[0]) is list:
        # A list of lists (students.explicit): each use of the flag gives one inner list.
        item = get_args(annotation)[0]
        return {"action": "append", "type": _value_parser(item, []), "metavar": _metavar(item, flag.field)}
    options: dict[str, Any] = {"type": _value_parser(annotation, flag.info.metadata),
                               "metavar": _metavar(annotation, flag.field)}
    if get_origin(annotation) is Literal:
        options["choices"] = get_args(annotation)
    return options


def _selected(selectors: tuple[str, ...]) -> list[ConfigFlag]:
    chosen: list[ConfigFlag] = []
    for selector in selectors:
        matches = [flag for field, flag in CONFIG_FLAGS.items()
                   if field == selector or field.startswith(selector + ".")]
        if not matches:
            raise ValueError(f"{selector!r} is neither a field nor a section of the config")
        chosen.extend(flag for flag in matches if flag not in chosen)
    return chosen


def add_config_flags(
    parser: argparse.ArgumentParser, *selectors: str, default_notes: Mapping[str, str] | None = None
) -> None:
    """Give ``parser`` a flag for each config field named in ``selectors`` (a dotted field, or a section such as
    ``"training"`` for all its fields), in argument groups named after their config sections.

    ``default_notes`` replaces the shown default of a field where the command fills it in another way, e.g.
    ``{"teacher.model": "the teacher that made the cache"}``.
    """
    notes = dict(default_notes or {})
    groups: dict[str, argparse._ArgumentGroup] = {}
    for flag in _selected(selectors):
        section = flag.field.rpartition(".")[0] or "run"
        if section not in groups:
            doc = re.sub(r"(:\w+:)?`+([^`]*)`+", r"\2", (flag.section.__doc__ or "").strip().splitlines()[0])
            groups[section] = parser.add_argument_group(f"{section} (config)", doc.replace("%", "%%"))
        groups[section].add_argument(*flag.names, dest=flag.field, default=None,
                                     help=flag_help(flag, notes.pop(flag.field, None)), **_argument_options(flag))
    if notes:
        raise ValueError(f"default_notes for fields not exposed: {sorted(notes)}")


def flag_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The config fields set by flags in ``args``, as dotted-key overrides; unset flags are left out."""
    return {field: value for field, value in vars(args).items() if field in CONFIG_FLAGS and value is not None}


def flag_value(args: argparse.Namespace, field: str) -> Any:
    """The value the flag of ``field`` was given, ``None`` when unset (or not exposed by this command)."""
    return getattr(args, field, None)
