"""W&B runs through pipeline.core.tracking, with the real wandb library offline (and a local fake server where
online start must fail): a random run id per stage kept in the stage folder, resume into the same run, one line and
offline logging when W&B cannot be reached, system metrics and console logs with their opt-outs, the final
checkpoint as an artifact by reference with its inputs, and no API key anywhere in what is written."""

from __future__ import annotations

import http.server
import json
import shutil
import threading
import time

import pytest

from pipeline.core.config import load_recipe
from pipeline.core.rundir import RunDir, wandb_runs, write_marker
from pipeline.core.tracking import Tracker
from tests.helpers import REPO
from tests.helpers.wandb_offline import read_offline_run

RECIPE = REPO / "recipes" / "tiny_ko.yaml"
FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # 40 characters, the shape of a W&B API key


@pytest.fixture(autouse=True)
def wandb_home(tmp_path, monkeypatch):
    """wandb's settings, cache and artifact staging under tmp_path, and no key or server from the caller's shell.
    wandb reads its environment once per process (at setup), so each test starts and ends with a fresh setup."""
    import wandb

    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    for var in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT", "WANDB_ENTITY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    wandb.teardown()
    yield
    wandb.teardown()


def _recipe(tmp_path, *overrides: str):
    return load_recipe(RECIPE, [f"run.output_dir={tmp_path / 'runs'}", "tracking.mode=offline", *overrides])


def _offline_runs(recipe) -> list:
    """The stage runs' offline folders, oldest first (``offline-run-<time>-<id>``, ``-1`` added within a second)."""
    return sorted((RunDir.of(recipe).wandb / "wandb").glob("offline-run-*"))


def _run_ids(recipe) -> list[str]:
    return [read_offline_run(str(p), wait=10)["run_id"] for p in _offline_runs(recipe)]


def _checkpoint(recipe, stage="sft", step=10) -> None:
    """A complete resumable checkpoint of the stage: what a resumed stage starts from."""
    path = RunDir.of(recipe).stage(stage).checkpoint(step)
    path.mkdir(parents=True)
    write_marker(path, {"stage": stage, "kind": "intermediate", "step": step})


def _start(recipe, stage="sft", metric=1.0) -> str:
    """Start a stage's tracker, log one metric, finish; the W&B run id it used."""
    tracker = Tracker(recipe, stage, is_main=True)
    assert tracker.active
    run_id = tracker.run.id
    tracker.log({f"{stage}/train/loss": metric}, step=1)
    tracker.finish()
    return run_id


# ----------------------------------------------------------------------------------------------------------------
# Run identity
# ----------------------------------------------------------------------------------------------------------------


def test_a_fresh_run_folder_with_the_same_recipe_does_not_append_to_the_old_wandb_run(tmp_path):
    recipe = _recipe(tmp_path)
    first = _start(recipe)
    shutil.rmtree(RunDir.of(recipe).root)  # `rm -rf runs/<run>` and start again with the same recipe
    second = _start(recipe)
    assert len(first) == len(second) == 8 and first.isalnum() and second.isalnum()
    assert first != second
    assert _run_ids(recipe) == [second]


def test_a_resumed_stage_continues_its_wandb_run_and_a_deleted_stage_folder_starts_a_new_one(tmp_path):
    recipe = _recipe(tmp_path)
    run_dir = RunDir.of(recipe)
    first = _start(recipe, metric=3.0)
    record_path = run_dir.stage("sft").wandb_run
    record = json.loads(record_path.read_text())
    assert record == {"id": first, "project": recipe.tracking.project, "entity": None, "mode": "offline", "url": None}
    assert wandb_runs(run_dir) == {"sft": record}
    _checkpoint(recipe)
    resumed = _start(recipe, metric=2.0)  # the record and a checkpoint are there: a resumed stage
    assert resumed == first
    assert _run_ids(recipe) == [first, first]
    history = [read_offline_run(str(p))["history"][0]["sft/train/loss"] for p in _offline_runs(recipe)]
    assert history == [3.0, 2.0]
    # Trained again from scratch (the checkpoints deleted, as the resume warning advises): a new W&B run, although
    # the record is still there.
    shutil.rmtree(run_dir.stage("sft").checkpoints)
    again = _start(recipe)
    assert again != first and wandb_runs(run_dir)["sft"]["id"] == again
    # Without the stage folder (its record), the stage starts a new W&B run too.
    _checkpoint(recipe)
    shutil.rmtree(run_dir.stage("sft").path)
    assert _start(recipe) not in (first, again)


def test_an_unreadable_run_record_starts_a_new_run_instead_of_failing(tmp_path):
    recipe = _recipe(tmp_path)
    path = RunDir.of(recipe).stage("rm").wandb_run
    path.parent.mkdir(parents=True)
    path.write_text("{not json")
    run_id = _start(recipe, stage="rm")
    assert json.loads(path.read_text())["id"] == run_id


# ----------------------------------------------------------------------------------------------------------------
# W&B unreachable: one line, offline logging
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def fake_wandb(monkeypatch):
    """A local HTTP server standing in for the W&B API. ``answer(body) -> (status, message)`` decides every GraphQL
    reply (default: 401, as for a revoked key); wandb is pointed at it with a fake key and a short init timeout."""
    state = {"answer": lambda body: (401, f"user is not logged in (key {FAKE_KEY})")}  # a server that echoes the key

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0)).decode("utf-8", "replace")
            status, message = state["answer"](body) if self.path == "/graphql" else (200, "")
            data = json.dumps({"errors": [{"message": message}]} if message else {}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    monkeypatch.setenv("WANDB_INIT_TIMEOUT", "10")
    yield state
    server.shutdown()
    server.server_close()


def _our_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("[sft]")]


def test_unreachable_wandb_is_one_line_and_the_stage_logs_offline(tmp_path, fake_wandb, capfd):
    recipe = _recipe(tmp_path, "tracking.mode=online")
    t0 = time.perf_counter()
    tracker = Tracker(recipe, "sft", is_main=True)
    seconds = time.perf_counter() - t0
    out, err = capfd.readouterr()
    lines = _our_lines(out + err)
    assert len(lines) == 1, out + err
    assert "W&B is unreachable" in lines[0] and "401" in lines[0] and "wandb sync " in lines[0]
    assert "Traceback" not in out + err and FAKE_KEY not in out + err
    assert seconds < 20, f"online start took {seconds:.1f}s to fail"
    assert tracker.active and tracker.mode == "offline"
    tracker.log({"sft/train/loss": 0.25}, step=7)
    run_id = tracker.run.id
    tracker.finish()
    (run,) = _offline_runs(recipe)
    assert _run_ids(recipe) == [run_id] and f"`wandb sync {run}`" in lines[0]
    assert [h["sft/train/loss"] for h in read_offline_run(str(run), wait=10)["history"] if "sft/train/loss" in h] == [
        0.25
    ]
    assert wandb_runs(RunDir.of(recipe))["sft"] == {
        "id": run_id,
        "project": recipe.tracking.project,
        "entity": None,
        "mode": "offline",
        "url": None,
    }


@pytest.mark.parametrize("deleted", [True, False])
def test_a_saved_run_id_deleted_on_the_server_gets_a_new_run(tmp_path, fake_wandb, capfd, deleted):
    """W&B refuses the id of a deleted run for days (wandb issue #4897); only that refusal replaces the saved id.
    The server here refuses the saved id as deleted, and every other request as unauthorised."""
    recipe = _recipe(tmp_path, "tracking.mode=online")
    record = RunDir.of(recipe).stage("sft").wandb_run
    record.parent.mkdir(parents=True)
    record.write_text(json.dumps({"id": "gone1234", "project": "gemma-rlhf", "mode": "online"}))
    _checkpoint(recipe)  # the stage resumes
    refusal = "run e/gemma-rlhf/gone1234 was previously created and deleted; try a new run name"
    fake_wandb["answer"] = lambda body: (
        (409, refusal) if deleted and "gone1234" in body else (401, "user is not logged in")
    )
    tracker = Tracker(recipe, "sft", is_main=True)
    run_id = tracker.run.id
    tracker.finish()
    out, err = capfd.readouterr()
    lines = _our_lines(out + err)
    assert json.loads(record.read_text())["id"] == run_id
    assert _run_ids(recipe) == [run_id]
    if deleted:
        assert run_id != "gone1234" and len(lines) == 2, out + err
        assert "gone1234 was deleted on the server" in lines[0] and "W&B is unreachable" in lines[1]
    else:  # negative control: an auth failure keeps the saved id (the run resumes when W&B is back)
        assert run_id == "gone1234" and len(lines) == 1 and "401" in lines[0], out + err


def test_when_wandb_cannot_start_at_all_the_stage_runs_untracked(tmp_path, monkeypatch, capfd):
    import wandb

    calls = []

    def broken_init(**kwargs):
        calls.append(kwargs["mode"])
        raise OSError("No space left on device\nsecond line of detail")

    monkeypatch.setattr(wandb, "init", broken_init)
    tracker = Tracker(_recipe(tmp_path, "tracking.mode=online"), "sft", is_main=True)
    out, err = capfd.readouterr()
    assert calls == ["online", "offline"] and not tracker.active
    (line,) = _our_lines(out + err)
    assert "nor offline" in line and "No space left on device" in line and "second line" not in line
    assert "continuing without tracking" in line and "Traceback" not in out + err
    tracker.log({"sft/train/loss": 1.0}, step=1)  # a no-op, not an error
    tracker.log_lineage(tmp_path)
    tracker.finish()
    assert wandb_runs(RunDir.of(_recipe(tmp_path))) == {}


# ----------------------------------------------------------------------------------------------------------------
# System metrics and console logs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("opt_out", [False, True])
def test_system_metrics_and_console_logs_are_on_unless_opted_out(tmp_path, opt_out):
    keys = ["tracking.system_metrics=false", "tracking.console_logs=false"] if opt_out else []
    recipe = _recipe(tmp_path, *keys)
    tracker = Tracker(recipe, "sft", is_main=True)
    settings = tracker.run.settings
    print("[sft] a line the stage prints", flush=True)
    tracker.log({"sft/train/loss": 1.0}, step=1)
    tracker.finish()
    run = read_offline_run(str(_offline_runs(recipe)[0]), wait=10)
    console = "".join(run["console"])
    if opt_out:
        assert settings.console == "off" and settings.x_disable_stats
        assert run["stats"] == 0 and run["console"] == []
    else:
        assert settings.console != "off" and not settings.x_disable_stats
        assert run["stats"] >= 1 and "[sft] a line the stage prints" in console


# ----------------------------------------------------------------------------------------------------------------
# Artifacts: lineage by reference
# ----------------------------------------------------------------------------------------------------------------


def _fake_chain(recipe) -> dict:
    """A data folder and an SFT and RM final checkpoint with a few bytes each."""
    run_dir = RunDir.of(recipe)
    folders = {"data": run_dir.data, "sft": run_dir.stage("sft").final, "rm": run_dir.stage("rm").final}
    for name, folder in folders.items():
        (folder / "sub").mkdir(parents=True, exist_ok=True)
        (folder / "model.safetensors").write_bytes(f"weights of {name}".encode() * 100)
        (folder / "sub" / "config.json").write_text(json.dumps({"stage": name}))
    return folders


def _lineage_run(recipe, stage: str, final, inputs=None) -> dict:
    tracker = Tracker(recipe, stage, is_main=True)
    tracker.log_lineage(final, inputs)
    run_id = tracker.run.id
    tracker.finish()
    run = [p for p, i in zip(_offline_runs(recipe), _run_ids(recipe)) if i == run_id][-1]
    return read_offline_run(str(run))


def test_final_checkpoints_are_logged_by_reference_with_their_inputs(tmp_path):
    recipe = _recipe(tmp_path)
    folders = _fake_chain(recipe)
    sft = _lineage_run(recipe, "sft", folders["sft"])
    rm = _lineage_run(recipe, "rm", folders["rm"], {"sft": folders["sft"]})
    by_name = {a["name"]: a for a in rm["artifacts"]}
    assert set(by_name) == {"tiny_ko-data", "tiny_ko-sft", "tiny_ko-rm"}
    out = by_name["tiny_ko-rm"]
    assert out["type"] == "model" and not out["use_after_commit"]
    assert sorted(e["path"] for e in out["entries"]) == ["model.safetensors", "sub/config.json"]
    assert all(e["ref"] == (folders["rm"] / e["path"]).resolve().as_uri() for e in out["entries"])
    assert all(not e["local_path"] for e in out["entries"])  # nothing to upload
    assert by_name["tiny_ko-data"]["type"] == "dataset" and by_name["tiny_ko-sft"]["type"] == "model"
    assert by_name["tiny_ko-data"]["use_after_commit"] and by_name["tiny_ko-sft"]["use_after_commit"]
    # The RM's input is the very version the SFT stage logged: the same digest.
    (sft_out,) = [a for a in sft["artifacts"] if not a["use_after_commit"]]
    assert sft_out["name"] == "tiny_ko-sft" and by_name["tiny_ko-sft"]["digest"] == sft_out["digest"]
    assert out["digest"] != sft_out["digest"]  # negative control: a different checkpoint, a different digest


def test_upload_weights_uploads_the_final_files_and_keeps_the_same_version(tmp_path):
    by_ref_recipe = _recipe(tmp_path / "by-ref")
    by_ref = _lineage_run(by_ref_recipe, "sft", _fake_chain(by_ref_recipe)["sft"])
    recipe = _recipe(tmp_path, "tracking.upload_weights=true")
    folders = _fake_chain(recipe)  # the same bytes in another run folder
    uploaded = _lineage_run(recipe, "sft", folders["sft"])
    (ref_out,) = [a for a in by_ref["artifacts"] if a["name"] == "tiny_ko-sft"]
    (up_out,) = [a for a in uploaded["artifacts"] if a["name"] == "tiny_ko-sft"]
    assert all(not e["ref"] and e["local_path"] for e in up_out["entries"])
    assert sorted(e["local_path"] for e in up_out["entries"]) == sorted(
        str(folders["sft"] / p) for p in ("model.safetensors", "sub/config.json")
    )
    assert up_out["digest"] == ref_out["digest"]
    (data,) = [a for a in uploaded["artifacts"] if a["name"] == "tiny_ko-data"]
    assert all(e["ref"] and not e["local_path"] for e in data["entries"])  # inputs stay references


def test_log_artifacts_false_logs_no_artifact_and_a_failure_is_one_warning(tmp_path, capfd):
    recipe = _recipe(tmp_path, "tracking.log_artifacts=false")
    folders = _fake_chain(recipe)
    assert _lineage_run(recipe, "sft", folders["sft"])["artifacts"] == []
    capfd.readouterr()
    tracker = Tracker(_recipe(tmp_path), "rm", is_main=True)
    tracker.log_lineage(tmp_path / "no-such-checkpoint")
    tracker.log({"rm/train/loss": 0.5}, step=1)  # the run goes on
    tracker.finish()
    out, err = capfd.readouterr()
    (line,) = [x for x in (out + err).splitlines() if x.startswith("[rm]")]
    assert "W&B artifacts not logged" in line and "Traceback" not in out + err


# ----------------------------------------------------------------------------------------------------------------
# Secrets
# ----------------------------------------------------------------------------------------------------------------


def _holds(folder, secret: str) -> list[str]:
    return [str(p) for p in folder.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def test_the_api_key_never_reaches_the_run_record_or_the_offline_run(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", FAKE_KEY)
    recipe = _recipe(tmp_path)
    folders = _fake_chain(recipe)
    tracker = Tracker(recipe, "sft", is_main=True)
    tracker.log({"sft/train/loss": 1.0}, step=1)
    tracker.log_lineage(folders["sft"])
    tracker.finish()
    run_dir = RunDir.of(recipe)
    assert FAKE_KEY not in run_dir.stage("sft").wandb_run.read_text()
    assert FAKE_KEY not in json.dumps(read_offline_run(str(_offline_runs(recipe)[0]), wait=10)["config"])
    assert _holds(run_dir.wandb, FAKE_KEY) == []
    # Negative control: the scan finds the key where it is written.
    other = _recipe(tmp_path / "control")
    leaky = Tracker(other, "sft", is_main=True, extra_config={"oops": FAKE_KEY})
    leaky.finish()
    assert read_offline_run(str(_offline_runs(other)[0]), wait=10)["config"]["oops"] == FAKE_KEY
    assert _holds(RunDir.of(other).wandb, FAKE_KEY)


# ----------------------------------------------------------------------------------------------------------------
# Through a stage
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_the_sft_stage_keeps_its_printing_records_its_run_and_logs_its_checkpoint_by_reference(tmp_path):
    """The stage as users run it (its own process: pytest's capture fixtures hide the console from wandb)."""
    import os
    import subprocess
    import sys

    from pipeline.data import main as data_main

    overrides = ["tracking.mode=offline", "sft.max_steps=2", "sft.logging_steps=1", "sft.eval_steps=100"]
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={tmp_path / 'runs'}"]) == 0
    done = subprocess.run(
        [sys.executable, "-m", "pipeline.sft", "--recipe", str(RECIPE), f"run.output_dir={tmp_path / 'runs'}"]
        + overrides,
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "[sft] step 2/2" in done.stdout and "[sft] saved" in done.stdout  # the stage's lines reach the terminal
    assert "Traceback" not in done.stdout + done.stderr
    recipe = _recipe(tmp_path, *overrides)
    (run_dir,) = _offline_runs(recipe)
    run = read_offline_run(str(run_dir), wait=10)
    assert run["run_id"] == wandb_runs(RunDir.of(recipe))["sft"]["id"]
    assert "[sft] step 2/2" in "".join(run["console"])  # and W&B's Logs tab
    assert any("sft/train/loss" in h for h in run["history"])
    kinds = {(a["name"], a["type"], a["use_after_commit"]) for a in run["artifacts"] if a["type"] != "run_table"}
    assert kinds == {("tiny_ko-data", "dataset", True), ("tiny_ko-sft", "model", False)}  # (tables are artifacts too)
    (model,) = [a for a in run["artifacts"] if a["name"] == "tiny_ko-sft"]
    final = RunDir.of(recipe).stage("sft").final
    assert {e["ref"] for e in model["entries"]} == {p.resolve().as_uri() for p in final.rglob("*") if p.is_file()}
