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
from pipeline.publish import PublishError, drop_card_section, export, exported_names, local_paths_in, stale_files
from tests.helpers.chain import chain_recipe
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
