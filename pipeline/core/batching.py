"""PPO's batch arithmetic (TRL's PPOConfig names): how a rollout batch splits into minibatches, one optimizer step
each, and micro-batches, one forward each. Pure and torch-free, so that a recipe's batch rules are checked before
anything is imported or trained (``pipeline.core.topology.check``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from pipeline.core.config import ConfigError


@dataclass(frozen=True)
class BatchSizes:
    """How a rollout batch splits into minibatches (one optimizer step each) and micro-batches (one forward each)."""

    local_batch: int  # rollouts per process per update
    batch: int  # rollouts per update over all processes
    mini_batch: int  # rollouts per optimizer step over all processes
    local_mini_batch: int  # rollouts per optimizer step per process
    micro_per_mini: int  # forward/backward passes per optimizer step per process
    num_updates: int  # rollout batches in the run
    optimizer_steps_per_update: int  # num_ppo_epochs x num_mini_batches


def batch_sizes(
    per_device: int, grad_accum: int, world: int, num_mini_batches: int, total_episodes: int, num_ppo_epochs: int
) -> BatchSizes:
    """TRL's PPOConfig arithmetic, with the optimizer-step count it intends (``num_ppo_epochs x num_mini_batches``).
    Raises ConfigError when the batch does not split into minibatches and micro-batches."""
    local = per_device * grad_accum
    if local % num_mini_batches:
        raise ConfigError(
            f"per_device_train_batch_size x gradient_accumulation_steps ({local}) must be divisible by "
            f"num_mini_batches ({num_mini_batches})"
        )
    local_mini = local // num_mini_batches
    if local_mini % per_device:
        raise ConfigError(
            f"a minibatch of {local_mini} rollouts per process does not split into micro-batches of "
            f"per_device_train_batch_size {per_device}"
        )
    batch = local * world
    return BatchSizes(
        local_batch=local,
        batch=batch,
        mini_batch=batch // num_mini_batches,
        local_mini_batch=local_mini,
        micro_per_mini=local_mini // per_device,
        num_updates=math.ceil(total_episodes / batch),
        optimizer_steps_per_update=num_ppo_epochs * num_mini_batches,
    )
