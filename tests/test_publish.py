"""Publishing: the export is exactly the model a user needs (no value model, markers or run files), carries every
Gemma notice and no local path, stops at <end_of_turn>, and the upload is one commit to the Hub (a local fake)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

from pipeline.core.locations import REPO_ROOT, portable, portable_path, scrub_paths
from pipeline.core.notices import missing_notices, read_safetensors_metadata
from pipeline.publish import (
    PublishError,
    drop_card_section,
    export,
    exported_names,
    local_paths_in,
    stale_files,
    trained_dtype,
    with_dtype,
)
from tests.helpers.chain import chain_recipe
from tests.helpers.checkpoints import files_naming
from tests.helpers.fake_hub import FakeHub


@pytest.fixture()
def run_copy(chain, tmp_path):
    """A run directory with the session chain's data and finished SFT checkpoint (publish writes into it)."""
    for part in ("data", "sft/final"):
        shutil.copytree(chain / "tiny_ko" / part, tmp_path / "tiny_ko" / part)
    return tmp_path


def _front_matter(card: str) -> dict:
    return yaml.safe_load(card.split("---\n")[1])


# ---------------------------------------------------------------------------------------------------------------
# Pure parts
# ---------------------------------------------------------------------------------------------------------------


def test_portable_paths_never_absolute(tmp_path):
    """Bug: lineage, cards and metadata carried '/home/.../runs/tiny_ko/sft/final'."""
    run = tmp_path / "runs" / "r"
    assert portable_path(str(run / "sft" / "final"), run) == "sft/final"
    assert portable_path(str(REPO_ROOT / "data_prep" / "x.jsonl"), run) == "data_prep/x.jsonl"
    assert portable_path("/somewhere/else/data.jsonl", run) == "data.jsonl"  # outside both: the name alone
    for kept in ("google/gemma-2b", "embedded:tiny-gemma-ko", "data_prep/x.jsonl"):
        assert portable_path(kept, run) == kept
    nested = portable({str(run / "a.json"): [str(run / "b"), {"k": "/x/y/z.parquet"}]}, run)
    assert nested == {"a.json": ["b", {"k": "z.parquet"}]}
    # text written by other libraries: the run directory, the repository and the home folder become relative, and a
    # longer folder name that merely starts with a root is left alone
    text = f'"{run}/sft/final" {REPO_ROOT}/build/x {run}2/y'
    assert scrub_paths(text, run) == f'"sft/final" build/x {run}2/y'


def test_paths_are_found_only_where_a_path_can_start(monkeypatch):
    """Bug: with the repository at /gemma, scrubbing turned the notice's 'ai.google.dev/gemma/terms' into
    'ai.google.devterms' and a W&B link '.../team/gemma/runs/x' into '.../teamruns/x'."""
    import pipeline.core.locations as locations

    monkeypatch.setattr(locations, "REPO_ROOT", locations.Path("/gemma"))
    text = "at ai.google.dev/gemma/terms, https://wandb.ai/team/gemma/runs/x, `/gemma/runs/r` and (/gemma)"
    assert (
        locations.scrub_paths(text, None)
        == "at ai.google.dev/gemma/terms, https://wandb.ai/team/gemma/runs/x, `runs/r` and (.)"
    )
    # negative control: the plain substring the scrub used to replace is there
    assert text.count("/gemma") == 4


def test_stale_files_delete_only_what_this_pipeline_writes():
    """Bug: every repository file missing from the export was deleted, a GGUF or the card's images included."""
    repo = [
        "README.md",
        ".gitattributes",
        "model-00002-of-00002.safetensors",
        "value/model.safetensors",
        "value/config.json",
        "adapter/adapter_config.json",
        "COMPLETE",
        "lineage.json",
        "recipe.yaml",
        "model-q4.gguf",
        "images/plot.png",
        "notes/README.md",
    ]
    delete, keep = stale_files(repo, ["README.md", "model.safetensors", "config.json"])
    assert delete == [
        "model-00002-of-00002.safetensors",
        "value/model.safetensors",
        "value/config.json",
        "adapter/adapter_config.json",
        "COMPLETE",
        "lineage.json",
        "recipe.yaml",
    ]
    assert keep == ["model-q4.gguf", "images/plot.png", "notes/README.md"]


def test_drop_card_section_keeps_the_rest():
    card = "# t\n\n## A\n\na\n\n## Provenance files\n\nfiles\n\n## B\n\nb\n"
    assert drop_card_section(card, "Provenance files") == "# t\n\n## A\n\na\n\n## B\n\nb\n"
    assert drop_card_section(card, "Nope") == card


def test_exported_names_leave_out_run_files(tmp_path):
    """Bug: a plain upload of ppo/final published value/, COMPLETE and lineage.json."""
    names = [
        "model.safetensors",
        "config.json",
        "generation_config.json",
        "tokenizer.json",
        "tokenizer_config.json",
        "chat_template.jinja",
        "README.md",
        "NOTICE",
        "GEMMA_TERMS_OF_USE.html",
    ]
    for n in names + ["COMPLETE", "lineage.json", "recipe.yaml", "reward_stats.json"]:
        (tmp_path / n).write_text("x")
    for sub in ("value", "adapter"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "model.safetensors").write_text("x")
    assert exported_names(tmp_path) == sorted(names)


# ---------------------------------------------------------------------------------------------------------------
# The export of a real checkpoint
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_export_is_clean_and_complete(run_copy):
    recipe = chain_recipe(run_copy)
    out = export(recipe, "sft")
    assert out == run_copy / "tiny_ko" / "publish"
    assert missing_notices(out, lineage=False) == []
    assert not (out / "lineage.json").exists() and not (out / "COMPLETE").exists() and not (out / "value").exists()
    card = (out / "README.md").read_text(encoding="utf-8")
    front = _front_matter(card)
    assert front["language"] == ["ko"] and front["license"] == "gemma"
    assert "base_model" not in front, "the embedded toy has no hub base model to name"
    assert "sft: `data_prep/tiny_ko/sft.jsonl`" in card
    assert "Provenance files" not in card and "lineage.json" not in card
    assert local_paths_in(out, [REPO_ROOT, run_copy, os.path.expanduser("~")]) == []
    # independent of the checker above: no byte of any exported file names the test's folders
    for f in out.iterdir():
        blob = f.read_bytes() if f.suffix != ".safetensors" else json.dumps(read_safetensors_metadata(f)).encode()
        for root in (str(run_copy), str(REPO_ROOT)):
            assert root.encode() not in blob, f"{f.name} names {root}"


@pytest.mark.slow
def test_export_stops_at_end_of_turn_with_a_plain_generate(run_copy):
    """Bug: a derivative saved with the base's generation config never stopped at <end_of_turn>."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export(chain_recipe(run_copy), "sft")
    tok = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    end_of_turn = tok.convert_tokens_to_ids("<end_of_turn>")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "사과에 대해 알려 주세요."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    n = ids["input_ids"].shape[1]
    plain = model.generate(**ids, do_sample=False, max_new_tokens=40)[0, n:].tolist()
    assert plain[-1] == end_of_turn and len(plain) < 40, tok.decode(plain)
    # negative control: stopping at <eos> only (the base's config) runs on past the end of the turn
    runaway = model.generate(**ids, do_sample=False, max_new_tokens=40, eos_token_id=tok.eos_token_id)[0, n:].tolist()
    assert end_of_turn in runaway[:-1], tok.decode(runaway)


@pytest.mark.slow
def test_export_refuses_a_model_that_does_not_stop(run_copy):
    gen = run_copy / "tiny_ko" / "sft" / "final" / "generation_config.json"
    cfg = json.loads(gen.read_text())
    cfg["eos_token_id"] = 1  # <eos> only, as a base model ships
    gen.write_text(json.dumps(cfg))
    with pytest.raises(PublishError, match="does not include <end_of_turn>"):
        export(chain_recipe(run_copy), "sft")
    assert not (run_copy / "tiny_ko" / "publish").exists(), "nothing half-written is left"


@pytest.mark.slow
def test_export_refuses_a_checkpoint_without_its_notices(run_copy):
    (run_copy / "tiny_ko" / "sft" / "final" / "NOTICE").unlink()
    from pipeline.core.rundir import IncompleteError

    with pytest.raises(IncompleteError, match="NOTICE"):
        export(chain_recipe(run_copy), "sft")


@pytest.mark.slow
def test_export_refuses_a_local_path(run_copy):
    """The last check before anything leaves the machine: a path planted in the card is found."""
    card = run_copy / "tiny_ko" / "sft" / "final" / "README.md"
    card.write_text(card.read_text() + f"\nsee {REPO_ROOT}/runs\n")
    with pytest.raises(PublishError, match="names local folders: README.md"):
        export(chain_recipe(run_copy), "sft")


# ---------------------------------------------------------------------------------------------------------------
# The upload, through huggingface_hub, against a local fake of the Hub
# ---------------------------------------------------------------------------------------------------------------


def _publish(run_copy, hub_url: str | None, *args: str, token: str | None = "hf_fakePublishToken123"):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    env.update(HF_HOME=str(run_copy / "hf_home"), HF_HUB_DISABLE_TELEMETRY="1")
    if hub_url:
        env["HF_ENDPOINT"] = hub_url
    if token:
        env["HF_TOKEN"] = token
    cmd = [
        sys.executable,
        "-m",
        "pipeline.publish",
        "--recipe",
        "recipes/tiny_ko.yaml",
        "--stage",
        "sft",
        *args,
        f"run.output_dir={run_copy}",
        "tracking.mode=disabled",
    ]
    return subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_upload_is_one_commit_of_exactly_the_export(run_copy):
    with FakeHub() as hub:
        old = {"value/model.safetensors": b"old", "README.md": b"old", "images/plot.png": b"png"}
        hub.repos["someone/tiny-ko"] = {"private": False, "files": dict(old)}
        res = _publish(run_copy, hub.url, "--repo-id", "someone/tiny-ko")
        assert res.returncode == 0, res.stderr[-3000:]
        out = run_copy / "tiny_ko" / "publish"
        assert len(hub.commits) == 1
        files = hub.repos["someone/tiny-ko"]["files"]
        assert set(files) == {p.name for p in out.iterdir()} | {"images/plot.png"}, "the stale value/ is deleted"
        assert all(files[p.name] == p.read_bytes() for p in out.iterdir())
        assert "left in someone/tiny-ko (not written by this pipeline): images/plot.png" in res.stdout
        assert hub.commits[0]["deleted"] == ["value/model.safetensors"]
        assert {auth for *_, auth in hub.requests} == {"Bearer hf_fakePublishToken123"}
        assert "hf_fakePublishToken123" not in res.stdout + res.stderr
        assert "[publish] uploaded to someone/tiny-ko" in res.stdout

        fresh = _publish(run_copy, hub.url, "--repo-id", "someone/new-one", "--private")
        assert fresh.returncode == 0 and hub.repos["someone/new-one"]["private"] is True
        # the Hub ignores `private` for an existing repository: --private into a public one is refused, not published
        public = _publish(run_copy, hub.url, "--repo-id", "someone/tiny-ko", "--private")
        assert public.returncode == 1 and "already exists and is public" in public.stderr and len(hub.commits) == 2

        # the card as this pipeline used to write it for an embedded base: the Hub refuses its metadata
        card = run_copy / "tiny_ko" / "sft" / "final" / "README.md"
        card.write_text(
            card.read_text().replace("license: gemma\n", "license: gemma\nbase_model: embedded:tiny-gemma-ko\n", 1)
        )
        old_card = _publish(run_copy, hub.url, "--repo-id", "someone/old-card")
        assert old_card.returncode == 1 and len(hub.commits) == 2, old_card.stderr[-2000:]
        assert old_card.stderr.startswith("error: upload to someone/old-card refused: Invalid metadata in README.md")


@pytest.mark.slow
def test_dry_run_uploads_nothing_and_no_token_is_one_line(run_copy):
    with FakeHub() as hub:
        dry = _publish(run_copy, hub.url, "--repo-id", "someone/tiny-ko", "--dry-run", token=None)
        assert dry.returncode == 0, dry.stderr[-3000:]
        assert hub.requests == [] and (run_copy / "tiny_ko" / "publish" / "model.safetensors").is_file()
        no_token = _publish(run_copy, hub.url, "--repo-id", "someone/tiny-ko", token=None)
        assert no_token.returncode == 1 and hub.requests == []
        assert no_token.stderr.strip().splitlines() == [
            "error: no Hugging Face token: set HF_TOKEN or run `hf auth login`, then publish again"
        ]
    refused = _publish(run_copy, "http://127.0.0.1:9", "--repo-id", "someone/tiny-ko")  # nothing listens there
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert refused.stderr.startswith("error: upload to someone/tiny-ko failed")
    missing = _publish(run_copy, None, "--dry-run")
    assert missing.returncode == 2 and "give --repo-id" in missing.stderr


@pytest.mark.slow
def test_export_checks_its_own_notices(run_copy, monkeypatch):
    """The export is checked after it is written, not only its source: a card damaged while exporting (here its
    use restrictions dropped) is refused and leaves no export behind."""
    import pipeline.publish as publish

    monkeypatch.setattr(publish, "drop_card_section", lambda card, title: card.replace("Use restrictions", "Uses"))
    with pytest.raises(PublishError, match="lacks its Gemma derivative notices: README.md"):
        export(chain_recipe(run_copy), "sft")
    assert not (run_copy / "tiny_ko" / "publish").exists()


def test_sharded_weights_are_exported_with_their_index(tmp_path, tiny_dir):
    """A model saved in shards (every model past the shard size) is published with its index and every shard."""
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tiny_dir).save_pretrained(tmp_path, max_shard_size="100KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1
    assert set(exported_names(tmp_path)) >= {"model.safetensors.index.json", *shards}


# ---------------------------------------------------------------------------------------------------------------
# Every stage, in the dtype users want
# ---------------------------------------------------------------------------------------------------------------


def test_with_dtype_names_the_dtype_in_every_config_field():
    """Bug: a bf16 export whose config.json still said float32 loaded (dtype="auto") as fp32 again, twice the
    memory; a multimodal config kept its text_config's own dtype."""
    config = {"dtype": "float32", "text_config": {"torch_dtype": "float32", "hidden_size": 8}, "vocab_size": 3}
    assert with_dtype(config, "bf16") == {
        "dtype": "bfloat16",
        "text_config": {"torch_dtype": "bfloat16", "hidden_size": 8},
        "vocab_size": 3,
    }
    assert with_dtype({"vocab_size": 3}, "fp32") == {"vocab_size": 3, "dtype": "float32"}  # added when absent


def test_default_dtype_is_the_precision_the_run_trained_in(tmp_path, monkeypatch):
    """Bug: a run trained in bf16 was published in fp32 (every stage saves fp32 master weights, so the weights and
    config.json cannot tell). The default is the run's recorded run.precision, `auto` resolved as training does."""
    import pipeline.core.devices as devices

    recipe = chain_recipe(tmp_path)
    ckpt = tmp_path / "final"
    ckpt.mkdir()
    for setting in ("bf16", "fp32"):
        (ckpt / "lineage.json").write_text(json.dumps({"recipe": {"run": {"precision": setting}}}))
        assert trained_dtype(ckpt, recipe) == (setting, f"run.precision {setting}")
    (ckpt / "lineage.json").write_text(json.dumps({"recipe": {"run": {"precision": "auto"}}}))
    for gpu_bf16, expected in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(devices, "precision", lambda setting, b=gpu_bf16: {"bf16": b, "use_cpu": not b})
        assert trained_dtype(ckpt, recipe)[0] == expected
    (ckpt / "lineage.json").unlink()  # no lineage: the recipe's setting (auto)
    assert trained_dtype(ckpt, chain_recipe(tmp_path, "run.precision=bf16"))[0] == "bf16"


def _main(tmp_path, capsys, *args: str) -> tuple[int, list[str]]:
    """``python -m pipeline.publish`` in this process on an empty run folder: (exit code, stderr lines)."""
    import pipeline.publish as publish

    code = publish.main(
        [
            "--recipe",
            "recipes/tiny_ko.yaml",
            "--repo-id",
            "someone/x",
            "--dry-run",
            *args,
            f"run.output_dir={tmp_path}",
        ]
    )
    return code, capsys.readouterr().err.strip().splitlines()


def test_every_stage_is_accepted_and_a_bad_one_is_one_line(tmp_path, capsys):
    """Bug: `make publish PUBLISH_ARGS="--stage dpo"` was refused with argparse's `invalid choice` (only ppo and sft
    could be published); a bad --stage or --dtype must be one error line, not a usage dump."""
    for stage in ("sft", "rm", "ppo", "dpo"):
        code, err = _main(tmp_path, capsys, "--stage", stage)
        # accepted: it gets as far as looking for the stage's checkpoint, which this empty run folder lacks
        assert code == 2 and len(err) == 1 and f"the {stage} checkpoint (run `make {stage}` first) not found" in err[0]
    code, err = _main(tmp_path, capsys, "--stage", "value")
    assert code == 2 and err == ["error: --stage 'value' is not one of: sft, rm, ppo, dpo"]
    code, err = _main(tmp_path, capsys, "--stage", "sft", "--dtype", "fp16")
    assert code == 2 and err == ["error: --dtype 'fp16' is not one of: bf16, fp32"]


@pytest.fixture()
def rm_copy(chain, tmp_path):
    """A run directory with the session chain's data and finished reward model."""
    for part in ("data", "rm/final"):
        shutil.copytree(chain / "tiny_ko" / part, tmp_path / "tiny_ko" / part)
    return tmp_path


@pytest.mark.slow
def test_rm_export_is_a_plain_sequence_classifier_with_its_reward_stats(rm_copy):
    """Bugs: the reward model could not be published (`--stage rm` refused), and a published reward model gave no
    way to read its scores on the scale PPO used (the held-out mean and std it standardises with)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from data_prep.gemma_format import render

    src = rm_copy / "tiny_ko" / "rm" / "final"
    out = export(chain_recipe(rm_copy), "rm")
    model = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert type(model).__name__.endswith("ForSequenceClassification") and model.config.num_labels == 1
    dtype, _ = trained_dtype(src, chain_recipe(rm_copy))  # the default: fp32 on a CPU machine
    assert model.dtype == {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    assert missing_notices(out, lineage=False) == [] and not (out / "reward_stats.json").exists()
    stats = json.loads((src / "reward_stats.json").read_text())
    card = (out / "README.md").read_text(encoding="utf-8")
    section = card.split("## Reward statistics\n", 1)[1]
    assert f"| mean | {stats['mean']:.6g} |" in section and f"| std | {stats['std']:.6g} |" in section
    assert "(reward - mean) / std" in section and _front_matter(card)["pipeline_tag"] == "text-classification"
    assert json.loads((out / "config.json").read_text())["reward_normalization"] == {
        "mean": stats["mean"],
        "std": stats["std"],
    }
    # the card's reading of a score: a rendered dialogue ending at its <end_of_turn>, the same score as the source's
    tok = AutoTokenizer.from_pretrained(out)
    text = render(
        [
            {"role": "user", "content": "사과에 대해 알려 주세요."},
            {"role": "assistant", "content": "사과는 과일입니다."},
        ]
    )
    ids = tok(text.rstrip("\n"), add_special_tokens=False, return_tensors="pt").input_ids
    source = AutoModelForSequenceClassification.from_pretrained(src).eval()
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, source(ids).logits) and model(ids).logits.shape == (1, 1)


@pytest.mark.slow
def test_bf16_export_is_half_the_bytes_loads_in_bf16_and_stops_at_end_of_turn(run_copy, capsys):
    """Bug: a model could be published only in fp32, twice the bytes of the bf16 a GPU run trained in. The bf16
    export must still be the model: it loads with a plain from_pretrained in bf16, keeps its notices, and a plain
    greedy generate stops at <end_of_turn>."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from data_prep.gemma_format import render

    recipe = chain_recipe(run_copy)
    fp32 = export(recipe, "sft", "fp32")
    assert "sft in fp32 (--dtype): loads in fp32" in capsys.readouterr().out
    fp32_bytes = (fp32 / "model.safetensors").stat().st_size
    assert json.loads((fp32 / "config.json").read_text())["dtype"] == "float32"
    out = export(recipe, "sft", "bf16")
    ratio = (out / "model.safetensors").stat().st_size / fp32_bytes
    assert 0.45 < ratio < 0.55, ratio
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert missing_notices(out, lineage=False) == []
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    tok = AutoTokenizer.from_pretrained(out)
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    ids = tok(
        render([{"role": "user", "content": "사과는 무엇인가요?"}], add_generation_prompt=True),
        add_special_tokens=False,
        return_tensors="pt",
    ).input_ids
    assert ids[0].tolist().count(tok.bos_token_id) == 1
    reply = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=40)[
        0, ids.size(1) :
    ]
    assert reply[-1].item() == eot and len(reply) < 40, tok.decode(reply)


@pytest.mark.slow
def test_bf16_export_of_a_model_that_does_not_stop_is_refused(run_copy):
    """Negative controls: in bf16 too, a generation config without <end_of_turn> is refused, and so is an export
    that no longer ends its turn where the fp32 checkpoint does (here its <end_of_turn> row zeroed while casting)."""
    import pipeline.publish as publish

    final = run_copy / "tiny_ko" / "sft" / "final"
    gen = json.loads((final / "generation_config.json").read_text())
    (final / "generation_config.json").write_text(json.dumps({**gen, "eos_token_id": 1}))
    with pytest.raises(PublishError, match="does not include <end_of_turn>"):
        export(chain_recipe(run_copy), "sft", "bf16")
    (final / "generation_config.json").write_text(json.dumps(gen))

    from transformers import AutoTokenizer

    cast = publish.cast_safetensors
    eot = AutoTokenizer.from_pretrained(final).convert_tokens_to_ids("<end_of_turn>")

    def cast_without_end_of_turn(src, dst, dtype):
        from safetensors.torch import load_file, save_file

        n = cast(src, dst, dtype)
        tensors = load_file(dst)
        tensors["model.embed_tokens.weight"][eot] = 0  # the tied head's <end_of_turn> logit is now 0 everywhere
        save_file(tensors, dst, metadata=read_safetensors_metadata(dst))
        return n

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(publish, "cast_safetensors", cast_without_end_of_turn)
        with pytest.raises(PublishError, match="bf16 export does not end its turn with <end_of_turn>"):
            export(chain_recipe(run_copy), "sft", "bf16")
    assert not (run_copy / "tiny_ko" / "publish").exists(), "nothing half-written is left"
    # a checkpoint that ends no check prompt within the budget cannot vouch for its export: said, not passed
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(publish, "STOP_CHECK_TOKENS", 1)
        with pytest.raises(PublishError, match="ends its turn with <end_of_turn> on none of its 4 check prompts"):
            export(chain_recipe(run_copy), "sft", "bf16")


# ---------------------------------------------------------------------------------------------------------------
# LoRA finals name no local folder; a DPO final publishes
# ---------------------------------------------------------------------------------------------------------------

PEFT_CARD = """---
base_model: sft/final
library_name: peft
tags:
- base_model:adapter:{base}
- lora
- trl
---

# Model Card for Model ID
"""


def test_adapter_card_names_a_hub_base_or_none(tmp_path):
    """Bug: PEFT's adapter card of every LoRA final tagged `base_model:adapter:/<absolute path>/sft/final`, a path
    the scrub of checkpoint files did not see (it starts after a colon)."""
    from pipeline.core.trainer_stage import adapter_card, name_adapter_base

    run = tmp_path / "runs" / "r"
    card = PEFT_CARD.format(base=run / "sft" / "final")
    assert local_paths_in_text(tmp_path, card, run) == [f"README.md: {run}"]  # negative control: the leak is seen
    local = adapter_card(card, None)
    assert _front_matter(local) == {"library_name": "peft", "tags": ["lora", "trl"]}
    assert local.endswith("\n---\n\n# Model Card for Model ID\n")
    hub = _front_matter(adapter_card(card, "google/gemma-3-270m"))
    assert hub["base_model"] == "google/gemma-3-270m" and "base_model:adapter:google/gemma-3-270m" in hub["tags"]

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "README.md").write_text(card)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": str(run / "sft" / "final")}))
    name_adapter_base(adapter, str(run / "sft" / "final"), run)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "sft/final"
    assert local_paths_in(adapter, [run, tmp_path]) == []
    name_adapter_base(adapter, "google/gemma-2b", run)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "google/gemma-2b"


def local_paths_in_text(folder, text: str, root) -> list[str]:
    """``local_paths_in`` on a folder holding ``text`` as its README.md alone."""
    scratch = folder / "scan"
    scratch.mkdir()
    (scratch / "README.md").write_text(text)
    try:
        return local_paths_in(scratch, [root])
    finally:
        shutil.rmtree(scratch)


@pytest.fixture(scope="module")
def lora_run(chain, tmp_path_factory):
    """A copy of the chain with a DPO LoRA final (2 steps) and a PPO LoRA final (one update of 32 rollouts)."""
    from pipeline import dpo, ppo

    out = tmp_path_factory.mktemp("lora")
    for part in ("data", "sft/final", "rm/final"):
        shutil.copytree(chain / "tiny_ko" / part, out / "tiny_ko" / part)
    dpo.run(
        chain_recipe(
            out, "dpo.method=lora", "dpo.lora.r=4", "dpo.max_steps=2", "dpo.save_steps=2", "dpo.eval_steps=100"
        )
    )
    ppo.run(chain_recipe(out, "ppo.method=lora", "ppo.lora.r=4", "ppo.total_episodes=32", "ppo.panel_every=0"))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["dpo", "ppo"])
def test_lora_finals_name_no_local_folder(lora_run, chain, stage):
    """Bug: the LoRA finals' adapter/README.md carried `tags: - base_model:adapter:/<absolute path>/sft/final` (sft,
    rm, dpo: pipeline/core/trainer_stage.py; ppo: pipeline/ppo.py). No file of a final may name the repository, the
    run directory, the chain it was copied from or the home folder; the adapter still loads onto its base."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    final = lora_run / "tiny_ko" / stage / "final"
    roots = [REPO_ROOT, lora_run, chain, os.path.expanduser("~")]
    assert local_paths_in(final, roots) == []
    for root in roots:  # independent of the checker: the plain text, anywhere in any file
        assert files_naming(final, str(root)) == [], root
    adapter = final / "adapter"
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == "sft/final"
    front = _front_matter((adapter / "README.md").read_text())
    assert "base_model" not in front and not [t for t in front["tags"] if t.startswith("base_model:")]
    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(lora_run / "tiny_ko" / "sft" / "final"), adapter)
    # negative control: the tag as PEFT wrote it is found
    planted = final.parent / "planted"
    shutil.copytree(adapter, planted)
    card = (planted / "README.md").read_text()
    (planted / "README.md").write_text(
        card.replace("- lora", f"- base_model:adapter:{lora_run}/tiny_ko/sft/final\n- lora")
    )
    try:
        assert local_paths_in(planted, roots) == [f"README.md: {lora_run}"]
    finally:
        shutil.rmtree(planted)


@pytest.mark.slow
def test_dpo_export_loads_with_a_plain_from_pretrained(lora_run):
    """Bug: a DPO model could not be published (`--stage dpo` was refused)."""
    from transformers import AutoModelForCausalLM

    out = export(chain_recipe(lora_run), "dpo")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert sorted(p.name for p in out.iterdir()) == sorted(exported_names(lora_run / "tiny_ko" / "dpo" / "final"))
        assert "DPO (lora-merged)" in read_safetensors_metadata(out / "model.safetensors")["modification"]
        assert local_paths_in(out, [REPO_ROOT, lora_run, os.path.expanduser("~")]) == []
    finally:
        shutil.rmtree(out)
