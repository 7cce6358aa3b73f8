"""CLI flags come from the config model: each maps to a config field, says what the field's description says,
overrides the config file only when given, and a bad value is one argparse line with exit code 2."""

from __future__ import annotations

import argparse
import re

import pytest
import yaml

from m3distill.cli import build_parser, main
from m3distill.cli._common import resolve_config
from m3distill.cli._flags import CONFIG_FLAGS, FLAG_NAMES
from m3distill.config import M3DistillConfig

# Flags that scripts, tests and the README already use: renaming one breaks a user's command line.
CONTRACT_FLAGS = {
    "synth": ["--corpus", "--general", "--general-ratio", "--text-column", "--id-column", "--hf-split",
              "--max-documents", "--skip-bad-files", "--run-dir", "--tokenizer", "--teacher", "--max-tokens",
              "--overlap-tokens", "--no-language-detection", "--generator", "--questions-per-context", "--seed",
              "--dev", "--test", "--llm-base-url", "--llm-model", "--llm-api-key-env", "--llm-concurrency",
              "--llm-cache", "--out", "--overwrite", "--config"],
    "teacher": ["--data", "--teacher", "--out", "--run-dir", "--revision", "--batch-size", "--dtype",
                "--max-seq-length", "--shard-size", "--device", "--force", "--config"],
    "train": ["--data", "--cache", "--out", "--run-dir", "--teacher", "--layers", "--strategy", "--plan",
              "--search-candidates", "--search-steps", "--max-steps", "--epochs", "--lr", "--batch-size",
              "--max-seq-length", "--eval-steps", "--save-steps", "--lr-scheduler", "--best-metric",
              "--early-stopping", "--texts", "--device", "--loss-mse", "--loss-cosine", "--loss-in-batch-kl",
              "--loss-anchor-kl", "--loss-token", "--resume", "--force", "--config"],
    "evaluate": ["--data", "--teacher", "--students", "--cache", "--out", "--k", "--index", "--qdrant-url",
                 "--distractors", "--device", "--config"],
    "run": ["--run-dir", "--force"],
}


def _commands() -> dict[str, argparse.ArgumentParser]:
    subparsers = next(action for action in build_parser()._actions if isinstance(action, argparse._SubParsersAction))
    return dict(subparsers.choices)


def _config_actions() -> list[tuple[str, argparse.Action]]:
    return [(command, action) for command, parser in _commands().items() for action in parser._actions
            if action.dest in CONFIG_FLAGS or "." in action.dest]


def _config_value(config: M3DistillConfig, field: str):
    value = config
    for part in field.split("."):
        value = getattr(value, part)
    return value


def test_every_existing_flag_still_parses():
    commands = _commands()
    for command, flags in CONTRACT_FLAGS.items():
        known = set(commands[command]._option_string_actions)
        assert not set(flags) - known, command


def test_every_config_flag_maps_to_an_existing_config_field():
    actions = _config_actions()
    assert len(actions) > 60
    defaults = M3DistillConfig()
    for command, action in actions:
        assert action.dest in CONFIG_FLAGS, (command, action.option_strings)
        _config_value(defaults, action.dest)  # raises if the path names no field
        assert action.default is None, (command, action.dest)  # unset keeps the config file's value
    assert set(FLAG_NAMES) <= set(CONFIG_FLAGS)


def test_help_is_the_field_description_with_the_config_default():
    defaults = M3DistillConfig()
    for command, action in _config_actions():
        description = CONFIG_FLAGS[action.dest].info.description
        help_text = action.help.replace("%%", "%")
        assert help_text.startswith(description), (command, action.dest)
        default = _config_value(defaults, action.dest)
        if command == "train" and action.dest == "teacher.model":
            assert help_text.endswith("(default: the teacher that made the cache)")
        elif command == "run":
            assert help_text.endswith("(default: the config file's run_dir)")
        elif isinstance(default, (int, float, str)) and not isinstance(default, bool):
            assert help_text == f"{description} (default: {default})", (command, action.dest)


def test_help_output_shows_the_config_descriptions(capsys):
    from m3distill.config import LossConfig, TeacherConfig

    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    shown = " ".join(capsys.readouterr().out.split())
    assert " ".join(LossConfig.model_fields["anchor_kl"].description.split()) in shown
    assert "--lr X, --learning-rate X Peak learning rate, reached after the warm-up. (default: 0.001)" in shown
    with pytest.raises(SystemExit):
        main(["teacher", "--help"])
    shown = " ".join(capsys.readouterr().out.split())
    assert f"{TeacherConfig.model_fields['shard_size'].description} (default: 2048)" in shown


@pytest.fixture
def config_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({
        "run_dir": str(tmp_path / "run"),
        "students": {"layers": [2]},
        "training": {"max_steps": 7, "learning_rate": 0.01, "loss": {"mse": 0.5}},
        "synth": {"splits": {"dev": 0.2}, "detect_language": True},
        "evaluation": {"k": [5]},
    }), encoding="utf-8")
    return path


def _resolve(*argv: str):
    return resolve_config(build_parser().parse_args(list(argv)))


def test_a_flag_overrides_the_config_file_and_an_unset_flag_keeps_it(config_file):
    config = _resolve("train", "--config", str(config_file), "--max-steps", "9", "--loss-cosine", "0.25")
    assert config.training.max_steps == 9 and config.training.loss.cosine == 0.25
    assert config.training.learning_rate == 0.01 and config.training.loss.mse == 0.5  # kept from the file
    assert config.students.layers == [2] and config.run_dir == str(config_file.parent / "run")

    unset = _resolve("train", "--config", str(config_file))
    assert unset == resolve_config(argparse.Namespace(config=str(config_file)))


def test_aliases_lists_and_switches_reach_their_fields(config_file):
    train = _resolve("train", "--config", str(config_file), "--lr", "0.5", "--layers", "3,1", "--plan", "0,1",
                     "--plan", "2,3", "--texts", "contexts, questions", "--early-stopping", "5",
                     "--no-group-by-length")
    assert train.training.learning_rate == 0.5 and train.students.layers == [3, 1]
    assert train.students.explicit == [[0, 1], [2, 3]] and train.training.texts == ["contexts", "questions"]
    assert train.training.early_stopping_patience == 5 and train.training.group_by_length is False
    assert _resolve("train", "--learning-rate", "0.2").training.learning_rate == 0.2

    synth = _resolve("synth", "--config", str(config_file), "--no-language-detection", "--dev", "3",
                     "--llm-cache", "answers.sqlite", "--teacher", "some/model")
    assert synth.synth.detect_language is False and synth.synth.splits.dev == 3
    assert synth.synth.splits.test == 0.1 and synth.synth.llm.cache_path == "answers.sqlite"
    assert synth.teacher.model == "some/model"

    evaluate = _resolve("evaluate", "--config", str(config_file), "--index", "hnsw", "--k", "20,10")
    assert evaluate.evaluation.index == ["exact", "hnsw"]  # HNSW is measured beside exact search
    assert evaluate.evaluation.k == [10, 20]
    weighted = _resolve("evaluate", "--hybrid-weights", "1, 0.5,0.8")
    assert weighted.evaluation.hybrid_weights == (1.0, 0.5, 0.8)
    assert _resolve("train", "--loss-sparse", "0", "--loss-colbert", "2").training.loss.colbert == 2.0


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["train", "--lr", "-1"], "--lr"),
        (["train", "--max-steps", "0"], "--max-steps"),
        (["train", "--strategy", "sideways"], "--strategy"),
        (["train", "--texts", "contexts,poems"], "--texts"),
        (["train", "--layers", "2,x"], "--layers"),
        (["train", "--warmup-ratio", "1.5"], "--warmup-ratio"),
        (["teacher", "--dtype", "float8"], "--dtype"),
        (["teacher", "--batch-size", "many"], "--batch-size"),
        (["evaluate", "--index", "ivf"], "--index"),
        (["evaluate", "--hybrid-weights", "1,0.3"], "--hybrid-weights"),
        (["train", "--loss-sparse", "-1"], "--loss-sparse"),
        (["synth", "--max-tokens", "4"], "--max-tokens"),
    ],
)
def test_a_bad_flag_value_is_one_line_and_exit_2(argv, flag, capsys):
    with pytest.raises(SystemExit) as exited:
        main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    assert re.match(rf"m3distill {argv[0]}: error: argument {flag}\b", err), err


def test_a_value_only_the_whole_config_refuses_is_one_line_and_exit_2(tmp_path, capsys):
    code = main(["-q", "train", "--run-dir", str(tmp_path), "--loss-cosine", "0", "--loss-anchor-kl", "0"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "every loss weight is 0" in err
