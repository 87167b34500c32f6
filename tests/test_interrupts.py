"""A stop (SIGINT/SIGTERM through the CLI's handler) never leaves a temporary file behind in atomic_path."""

from __future__ import annotations

import tempfile

import pytest

from codec import errors
from codec.io import atomic_path


@pytest.fixture(autouse=True)
def _no_stop_left():
    errors.clear_interrupt()
    yield
    errors.clear_interrupt()


def test_a_stop_while_the_temporary_file_is_created_leaves_nothing(tmp_path, monkeypatch):
    real = tempfile.mkstemp

    def mkstemp_then_stop(*args, **kwargs):
        made = real(*args, **kwargs)
        errors.on_stop_signal()  # the signal lands right after the file exists, before atomic_path owns it
        return made

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_then_stop)
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "member.onnx") as tmp:
            tmp.write_bytes(b"x")
    assert list(tmp_path.iterdir()) == []
    assert errors.interrupt_requested()


def test_a_stop_while_writing_removes_the_temporary_file(tmp_path):
    (tmp_path / "member.onnx").write_bytes(b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(tmp_path / "member.onnx") as tmp:
            tmp.write_bytes(b"half")
            errors.on_stop_signal()
    assert [p.name for p in tmp_path.iterdir()] == ["member.onnx"]
    assert (tmp_path / "member.onnx").read_bytes() == b"old"


def test_outside_a_deferred_block_the_handler_raises_at_once():
    with pytest.raises(KeyboardInterrupt):
        errors.on_stop_signal()
    reached = []
    with pytest.raises(KeyboardInterrupt):
        with errors.interrupts_deferred():
            errors.on_stop_signal()  # held until the block ends
            reached.append("after the signal")
    assert reached == ["after the signal"]


def test_an_interrupt_that_an_import_turned_into_another_error_ends_as_interrupted(monkeypatch, capsys):
    from codec import cli
    from codec.commands import inspect

    def interrupted_import(args):
        errors.request_interrupt()  # what the handler records before raising inside the import
        raise ImportError("initialization failed")

    monkeypatch.setattr(inspect, "run", interrupted_import)
    assert cli.main(["inspect", "model.onnx"]) == 130
    assert "interrupted" in capsys.readouterr().err

    def plain_bug(args):
        raise ImportError("a real bug")

    monkeypatch.setattr(inspect, "run", plain_bug)
    with pytest.raises(ImportError):
        cli.main(["inspect", "model.onnx"])
