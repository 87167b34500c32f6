"""Every command that reads data describes its data options in the same words, and so does `codec --help`."""

from __future__ import annotations

import re

import pytest

from codec.cli import build_parser

DATA_OPTIONS = ("--data", "--data-dir", "--split", "--limit")
RECIPE_DATA_OPTIONS = ("--data-dir", "--n-train", "--n-test")


def _subparsers() -> dict:
    parser = build_parser()
    action = next(a for a in parser._actions if a.dest == "command")
    return dict(action.choices)


def _option_help(parser, flag: str) -> str | None:
    """The help text of `flag` without its trailing "(default ...)": defaults may differ, words may not."""
    for action in parser._actions:
        if flag in action.option_strings:
            return re.sub(r"\s*\(default [^)]*\)$", "", action.help or "")
    return None


@pytest.fixture(scope="module")
def commands():
    return _subparsers()


def test_commands_that_read_data_have_the_same_data_options_in_the_same_words(commands):
    readers = {name: p for name, p in commands.items() if _option_help(p, "--data") is not None}
    assert set(readers) >= {"profile", "eval", "opt", "export"}
    for flag in DATA_OPTIONS:
        # compile reads --data for training (every split), so it has no --split/--limit of one split
        texts = {
            name: _option_help(p, flag)
            for name, p in readers.items()
            if name != "compile" or flag in ("--data", "--data-dir")
        }
        assert None not in texts.values(), f"{flag} missing from {[n for n, t in texts.items() if t is None]}"
        assert len(set(texts.values())) == 1, f"{flag} is described differently: {texts}"


def test_recipe_commands_describe_data_dir_and_subsets_alike(commands):
    for flag in RECIPE_DATA_OPTIONS:
        texts = {
            name: _option_help(p, flag) for name, p in commands.items() if _option_help(p, flag) is not None
        }
        assert {"train", "compile", "train-ensemble", "bench"} <= set(texts), (flag, sorted(texts))
        assert len(set(texts.values())) == 1, f"{flag} is described differently: {texts}"


def test_rendered_help_lines_agree(commands, monkeypatch):
    # what a user reads: argparse's rendering, one line per option at a wide terminal
    monkeypatch.setenv("COLUMNS", "400")
    lines = {}
    for name in ("profile", "eval", "opt", "export"):
        text = commands[name].format_help()
        for flag in DATA_OPTIONS:
            line = next(l for l in text.splitlines() if l.strip().startswith(flag + " "))
            lines.setdefault(flag, {})[name] = re.sub(r"\s*\(default [^)]*\)$", "", " ".join(line.split()))
    for by_command in lines.values():
        assert len(set(by_command.values())) == 1, by_command


def test_top_level_help_lists_the_data_options_in_the_subcommands_words(commands, monkeypatch):
    monkeypatch.setenv("COLUMNS", "400")
    top = " ".join(build_parser().format_help().split())
    for flag in (*DATA_OPTIONS, "--n-train", "--n-test"):
        parser = commands["eval"] if flag in DATA_OPTIONS else commands["train"]
        words = " ".join(_option_help(parser, flag).split())
        assert words in top, f"codec --help does not describe {flag} as the subcommands do: {words!r}"
