"""Launch a stage under ``accelerate launch`` with the recipe's (or the command line's) accelerate settings.

    python -m pipeline.launch sft --recipe recipes/tiny_ko.yaml [--config-file configs/accelerate/zero2.yaml]
        [--num-processes 2] [--num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1 --main-process-port 29500]
        [key.sub=value ...]

The Makefile calls this (``make sft ACCELERATE_CONFIG=... NUM_PROCESSES=...``). The configs in configs/accelerate/
are GPU-style (MULTI_GPU or DEEPSPEED) and run unchanged on a CPU-only machine: the stages set ``use_cpu`` there,
which gives each process gloo. Multi-node runs use accelerate's own multi-machine settings: run the same command on
every machine with its ``--machine-rank``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys

from pipeline.core.cli import EXIT_INPUT, add_recipe_arguments, print_error, recipe_from
from pipeline.core.config import ConfigError
from pipeline.core.locations import resolve_path
from pipeline.core.rundir import TRAINING_STAGES


def build_command(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=TRAINING_STAGES)
    add_recipe_arguments(ap)
    ap.add_argument("--config-file", default=None, help="accelerate config (default: the recipe's launch section)")
    ap.add_argument("--num-processes", type=int, default=None, help="processes in total, over all machines")
    ap.add_argument("--num-machines", type=int, default=None)
    ap.add_argument("--machine-rank", type=int, default=None)
    ap.add_argument("--main-process-ip", default=None)
    ap.add_argument("--main-process-port", type=int, default=None)
    a = ap.parse_intermixed_args(argv)
    recipe = recipe_from(a)
    config = resolve_path(a.config_file or recipe.launch.accelerate_config)
    if not config.is_file():
        raise ConfigError(f"accelerate config {config} does not exist")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config)]
    n = a.num_processes or recipe.launch.num_processes
    if n:
        cmd += ["--num_processes", str(n)]
    if a.num_machines:
        cmd += ["--num_machines", str(a.num_machines)]
    if a.machine_rank is not None:
        cmd += ["--machine_rank", str(a.machine_rank)]
    if a.main_process_ip:
        cmd += ["--main_process_ip", a.main_process_ip]
    if a.main_process_port is not None:
        cmd += ["--main_process_port", str(a.main_process_port)]
    elif not a.num_machines or a.num_machines == 1:
        cmd += ["--main_process_port", "0"]  # any free port: single-machine runs never collide
    return cmd + ["-m", f"pipeline.{a.stage}", "--recipe", a.recipe, *a.overrides]


def main(argv: list[str] | None = None) -> int:
    try:
        cmd = build_command(argv)
    except ConfigError as e:
        print_error(e)
        return EXIT_INPUT
    print("[launch] " + " ".join(cmd), flush=True)
    # accelerate's launcher runs in this process so that a stage that fails (and has already printed its one-line
    # error) ends with its own exit code, not with the launcher's traceback of the failed subprocess.
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    try:
        launch_command(launch_command_parser().parse_args(cmd[3:]))
    except subprocess.CalledProcessError as e:
        return e.returncode if e.returncode > 0 else 1
    except ChildFailedError as e:
        rank, failure = e.get_first_failure()
        module = cmd[cmd.index("-m", 3) + 1]
        print(f"error: {module}: process {rank} exited with code {failure.exitcode}", file=sys.stderr)
        return failure.exitcode if failure.exitcode > 0 else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
