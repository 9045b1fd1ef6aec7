"""Print what a recipe will run, and whether it fits, without running or downloading anything.

    make plan RECIPE=recipes/gemma2b_ko.yaml [GPU_GIB=80] [ACCELERATE_CONFIG=...] [NUM_PROCESSES=16 NUM_MACHINES=2]
    python -m pipeline.plan --recipe recipes/gemma2b_ko.yaml [--gpu-gib 80] [--config-file ...] [--num-processes 8]

The launch is read as the stages read it (``pipeline.core.topology``: ACCELERATE_CONFIG, NUM_PROCESSES,
NUM_MACHINES over the recipe's launch section), and the recipe is checked against it first, as every stage checks it.
Stages (sft, rm, ppo, dpo), models, datasets, world size, effective batch sizes and steps, and an estimate of per-GPU
memory for each stage's models under the accelerate config's ZeRO stage: parameters, gradients, optimizer states,
activations and the largest logits tensor. A plan that will not fit the stated GPU memory is flagged. Each stage's
shape (``Shape``: which models it trains and which it holds frozen, and one micro-batch's activations) is one
function (``sft_shape``, ``rm_shape``, ``ppo_shape``, ``dpo_shape``); ``per_gpu`` applies the ZeRO accounting to it.

Model sizes come from the model's ``config.json`` when it is local (or embedded), otherwise from the table of known
Gemma configurations below: nothing is downloaded. The estimate follows the ZeRO paper's accounting for bf16
mixed precision with Adam (2 bytes of weights, 2 of gradients and 12 of fp32 master weights and moments per
trained parameter, sharded by stage); it is a planning figure, not a measurement.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass

from pipeline.core.batching import batch_sizes
from pipeline.core.cli import add_recipe_arguments, launch_of, print_error, recipe_from
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.embedded import EMBEDDED_MODELS, GGUFSpec
from pipeline.core.errors import EXIT_INPUT
from pipeline.core.locations import EMBEDDED_PREFIX, resolve_path
from pipeline.core.rundir import MODEL_CONFIG, RunDir, is_complete, read_manifest
from pipeline.core.starts import STAGES, needs
from pipeline.core.topology import Topology

# Architectures of public Gemma checkpoints (from their config.json), so that hub recipes plan offline.
KNOWN_CONFIGS = {
    "google/gemma-2b": dict(
        vocab_size=256000,
        hidden_size=2048,
        intermediate_size=16384,
        num_hidden_layers=18,
        num_attention_heads=8,
        num_key_value_heads=1,
        head_dim=256,
    ),
    "google/gemma-7b": dict(
        vocab_size=256000,
        hidden_size=3072,
        intermediate_size=24576,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=16,
        head_dim=256,
    ),
    "google/gemma-2-2b": dict(
        vocab_size=256000,
        hidden_size=2304,
        intermediate_size=9216,
        num_hidden_layers=26,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=256,
    ),
}
KNOWN_CONFIGS["google/gemma-3-270m"] = dict(
    vocab_size=262144,
    hidden_size=640,
    intermediate_size=2048,
    num_hidden_layers=18,
    num_attention_heads=4,
    num_key_value_heads=1,
    head_dim=256,
)
# Korean continuations keep their base architecture.
KNOWN_CONFIGS["beomi/gemma-ko-2b"] = KNOWN_CONFIGS["google/gemma-2b"]
KNOWN_CONFIGS["beomi/gemma-ko-7b"] = KNOWN_CONFIGS["google/gemma-7b"]
GIB = 1024**3


@dataclass
class Arch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int

    def parameters(self, lm_head: bool = True) -> int:
        """Parameter count of a Gemma decoder (tied embeddings: the output head adds nothing)."""
        h, hd = self.hidden_size, self.head_dim
        attn = h * self.num_attention_heads * hd * 2 + h * self.num_key_value_heads * hd * 2
        mlp = 3 * h * self.intermediate_size
        return self.vocab_size * h + self.num_hidden_layers * (attn + mlp + 2 * h) + h + (0 if lm_head else h)


def architecture(recipe: Recipe) -> tuple[Arch, str]:
    name = recipe.model.name_or_path
    if name.startswith(EMBEDDED_PREFIX):
        spec = EMBEDDED_MODELS[name[len(EMBEDDED_PREFIX) :]]
        if isinstance(spec, GGUFSpec):  # a real base: its upstream architecture, without building it
            return Arch(**KNOWN_CONFIGS[spec.upstream]), f"known configuration table ({spec.upstream})"
        vocab = spec.model_vocab_size or -(-spec.vocab_size // 64) * 64
        return Arch(
            vocab,
            spec.hidden_size,
            spec.intermediate_size,
            spec.num_hidden_layers,
            spec.num_attention_heads,
            spec.num_key_value_heads,
            spec.head_dim,
        ), "embedded spec"
    local = resolve_path(name) / MODEL_CONFIG
    if local.is_file():
        cfg = json.loads(local.read_text(encoding="utf-8"))
        fields = Arch.__dataclass_fields__
        cfg.setdefault("head_dim", cfg["hidden_size"] // cfg["num_attention_heads"])
        return Arch(**{k: cfg[k] for k in fields}), str(local)
    if name in KNOWN_CONFIGS:
        return Arch(**KNOWN_CONFIGS[name]), "known configuration table"
    raise ConfigError(
        f"no architecture for {name!r} without downloading: use a local directory or add it to "
        "pipeline/plan.py KNOWN_CONFIGS"
    )


def trained_bytes(n: int, world: int, stage: int, offload: str) -> dict[str, float]:
    """Per-GPU bytes of a trained model: weights, gradients, optimizer states. Without ZeRO (stage 0) the weights
    and gradients are fp32 and bf16 is autocast (``run.precision``); with ZeRO, 16-bit weights and gradients and an
    fp32 master copy in the optimizer state, partitioned by stage. 16 bytes per parameter either way, unsharded."""
    if stage == 0:
        return {"weights": 4.0 * n, "gradients": 4.0 * n, "optimizer": 0.0 if offload == "cpu" else 8.0 * n}
    weights = 2 * n / (world if stage >= 3 else 1)
    grads = 2 * n / (world if stage >= 2 else 1)
    optim = 0.0 if offload == "cpu" else 12 * n / (world if stage >= 1 else 1)
    return {"weights": weights, "gradients": grads, "optimizer": optim}


def activation_bytes(a: Arch, tokens: int, checkpointing: bool) -> float:
    """Activation memory of one micro-batch (Korthikanti et al.: ~34 bytes x hidden per token and layer in 16-bit,
    attention scores excluded as with fused attention); with checkpointing, one hidden state per layer."""
    per_token_layer = 2 * a.hidden_size if checkpointing else 34 * a.hidden_size
    return tokens * a.num_hidden_layers * per_token_layer


LORA_SHARE = 0.01  # LoRA adapters: about 1% of the parameters (planning figure; r and target modules vary)


@dataclass(frozen=True)
class Shape:
    """What one stage holds on each GPU before ZeRO shards it: the parameter counts of the models it trains and of
    the models it holds frozen, and the bytes of one micro-batch's activations and of its largest logits tensor."""

    trained: tuple[int, ...]
    frozen: tuple[int, ...]
    activations: float
    logits: float


def per_gpu(shape: Shape, world: int, stage: int, offload: str) -> dict[str, float]:
    """Per-GPU bytes of a stage by part: its trained models' weights, gradients and optimizer states
    (``trained_bytes``), its frozen models (fp32 under autocast without DeepSpeed, 16-bit DeepSpeed inference engines
    with it, sharded under ZeRO-3), its activations and its largest logits."""
    parts = {"weights": 0.0, "gradients": 0.0, "optimizer": 0.0}
    for t in shape.trained:
        for k, v in trained_bytes(t, world, stage, offload).items():
            parts[k] += v
    parts["frozen models"] = sum((4 if stage == 0 else 2) * f / (world if stage >= 3 else 1) for f in shape.frozen)
    parts["activations"] = shape.activations
    parts["largest logits"] = shape.logits
    return parts


def _policy(a: Arch, method: str) -> tuple[int, int]:
    """(trained, frozen) parameters of a causal LM trained by ``method``: full trains it all; LoRA trains the
    adapters and holds the base frozen."""
    n = a.parameters()
    return (n, 0) if method == "full" else (int(n * LORA_SHARE), n)


def sft_shape(recipe: Recipe, a: Arch) -> Shape:
    """The policy (counted as fully trained, whatever ``sft.method``), its micro-batch of ``max_length`` rows, and
    fp32 logits with their gradient."""
    s = recipe.sft
    tokens = s.per_device_train_batch_size * recipe.data.max_length
    return Shape(
        (a.parameters(),), (), activation_bytes(a, tokens, s.gradient_checkpointing), tokens * a.vocab_size * 4 * 2
    )


def rm_shape(recipe: Recipe, a: Arch) -> Shape:
    """A sequence classifier (counted as fully trained), chosen and rejected rows per pair, no vocabulary logits."""
    r = recipe.rm
    tokens = 2 * r.per_device_train_batch_size * recipe.data.max_length  # chosen and rejected
    return Shape((a.parameters(),), (), activation_bytes(a, tokens, r.gradient_checkpointing), 0.0)


def ppo_shape(recipe: Recipe, a: Arch, local_batch: int) -> Shape:
    """The policy (full or LoRA), the value model (``estimator: gae`` only: rloo and grpo build none, so no value
    weights, gradients, optimizer states or value activations), the reference (a frozen copy of the SFT model; under
    LoRA the adapter-disabled base, no second copy) and the reward model. Activations: one training micro-batch of
    prompt + response rows through the policy (and the value model), plus the key/value cache of one rollout chunk
    (``local_rollout_forward_batch_size`` rows of ``local_batch``; the rollout batch counts samples, prompts x
    ``num_generations``)."""
    p, d = recipe.ppo, recipe.data
    critic = p.estimator == "gae"
    policy, base = _policy(a, p.method)
    classifier = a.parameters(lm_head=False)  # the value and reward models: the decoder and a score head
    seq = d.max_prompt_length + p.response_length
    tokens = p.per_device_train_batch_size * seq
    rollout_rows = min(p.local_rollout_forward_batch_size, local_batch)
    kv_cache = rollout_rows * seq * a.num_hidden_layers * a.num_key_value_heads * a.head_dim * 2 * 2
    return Shape(
        trained=(policy, classifier) if critic else (policy,),
        # The LoRA base is the reference (else a reference copy), and the reward model unless there is none.
        frozen=(base or a.parameters(), classifier) if p.uses_reward_model else (base or a.parameters(),),
        activations=(2 if critic else 1) * activation_bytes(a, tokens, p.gradient_checkpointing) + kv_cache,
        # A sampling step (per row and id: fp32 logits, log-probs and probabilities, the float64 cumulative sum) or
        # the training head, bounded by ppo.logits_memory_mb (pipeline.core.heads.LOGIT_BYTES)
        logits=max(rollout_rows * a.vocab_size * 20, p.logits_memory_mb << 20),
    )


def dpo_shape(recipe: Recipe, a: Arch) -> Shape:
    """The policy (full or LoRA) and a frozen reference: a second full copy of the SFT model for full fine-tuning,
    nothing extra under LoRA (the adapter-disabled base is the reference). Each pair is two rows, chosen and
    rejected, through the policy in one micro-batch (TRL concatenates them); the reference's forward is without
    gradient and keeps no activations. The logits are an upper bound: the fp32 logits of every position and their
    gradient, where TRL's fused log-prob head (``add_fused_lm_head``) computes them in chunks and never holds them
    all, so a plan near the memory limit may still fit."""
    o = recipe.dpo
    policy, base = _policy(a, o.method)
    tokens = 2 * o.per_device_train_batch_size * recipe.data.max_length  # chosen and rejected
    return Shape(
        trained=(policy,),
        frozen=(base or a.parameters(),),  # the reference copy, or the LoRA base that doubles as it
        activations=activation_bytes(a, tokens, o.gradient_checkpointing),
        logits=tokens * a.vocab_size * 4 * 2,
    )


def plan(recipe: Recipe, launch: Topology, gpu_gib: float = 80.0) -> tuple[str, bool]:
    a, source = architecture(recipe)
    world, stage, offload = launch.num_processes, launch.zero_stage, launch.offload_optimizer
    n = a.parameters()
    d = recipe.data
    data = RunDir.of(recipe).data
    counts = read_manifest(data).counts if is_complete(data) else {}
    lines = [
        f"plan for {recipe.run.name}: {recipe.model.name_or_path} ({n / 1e9:.3f}B parameters, architecture from "
        f"{source})",
        f"launch: {launch.describe()}",
        f"GPU memory stated: {gpu_gib:g} GiB",
        "",
    ]
    fits = True

    def steps(per_device: int, ga: int, epochs: float, max_steps: int, data_key: str) -> str:
        batch = per_device * ga * world
        rows = counts.get(data_key, {}).get("train")
        if max_steps > 0:
            return f"global batch {batch}, {max_steps} optimizer steps (max_steps)"
        if rows is None:
            return f"global batch {batch}, steps = {epochs:g} x ceil(rows / {batch}) (rows known after `make data`)"
        return f"global batch {batch}, {math.ceil(epochs * math.ceil(rows / batch))} optimizer steps over {rows} rows"

    def memory(shape: Shape) -> None:
        nonlocal fits
        parts = per_gpu(shape, world, stage, offload)
        total = sum(parts.values())
        ok = total <= gpu_gib * GIB
        fits &= ok
        detail = ", ".join(f"{k} {v / GIB:.2f}" for k, v in parts.items())
        lines.append(
            f"  memory per GPU: {total / GIB:.1f} GiB ({detail} GiB)"
            + ("" if ok else f"  <-- DOES NOT FIT {gpu_gib:g} GiB")
        )

    s = recipe.sft
    lines.append(f"[sft] data: {', '.join(x.path for x in d.sft.train) or '(none)'}; method {s.method}")
    lines.append(
        "  "
        + steps(s.per_device_train_batch_size, s.gradient_accumulation_steps, s.num_train_epochs, s.max_steps, "sft")
    )
    memory(sft_shape(recipe, a))
    r = recipe.rm
    lines.append(
        f"[rm] data: {', '.join(x.path for x in d.preference.train) or '(none)'}; method {r.method}; "
        f"gate: held-out accuracy >= {r.min_accuracy}"
    )
    lines.append(
        "  "
        + steps(
            r.per_device_train_batch_size, r.gradient_accumulation_steps, r.num_train_epochs, r.max_steps, "preference"
        )
    )
    memory(rm_shape(recipe, a))
    p = recipe.ppo
    sizes = batch_sizes(
        p.per_device_train_batch_size,
        p.gradient_accumulation_steps,
        world,
        p.num_mini_batches,
        p.total_episodes,
        p.num_ppo_epochs,
    )
    critic = p.estimator == "gae"
    lines.append(
        f"[ppo] prompts: {', '.join(x.path for x in d.prompts.train) or '(none)'}; method {p.method}; estimator "
        + (
            f"gae, value from {'rm' if p.value_from == 'rm' else ('ppo.init_from' if p.init_from else 'sft')}"
            if critic
            else f"{p.estimator}, {p.num_generations} samples per prompt, no value model"
        )
    )
    scoring = (
        ["the reward model" + (f" x {p.reward_model_weight:g}" if p.reward_functions else "")]
        if p.uses_reward_model
        else []
    )
    scoring += [f"{f.function} x {f.weight:g}" for f in p.reward_functions]
    lines.append(f"  starts from {p.init_from or 'the SFT checkpoint'}; score: {' + '.join(scoring)}")
    lines.append(
        f"  {sizes.num_updates} updates of {sizes.batch} rollouts ({sizes.local_batch} per process"
        + (
            f"; {sizes.batch // p.num_generations} prompts x {p.num_generations} samples"
            if p.num_generations > 1
            else ""
        )
        + f"), {sizes.optimizer_steps_per_update} optimizer steps each (minibatch {sizes.mini_batch}), "
        f"{sizes.num_updates * sizes.optimizer_steps_per_update} in total"
    )
    memory(ppo_shape(recipe, a, sizes.local_batch))
    o = recipe.dpo
    lines.append(
        f"[dpo] data: {', '.join(x.path for x in d.preference.train) or '(none)'} (pairs: a chosen and a rejected row "
        f"each); method {o.method}; beta {o.beta}, {o.loss_type} loss; starts from "
        f"{o.init_from or 'the SFT checkpoint'}; reference: "
        + (
            f"a frozen copy of the {'start model' if o.init_from else 'SFT model'}"
            if o.method == "full"
            else "the adapter-disabled base (no copy)"
        )
    )
    lines.append(
        "  "
        + steps(
            o.per_device_train_batch_size, o.gradient_accumulation_steps, o.num_train_epochs, o.max_steps, "preference"
        )
    )
    memory(dpo_shape(recipe, a))
    lines += [""] + [f"make {x} runs: {' -> '.join([*needs(recipe, x), x])}" for x in ("sft", "rm", "ppo", "dpo")]
    lines += [
        "",
        "fits"
        if fits
        else "DOES NOT FIT: use more processes, a higher ZeRO stage, offload, smaller "
        "micro-batches or gradient checkpointing",
    ]
    return "\n".join(lines), fits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(ap)
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU (GiB)")
    ap.add_argument(
        "--needs",
        choices=STAGES,
        metavar="STAGE",
        help="print only the stages STAGE needs first under the recipe, in order (what `make STAGE` runs first)",
    )
    ap.add_argument(
        "--goals", default="", help="with --needs: make's goals; those before STAGE are already being made"
    )
    a = ap.parse_intermixed_args(argv)
    try:
        recipe = recipe_from(a)
        if a.needs:
            goals = a.goals.split()
            before = goals[: goals.index(a.needs)] if a.needs in goals else []
            made = {x for g in before if g in STAGES for x in [g, *needs(recipe, g)]}  # made by then, in order
            print(" ".join(x for x in needs(recipe, a.needs) if x not in made))
            return 0
        text, fits = plan(recipe, launch_of(recipe, a), a.gpu_gib)
    except ConfigError as e:
        print_error(e)
        return EXIT_INPUT
    print(text)
    return 0 if fits else 3


if __name__ == "__main__":
    sys.exit(main())
