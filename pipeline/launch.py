"""Launch a stage under ``accelerate launch`` with the recipe's (or the command line's) accelerate settings.

    python -m pipeline.launch sft --recipe recipes/tiny_ko.yaml [--config-file configs/accelerate/zero2.yaml]
        [--num-processes 2] [--num-machines 2 --machine-rank 0 --main-process-ip 10.0.0.1 --main-process-port 29500]
        [key.sub=value ...]

The Makefile calls this (``make sft ACCELERATE_CONFIG=... NUM_PROCESSES=...``). The configs in configs/accelerate/
are GPU-style (MULTI_GPU or DEEPSPEED) and run unchanged on a CPU-only machine: the stages set ``use_cpu`` there,
which gives each process gloo. The recipe is checked against the launch (``pipeline.core.topology``) before anything
starts.

Multi-machine runs: the same command on every machine, with its own ``--machine-rank``; ``--num-processes`` is the
total over all machines. Every machine is started by torchrun with a static rendezvous on machine 0's address and
port, whatever the config file says: under DeepSpeed, accelerate would otherwise hand a multi-machine launch to
DeepSpeed's own launcher (pdsh over ssh from one node), which is not what running the command on each node means.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

from pipeline.core.cli import add_recipe_arguments, launch_of, print_error, recipe_from
from pipeline.core.config import ConfigError
from pipeline.core.errors import EXIT_INPUT
from pipeline.core.locations import resolve_path
from pipeline.core.rundir import TRAINING_STAGES


def cpu_threads(local_processes: int) -> int:
    """CPU threads per process: ``OMP_NUM_THREADS`` when it is set, else the machine's cores shared by its processes.
    accelerate sets ``OMP_NUM_THREADS=1`` in every process it launches unless its config says ``use_cpu`` (the
    shipped configs are GPU-style), which on a CPU machine ran every stage on one core."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    return max((os.cpu_count() or 1) // max(local_processes, 1), 1)


def build_command(argv: list[str] | None = None) -> list[str]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stage", choices=TRAINING_STAGES)
    add_recipe_arguments(ap)
    a = ap.parse_intermixed_args(argv)
    recipe = recipe_from(a)
    topo = launch_of(recipe, a)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(resolve_path(topo.config_file))]
    cmd += ["--num_processes", str(topo.num_processes), "--num_machines", str(topo.num_machines)]
    cmd += ["--num_cpu_threads_per_process", str(cpu_threads(topo.num_processes // max(topo.num_machines, 1)))]
    if topo.num_machines > 1:
        if not topo.main_process_ip or topo.main_process_port is None:
            raise ConfigError(
                f"a run on {topo.num_machines} machines needs machine 0's address and a free port on it, the same on "
                "every machine: MAIN_PROCESS_IP=... MAIN_PROCESS_PORT=... (--main-process-ip, --main-process-port)"
            )
        cmd += ["--machine_rank", str(topo.machine_rank), "--main_process_ip", topo.main_process_ip]
        cmd += ["--main_process_port", str(topo.main_process_port), "--rdzv_backend", "static", "--same_network"]
        if topo.deepspeed:
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    else:
        # any free port unless one is given: single-machine runs never collide
        cmd += ["--machine_rank", "0", "--main_process_port", str(topo.main_process_port or 0)]
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
