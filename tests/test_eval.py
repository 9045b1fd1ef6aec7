"""`make eval`: the shipped Korean benchmark (data_prep/ko_bench/) as lm-evaluation-harness tasks, the harness run on
every model of a run, the results in runs/<run>/eval/, the report and the errors a user meets offline."""

from __future__ import annotations

import json
import random
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data_prep.ko_bench import BENCH_DIR
from data_prep.ko_bench.generate import SUBJECTS, build
from data_prep.ko_bench.tasks import first_word, is_right
from data_prep.tiny_ko.generate import batchim
from data_prep.tiny_ko.rules import is_polite_korean
from pipeline.core.config import ConfigError, load_recipe, validate
from tests.helpers import REPO
from tests.helpers.chain import chain_recipe

MC = "data_prep/ko_bench/ko_bench_mc.yaml"
SHORT = "data_prep/ko_bench/ko_bench_short.yaml"


def rows(name: str) -> list[dict]:
    return [json.loads(x) for x in (BENCH_DIR / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]


# --------------------------------------------------------------------------------------------------------------
# The benchmark's items
# --------------------------------------------------------------------------------------------------------------


def test_the_committed_items_are_what_the_generator_writes():
    """Catches an item file edited by hand or a generator change not written out: the files are the generator's."""
    built = build()
    for name, items in built.items():
        assert [{k: v for k, v in r.items() if k != "id"} for r in rows(name)] == items, name


def test_every_item_has_one_right_answer_and_every_kind_is_there():
    """Catches a wrong answer key (the right sum, particle or word not at the answer index), a duplicate choice, or a
    kind missing from the benchmark."""
    mc, short = rows("mc"), rows("short")
    assert len(mc) == 240 and len(short) == 80
    assert {r["kind"] for r in mc} == {"polite", "josa", "arith", "word"}
    assert {r["kind"] for r in short} == {"arith", "word"}
    english = {e: n for n, e in SUBJECTS}
    for r in mc:
        choices, right = r["choices"], r["choices"][r["answer"]]
        assert len(set(choices)) == len(choices), r
        if r["kind"] == "arith":
            a, b = re.match(r"(\d+) 더하기 (\d+)", r["question"]).groups()
            assert int(right) == int(a) + int(b), r
        elif r["kind"] == "josa":
            noun, particle = re.match(r"^(?:여기에 |저는 )?(\S+?)([은는이가을를]) ", right).groups()
            assert (particle in "은이을") == batchim(noun), r
        elif r["kind"] == "word":
            assert right == english[r["question"].split("'")[1]], r
        else:  # polite: the one choice the demo's politeness rule accepts
            assert [is_polite_korean(c) for c in choices].count(True) == 1 and is_polite_korean(right), r
    for r in short:
        if r["kind"] == "arith":
            a, b = re.match(r"(\d+) 더하기 (\d+)", r["question"]).groups()
            assert int(r["answer"]) == int(a) + int(b), r
        else:
            assert r["answer"] == english[r["question"].split("'")[1]], r


def test_no_item_is_a_sentence_or_a_sum_of_the_demo_data():
    """Catches a benchmark that measures memorised training rows: no choice or question of the benchmark is a turn
    of any demo data file, and no sum it asks is asked there."""
    turns = set()
    for f in (REPO / "data_prep" / "tiny_ko").glob("*.jsonl"):
        for line in f.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            for key in ("prompt", "chosen", "rejected"):
                if isinstance(row.get(key), str):
                    turns.add(row[key])
            for m in row.get("messages", []):
                turns.add(m["content"])
    texts = [t for r in rows("mc") for t in (r["question"], *r["choices"])] + [r["question"] for r in rows("short")]
    assert not [t for t in texts if t in turns]
    asked = {p for t in turns for p in re.findall(r"(\d+) 더하기 (\d+)", t)}
    assert asked, "no sums found in the demo data: the check below would pass on nothing"
    bench = {p for r in rows("mc") + rows("short") for p in re.findall(r"(\d+) 더하기 (\d+)", r["question"])}
    assert len(bench) >= 70 and not bench & asked


@pytest.mark.parametrize(
    ("kind", "answer", "response", "right"),
    [
        ("word", "바나나", "바나나입니다.", True),
        ("word", "고양이", "고양이요.", True),
        ("word", "고양이", "고양이", True),
        ("word", "비", "비예요", True),
        ("word", "비", "비행기", False),  # a longer word that starts with the answer
        ("word", "사과", "I think 사과", False),  # the first word decides
        ("word", "사과", "", False),
        ("arith", "48", "정답은 48이에요.", True),
        ("arith", "48", "148", False),
        ("arith", "48", "4 더하기 44는 48", False),  # the first number decides
    ],
)
def test_short_answers_are_scored_by_their_first_word_or_number(kind, answer, response, right):
    """Catches a scorer that accepts any answer containing the word (비 in 비행기) or any number in the answer."""
    assert is_right({"kind": kind, "answer": answer}, response) is right
    assert first_word("  사과, 맛있어요") == "사과"


# --------------------------------------------------------------------------------------------------------------
# The recipe's tasks
# --------------------------------------------------------------------------------------------------------------


def test_the_recipe_check_refuses_a_missing_task_file_and_a_malformed_name():
    """Catches an `eval.tasks` typo found only after a model has loaded."""
    recipe = load_recipe(REPO / "recipes" / "tiny_ko.yaml", ["eval.tasks=[data_prep/ko_bench/nope.yaml]"])
    with pytest.raises(ConfigError, match=r"eval\.tasks\.0.*does not exist"):
        validate(recipe)
    recipe = load_recipe(REPO / "recipes" / "tiny_ko.yaml", ["eval.tasks=['kobest boolq']"])
    with pytest.raises(ConfigError, match=r"eval\.tasks\.0"):
        validate(recipe)
    validate(load_recipe(REPO / "recipes" / "gemma2b_ko.yaml"))  # the real recipe's harness names pass


def test_a_task_file_without_a_task_name_is_refused(tmp_path):
    """Catches a task file the harness would index under no name (its results could not be reported)."""
    from pipeline.eval import task_specs

    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\noutput_type: multiple_choice\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="names its task"):
        task_specs([str(bad)])
    assert [s.name for s in task_specs([MC, SHORT, "kobest_boolq"])] == [
        "ko_bench_mc",
        "ko_bench_short",
        "kobest_boolq",
    ]


@pytest.mark.slow
def test_an_offline_hub_task_ends_in_one_line_naming_the_task_and_its_dataset(chain, tmp_path):
    """Catches the datasets/hub traceback a user gets offline, and a model loaded before the tasks are checked."""
    _copy_sft(chain, tmp_path)
    out = subprocess.run(
        [sys.executable, "-m", "pipeline.eval", "--recipe", "recipes/tiny_ko.yaml", *_overrides(tmp_path)]
        + ["--stages", "sft", "--tasks", f"{MC},kobest_copa,not_a_task_anywhere", "eval.limit=2"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
        env={**_offline_env()},
    )
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    err = out.stderr
    assert "eval task kobest_copa: dataset skt/kobest_v1 (copa) cannot be loaded" in err, err[-2000:]
    assert "'not_a_task_anywhere' is not a task or group of lm-evaluation-harness" in err
    assert "[eval] SFT:" not in out.stdout  # no model was loaded
    assert not (tmp_path / "tiny_ko" / "eval").exists()


# --------------------------------------------------------------------------------------------------------------
# make eval on the toy chain
# --------------------------------------------------------------------------------------------------------------


def _offline_env() -> dict:
    import os

    return {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "WANDB_MODE": "disabled"}


def _overrides(out: Path) -> list[str]:
    return [f"run.output_dir={out}", "tracking.mode=disabled"]


def _copy_sft(chain: Path, out: Path) -> None:
    for part in ("data", "sft/final", "rm/final"):
        if not (out / "tiny_ko" / part).exists():
            shutil.copytree(chain / "tiny_ko" / part, out / "tiny_ko" / part)


@pytest.fixture(scope="module")
def toy_eval(chain, tmp_path_factory):
    """make eval's results on the toy chain's base and SFT checkpoint (both tasks, every item)."""
    from pipeline import eval as benchmarks

    out = tmp_path_factory.mktemp("eval")
    _copy_sft(chain, out)
    recipe = chain_recipe(out, "eval.batch_size=32", "run.precision=fp32")  # as lm_eval by hand, on any machine
    return out, recipe, benchmarks.run(recipe)


@pytest.mark.slow
def test_make_eval_writes_every_model_s_scores_for_every_item(toy_eval):
    """Catches a model left out (the base, or a stage whose checkpoint exists), items dropped, or a score outside
    [0, 1]; only stages whose final exists are evaluated (no PPO or DPO here)."""
    out, recipe, results = toy_eval
    assert list(results) == ["base", "sft"]
    for stage in results:
        saved = json.loads((out / "tiny_ko" / "eval" / f"{stage}.json").read_text(encoding="utf-8"))
        assert saved == json.loads(json.dumps(results[stage]))
        assert saved["tasks"]["ko_bench_mc"]["n"] == 240 and saved["tasks"]["ko_bench_short"]["n"] == 80
        assert saved["tasks"]["ko_bench_short"]["chat_template"] is True
        assert saved["tasks"]["ko_bench_mc"]["chat_template"] is False
        for task in saved["tasks"].values():
            values = [v for k, v in task["metrics"].items() if "stderr" not in k]
            assert values and all(0.0 <= v <= 1.0 for v in values), task


@pytest.mark.slow
def test_make_eval_gives_the_numbers_of_lm_eval_run_by_hand(toy_eval):
    """Catches a difference between our call of the harness and the harness's own command line on the same
    checkpoint (another prompt, dropped BOS, another tokenizer): the multiple-choice accuracies must be equal."""
    out, _, results = toy_eval
    ckpt = out / "tiny_ko" / "sft" / "final"
    hand = subprocess.run(
        [str(Path(sys.executable).parent / "lm_eval"), "--model", "hf"]
        + ["--model_args", f"pretrained={ckpt},dtype=float32", "--device", "cpu", "--batch_size", "32"]
        + ["--include_path", "data_prep/ko_bench", "--tasks", "ko_bench_mc", "--output_path", str(out / "hand")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=900,
        env=_offline_env(),
    )
    assert hand.returncode == 0, hand.stderr[-3000:]
    found = list((out / "hand").rglob("results_*.json"))
    assert len(found) == 1
    by_hand = json.loads(found[0].read_text(encoding="utf-8"))["results"]["ko_bench_mc"]
    ours = results["sft"]["tasks"]["ko_bench_mc"]["metrics"]
    assert ours["acc"] == pytest.approx(by_hand["acc,none"], abs=1e-12)
    assert ours["acc_norm"] == pytest.approx(by_hand["acc_norm,none"], abs=1e-12)


@pytest.mark.slow
def test_the_report_carries_the_benchmark_table_and_leaves_out_results_of_an_older_checkpoint(toy_eval):
    """Catches results of a checkpoint trained again shown as if they were the current model's."""
    from pipeline.core import benchmarks
    from pipeline.core.rundir import RunDir

    out, recipe, results = toy_eval
    said: list[str] = []
    assert list(benchmarks.read_results(recipe, said.append)) == ["base", "sft"]
    section = benchmarks.report_section(benchmarks.read_results(recipe), RunDir.of(recipe), "benchmarks.png")
    assert "| ko_bench_mc | acc |" in section and "| task | metric | base | SFT |" in section
    assert f"{results['sft']['tasks']['ko_bench_mc']['metrics']['acc']:.3f}" in section
    # the SFT checkpoint "trained again": its marker has another completion time
    marker = out / "tiny_ko" / "sft" / "final"
    from pipeline.core.rundir import read_marker, write_marker

    info = read_marker(marker)
    try:
        write_marker(marker, {**info, "finished_at": "2099-01-01T00:00:00"})
        assert list(benchmarks.read_results(recipe, said.append)) == ["base"]
        assert any("earlier SFT checkpoint" in s for s in said)
    finally:
        write_marker(marker, info)


@pytest.mark.slow
def test_a_shuffled_answer_key_scores_at_chance_where_the_real_key_does_not(toy_eval, tmp_path):
    """The negative control of the comparison with the harness: the same task with a random answer key scores what
    guessing scores (the mean of 1/choices over items) and the right key scores above it, on a model that knows
    the answers: the key the toy SFT model itself ranks first, written into a copy of the task."""
    from pipeline import eval as benchmarks

    base, _, _ = toy_eval
    out = tmp_path / "runs"
    shutil.copytree(base / "tiny_ko" / "sft" / "final", out / "tiny_ko" / "sft" / "final")
    recipe = chain_recipe(out, "eval.batch_size=32", "run.precision=fp32")
    copy = tmp_path / "bench"
    shutil.copytree(BENCH_DIR, copy)
    items = rows("mc")
    # which choice the model ranks first, per item, from the harness's own per-item output
    picked = _argmax_choices(out / "tiny_ko" / "sft" / "final", copy)
    rng = random.Random(0)
    for name, key in (("known", picked), ("shuffled", [rng.randrange(len(r["choices"])) for r in items])):
        lines = [json.dumps({**r, "answer": key[i]}, ensure_ascii=False) for i, r in enumerate(items)]
        (copy / "mc.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
        task = copy / "ko_bench_mc.yaml"
        scores = benchmarks.run(recipe, stages=["sft"], tasks=[str(task)])["sft"]["tasks"]["ko_bench_mc"]
        acc = scores["metrics"]["acc"]
        chance = sum(1 / len(r["choices"]) for r in items) / len(items)
        if name == "known":
            assert acc == pytest.approx(1.0)
        else:
            assert abs(acc - chance) < 3 * (chance * (1 - chance) / len(items)) ** 0.5, (acc, chance)


@pytest.mark.slow
def test_a_group_file_is_scored_and_a_second_call_adds_its_tasks(toy_eval, tmp_path):
    """Catches a group the harness does not aggregate dropping out with no metrics (lm-eval 0.4.13 reports only
    its name), a group task file the harness cannot load by path, and `make eval TASKS=...` erasing the results
    of the other tasks."""
    from pipeline import eval as benchmarks

    base, _, results = toy_eval
    out = tmp_path / "runs"
    shutil.copytree(base / "tiny_ko" / "sft" / "final", out / "tiny_ko" / "sft" / "final")
    recipe = chain_recipe(out, "eval.batch_size=32", "run.precision=fp32", "eval.limit=24")
    folder = tmp_path / "tasks"
    shutil.copytree(BENCH_DIR, folder)
    group = folder / "both.yaml"
    group.write_text("group: ko_bench_both\ntask:\n  - ko_bench_mc\n  - ko_bench_short\n", encoding="utf-8")
    first = benchmarks.run(recipe, stages=["sft"], tasks=[str(folder / "ko_bench_mc.yaml")])["sft"]["tasks"]
    both = benchmarks.run(recipe, stages=["sft"], tasks=[str(group)])["sft"]["tasks"]
    assert set(both) == {"ko_bench_mc", "ko_bench_both"}  # the earlier task kept, the group added
    mc = first["ko_bench_mc"]["metrics"]["acc"]
    assert both["ko_bench_both"]["metrics"]["acc"] == pytest.approx(mc)  # the only task with acc: its mean
    assert both["ko_bench_both"]["n"] == 48
    saved = json.loads((out / "tiny_ko" / "eval" / "sft.json").read_text(encoding="utf-8"))
    assert set(saved["tasks"]) == {"ko_bench_mc", "ko_bench_both"}


def _argmax_choices(ckpt: Path, task_dir: Path) -> list[int]:
    """The choice of each multiple-choice item the model gives the highest log-likelihood (harness per-item output)."""
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = simple_evaluate(
        model="hf",
        model_args=f"pretrained={ckpt},dtype=float32,device=cpu",
        tasks=[str(task_dir / "ko_bench_mc.yaml")],
        task_manager=TaskManager(include_defaults=False, include_path=str(task_dir)),
        batch_size=32,
        log_samples=True,
    )
    samples = sorted(out["samples"]["ko_bench_mc"], key=lambda s: s["doc_id"])
    return [max(range(len(s["filtered_resps"])), key=lambda k: s["filtered_resps"][k][0]) for s in samples]


@pytest.mark.slow
def test_the_scores_reach_an_offline_w_and_b_run_of_their_own(chain, tmp_path, monkeypatch):
    """Catches scores missing from W&B, and an eval W&B run that breaks the stage (it has no training folder of
    its own): two items of one task, tracked offline, summary keys eval/<stage>/<task>/<metric>."""
    import wandb

    from pipeline import eval as benchmarks
    from pipeline.core.rundir import RunDir
    from tests.helpers.wandb_offline import read_offline_run

    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / var.lower()))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    wandb.teardown()
    out = tmp_path / "runs"
    _copy_sft(chain, out)
    recipe = chain_recipe(out, "tracking.mode=offline", "eval.limit=2")
    try:
        results = benchmarks.run(recipe, stages=["sft"], tasks=[MC])
    finally:
        wandb.teardown()
    runs = sorted((RunDir.of(recipe).wandb / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    logged = read_offline_run(str(runs[0]), wait=10)
    acc = results["sft"]["tasks"]["ko_bench_mc"]["metrics"]["acc"]
    assert logged["summary"]["eval/sft/ko_bench_mc/acc"] == pytest.approx(acc)
    assert "eval/benchmarks" in logged["tables"]
    assert json.loads(RunDir.of(recipe).stage("eval").wandb_run.read_text())["mode"] == "offline"
