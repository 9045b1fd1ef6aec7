"""The failure policy every command shares (``pipeline.core.errors``, ``pipeline.core.cli.guarded``).

Catches: an error a stage raises on purpose that is not one of the two kinds (it would leak as a traceback, or a
catch-all would swallow a real bug), and a policy that catches a plain ValueError or RuntimeError, so that a bug
becomes a one-line exit 2 with no traceback.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest

import pipeline
import pipeline.core
from data_prep.readers import DataError
from pipeline.core.cli import guarded
from pipeline.core.errors import EXIT_INPUT, EXIT_RUN, InputError, RunError


def _modules():
    for pkg in (pipeline, pipeline.core):
        for m in pkgutil.iter_modules(pkg.__path__):
            yield importlib.import_module(f"{pkg.__name__}.{m.name}")


def _raise(e: BaseException):
    def call():
        raise e

    return call


def _stray(errors: dict[str, type]) -> list[str]:
    return [name for name, cls in errors.items() if not issubclass(cls, (InputError, RunError))]


def test_every_error_a_stage_raises_on_purpose_is_input_or_run():
    errors = {
        f"{mod.__name__}.{name}": cls
        for mod in _modules()
        for name, cls in vars(mod).items()
        if inspect.isclass(cls) and issubclass(cls, Exception) and cls.__module__ == mod.__name__
    }
    assert len(errors) >= 8, errors  # the scan finds the errors (ConfigError, IncompleteError, LoadError, ...)
    assert not _stray(errors), f"neither bad input nor a failure while running: {_stray(errors)}"
    # Negative control: an error class of neither kind is reported.
    assert _stray({**errors, "pipeline.x.StrayError": type("StrayError", (RuntimeError,), {})}) == [
        "pipeline.x.StrayError"
    ]


@pytest.mark.parametrize(
    "error, code",
    [
        ("pipeline.core.errors.ConfigError", EXIT_INPUT),
        ("pipeline.core.rundir.IncompleteError", EXIT_INPUT),
        ("pipeline.core.loading.LoadError", EXIT_INPUT),
        ("pipeline.core.consistency.ConsistencyError", EXIT_INPUT),
        ("pipeline.core.reward_stats.RewardModelGateError", EXIT_INPUT),
        ("pipeline.core.faults.NonFiniteLossError", EXIT_RUN),
        ("pipeline.core.writer.WaitTimeout", EXIT_RUN),
        ("pipeline.publish.PublishError", EXIT_RUN),
    ],
)
def test_known_failures_are_one_line_and_their_exit_code(error, code, capsys):
    module, name = error.rsplit(".", 1)
    cls = getattr(importlib.import_module(module), name)
    assert guarded("x", _raise(cls("what went wrong"))) == code
    err = capsys.readouterr().err
    assert err.strip() == "error: what went wrong" and "Traceback" not in err


def test_data_prep_errors_are_bad_input(capsys):
    assert guarded("data", _raise(DataError("rows.jsonl row 3: no messages"))) == EXIT_INPUT
    assert "error: rows.jsonl row 3" in capsys.readouterr().err


@pytest.mark.parametrize("bug", [ValueError("bad unpack"), RuntimeError("oops"), KeyError("k"), TypeError("t")])
def test_a_bug_keeps_its_traceback(bug):
    """Negative control for the policy: plain library errors are bugs, raised as they are (exit 1 with a
    traceback from Python), never turned into a tidy one-line exit 2."""
    with pytest.raises(type(bug)):
        guarded("x", _raise(bug))
