"""The DPO stage on the tiny chain: TRL's DPOTrainer on the data stage's own ids from the SFT checkpoint, the loss
on completion tokens only, the reference (a frozen SFT copy; the adapter-disabled model under LoRA), resume, the
non-finite stop, the consistency gate, two processes under accelerate, and the held-out rule rate it reaches."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess

import pytest
import torch

from pipeline.core.notices import NOTICE_LINE, missing_notices, read_safetensors_metadata
from tests.helpers import REPO
from tests.helpers.chain import RECIPE, chain_recipe, rule_rate
from tests.helpers.launch import kill_and_resume, launch_command
from tests.helpers.wandb_offline import read_offline_run

SHORT = ["dpo.max_steps=4", "dpo.save_steps=4", "dpo.eval_steps=100", "dpo.logging_steps=1"]


def _inputs(chain, out):
    """A run folder holding the chain's data stage and SFT checkpoint: what `make dpo` starts from."""
    for part in ("data", "sft/final"):
        shutil.copytree(chain / "tiny_ko" / part, out / "tiny_ko" / part)
    return out


def _recording(mp: pytest.MonkeyPatch) -> list:
    """Make the stage's trainer class record each instance it builds (the stage returns only its checkpoint)."""
    from pipeline import dpo

    made = []
    base = dpo.pretokenized_trainer()

    class Recorded(base):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    mp.setattr(dpo, "pretokenized_trainer", lambda: Recorded)
    return made


def _run(recipe):
    """Run the stage; its final checkpoint and the trainer it built."""
    from pipeline import dpo

    with pytest.MonkeyPatch.context() as mp:
        made = _recording(mp)
        final = dpo.run(recipe)
    return final, made[-1]


@pytest.fixture(scope="module")
def trained(chain, tmp_path_factory):
    """The recipe's own DPO section on a copy of the tiny chain (W&B offline): (run folder, final, trainer)."""
    out = _inputs(chain, tmp_path_factory.mktemp("dpo"))
    final, trainer = _run(chain_recipe(out, "tracking.mode=offline"))
    return out, final, trainer


def _batch(trainer, n=4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _summed_logps(model, batch, mask_key="completion_mask"):
    """Each row's log-probability of its tokens where ``batch[mask_key]`` is 1, from a plain forward of ``model``
    (the prediction of token t is read at position t - 1)."""
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return (logp * batch[mask_key][:, 1:]).sum(1)  # (2B,): the chosen rows, then the rejected rows


def _sft_model(run):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(run / "tiny_ko" / "sft" / "final")


@pytest.mark.slow
def test_trains_on_the_recipe_and_saves_a_derivative(trained, chain):
    """Catches a recipe section that does not reach TRL (beta, loss type, learning rate, length), a step count
    other than the epochs over the pairs, a checkpoint without its notices, lineage or stop at <end_of_turn>, and a
    DPO that does not move the implicit reward toward the chosen answers on held-out pairs."""
    import pyarrow.parquet as pq
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    out, final, trainer = trained
    recipe = chain_recipe(out)
    d = recipe.dpo
    args = trainer.args
    assert (args.beta, args.loss_type, args.learning_rate) == (d.beta, [d.loss_type], d.learning_rate)
    assert trainer.args.max_length == recipe.data.max_length
    assert final == out / "tiny_ko" / "dpo" / "final"
    pairs = pq.read_metadata(out / "tiny_ko" / "data" / "preference" / "train.parquet").num_rows
    steps = math.ceil(pairs / d.per_device_train_batch_size) * int(d.num_train_epochs)
    ckpts = sorted((out / "tiny_ko" / "dpo" / "checkpoints").glob("checkpoint-*"), key=lambda p: int(p.name[11:]))
    assert ckpts[-1].name == f"checkpoint-{steps}"
    for ckpt in [final, *ckpts]:
        assert missing_notices(ckpt) == [] and (ckpt / "COMPLETE").is_file(), ckpt
    assert read_safetensors_metadata(final / "model.safetensors")["gemma_notice"] == NOTICE_LINE
    assert "DPO (full)" in read_safetensors_metadata(final / "model.safetensors")["modification"]
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["stage"] == "dpo" and lineage["parent"] == "sft/final"
    assert lineage["parent_lineage"]["stage"] == "sft"
    assert lineage["datasets"] == ["data_prep/tiny_ko/preference.jsonl"]
    tok = AutoTokenizer.from_pretrained(final)
    gen = json.loads((final / "generation_config.json").read_text())
    assert tok.convert_tokens_to_ids("<end_of_turn>") in gen["eos_token_id"]
    assert not (final / "training_args.bin").exists()
    metrics = lineage["metrics"]
    assert metrics["steps"] == steps
    assert metrics["eval/rewards/accuracies"] > 0.8 and metrics["eval/rewards/margins"] > 0.5, metrics
    assert metrics["train/loss_last"] < metrics["train/loss_first"] == pytest.approx(math.log(2), abs=1e-4)
    before = load_file(chain / "tiny_ko" / "sft" / "final" / "model.safetensors")
    after = load_file(final / "model.safetensors")
    assert before.keys() == after.keys() and all(not torch.equal(before[k], after[k]) for k in before)


@pytest.mark.slow
def test_pairs_are_the_data_stages_ids_with_one_bos(trained):
    """Catches TRL preparing the pairs itself: from the data stage's strings it doubles <bos> (plain text) or trains
    a newline after <end_of_turn> (chat messages). The stock preparation, run on the same rows, is the negative
    control: it must differ from ours."""
    import datasets
    from trl import DPOConfig, DPOTrainer

    out, _, trainer = trained
    tok = trainer.processing_class
    bos, eot = tok.bos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")
    rows = datasets.Dataset.from_parquet(str(out / "tiny_ko" / "data" / "preference" / "train.parquet"))
    used = trainer.train_dataset
    assert len(used) == len(rows)
    for key in ("prompt_ids", "chosen_ids", "rejected_ids"):
        assert used[key] == rows[key], key
    for r in used:
        assert r["prompt_ids"][0] == bos and (r["prompt_ids"] + r["chosen_ids"] + r["rejected_ids"]).count(bos) == 1
        assert r["chosen_ids"][-1] == eot and r["rejected_ids"][-1] == eot
    few = rows.select(range(8))
    messages = datasets.Dataset.from_dict(
        {
            "prompt": [json.loads(m) for m in few["messages"]],
            "chosen": [[{"role": "assistant", "content": c}] for c in few["chosen"]],
            "rejected": [[{"role": "assistant", "content": c}] for c in few["rejected"]],
        }
    )
    plain = datasets.Dataset.from_dict(
        {"prompt": [tok.decode(p) for p in few["prompt_ids"]], "chosen": few["chosen"], "rejected": few["rejected"]}
    )
    args = DPOConfig(output_dir=str(out / "stock"), use_cpu=True, report_to="none", max_length=128)
    for stock in (messages, plain):
        stock_trainer = DPOTrainer(model=_sft_model(out), args=args, train_dataset=stock, processing_class=tok)
        prepared = stock_trainer.train_dataset
        assert [p + c for p, c in zip(prepared["prompt_ids"], prepared["chosen_ids"])] != [
            p + c for p, c in zip(few["prompt_ids"], few["chosen_ids"])
        ]


@pytest.mark.slow
def test_the_loss_reads_only_completion_tokens(trained):
    """Catches prompt tokens in the sequence log-probabilities the DPO loss is built from (the implicit rewards,
    TRL's logps metrics, IPO's length normalisation): TRL's collator mask on our ids and the trainer's own loss
    pass are compared with log-probs summed by hand over the completion, <end_of_turn> included. Negative control:
    the same sums with the prompt tokens in differ."""
    import torch.nn.functional as F

    _, _, trainer = trained
    batch = _batch(trainer)
    n = len(batch["input_ids"]) // 2
    eot = trainer.processing_class.convert_tokens_to_ids("<end_of_turn>")
    rows = [trainer.train_dataset[i] for i in range(n)]
    width = batch["input_ids"].size(1)
    for i, r in enumerate(rows):
        for side, row in (("chosen_ids", i), ("rejected_ids", n + i)):
            p, c = len(r["prompt_ids"]), len(r[side])
            assert batch["completion_mask"][row].tolist() == [0] * p + [1] * c + [0] * (width - p - c)
            assert batch["input_ids"][row, p + c - 1] == eot  # the stop token is trained
    policy = _summed_logps(trainer.model, batch)
    reference = _summed_logps(trainer.ref_model, batch)
    with_prompt = _summed_logps(trainer.model, batch, "attention_mask")
    assert not torch.allclose(with_prompt, policy, atol=1e-2)  # the negative control

    trainer.model.eval()
    with torch.no_grad():
        loss = trainer.compute_loss(trainer.model, batch)
    logged = {k: v[-1] for k, v in trainer._metrics["eval"].items()}
    beta = trainer.args.beta
    assert logged["logps/chosen"] == pytest.approx(policy[:n].mean().item(), abs=1e-3)
    assert logged["logps/rejected"] == pytest.approx(policy[n:].mean().item(), abs=1e-3)
    assert logged["rewards/chosen"] == pytest.approx(beta * (policy - reference)[:n].mean().item(), abs=1e-3)
    assert logged["rewards/rejected"] == pytest.approx(beta * (policy - reference)[n:].mean().item(), abs=1e-3)
    margin = (policy - reference)[:n] - (policy - reference)[n:]
    assert loss.item() == pytest.approx(-F.logsigmoid(beta * margin).mean().item(), abs=1e-4)
    assert logged["logps/chosen"] != pytest.approx(with_prompt[:n].mean().item(), abs=1e-2)


@pytest.mark.slow
def test_reference_is_the_frozen_sft_model(trained):
    """Catches a reference that trains with the policy or is not the SFT checkpoint: after training, its weights
    are the SFT model's and TRL's reference log-probs are the SFT model's own; the policy's (the negative control)
    are not."""
    out, _, trainer = trained
    sft = _sft_model(out)
    assert trainer.ref_model is not None and trainer.ref_model is not trainer.model
    ref_weights = trainer.ref_model.state_dict()
    assert all(torch.equal(v, ref_weights[k]) for k, v in sft.state_dict().items())
    batch = _batch(trainer)
    chosen, rejected = trainer.compute_ref_log_probs(trainer.ref_model, batch)
    expected = _summed_logps(sft, batch)
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=1e-4)
    assert not torch.allclose(_summed_logps(trainer.model, batch), expected, atol=1e-2)


@pytest.mark.slow
def test_wandb_offline_run_has_the_dpo_metrics(trained):
    """Catches a DPO stage that logs nothing to W&B, or logs outside the ``dpo/group/name`` keys."""
    out, _, _ = trained
    runs = sorted((out / "tiny_ko" / "wandb" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    run = read_offline_run(str(runs[0]))
    keys = set().union(*run["history"])
    for k in (
        "dpo/train/loss",
        "dpo/train/grad_norm",
        "dpo/train/learning_rate",
        "dpo/train/rewards/accuracies",
        "dpo/train/rewards/margins",
        "dpo/eval/loss",
        "dpo/eval/rewards/accuracies",
        "dpo/final/eval/rewards/margins",
    ):
        assert k in keys, k
    assert all(k.startswith("dpo/") for k in keys if not k.startswith("_")), sorted(keys)
    assert run["config"]["recipe"]["dpo"]["beta"] == chain_recipe(out).dpo.beta


@pytest.mark.slow
def test_finished_stage_is_skipped(trained, capsys):
    """Catches a finished DPO stage that trains again (or rewrites its checkpoint) when `make dpo` runs again."""
    from pipeline import dpo

    out, final, _ = trained
    stamp = (final / "COMPLETE").read_text()
    assert dpo.run(chain_recipe(out)) == final
    assert "already finished" in capsys.readouterr().out and (final / "COMPLETE").read_text() == stamp


@pytest.mark.slow
def test_lora_reference_is_the_adapter_disabled_model_and_the_final_is_merged(chain, tmp_path):
    """Catches, under LoRA, a second model held as the reference, a reference other than the adapter-disabled SFT
    model (TRL copies an adapter it is handed into a "ref" adapter), base weights that train, and a final that is
    not the adapter merged into the SFT weights. Negative control: the policy with its adapter on differs from the
    SFT model."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = _inputs(chain, tmp_path)
    overrides = ["dpo.method=lora", "dpo.lora.r=4", "dpo.learning_rate=5e-3", "dpo.max_steps=6", "dpo.save_steps=3"]
    final, trainer = _run(chain_recipe(out, *overrides, "dpo.eval_steps=3"))
    assert trainer.ref_model is None and set(trainer.model.peft_config) == {"default"}
    trainable = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    # the adapters, and the two control-token rows (lora.train_control_tokens) as a delta beside the frozen embedding
    assert trainable and all("lora_" in n or "trainable_tokens_delta" in n for n in trainable), trainable
    assert any("trainable_tokens_delta" in n for n in trainable)
    sft = _sft_model(out)
    batch = _batch(trainer)
    chosen, rejected = trainer.compute_ref_log_probs(trainer.model, batch)
    expected = _summed_logps(sft, batch)
    assert torch.allclose(torch.cat([chosen, rejected]), expected, atol=1e-4)
    assert not torch.allclose(_summed_logps(trainer.model, batch), expected, atol=1e-2)

    assert missing_notices(final) == [] and not (final / "adapter_config.json").exists()
    assert (final / "adapter" / "adapter_config.json").is_file() and not (final / "adapter" / "ref").exists()
    assert read_safetensors_metadata(final / "adapter" / "adapter_model.safetensors")["gemma_notice"] == NOTICE_LINE
    assert "DPO (lora-merged)" in read_safetensors_metadata(final / "model.safetensors")["modification"]
    merged = AutoModelForCausalLM.from_pretrained(final).eval()
    adapted = PeftModel.from_pretrained(_sft_model(out), final / "adapter").eval()
    x = batch["input_ids"][:2]
    with torch.no_grad():
        a, b, c = merged(x).logits, adapted(x).logits, sft(x).logits
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, c, atol=1e-3)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_rerun_after_the_last_checkpoint_keeps_the_sft_reference(chain, tmp_path, capsys, method):
    """Catches the trained policy becoming its own reference when a stage killed after its last checkpoint (while
    writing final/) runs again and restores that checkpoint instead of training: TRL builds a full reference from
    the policy's own path and copies a restored adapter into its "ref" adapter, and the final's held-out reward
    margin then reads 0. The rerun must report what the uninterrupted run did, with the same weights."""
    from safetensors.torch import load_file

    from pipeline import dpo

    out = _inputs(chain, tmp_path)
    lora = ["dpo.method=lora", "dpo.lora.r=4", "dpo.learning_rate=5e-3"] if method == "lora" else []
    recipe = chain_recipe(out, *SHORT, *lora)
    final = dpo.run(recipe)
    first = json.loads((final / "lineage.json").read_text())["metrics"]
    weights = load_file(final / "model.safetensors")
    shutil.rmtree(final)  # the last checkpoint (step 4 of 4) is complete; final/ never was
    assert dpo.run(recipe) == final
    assert "(training was finished)" in capsys.readouterr().out
    again = json.loads((final / "lineage.json").read_text())["metrics"]
    assert first["eval/rewards/margins"] > 0.01
    for k in ("eval/loss", "eval/rewards/margins", "eval/rewards/accuracies", "steps"):
        assert again[k] == pytest.approx(first[k], rel=1e-5), k
    restored = load_file(final / "model.safetensors")
    assert all(torch.equal(weights[k], restored[k]) for k in weights)


@pytest.mark.slow
def test_resume_after_kill(chain, tmp_path):
    """Catches a DPO run that, killed after a checkpoint and run again, restarts, loses its data position or RNG
    streams (losses and final weights differ from an uninterrupted run), or trains again once finished."""
    _inputs(chain, tmp_path)
    # Logs every 2 steps: a log window across the resume point (the Trainer averages the loss since its last log)
    # would differ from the uninterrupted run's without anything being wrong.
    overrides = ["dpo.max_steps=12", "dpo.save_steps=4", "dpo.eval_steps=100", "dpo.logging_steps=2"]
    kill_and_resume("dpo", tmp_path, overrides, 4, 12)


@pytest.mark.parametrize(
    "spec, said",
    [("dpo:3", "non-finite loss (nan) at step 3"), ("dpo:3:grad", "non-finite grad_norm (nan) at step 3")],
)
@pytest.mark.slow
def test_non_finite_numbers_stop_with_the_step_and_no_final(chain, tmp_path, monkeypatch, capsys, spec, said):
    """Catches a DPO run that trains on through NaN weights or gradients (TRL averages the logged loss), exits 0,
    or leaves a final checkpoint or an unmarked later one behind: it must stop at the step, name the last good
    checkpoint, and exit 1."""
    from pipeline import dpo
    from pipeline.core.faults import FAULT_ENV

    out = _inputs(chain, tmp_path)
    monkeypatch.setenv(FAULT_ENV, spec)
    argv = ["--recipe", str(RECIPE), f"run.output_dir={out}", "tracking.mode=disabled", "dpo.max_steps=8"]
    rc = dpo.main([*argv, "dpo.logging_steps=1", "dpo.save_steps=2", "dpo.eval_steps=100"])
    err = capsys.readouterr().err
    assert rc == 1, err
    ckpts = out / "tiny_ko" / "dpo" / "checkpoints"
    assert f"error: {said}; stopping: the last good checkpoint, {ckpts / 'checkpoint-2'}" in err, err
    assert [p.name for p in ckpts.glob("checkpoint-*") if (p / "COMPLETE").is_file()] == ["checkpoint-2"]
    assert not (out / "tiny_ko" / "dpo" / "final").exists()


@pytest.mark.slow
def test_refuses_an_sft_checkpoint_from_another_data_stage(chain, tmp_path, capsys):
    """Catches DPO starting from an SFT checkpoint whose chat template differs from the data stage's (its pairs
    would be ids the model was never tuned on), or failing on it with a traceback instead of the one-line input
    error, exit 2, the other stages give."""
    from pipeline import dpo

    out = _inputs(chain, tmp_path)
    template = out / "tiny_ko" / "sft" / "final" / "chat_template.jinja"
    template.write_text(template.read_text().replace("model", "assistant"))
    assert dpo.main(["--recipe", str(RECIPE), f"run.output_dir={out}", "tracking.mode=disabled"]) == 2
    err = capsys.readouterr().err
    assert "stage inputs are inconsistent" in err and "the SFT checkpoint" in err and "chat_template_hash" in err
    assert not (out / "tiny_ko" / "dpo" / "final").exists()


@pytest.mark.parametrize(
    "override, match",
    [
        ("dpo.beta=0", "key 'dpo.beta': must be positive"),
        ("dpo.label_smoothing=0.5", r"key 'dpo.label_smoothing': 0.5 is not in \[0, 0.5\)"),
        ("dpo.label_smoothing=0.1", "key 'dpo.label_smoothing': only loss_type robust reads it; sigmoid would"),
        ("dpo.lora.dropout=0.1", "key 'dpo.lora.dropout': must be 0"),
        ("dpo.save_total_limit=1", "key 'dpo.save_total_limit': must be at least 2"),
        ("dpo.loss_type=kto", "dpo.loss_type"),
    ],
)
def test_recipe_checks_refuse_what_dpo_would_ignore_or_break_on(override, match):
    """Catches a dpo: section that would run with a setting TRL ignores (label smoothing outside the robust loss,
    LoRA dropout under TRL's dropout-free DPO) or cannot run. Negative control: robust with label smoothing passes."""
    from pipeline.core.config import ConfigError, load_recipe, validate

    with pytest.raises(ConfigError, match=match):
        validate(load_recipe(RECIPE, [override]))
    validate(load_recipe(RECIPE, ["dpo.loss_type=robust", "dpo.label_smoothing=0.1"]))


LAUNCH = [("ddp", "MULTI_CPU"), ("zero2", "DeepSpeed ZeRO-2"), ("zero3", "DeepSpeed ZeRO-3")]


@pytest.mark.slow
@pytest.mark.parametrize("config, kind", LAUNCH)
def test_two_processes_under_accelerate(chain, tmp_path, config, kind):
    """Catches a DPO stage that does not run under `make dpo`'s launcher with 2 processes (gloo on CPU, DDP and
    DeepSpeed ZeRO-2/3): the reference on each process, the held-out pairs over both, the checkpoints the engine
    writes, a full final checkpoint with its notices."""
    from transformers import AutoModelForCausalLM

    from tests.test_launch import _engine_ran

    run = f"dpo_{config}"
    for part in ("data", "sft/final"):
        shutil.copytree(chain / "tiny_ko" / part, tmp_path / run / part)
    cmd = launch_command(
        "dpo",
        config,
        f"run.output_dir={tmp_path}",
        f"run.name={run}",
        "tracking.mode=disabled",
        "dpo.max_steps=4",
        "dpo.save_steps=2",
        "dpo.eval_steps=2",
        "dpo.logging_steps=1",
        "dpo.per_device_train_batch_size=8",
    )
    res = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, capture_output=True, text=True, timeout=600
    )
    log = res.stdout + res.stderr
    assert res.returncode == 0, log[-4000:]
    assert f"[dpo] 2 process(es), {kind}" in log, log[-4000:]
    final = tmp_path / run / "dpo" / "final"
    ckpt = tmp_path / run / "dpo" / "checkpoints" / "checkpoint-2"
    assert missing_notices(final) == [] and missing_notices(ckpt) == []
    _engine_ran(ckpt, config)
    metrics = json.loads((final / "lineage.json").read_text())["metrics"]
    assert metrics["steps"] == 4 and metrics["eval/rewards/margins"] > 0, metrics
    sft = AutoModelForCausalLM.from_pretrained(chain / "tiny_ko" / "sft" / "final").state_dict()
    saved = AutoModelForCausalLM.from_pretrained(final).state_dict()
    assert {k: v.shape for k, v in sft.items()} == {k: v.shape for k, v in saved.items()}
    assert any(not torch.equal(sft[k], saved[k]) for k in sft)


@pytest.mark.slow
def test_dpo_learns_the_ground_truth_property(trained):
    """Catches a DPO that does not improve what the preference pairs prefer: with the recipe's toy settings the
    held-out polite rate (a rule, independent of any reward model) must rise at least 0.15 above the SFT model's."""
    out, final, _ = trained
    sft_rate, dpo_rate = rule_rate(out / "tiny_ko" / "sft" / "final"), rule_rate(final)
    print(f"held-out polite rate: SFT {sft_rate:.3f}, DPO {dpo_rate:.3f}")
    assert dpo_rate >= sft_rate + 0.15, (sft_rate, dpo_rate)
