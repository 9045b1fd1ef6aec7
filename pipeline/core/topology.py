"""How a recipe is launched: the accelerate config, the processes in total and the machines they run on, the engine
(DDP or DeepSpeed and its ZeRO stage), and the rules of a recipe that depend on them.

    make recipe|plan|data|sft|... ACCELERATE_CONFIG=configs/accelerate/zero3.yaml NUM_PROCESSES=16 NUM_MACHINES=2

Every command that checks a recipe reads the launch the same way (``add_launch_arguments``, ``from_arguments``):
the command line's ``--config-file``, ``--num-processes`` (in total, over every machine, as accelerate counts them),
``--num-machines`` and ``--machine-rank`` over the recipe's ``launch`` section over the accelerate config's own
values. Inside a stage that accelerate started, the launch is read back from the launcher's environment
(``from_environment``). ``check`` refuses, in one line naming the key, every recipe setting that cannot run under the
launch, so that ``make recipe``, ``make plan`` and the first stage of a chain stop before anything trains.
"""

from __future__ import annotations

import argparse
import json
import os
import typing
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline.core.batching import batch_sizes
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.locations import resolve_path


@dataclass(frozen=True)
class Topology:
    """One launch of a stage."""

    config_file: str
    """The accelerate config, as given (``(environment)`` inside a launched stage)."""
    num_processes: int
    """Processes in total, over every machine."""
    num_machines: int
    """Machines (nodes) the processes run on, the same number on each."""
    machine_rank: int
    """This machine's rank (0 is the machine that writes every shared output)."""
    distributed_type: str
    """accelerate's distributed type: ``NO``, ``MULTI_GPU``, ``MULTI_CPU`` or ``DEEPSPEED``."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage (0: no DeepSpeed)."""
    offload_optimizer: str = "none"
    """Where DeepSpeed keeps the optimizer states: ``none``, ``cpu`` or ``nvme``."""
    main_process_ip: str | None = None
    """Address of machine 0 (multi-machine runs)."""
    main_process_port: int | None = None
    """Port of the job's rendezvous on machine 0 (multi-machine runs)."""

    @property
    def deepspeed(self) -> bool:
        return self.distributed_type == "DEEPSPEED"

    @property
    def per_machine(self) -> int:
        return self.num_processes // max(self.num_machines, 1)

    def describe(self) -> str:
        """``configs/accelerate/zero2.yaml, 16 processes on 2 machines, DeepSpeed ZeRO-2``."""
        machines = f" on {self.num_machines} machines" if self.num_machines > 1 else ""
        engine = f"DeepSpeed ZeRO-{self.zero_stage}" if self.deepspeed else "no ZeRO"
        offload = ", optimizer offloaded to CPU" if self.offload_optimizer == "cpu" else ""
        return f"{self.config_file}, {self.num_processes} process(es){machines}, {engine}{offload}"


# --------------------------------------------------------------------------------------------------------------
# Reading the launch
# --------------------------------------------------------------------------------------------------------------


def add_launch_arguments(ap: argparse.ArgumentParser) -> None:
    """The launch options every recipe-checking command takes (the Makefile passes the same to each)."""
    ap.add_argument("--config-file", default=None, help="accelerate config (default: the recipe's launch section)")
    ap.add_argument("--num-processes", type=int, default=None, help="processes in total, over all machines")
    ap.add_argument("--num-machines", type=int, default=None, help="machines of a multi-machine run")
    ap.add_argument("--machine-rank", type=int, default=None, help="this machine's rank (0: the one that writes)")
    ap.add_argument("--main-process-ip", default=None, help="address of machine 0")
    ap.add_argument("--main-process-port", type=int, default=None, help="rendezvous port on machine 0")


def _read_config(path: Path, shown: str) -> dict:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"accelerate config {shown}: cannot read it ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"accelerate config {shown}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"accelerate config {shown}: not a mapping of accelerate settings")
    return raw


def _int(value: object, key: str, shown: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ConfigError(f"accelerate config {shown}: {key} must be a whole number, got {value!r}")
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"accelerate config {shown}: {key} must be a whole number, got {value!r}") from None


def _zero(ds: dict, shown: str) -> tuple[int, str]:
    """(ZeRO stage, optimizer offload device) of an accelerate config's ``deepspeed_config`` (or the DeepSpeed JSON
    it names with ``deepspeed_config_file``)."""
    file = ds.get("deepspeed_config_file")
    if file:
        path = resolve_path(str(file))
        try:
            zero = json.loads(path.read_text(encoding="utf-8")).get("zero_optimization") or {}
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"accelerate config {shown}: deepspeed_config_file {file}: cannot read it ({e})"
            ) from None
        device = (zero.get("offload_optimizer") or {}).get("device", "none")
        return _int(zero.get("stage", 0), "zero_optimization.stage", str(file)), str(device)
    return _int(ds.get("zero_stage", 0), "deepspeed_config.zero_stage", shown), str(
        ds.get("offload_optimizer_device", "none")
    )


def resolve(
    recipe: Recipe,
    config_file: str | None = None,
    num_processes: int | None = None,
    num_machines: int | None = None,
    machine_rank: int | None = None,
    main_process_ip: str | None = None,
    main_process_port: int | None = None,
) -> Topology:
    """The launch a command asks for: its options over the recipe's ``launch`` section over the config's values."""
    shown = config_file or recipe.launch.accelerate_config
    path = resolve_path(shown)
    if not path.is_file():
        key = "--config-file (ACCELERATE_CONFIG)" if config_file else "launch.accelerate_config"
        raise ConfigError(f"{key}: accelerate config {shown} does not exist")
    raw = _read_config(path, shown)
    kind = str(raw.get("distributed_type", "NO")).upper()
    stage, offload = _zero(raw.get("deepspeed_config") or {}, shown) if kind == "DEEPSPEED" else (0, "none")
    port = main_process_port if main_process_port is not None else raw.get("main_process_port")
    return Topology(
        config_file=shown,
        num_processes=num_processes
        or recipe.launch.num_processes
        or _int(raw.get("num_processes", 1), "num_processes", shown),
        num_machines=num_machines or _int(raw.get("num_machines", 1), "num_machines", shown),
        machine_rank=machine_rank
        if machine_rank is not None
        else _int(raw.get("machine_rank", 0), "machine_rank", shown),
        distributed_type=kind,
        zero_stage=stage,
        offload_optimizer=offload,
        main_process_ip=main_process_ip or raw.get("main_process_ip"),
        main_process_port=None if port is None else _int(port, "main_process_port", shown),
    )


def from_arguments(recipe: Recipe, args: argparse.Namespace) -> Topology:
    """The launch named by ``add_launch_arguments``' options."""
    return resolve(
        recipe,
        args.config_file,
        args.num_processes,
        args.num_machines,
        args.machine_rank,
        args.main_process_ip,
        args.main_process_port,
    )


def from_environment() -> Topology:
    """The launch of the running process, from what accelerate and torchrun put in its environment (a plain
    ``python -m pipeline.<stage>`` is one process, no ZeRO)."""
    env = os.environ
    world = int(env.get("WORLD_SIZE", "1") or 1)
    local = int(env.get("LOCAL_WORLD_SIZE", str(world)) or world)
    deepspeed = env.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    kind = "DEEPSPEED" if deepspeed else ("MULTI_GPU" if world > 1 else "NO")
    return Topology(
        config_file="(environment)",
        num_processes=world,
        num_machines=max(world // max(local, 1), 1),
        machine_rank=int(env.get("GROUP_RANK", "0") or 0),
        distributed_type=kind,
        zero_stage=int(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "0") or 0) if deepspeed else 0,
        offload_optimizer=env.get("ACCELERATE_DEEPSPEED_OFFLOAD_OPTIMIZER_DEVICE", "none") if deepspeed else "none",
    )


# --------------------------------------------------------------------------------------------------------------
# The recipe's rules that depend on the launch
# --------------------------------------------------------------------------------------------------------------


def check(recipe: Recipe, topo: Topology, source: str = "recipe") -> None:
    """Refuse, naming the key, what cannot run under ``topo``. The launch is that of every stage of a chain
    (``make sft rm ppo`` launches each with the same ACCELERATE_CONFIG), so every section is checked."""

    def err(key: str, why: str) -> typing.NoReturn:
        raise ConfigError(f"{source}: key '{key}': {why} (launch: {topo.describe()})")

    if topo.num_processes < 1:
        err("NUM_PROCESSES", "must be at least 1")
    if topo.num_machines < 1:
        err("NUM_MACHINES", "must be at least 1")
    if topo.num_processes % topo.num_machines:
        err(
            "NUM_PROCESSES",
            f"{topo.num_processes} processes do not split evenly over {topo.num_machines} machines (NUM_PROCESSES is "
            "the total over every machine: 16 on 2 machines of 8 GPUs)",
        )
    if not 0 <= topo.machine_rank < topo.num_machines:
        err("MACHINE_RANK", f"{topo.machine_rank} is not in 0..{topo.num_machines - 1}")
    if topo.distributed_type == "NO" and topo.num_processes > 1:
        err(
            "NUM_PROCESSES",
            f"{topo.num_processes} processes under a one-process accelerate config: use ddp.yaml or a zero*.yaml",
        )
    p = recipe.ppo
    try:
        batch_sizes(
            p.per_device_train_batch_size,
            p.gradient_accumulation_steps,
            topo.num_processes,
            p.num_mini_batches,
            p.total_episodes,
            p.num_ppo_epochs,
        )
    except ConfigError as e:  # the batch arithmetic refused (any other error is a bug and keeps its traceback)
        err("ppo.num_mini_batches", str(e))
    if topo.zero_stage == 3:
        if recipe.ppo.method == "lora":
            # The policy's adapters and its disabled-adapter reference share one partitioned base; the reference
            # forward would have to gather it outside the engine on every call.
            err("ppo.method", "lora is not supported under DeepSpeed ZeRO-3 (use ZeRO-2, or full)")
        if recipe.ppo.frozen_precision == "bf16":
            # ZeRO-3 builds every model inside deepspeed.zero.Init, which gives all of them the engine's dtype.
            err("ppo.frozen_precision", "bf16 is not supported under DeepSpeed ZeRO-3 (use fp32)")
