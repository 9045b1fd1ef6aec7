"""PPO on the paths a real model takes: bf16 with fp32 master weights, the value model on the scores' scale, a
generation config that nothing merges into, dropout rates the model copied at construction, <eos>-ended responses,
the head's size under ZeRO-3, clipping policy and value apart, gradient checkpointing, the logged learning rate and
metric names, and a NaN on one process of two. Each test names the defect it catches; where a check could pass
with the defect present, a negative control shows it fails on the broken variant."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest
import torch

from pipeline.core.config import ConfigError, load_recipe
from tests.helpers import REPO
from tests.helpers.chain import BASE, RECIPE
from tests.helpers.chain import chain_recipe as _recipe
from tests.helpers.chain import fresh_run as _fresh
from tests.helpers.chain import ppo_metrics as _metrics
from tests.helpers.chain import ppo_setup as _setup
from tests.helpers.checkpoints import changed_fraction as _changed_fraction
from tests.helpers.launch import launch_command


def _prompts(tok, texts=("사과는 무엇인가요?", "3 더하기 4는?", "녹차에 대해 알려 주세요.")):
    return [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
        for p in texts
    ]


def _fixed_response(tok, pad_id):
    """The prompts above, left-padded, each answered "사과는 좋습니다.<end_of_turn>" and 3 pads: ``(queries, responses,
    ids, attention mask, position ids, index of the stop token in the response)``."""
    from pipeline.core.sampling import left_pad, positions

    q = left_pad(_prompts(tok), pad_id, "cpu")
    resp = tok("사과는 좋습니다.", add_special_tokens=False)["input_ids"] + [
        tok.convert_tokens_to_ids("<end_of_turn>")
    ]
    r = torch.tensor([resp + [pad_id] * 3] * q.size(0))
    seq = torch.cat([q, r], 1)
    mask = (seq != pad_id).long()
    return q, r, seq, mask, positions(mask), len(resp) - 1


# W1 -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_bf16_trains_fp32_master_weights_with_a_first_ratio_of_one(
    chain, tmp_path, capsys, monkeypatch, fresh_accelerator_state
):
    """Catches pure-bf16 AdamW (no fp32 master copy): at lr 3e-6 a bf16 weight keeps nearly every entry unchanged,
    so the policy barely trains. Also catches rollout forwards outside autocast (the first ratio or KL not exact).
    Besides the start line, the stage's own objects are checked: its accelerator computes in bf16 (a head call
    under its autocast gives bf16) while every weight its optimizer steps is fp32. Negative control: the stage
    itself with its models loaded in bf16 (what it did before the fix: its own AdamW then steps bf16 weights), same
    recipe and seed, steps bf16 weights, saves them in bf16 and changes 2% of the entries (the fixed run: all but
    0.04%), failing each check."""
    from accelerate.state import AcceleratorState
    from safetensors.torch import load_file

    from pipeline import ppo
    from pipeline.core import devices

    args = ["run.precision=bf16", "ppo.learning_rate=3e-6", "ppo.total_episodes=64", "ppo.panel_every=0"]
    sft = load_file(chain / "tiny_ko" / "sft" / "final" / "model.safetensors")
    built = []  # the Setup each run of the stage builds (recorded, not changed)
    build_setup = ppo.build_setup

    def recording(*args, **kwargs):
        setup, scheduler = build_setup(*args, **kwargs)
        built.append(setup)
        return setup, scheduler

    monkeypatch.setattr(ppo, "build_setup", recording)

    def train(out):
        """The stage's two updates from the SFT model; the saved weights."""
        AcceleratorState._reset_state(reset_partial_state=True)  # a stage normally runs in a process of its own
        final = ppo.run(_recipe(_fresh(chain, out), *args, "ppo.num_ppo_epochs=1"))
        return load_file(final / "model.safetensors")

    def stepped_dtypes(s):
        """The dtypes of the weights the stage's optimizer steps."""
        inner = s.optimizer.optimizer if hasattr(s.optimizer, "optimizer") else s.optimizer
        return {p.dtype for group in inner.param_groups for p in group["params"]}

    def trained_fraction(got):
        """The share of entries the run changed (the start rounded to the saved dtype)."""
        return _changed_fraction({k: v.to(got[k].dtype) for k, v in sft.items()}, got)

    got = train(tmp_path / "fixed")
    assert "; bf16;" in capsys.readouterr().out
    first = _metrics(tmp_path / "fixed")[0]
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-6)  # rollout and training forwards: one function
    assert first["objective/kl"] == pytest.approx(0.0, abs=1e-6)  # policy and reference under the same autocast
    assert {v.dtype for v in got.values()} == {torch.float32}
    assert trained_fraction(got) > 0.9, trained_fraction(got)
    s = built[-1]
    assert s.accelerator.mixed_precision == "bf16" and s.bf16
    policy = s.unwrapped.policy
    with s.autocast():  # the context every rollout forward runs in
        assert policy.get_output_embeddings()(torch.ones(1, policy.config.hidden_size)).dtype == torch.bfloat16
    assert stepped_dtypes(s) == {torch.float32}  # fp32 master weights
    # Negative control: the same run with the stage's models loaded in bf16.
    monkeypatch.setattr(ppo, "precision", lambda setting: {**devices.precision(setting), "dtype": torch.bfloat16})
    pure = train(tmp_path / "pure_bf16")
    assert stepped_dtypes(built[-1]) == {torch.bfloat16}
    assert {v.dtype for v in pure.values()} == {torch.bfloat16}
    assert trained_fraction(pure) < 0.5, trained_fraction(pure)


# W2 -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_value_model_from_the_reward_model_is_on_the_normalised_scale(chain):
    """Catches a value model that outputs raw reward units while the scores are standardised: its first targets
    would be off by the reward model's mean and scale (here 3.0 and 6.7)."""
    from pipeline.core.reward_stats import RewardStats
    from pipeline.core.sampling import score_at
    from pipeline.ppo import build_setup

    stats = RewardStats.read(chain / "tiny_ko" / "rm" / "final")
    assert abs(stats.mean) > 1 and stats.std > 2  # the effect below is large for this reward model
    s, tok = _setup(chain)
    q, r, seq, mask, pos, stop = _fixed_response(tok, s.pad_id)
    raw = score_at(s.reward, seq, mask, pos, torch.full((q.size(0),), q.size(1) + stop))
    normalised = (raw - stats.mean) / stats.std

    from accelerate import Accelerator

    run = chain / "tiny_ko"
    rm_dir = run / "rm" / "final"
    recipe = _recipe(chain, "ppo.normalize_reward=true")
    fixed, _ = build_setup(recipe, Accelerator(cpu=True), run / "sft" / "final", rm_dir, rm_dir, tok, 10, stats)
    with torch.no_grad():
        _, values, _ = fixed.model(seq, mask, pos, r, 1.0)
        _, unscaled, _ = s.model(seq, mask, pos, r, 1.0)
    # values[:, j] is the value of the state before response token j: at j = stop + 1, the stop token's state,
    # exactly what the reward model scored.
    assert torch.allclose(values[:, stop + 1], normalised, atol=1e-4)
    # Negative control: the raw head (what PPO used before) fails the same check, by far more than its tolerance.
    assert not torch.allclose(unscaled[:, stop + 1], normalised, atol=1e-4)
    assert (unscaled[:, stop + 1] - normalised).abs().max() > 0.3


@pytest.mark.slow
def test_the_stage_standardises_values_only_when_scores_are(chain, tmp_path, capsys, monkeypatch):
    """Catches the stage not passing the reward statistics on (a value model from the reward model outputting raw
    reward units, 3.0 and 6.7 off, while the scores are standardised), or passing them for a value model from SFT.
    Checks the values of the model the stage builds (``ppo.setup``), not only its start line: from the reward model,
    the value at a stop token equals (score - mean) / std of the reward model's own Hugging Face forward there; from
    SFT, every value equals the value model's plain head output. Tolerance 1e-4 (fp32 forwards of the same weights
    through different code; they agree exactly here, and standardising moves a value by |v (1 - 1/std) + mean/std|,
    0.45 for v = 0). Negative controls: the stage with the statistics dropped, or passed to the SFT value model,
    misses by more than 0.3 (measured 3.9 and 0.71); with them dropped the start line still claims standardisation,
    so the line alone would not catch it."""
    from accelerate.state import AcceleratorState

    from pipeline import ppo
    from pipeline.core.reward_stats import RewardStats

    stats = RewardStats.read(chain / "tiny_ko" / "rm" / "final")
    assert abs(stats.mean) > 1 and stats.std > 2  # the effect below is large for this reward model
    out = _fresh(chain, tmp_path)
    inputs = ppo.read_inputs(_recipe(out))
    build_setup = ppo.build_setup
    keep = object()

    def stage(*overrides, stats_passed=keep):
        """The PPO models the stage builds with ``ppo.normalize_reward``; ``stats_passed`` replaces the reward
        statistics the stage hands to build_setup (the broken variants)."""

        def with_stats(*args, **kwargs):
            return build_setup(*args[:7], **{**kwargs, "reward_stats": stats_passed})

        if stats_passed is not keep:
            monkeypatch.setattr(ppo, "build_setup", with_stats)
        AcceleratorState._reset_state(reset_partial_state=True)
        try:
            return ppo.setup(_recipe(out, "ppo.normalize_reward=true", *overrides), inputs).s
        finally:
            monkeypatch.setattr(ppo, "build_setup", build_setup)
            AcceleratorState._reset_state(reset_partial_state=True)

    s = stage()
    tok = inputs.tokenizer
    _, r, seq, mask, pos, stop = _fixed_response(tok, s.pad_id)  # values[:, stop + 1]: the state at the stop token

    def values(s):
        with torch.no_grad():
            return s.model(seq, mask, pos, r, 1.0)[1]

    with torch.no_grad():  # the reward model's score at its last non-pad token (the stop token), Hugging Face's way
        raw = s.reward(input_ids=seq, attention_mask=mask, position_ids=pos).logits.squeeze(-1)
    normalised = (raw - stats.mean) / stats.std
    assert "values standardised like the scores" in capsys.readouterr().out
    assert (values(s)[:, stop + 1] - normalised).abs().max() < 1e-4
    # Negative control: the stage not passing the statistics on. Its line still says standardised.
    dropped = stage(stats_passed=None)
    assert "values standardised like the scores" in capsys.readouterr().out
    assert (values(dropped)[:, stop + 1] - normalised).abs().max() > 0.3

    # From SFT: the value model's own head, unscaled, at every position.
    def plain(s):
        v = s.unwrapped.value
        with torch.no_grad():
            hidden = v.model(input_ids=seq, attention_mask=mask, position_ids=pos).last_hidden_state
            return v.score(hidden).squeeze(-1)[:, -r.size(1) - 1 : -1]

    s = stage("ppo.value_init=sft")
    assert "values standardised" not in capsys.readouterr().out
    assert (values(s) - plain(s)).abs().max() < 1e-4
    # Negative control: the statistics passed to the SFT value model.
    scaled = stage("ppo.value_init=sft", stats_passed=stats)
    assert (values(scaled) - plain(scaled)).abs().max() > 0.3


# E1 -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_policy_own_generation_config_does_not_change_sampling(chain):
    """Catches transformers merging the model's generation defaults (min_new_tokens, repetition_penalty,
    suppress_tokens) into our config: the sampled distribution would not be the policy's."""
    from transformers import GenerationConfig

    from pipeline.core.sampling import generate, left_pad

    s, tok = _setup(chain)
    policy = s.unwrapped.policy
    q = left_pad(_prompts(tok), s.pad_id, "cpu")
    kwargs = dict(pad_id=s.pad_id, stop_ids=s.stop_ids, max_new_tokens=12)
    clean = generate(policy, q, **kwargs)
    own = policy.generation_config
    own.min_new_tokens, own.repetition_penalty, own.suppress_tokens = 12, 5.0, [s.stop_ids[0]]
    polluted = generate(policy, q, **kwargs)
    assert torch.equal(polluted.responses, clean.responses)
    assert clean.stopped.any()  # the clean answers do stop, so a suppressed stop would show
    assert policy.generation_config.repetition_penalty == 5.0  # the model's config is given back
    # Negative control: passing our config to generate() is not enough; the model's fields merge in.
    gen = GenerationConfig(max_new_tokens=12, do_sample=False, eos_token_id=s.stop_ids, pad_token_id=s.pad_id)
    with torch.no_grad():
        merged = policy.generate(input_ids=q, attention_mask=(q != s.pad_id).long(), generation_config=gen)
    assert not torch.equal(merged[:, q.size(1) :], clean.responses)


# E2 -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_attention_dropout_copied_at_construction_is_off(chain, tmp_path):
    """Catches dropout zeroed on the config after the model is built: Gemma's attention copied the rate when it was
    constructed, so two training-mode forwards would differ (and no rollout log-prob would match training)."""
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    from pipeline.core.loading import disable_dropout
    from pipeline.core.policy import response_logprobs
    from pipeline.ppo import build_setup

    run = chain / "tiny_ko"
    policy_dir = tmp_path / "sft"
    shutil.copytree(run / "sft" / "final", policy_dir)
    cfg = json.loads((policy_dir / "config.json").read_text())
    (policy_dir / "config.json").write_text(json.dumps({**cfg, "attention_dropout": 0.5}))
    _, tok = _setup(chain)
    q = torch.tensor([_prompts(tok)[0] + [7, 8, 9, 10]])
    mask, pos, resp = torch.ones_like(q), torch.arange(q.size(1)).unsqueeze(0), q[:, -4:]
    for method in ("full", "lora"):
        recipe = _recipe(chain, f"ppo.method={method}")
        s, _ = build_setup(
            recipe, Accelerator(cpu=True), policy_dir, run / "rm" / "final", run / "rm" / "final", tok, 10
        )
        s.model.train()
        a, _, _ = s.model(q, mask, pos, resp, 1.0)
        b, _, _ = s.model(q, mask, pos, resp, 1.0)
        assert torch.equal(a, b), method
        assert (s.ref is None) == (method == "lora")  # LoRA: the reference is the adapter-disabled base
    # Negative control: built with the rate, then zeroed afterwards (what the stage did) - training forwards differ.
    old = AutoModelForCausalLM.from_pretrained(policy_dir)
    disable_dropout(old)
    old.train()
    c, _ = response_logprobs(old, q, mask, pos, resp, 1.0)
    d, _ = response_logprobs(old, q, mask, pos, resp, 1.0)
    assert not torch.equal(c, d)


def test_ppo_lora_dropout_is_refused_not_ignored():
    """Catches ``ppo.lora.dropout`` being accepted and silently not applied."""
    from pipeline.core.config import validate

    with pytest.raises(ConfigError, match="ppo.lora.dropout"):
        validate(load_recipe(RECIPE, ["ppo.method=lora", "ppo.lora.dropout=0.1"]))
    validate(load_recipe(RECIPE, ["sft.method=lora", "sft.lora.dropout=0.1"]))  # SFT keeps its LoRA dropout


# E3 -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_response_ended_by_eos_gets_the_missing_stop_penalty(chain, monkeypatch):
    """Catches an <eos>-ended response counting as ended: the reward model never learned to score there, and it
    escaped the missing-stop penalty."""
    from pipeline.core import ppo_math as pm
    from pipeline.core import ppo_step
    from pipeline.core.sampling import Generation, left_pad

    s, tok = _setup(chain, "ppo.missing_eos_penalty=1.0", "ppo.response_length=6")
    eot, eos = tok.convert_tokens_to_ids("<end_of_turn>"), tok.eos_token_id
    words = tok("사과는 좋습니다", add_special_tokens=False)["input_ids"][:2]
    assert len(words) == 2 and s.pad_id not in (eot, eos)
    p = s.pad_id
    rows = torch.tensor([words + [eot, p, p, p], words + [eos, p, p, p], words * 3])  # turn end, <eos>, cut
    responses, seq_len, stopped = pm.truncate_after_stop(rows, s.stop_ids, s.pad_id)
    prompts = _prompts(tok)
    q = left_pad(prompts, s.pad_id, "cpu")
    monkeypatch.setattr(ppo_step, "sample", lambda *a, **k: Generation(q, responses, seq_len, stopped, s.pad_id))
    ro = ppo_step.rollout(s, prompts, 0.05)
    assert stopped.tolist() == [True, True, False]
    assert float(ro.stats["ppo/no_stop_rate"]) == pytest.approx(2 / 3)
    assert float(ro.stats["ppo/eos_stop_rate"]) == pytest.approx(1 / 3)
    penalty = float(ro.stats["objective/raw_scores"] - ro.stats["objective/scores"])
    assert penalty == pytest.approx(2 / 3, abs=1e-5)  # two of three penalised (1/3 if <eos> counted as ended)


# E6 -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_logit_chunks_are_sized_from_the_config_not_the_partitioned_head(chain, monkeypatch):
    """Catches the chunk size read from the head's weight shape, which is (0,) on a ZeRO-3 process outside a gather:
    chunking silently turned off and the whole batch's (B, L, vocabulary) logits computed at once. The head here is
    partitioned as ZeRO-3 holds it (an empty local weight, the full one only inside the head's forward). At a
    ``logits_memory_mb`` that the batch's fp32 logits exceed, the partitioned head must be called in the same
    pieces as the whole head, each piece's fp32 logits within the budget, with the whole head's log-probs.
    Negative control: the old reading (``max(1, head.weight.shape[0])``) put back in place of the config's
    vocabulary: one call takes every position, past the budget. tests/test_launch.py checks the same line under
    two-process ZeRO-3."""
    from pipeline.core import heads
    from pipeline.core.policy import response_logprobs
    from pipeline.core.sampling import left_pad, positions

    s, tok = _setup(chain)
    policy = s.unwrapped.policy
    vocab = policy.config.vocab_size
    q = left_pad(_prompts(tok), s.pad_id, "cpu")
    resp = torch.randint(10, 200, (q.size(0), 16), generator=torch.Generator().manual_seed(0))
    seq = torch.cat([q, resp], 1)
    mask = (seq != s.pad_id).long()
    pos = positions(mask)
    # The smallest budget (in KB) whose pieces hold 3 positions; the batch's fp32 logits do not fit in it.
    budget = next(kb / 1024 for kb in range(1, 4096) if heads.logit_positions(policy, kb / 1024, "fp32") >= 3)
    assert resp.numel() * 4 * vocab > budget * (1 << 20)

    head = policy.get_output_embeddings()
    full, local = head.weight, torch.nn.Parameter(torch.empty(0))  # what a ZeRO-3 rank holds outside a gather
    rows: list[int] = []
    partitioned = False

    def gather(module, args):
        module.weight = full

    def release(module, args, output):
        rows.append(args[0].shape[0])
        module.weight = local if partitioned else full

    def head_calls(partition: bool) -> tuple[list[int], torch.Tensor]:
        """Positions per head call, and the log-probs, of one pass over the whole or the partitioned head."""
        nonlocal partitioned
        partitioned = partition
        head.weight = local if partition else full
        rows.clear()
        with torch.no_grad():
            lp, _ = response_logprobs(policy, seq, mask, pos, resp, 1.0, memory_mb=budget)
        return list(rows), lp

    hooks = [head.register_forward_pre_hook(gather), head.register_forward_hook(release)]
    try:
        whole, whole_lp = head_calls(False)
        assert sum(whole) == resp.numel() and len(whole) > 1
        calls, lp = head_calls(True)
        assert calls == whole
        assert max(calls) * 4 * vocab <= budget * (1 << 20), calls  # every call's fp32 logits fit
        assert torch.allclose(lp, whole_lp, atol=1e-6)  # the partitioned head computes the whole head's numbers
        # Negative control: the rows read from the local weight (0 here), as the head's size was read before.
        monkeypatch.setattr(heads, "vocabulary_size", lambda m: max(1, m.get_output_embeddings().weight.shape[0]))
        assert head_calls(False)[0] == whole  # unpartitioned, the old reading sized the pieces right
        broken, _ = head_calls(True)
        assert broken == [resp.numel()] != whole
        assert max(broken) * 4 * vocab > budget * (1 << 20)
    finally:
        for h in hooks:
            h.remove()
        head.weight = full


# E7 -------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_policy_and_value_gradients_are_clipped_apart(chain):
    """Catches one joint clip: a large value gradient would shrink the policy's step."""
    from accelerate import Accelerator

    from pipeline.core.policy import clip_each

    s, _ = _setup(chain)
    model = s.unwrapped
    torch.manual_seed(0)
    for part, norm in ((model.policy, 0.5), (model.value, 100.0)):
        params = [p for p in part.parameters() if p.requires_grad]
        for p in params:
            p.grad = torch.randn_like(p)
        total = torch.norm(torch.stack([p.grad.norm() for p in params]))
        for p in params:
            p.grad *= norm / total
    saved = [p.grad.clone() for p in model.parameters()]
    # Negative control: one joint clip shrinks the policy's gradient about 100-fold.
    torch.nn.utils.clip_grad_norm_(list(model.parameters()), 1.0)
    shrunk = torch.norm(torch.stack([p.grad.norm() for p in model.policy.parameters()]))
    assert float(shrunk) < 0.01
    for p, g in zip(model.parameters(), saved):
        p.grad = g.clone()
    before = [p.grad.clone() for p in model.policy.parameters()]
    pol, val = clip_each(Accelerator(cpu=True), model, 1.0)
    assert float(pol) == pytest.approx(0.5, rel=1e-4) and float(val) == pytest.approx(100.0, rel=1e-4)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, model.policy.parameters()))  # untouched
    value_norm = torch.norm(torch.stack([p.grad.norm() for p in model.value.parameters()]))
    assert float(value_norm) == pytest.approx(1.0, rel=1e-3)


# Gradient checkpointing -----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_gradient_checkpointing_recomputes_layers_and_keeps_the_gradients(chain):
    """Catches ``ppo.gradient_checkpointing`` not reaching the policy and value models (no recompute), or changing
    the gradients."""
    s_off, tok = _setup(chain)
    s_on, _ = _setup(chain, "ppo.gradient_checkpointing=true")
    q = torch.tensor([_prompts(tok)[0] + [7, 8, 9, 10]])
    mask, pos, resp = torch.ones_like(q), torch.arange(q.size(1)).unsqueeze(0), q[:, -4:]
    grads, calls = [], []
    for s in (s_off, s_on):
        seen: list[int] = []
        # Count calls of each layer's MLP forward (module hooks do not run in the recompute).
        mlps = [layer.mlp for m in (s.unwrapped.policy, s.unwrapped.value) for layer in m.model.layers]
        for mlp in mlps:
            mlp.forward = lambda *a, f=mlp.forward, seen=seen, **k: seen.append(1) or f(*a, **k)
        s.model.train()
        lp, values, _ = s.model(q, mask, pos, resp, 1.0)
        (lp.sum() + values.sum()).backward()
        calls.append((len(seen), len(mlps)))
        grads.append([p.grad.clone() for p in s.unwrapped.parameters() if p.grad is not None])
    (off_calls, n), (on_calls, _) = calls
    assert off_calls == n and on_calls == 2 * n  # each layer runs again in the backward pass
    assert len(grads[0]) == len(grads[1]) > 0
    assert all(torch.allclose(a, b, atol=1e-6, rtol=1e-4) for a, b in zip(*grads))


# Logging --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_logged_lr_is_the_rate_used_and_metric_names_have_one_prefix(chain, tmp_path, monkeypatch):
    """Catches the LR logged after ``scheduler.step()`` (the next update's rate) and keys like
    ``ppo/ppo/response_length``."""
    from pipeline import ppo
    from pipeline.core.tracking import Tracker

    logged: list[dict] = []
    monkeypatch.setattr(Tracker, "log", lambda self, data, step=None: logged.append(dict(data)))
    out = _fresh(chain, tmp_path)
    ppo.run(_recipe(out, "ppo.total_episodes=64", "ppo.panel_every=0", "ppo.learning_rate=1e-5"))
    lrs = [m["lr"] for m in _metrics(out)]
    assert lrs == pytest.approx([1e-5, 0.5e-5])  # linear decay over 2 updates: the first update runs at the peak
    keys = set().union(*logged)
    assert "ppo/ppo/response_length" not in keys and "ppo/response_length" in keys and "ppo/objective/kl" in keys
    assert {"ppo/policy/grad_norm", "ppo/value/grad_norm"} <= keys


# A NaN on one process; NaN gradients under DeepSpeed ----------------------------------------------------------


NAN_CASES = [
    # Catches one rank raising alone while the other waits in the all-reduce until the launcher kills the group.
    (
        "ddp",
        "ppo:2@1",  # update 2, process 1 only: its weight (and so its loss) is NaN
        [
            "non-finite PPO loss (nan) at update 2, epoch 1, minibatch 1",
            "non-finite PPO loss (on another process) at update 2, epoch 1, minibatch 1",
        ],
    ),
    # Catches DeepSpeed skipping the step on NaN gradients ("OVERFLOW! Skipping step") while the run carries on to
    # a "finished" model that stopped training: before the check this case exited 0.
    (
        "zero2",
        "ppo:2:grad",  # the loss stays finite; one weight's gradient is NaN
        ["non-finite gradients at update 2, epoch 1, minibatch 1: DeepSpeed skipped the optimizer step"],
    ),
]


@pytest.mark.slow
@pytest.mark.parametrize("config, fault, messages", NAN_CASES, ids=[c[0] for c in NAN_CASES])
def test_non_finite_numbers_on_two_processes_stop_every_process_by_name(chain, tmp_path, config, fault, messages):
    from pipeline.core.faults import FAULT_ENV

    out = _fresh(chain, tmp_path)
    cmd = launch_command(
        "ppo",
        config,
        f"run.output_dir={out}",
        *BASE,
        "ppo.total_episodes=96",
        "ppo.per_device_train_batch_size=4",
        "ppo.gradient_accumulation_steps=2",
        "ppo.panel_every=0",
        "ppo.save_steps=1",
    )
    env = {**os.environ, "PYTHONUNBUFFERED": "1", FAULT_ENV: fault}
    res = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    text = res.stdout + res.stderr
    assert res.returncode == 1, text[-3000:]
    for rank in (0, 1):  # every process stops with a named error
        assert any(f"[rank {rank}] error: {m}" in text for m in messages), (rank, text[-3000:])
    for m in messages:
        assert m in text, text[-3000:]
    ckpts = out / "tiny_ko" / "ppo" / "checkpoints"
    assert (ckpts / "checkpoint-1" / "COMPLETE").is_file() and not (ckpts / "checkpoint-2").exists()
    assert not (out / "tiny_ko" / "ppo" / "final").exists()
