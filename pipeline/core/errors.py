"""The two kinds of failure a command reports in one ``error:`` line instead of a traceback, and their exit codes.

Every error a stage raises on purpose derives from one of them; ``pipeline.core.cli.guarded`` turns them into the
line and the code. Anything else is a bug and keeps its traceback.

- ``InputError`` (exit 2): a recipe, a file, a checkpoint or a model that cannot be used as it is. Nothing was
  trained; fix the input and run again.
- ``RunError`` (exit 1): a failure while running (a non-finite loss, a safety limit, a wait that timed out, an
  upload). What was saved before it stays; running again resumes.
"""

from __future__ import annotations

from data_prep.readers import DataError

EXIT_INPUT = 2
EXIT_RUN = 1


class InputError(Exception):
    """An input that cannot be used; the message names the file, the key or the row, and why."""


class ConfigError(InputError, ValueError):
    """A recipe that cannot be used: the message names the file and the key (``pipeline.core.config``)."""


class RunError(Exception):
    """A stage stopped while running; the message says where and what was kept."""


# data_prep reports its own bad rows (it never imports pipeline): its error counts as bad input here.
INPUT_ERRORS: tuple[type[Exception], ...] = (InputError, DataError)
