"""The command line's contract for failures: a user's mistake is one line on stderr and exit
status 2; anything else is a bug in selfalign, shown with its traceback, a line asking to report
it, and exit status 1."""
from __future__ import annotations

import pytest

from selfalign import errors
from selfalign.cli import main
from selfalign.commands import models as models_command


def fail_with(monkeypatch, error: BaseException) -> None:
    """Make ``selfalign models`` raise ``error``."""
    def run(args):
        raise error
    monkeypatch.setattr(models_command, "run", run)


@pytest.mark.parametrize("kind", [errors.ConfigError, errors.UsageError, errors.DataError,
                                  errors.CheckpointError])
def test_a_users_mistake_is_one_line_and_exit_2(monkeypatch, capsys, kind):
    message = "shards/shard-000003.npy is truncated; rerun `selfalign prepare`"
    fail_with(monkeypatch, kind(message))
    assert main(["models"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"selfalign models: error: {message}\n"
    assert captured.out == ""


@pytest.mark.parametrize("bug", [KeyError("num_heads"), ValueError("math domain error"),
                                 FileNotFoundError("/nonexistent/cache.npy")])
def test_a_bug_keeps_its_traceback_and_asks_to_be_reported(monkeypatch, capsys, bug):
    fail_with(monkeypatch, bug)
    assert main(["models"]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines[0] == "Traceback (most recent call last):"
    assert f"{type(bug).__name__}: {str(bug)}" in lines
    assert "internal error" in lines[-1] and "please report it" in lines[-1]


def test_a_real_usage_error_reaches_the_user_as_one_line(capsys):
    assert main(["models", "--filter", "XL/2", "--input-size", "33"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("selfalign models: error: no preset matches --filter 'XL/2'") and err.count("\n") == 1
