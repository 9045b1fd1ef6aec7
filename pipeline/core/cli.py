"""The recipe command line every stage shares, and its failure policy.

    <stage> --recipe FILE [key.sub=value ...]
    python -m pipeline.core.cli --recipe recipes/tiny_ko.yaml [key.sub=value ...]   # print the resolved recipe

``run_cli`` parses and validates the recipe, runs the stage, and turns a known failure into one ``error:`` line on
stderr and an exit code: 2 for a bad recipe or input, 1 for a failure while running (a non-finite loss, a full
disk). Anything else keeps its traceback: it is a bug.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from pipeline.core.atomic import storage_full, storage_full_message
from pipeline.core.config import ConfigError, Recipe, load_recipe, to_yaml, validate

EXIT_INPUT = 2
EXIT_RUN = 1


def print_error(message: object) -> None:
    """``error: <message>`` on stderr in one write, prefixed by the rank in a multi-process run (its processes share
    the stream, and each may fail for its own reason)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if world > 1 and rank is not None else ""
    sys.stderr.write(f"{prefix}error: {message}\n")
    sys.stderr.flush()


def add_recipe_arguments(ap: argparse.ArgumentParser) -> None:
    """``--recipe FILE`` and the ``key.sub=value`` overrides, for a command that has options of its own."""
    ap.add_argument("--recipe", required=True, help="recipe YAML")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")


def recipe_from(args: argparse.Namespace, check: bool = True) -> Recipe:
    """The typed recipe the parsed arguments name, overrides applied and (``check``) validated before anything runs.
    Raises ConfigError naming the file and the key."""
    recipe = load_recipe(args.recipe, args.overrides)
    if check:
        validate(recipe, source=args.recipe)
    return recipe


def parse_cli(argv: list[str] | None = None, description: str = "") -> tuple[Recipe, Path]:
    """``--recipe FILE [key.sub=value ...]``: the typed, validated recipe and its file."""
    ap = argparse.ArgumentParser(description=description)
    add_recipe_arguments(ap)
    args = ap.parse_args(argv)
    return recipe_from(args), Path(args.recipe)


def guarded(
    stage: str,
    call: Callable[[], object],
    input_errors: tuple[type[BaseException], ...] = (),
    run_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Run ``call()`` under the failure policy of every command: a known failure is one ``error:`` line and an exit
    code, 2 for a bad recipe or input (``ConfigError`` and ``input_errors``), 1 for a failure while running
    (``run_errors``, or the disk filling up). Anything else keeps its traceback."""
    try:
        call()
    except (ConfigError, *input_errors) as e:
        print_error(e)
        return EXIT_INPUT
    except run_errors as e:
        print_error(e)
        return EXIT_RUN
    except Exception as e:
        if not storage_full(e):
            raise
        print_error(storage_full_message(e, stage))
        return EXIT_RUN
    return 0


def run_cli(
    stage: str,
    description: str,
    run: Callable[[Recipe], object],
    argv: list[str] | None,
    input_errors: tuple[type[BaseException], ...] = (),
    run_errors: tuple[type[BaseException], ...] = (),
) -> int:
    """Every stage's command line: parse and validate the recipe, then run the stage under ``guarded``."""
    return guarded(stage, lambda: run(parse_cli(argv, description)[0]), input_errors, run_errors)


def main(argv: list[str] | None = None) -> None:
    try:
        recipe, _ = parse_cli(argv, "Print the resolved recipe.")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    print(to_yaml(recipe), end="")


if __name__ == "__main__":
    main()
