"""The recipe command line every stage shares, and its failure policy.

    <stage> --recipe FILE [key.sub=value ...]
    python -m pipeline.core.cli --recipe recipes/tiny_ko.yaml [key.sub=value ...]   # print the resolved recipe

Every command takes the launch options too (``--config-file``, ``--num-processes``, ``--num-machines``,
``--machine-rank``; ``pipeline.core.topology``), so that a recipe is checked against the launch it will run under
wherever it is read: ``make recipe``, ``make plan``, the data stage at the head of a chain, the launcher, and each
launched stage (which reads the launch back from its environment).

``run_cli`` parses and validates the recipe, runs the stage, and turns a known failure into one ``error:`` line on
stderr and an exit code: 2 for a bad recipe or input, 1 for a failure while running (a non-finite loss, a full
disk). Anything else keeps its traceback: it is a bug. In a multi-process stage a failing process also tells the
others (``pipeline.core.peers``), which stop at once instead of waiting in their next collective.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable

from pipeline.core import peers, topology
from pipeline.core.atomic import storage_full, storage_full_message
from pipeline.core.config import ConfigError, Recipe, load_recipe, to_yaml, validate
from pipeline.core.errors import EXIT_INPUT, EXIT_RUN, INPUT_ERRORS, RunError
from pipeline.core.topology import Topology


def print_error(message: object) -> None:
    """``error: <message>`` on stderr in one write, prefixed by the rank in a multi-process run (its processes share
    the stream, and each may fail for its own reason)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    rank = os.environ.get("RANK")
    prefix = f"[rank {rank}] " if world > 1 and rank is not None else ""
    sys.stderr.write(f"{prefix}error: {message}\n")
    sys.stderr.flush()


def add_recipe_arguments(ap: argparse.ArgumentParser) -> None:
    """``--recipe FILE``, the ``key.sub=value`` overrides and the launch options, for a command that has options of
    its own."""
    ap.add_argument("--recipe", required=True, help="recipe YAML")
    ap.add_argument("overrides", nargs="*", help="key.sub=value overrides")
    topology.add_launch_arguments(ap)


def launched() -> bool:
    """Whether this process was started by ``accelerate launch`` (its launch is then read from the environment)."""
    return "WORLD_SIZE" in os.environ or "ACCELERATE_MIXED_PRECISION" in os.environ


def launch_of(recipe: Recipe, args: argparse.Namespace) -> Topology:
    """The launch the command runs under: the environment's in a launched stage, else the launch options'."""
    return topology.from_environment() if launched() else topology.from_arguments(recipe, args)


def recipe_from(args: argparse.Namespace, check: bool = True) -> Recipe:
    """The typed recipe the parsed arguments name, overrides applied and (``check``) validated, with the rules that
    depend on the launch, before anything runs. Raises ConfigError naming the file and the key."""
    recipe = load_recipe(args.recipe, args.overrides)
    if check:
        validate(recipe, source=args.recipe)
        topology.check(recipe, launch_of(recipe, args), source=args.recipe)
    return recipe


def parse_cli(argv: list[str] | None = None, description: str = "") -> tuple[Recipe, Topology]:
    """``--recipe FILE [key.sub=value ...]`` and the launch options: the typed, validated recipe and its launch."""
    ap = argparse.ArgumentParser(description=description)
    add_recipe_arguments(ap)
    args = ap.parse_intermixed_args(argv)
    recipe = recipe_from(args)
    return recipe, launch_of(recipe, args)


def guarded(stage: str, call: Callable[[], object]) -> int:
    """Run ``call()`` under the failure policy of every command (``pipeline.core.errors``): bad input is one ``error:``
    line and exit 2, a failure while running (or the disk filling up) one line and exit 1. Anything else keeps its
    traceback."""
    try:
        call()
    except INPUT_ERRORS as e:
        return _failed(e, EXIT_INPUT)
    except RunError as e:
        return _failed(e, EXIT_RUN)
    except Exception as e:
        if not storage_full(e):
            peers.post(f"{type(e).__name__}: {e}", EXIT_RUN)
            raise
        return _failed(storage_full_message(e, stage), EXIT_RUN)
    return 0


def _failed(message: object, code: int) -> int:
    print_error(message)
    peers.post(message, code)
    return code


def run_cli(
    stage: str, description: str, run: Callable[..., object], argv: list[str] | None, with_launch: bool = False
) -> int:
    """Every stage's command line: parse and validate the recipe, then run the stage under ``guarded``: ``run(recipe)``,
    or ``run(recipe, launch)`` for a stage that needs its launch (``with_launch``)."""

    def call() -> object:
        recipe, launch = parse_cli(argv, description)
        return run(recipe, launch) if with_launch else run(recipe)

    return guarded(stage, call)


def main(argv: list[str] | None = None) -> None:
    try:
        recipe, _ = parse_cli(argv, "Print the resolved recipe.")
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    print(to_yaml(recipe), end="")


if __name__ == "__main__":
    main()
