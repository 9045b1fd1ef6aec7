"""Reward functions (``ppo.reward_functions``, pipeline/core/rewards.py) and starting anywhere (``ppo.init_from``,
``dpo.init_from``, pipeline/core/starts.py): the score's arithmetic by hand, every failure in one line, the recipe's
refusals before anything runs, the shipped rules as functions, and the stages on the tiny chain started from a folder
that is not this run's SFT checkpoint."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from pipeline.core import rewards
from pipeline.core.config import ConfigError, load_recipe, validate
from pipeline.core.rewards import PromptRows, RewardFunction, RewardFunctionError
from tests.helpers.chain import RECIPE, chain_recipe, ppo_metrics, rule_rate

POLITE = "data_prep.tiny_ko.rules:polite_reward"
NO_RM = ["ppo.reward_model=none", "ppo.normalize_reward=false"]


def fn(body, name="f"):
    return RewardFunction(name, f"tests:{name}", 1.0, body)


# ----------------------------------------------------------------------------------------------------------------
# The arithmetic and the one-line failures (no model)
# ----------------------------------------------------------------------------------------------------------------


def test_combine_is_the_weighted_sum_of_the_standardised_model_score_and_the_functions():
    """Catches a weight applied to the wrong function, the model's weight dropped, or functions averaged instead of
    summed. By hand: 2 * (-1) + 0.5 * 1 + (-3) * 0 = -1.5 and 2 * 0.5 + 0.5 * 0 + (-3) * 1 = -2."""
    rm = torch.tensor([-1.0, 0.5])
    table = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert rewards.combine(rm, 2.0, table, [0.5, -3.0]).tolist() == [-1.5, -2.0]
    assert rewards.combine(None, 2.0, table, [0.5, -3.0]).tolist() == [0.5, -3.0]  # no model: its weight unused
    assert rewards.combine(rm, 2.0, None, []).tolist() == [-2.0, 1.0]
    with pytest.raises(ValueError):
        rewards.combine(None, 1.0, None, [])


@pytest.mark.parametrize(
    "body, says",
    [
        (lambda prompts, **_: 1 / 0, "raised ZeroDivisionError: division by zero (prompt '3 더하기 4는?')"),
        (lambda prompts, **_: [1.0], "returned 1 values for 2 responses (prompt '사과는 무엇인가요?')"),
        (lambda prompts, **_: [1.0, float("nan")], "returned nan for prompt '3 더하기 4는?'"),
        (lambda prompts, **_: [1.0, math.inf], "returned inf for prompt '3 더하기 4는?'"),
        (lambda prompts, **_: 0.5, "returned float, not one number per response"),
        (lambda prompts, **_: ["a", "b"], "returned list, not one number per response"),
    ],
    ids=["raises", "wrong-count", "nan", "inf", "scalar", "strings"],
)
def test_a_failing_function_stops_in_one_line_naming_it_and_the_prompt(body, says):
    """Catches a reward function's failure surfacing as a traceback from inside the loop, or a NaN/inf reward
    silently entering the advantages."""

    def picky(prompts, **_):  # raises only on the arithmetic prompt: the message names that one, not the first
        if any("더하기" in p for p in prompts):
            return body(prompts)
        return [0.0] * len(prompts)

    f = fn(picky if "raised" in says else body, "picky")
    with pytest.raises(RewardFunctionError) as e:
        rewards.call(f, ["사과는 무엇인가요?", "3 더하기 4는?"], ["네.", "7"], [True, True], {})
    message = str(e.value)
    assert "\n" not in message and "reward function picky (tests:picky)" in message and says in message, message


def test_a_good_function_gets_every_argument_and_its_values_back():
    """Catches the extra columns not reaching the function, the arguments shifted by one row, or a tensor result
    refused. Negative control: the same call without the column gives the checker nothing to compare."""
    seen = {}

    def checker(prompts, responses, ended, answer, **kwargs):
        seen.update(prompts=prompts, responses=responses, ended=ended, answer=answer, extra=kwargs)
        return torch.tensor([float(str(a) in r) for a, r in zip(answer, responses)])

    f = fn(checker, "checker")
    rows = PromptRows(["1 더하기 2는?", "2 더하기 2는?"], {"answer": [3, 4], "kind": ["a", "b"]})
    got = rewards.function_scores([f], rows, ["3입니다.", "5입니다."], [True, False])
    assert got == {"checker": [1.0, 0.0]}
    assert seen == {
        "prompts": rows.prompts,
        "responses": ["3입니다.", "5입니다."],
        "ended": [True, False],
        "answer": [3, 4],
        "extra": {"kind": ["a", "b"]},
    }
    with pytest.raises(RewardFunctionError, match="raised TypeError"):  # no answer column: the checker cannot run
        rewards.function_scores([f], PromptRows(rows.prompts, {}), ["3", "5"], [True, True])
    assert rows.take([1, 1]).columns == {"answer": [4, 4], "kind": ["b", "b"]}


def test_prompt_rows_read_the_data_stage_columns_and_refuse_a_reserved_name():
    """Catches rows without a column losing their place (every row gets every column, None where absent), and a
    column named like an argument silently overriding it."""
    msgs = [json.dumps([{"role": "user", "content": q}]) for q in ("가?", "나?")]
    rows = PromptRows.read(msgs, ['{"answer": 1}', "{}"], "p.parquet")
    assert rows.prompts == ["가?", "나?"] and rows.columns == {"answer": [1, None]}
    with pytest.raises(RewardFunctionError, match="p.parquet: prompt column 'ended' has the name"):
        PromptRows.read(msgs, ['{"ended": 1}', "{}"], "p.parquet")


def test_the_shipped_rules_are_reward_functions_with_the_judging_logic():
    """Catches a reward function drifting from the rule the report judges with (a GRPO run would optimise one thing
    and be judged on another)."""
    from data_prep.tiny_ko import rules

    prompts = ["사과는 무엇인가요?", "사과는 무엇인가요?", "3 더하기 4는?", "3 더하기 4는?"]
    responses = ["사과는 맛있습니다.", "바나나는 맛있습니다.", "7입니다.", "8입니다."]
    ended = [True, True, True, False]
    assert rules.polite_reward(prompts, responses, ended) == [
        1.0,
        1.0,
        0.0,
        0.0,
    ]  # 입니다. is not a polite ending here
    assert rules.polite_on_topic_reward(prompts, responses, ended) == [1.0, 0.0, 0.0, 0.0]
    assert rules.arithmetic_reward(prompts, responses, ended) == [0.0, 0.0, 1.0, 0.0]
    for p, r, e in zip(prompts, responses, ended):
        assert rules.polite_on_topic_reward([p], [r], [e]) == [float(rules.is_polite_and_on_topic(p, r, e))]
    # An answer column is checked instead of the prompt's sum: "what is 6 x 7" has no 더하기 in it.
    assert rules.arithmetic_reward(["6 곱하기 7은?"], ["42입니다."], [True], answer=[42]) == [1.0]


# ----------------------------------------------------------------------------------------------------------------
# The recipe: refused before anything runs
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key, says",
    [
        (
            ["ppo.reward_functions=[{function: data_prep.tiny_ko.rules:nope}]"],
            "ppo.reward_functions.0.function",
            "has no attribute 'nope'",
        ),
        (
            ["ppo.reward_functions=[{function: no_such_module:f}]"],
            "ppo.reward_functions.0.function",
            "module 'no_such_module' does not import",
        ),
        (
            ["ppo.reward_functions=[{function: tests/nothing.py:f}]"],
            "ppo.reward_functions.0.function",
            "file 'tests/nothing.py' does not exist",
        ),
        (
            ["ppo.reward_functions=[{function: data_prep.tiny_ko.rules}]"],
            "ppo.reward_functions.0.function",
            "is not 'package.module:function'",
        ),
        (
            ["ppo.reward_functions=[{function: 'data_prep.tiny_ko.rules:POLITE_ENDINGS'}]"],
            "ppo.reward_functions.0.function",
            "is a tuple, not a function",
        ),
        (
            [f"ppo.reward_functions=[{{function: '{POLITE}', weight: 0}}]"],
            "ppo.reward_functions.0.weight",
            "finite, non-zero",
        ),
        (
            [f"ppo.reward_functions=[{{function: '{POLITE}'}}, {{function: '{POLITE}'}}]"],
            "ppo.reward_functions.1.name",
            "names two reward functions",
        ),
        (["ppo.reward_model=none", "ppo.normalize_reward=false"], "ppo.reward_model", "nothing to score with"),
        (
            ["ppo.reward_model=none", f"ppo.reward_functions=[{{function: '{POLITE}'}}]"],
            "ppo.normalize_reward",
            "ppo.reward_model is none",
        ),
        (
            ["ppo.normalize_reward=false", f"ppo.reward_functions=[{{function: '{POLITE}'}}]"],
            "ppo.normalize_reward",
            "must be true when reward_functions are added",
        ),
        (["ppo.init_from=models/no/such/folder"], "ppo.init_from", "does not exist"),
        (["dpo.init_from=not a hub id"], "dpo.init_from", "neither an existing local path nor a valid hub id"),
        (
            ["ppo.init_from=google/gemma-2b-it", "dpo.init_from=google/gemma-7b-it"],
            "dpo.init_from",
            "the data stage tokenizes with one tokenizer",
        ),
    ],
    ids=[
        "no-attribute",
        "no-module",
        "no-file",
        "no-colon",
        "not-callable",
        "zero-weight",
        "same-name",
        "nothing-scores",
        "normalize-without-rm",
        "unnormalised-sum",
        "missing-folder",
        "bad-hub-id",
        "two-starts",
    ],
)
def test_the_recipe_refuses_reward_and_start_settings_that_cannot_work(overrides, key, says):
    """Catches a reward function path that does not import (or is not a function) surfacing only in the PPO stage,
    an unstandardised reward-model score summed with a 0/1 rule, and starts that cannot be loaded or tokenized."""
    with pytest.raises(ConfigError) as e:
        validate(load_recipe(RECIPE, overrides))
    assert f"key '{key}'" in str(e.value) and says in str(e.value), str(e.value)


def test_a_good_reward_recipe_validates_and_a_file_path_works(tmp_path):
    """Negative control of the refusals: functions by module and by file path, with and without a reward model."""
    (tmp_path / "mine.py").write_text("def score(prompts, **_):\n    return [1.0] * len(prompts)\n")
    validate(load_recipe(RECIPE, [*NO_RM, f"ppo.reward_functions=[{{function: '{tmp_path}/mine.py:score'}}]"]))
    validate(load_recipe(RECIPE, [f"ppo.reward_functions=[{{function: '{POLITE}', weight: 0.5}}]"]))
    validate(load_recipe(RECIPE, ["ppo.init_from=google/gemma-2b-it", "dpo.init_from=google/gemma-2b-it"]))


def test_a_start_in_another_run_is_checked_when_the_stage_starts(tmp_path):
    """A start under the runs' root may not exist yet at validation (``make demo-rlvr`` trains it first); the stage
    refuses it in one line when it is still missing. Catches the shipped recipes failing `make recipe` on a fresh
    clone, and a missing start surfacing as a loader traceback."""
    from pipeline.core.errors import InputError
    from pipeline.core.starts import policy_start

    recipe = load_recipe(RECIPE, [f"run.output_dir={tmp_path}", f"ppo.init_from={tmp_path}/other/sft/final"])
    validate(recipe)
    with pytest.raises(InputError, match=r"ppo.init_from .*other/sft/final.* does not exist \(train it first"):
        policy_start(recipe, "ppo")
    (tmp_path / "other" / "sft" / "final").mkdir(parents=True)
    with pytest.raises(InputError, match="is not a model folder"):
        policy_start(recipe, "ppo")


def test_the_chain_a_stage_needs_follows_the_recipe():
    """Catches `make ppo` running SFT when PPO starts elsewhere, or training a reward model nobody reads."""
    from pipeline.core.starts import needs

    r = load_recipe(RECIPE)
    assert needs(r, "ppo") == ["data", "sft", "rm"] and needs(r, "dpo") == ["data", "sft"]
    init = load_recipe(RECIPE, ["ppo.init_from=google/gemma-2b-it", "dpo.init_from=google/gemma-2b-it"])
    assert needs(init, "ppo") == ["data", "rm"] and needs(init, "rm") == ["data"] and needs(init, "dpo") == ["data"]
    free = load_recipe(
        RECIPE, ["ppo.init_from=google/gemma-2b-it", *NO_RM, f"ppo.reward_functions=[{{function: '{POLITE}'}}]"]
    )
    assert needs(free, "ppo") == ["data"] and needs(free, "report") == ["data", "ppo"]
    functions_only = load_recipe(RECIPE, [*NO_RM, f"ppo.reward_functions=[{{function: '{POLITE}'}}]"])
    assert needs(functions_only, "ppo") == ["data", "sft"]


def test_make_plan_prints_what_make_ppo_runs(capsys):
    """Catches the Makefile's upstream and `make plan` disagreeing: both read ``pipeline.plan --needs``."""
    from pipeline.plan import main

    args = [
        "--recipe",
        str(RECIPE),
        "ppo.init_from=google/gemma-2b-it",
        *NO_RM,
        f"ppo.reward_functions=[{{function: '{POLITE}'}}]",
    ]
    assert main(["--needs", "ppo", *args]) == 0
    assert capsys.readouterr().out.split() == ["data"]
    assert main(["--needs", "ppo", "--goals", "data ppo", *args]) == 0  # data is made first by the same make
    assert capsys.readouterr().out.split() == []
    assert main(["--needs", "ppo", "--recipe", str(RECIPE)]) == 0
    assert capsys.readouterr().out.split() == ["data", "sft", "rm"]


# ----------------------------------------------------------------------------------------------------------------
# The stages on the tiny chain, started from a folder that is not this run's SFT checkpoint
# ----------------------------------------------------------------------------------------------------------------


def elsewhere(chain, tmp_path):
    """A run folder with the chain's data only, and a copy of its SFT checkpoint in an unrelated folder."""
    start = tmp_path / "models" / "my-instruct"
    shutil.copytree(chain / "tiny_ko" / "sft" / "final", start)
    shutil.copytree(chain / "tiny_ko" / "data", tmp_path / "tiny_ko" / "data")
    return start


GRPO_RULE = [
    "ppo.estimator=grpo",
    "ppo.num_generations=4",
    "ppo.kl_penalty=loss",
    *NO_RM,
    f"ppo.reward_functions=[{{function: '{POLITE}'}}]",
]


@pytest.fixture(scope="module")
def grpo_run(chain, tmp_path_factory):
    """GRPO with the politeness rule as the only reward, from a copy of the SFT checkpoint elsewhere: 60 updates of
    8 prompts x 4 samples (the toy's learning run, shared by the tests below)."""
    from pipeline import ppo
    from pipeline.core import loading

    tmp = tmp_path_factory.mktemp("grpo_rule")
    start = elsewhere(chain, tmp)
    loaded = []
    original = loading.load_sequence_classifier
    ppo.load_sequence_classifier = lambda *a, **k: loaded.append(a[1]) or original(*a, **k)
    try:
        final = ppo.run(
            chain_recipe(
                tmp,
                f"ppo.init_from={start}",
                *GRPO_RULE,
                "ppo.total_episodes=1920",
                "ppo.panel_every=30",
                "ppo.save_steps=1000",
            )
        )
    finally:
        ppo.load_sequence_classifier = original
    return tmp, start, final, loaded


@pytest.mark.slow
def test_grpo_with_the_rule_function_learns_the_rule_with_no_reward_model(grpo_run):
    """The issue's toy goal: GRPO rewarded by the politeness function alone raises the held-out rule rate by 0.15
    over its start. Catches the functions' scores not reaching the advantages (the rate would not move)."""
    out, start, final, loaded = grpo_run
    before, after = rule_rate(start), rule_rate(final)
    print(f"held-out polite rate: start {before:.3f} -> GRPO on the rule function {after:.3f}")
    assert after > before + 0.15, (before, after)


@pytest.mark.slow
def test_no_reward_model_is_needed_built_or_loaded_and_no_sft_ran(grpo_run, chain):
    """Catches a reward-model-free run still loading one (memory and a hard dependency on `make rm`), and a start
    elsewhere still needing this run's SFT. Negative control: the default recipe's PPO needs both."""
    from pipeline import ppo
    from pipeline.core import loading
    from pipeline.core.devices import precision

    out, start, final, loaded = grpo_run
    assert loaded == []  # no sequence classifier at all: grpo has no value model, and there is no reward model
    default = chain_recipe(out, "ppo.estimator=grpo", "ppo.num_generations=4")
    calls = []
    original = loading.load_sequence_classifier
    ppo.load_sequence_classifier = lambda *a, **k: calls.append(a[1]) or original(*a, **k)
    try:  # negative control: with its reward model the same estimator loads it
        reward = ppo.load_models(default, start, chain / "tiny_ko" / "rm" / "final", None, precision("fp32"))[2]
    finally:
        ppo.load_sequence_classifier = original
    assert reward is not None and calls == [str(chain / "tiny_ko" / "rm" / "final")]
    assert not (out / "tiny_ko" / "sft").exists() and not (out / "tiny_ko" / "rm").exists()
    metrics = ppo_metrics(out)
    assert len(metrics) == 60 and all("reward/polite_reward" in m for m in metrics)
    # The logged function mean is the mean of what the function returned: a 0/1 rate, rising with training.
    first, last = metrics[0]["reward/polite_reward"], sum(m["reward/polite_reward"] for m in metrics[-10:]) / 10
    assert 0 <= first <= 1 and last > first, (first, last)


@pytest.mark.slow
def test_lineage_and_card_name_the_start_folder_and_the_function(grpo_run):
    """Catches a PPO model that claims this run's SFT checkpoint (or the recipe's base alone) as its parent when it
    started from another folder, and a card silent about the reward it was trained on."""
    from pipeline.core.notices import missing_notices

    out, start, final, _ = grpo_run
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["parent"].endswith("my-instruct"), lineage["parent"]
    assert lineage["base_model"]["id"] == "embedded:tiny-gemma-ko"  # the copy's own lineage names its base
    assert any(POLITE in str(v) for v in lineage.get("inputs", {}).values()), lineage.get("inputs")
    assert "reward model" not in lineage.get("inputs", {})
    card = (final / "README.md").read_text()
    assert "start model (`ppo.init_from`)" in card and POLITE in card and "| reward model |" not in card
    assert missing_notices(final) == []


@pytest.mark.slow
def test_dpo_starts_from_a_folder_and_a_mismatched_tokenizer_is_refused(chain, tmp_path):
    """``dpo.init_from``: DPO trains from a folder with no SFT in the run, and its lineage names it. Catches a start
    whose tokenizer differs from the data stage's being trained on ids it does not know (negative control: the
    same folder with one token added is refused by the gate, naming what differs)."""
    from pipeline import dpo
    from pipeline.core.consistency import ConsistencyError

    start = elsewhere(chain, tmp_path)
    final = dpo.run(chain_recipe(tmp_path, f"dpo.init_from={start}", "dpo.max_steps=2", "dpo.eval_steps=1000"))
    assert not (tmp_path / "tiny_ko" / "sft").exists()
    assert json.loads((final / "lineage.json").read_text())["parent"].endswith("my-instruct")

    from transformers import AutoTokenizer

    other = tmp_path / "models" / "other"
    shutil.copytree(start, other)
    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<새토큰>"])
    tok.save_pretrained(other)
    shutil.rmtree(final.parent)
    with pytest.raises(ConsistencyError, match="tokenizer (hash|vocab_size)"):
        dpo.run(chain_recipe(tmp_path, f"dpo.init_from={other}", "dpo.max_steps=2", f"model.tokenizer={start}"))


@pytest.mark.slow
def test_score_responses_sums_the_standardised_model_score_and_the_functions(chain):
    """The hand-checked combination on fixed responses: weights, the reward model's score standardised with its
    stored statistics, the functions, then the missing-stop penalty. Catches the model's raw score summed
    unstandardised, a weight on the wrong term, or the penalty skipped."""
    from pipeline.core.ppo_step import score_responses
    from pipeline.core.reward_stats import RewardStats
    from pipeline.core.sampling import Generation, score
    from tests.helpers.chain import ppo_setup

    over = [
        "ppo.reward_model_weight=2.0",
        f"ppo.reward_functions=[{{function: '{POLITE}', weight: 0.5}}, "
        "{function: 'data_prep.tiny_ko.rules:arithmetic_reward', weight: -3}]",
    ]
    s, tok = ppo_setup(chain, *over)
    s.reward_functions = rewards.load_all(chain_recipe(chain, *over).ppo.reward_functions)
    stats = RewardStats.read(chain / "tiny_ko" / "rm" / "final")
    s.reward_mean, s.reward_std = stats.mean, stats.std
    eot = tok.convert_tokens_to_ids("<end_of_turn>")
    prompts = ["사과는 무엇인가요?", "3 더하기 4는?"]
    q = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    q = [tok.encode(x, add_special_tokens=False) for x in q]
    r = [tok.encode("사과는 좋습니다.", add_special_tokens=False) + [eot], tok.encode("7", add_special_tokens=False)]
    width = max(map(len, r))
    responses = torch.tensor([x + [s.pad_id] * (width - len(x)) for x in r])
    C = max(map(len, q))
    queries = torch.tensor([[s.pad_id] * (C - len(x)) + x for x in q])
    seq_len = torch.tensor([len(r[0]) - 1, width - 1])
    g = Generation(queries, responses, seq_len, torch.tensor([True, False]), s.pad_id)
    raw = score(s.reward, g)
    got_raw, ended, scores = score_responses(s, g, PromptRows(prompts, {}))
    standard = (raw - stats.mean) / stats.std
    # polite: [1, 0] (the second never stopped); arithmetic: [0, 0] (it says 7 but never ended its turn)
    expected = 2.0 * standard + 0.5 * torch.tensor([1.0, 0.0]) - 3 * torch.tensor([0.0, 0.0])
    expected = expected - 1.0 * torch.tensor([0.0, 1.0])  # the missing-stop penalty (tiny_ko: 1.0)
    assert ended.tolist() == [True, False]
    torch.testing.assert_close(got_raw, raw)
    torch.testing.assert_close(scores, expected)
    assert set(s.last_rewards) == {"reward/polite_reward", "reward/arithmetic_reward", "reward/model"}
    # Negative control: without functions the score is the reward model's alone (normalised by the recipe).
    s.reward_functions = []
    torch.testing.assert_close(score_responses(s, g)[2], standard - torch.tensor([0.0, 1.0]))


def test_a_hub_start_model_that_cannot_be_had_stops_the_data_stage_in_one_line(tmp_path, capsys):
    """``ppo.init_from`` a hub id: the data stage tokenizes with that model's tokenizer, so an absent (or, offline,
    unreachable) hub model stops there, before anything trains, in the loaders' one line naming it. Catches the
    data stage quietly tokenizing with the base model's tokenizer instead."""
    from pipeline.data import main

    code = main(["--recipe", str(RECIPE), f"run.output_dir={tmp_path}", "ppo.init_from=nobody-here/absent-instruct"])
    err = capsys.readouterr().err
    assert code == 2, err
    line = [x for x in err.splitlines() if "absent-instruct" in x]
    assert line and "cannot load the tokenizer from 'nobody-here/absent-instruct'" in line[0], err
    assert "Traceback" not in err and not (tmp_path / "tiny_ko" / "data").exists()


@pytest.mark.slow
def test_the_reward_model_starts_from_ppo_init_from_when_rm_has_none(chain, tmp_path):
    """With ``ppo.init_from`` and no ``rm.init_from`` the reward model starts where PPO does, so `make ppo` needs no
    SFT for it either. Catches the reward model still requiring this run's SFT checkpoint."""
    from pipeline import rm

    start = elsewhere(chain, tmp_path)
    final = rm.run(chain_recipe(tmp_path, f"ppo.init_from={start}", "rm.max_steps=2", "rm.eval_steps=1000"))
    lineage = json.loads((final / "lineage.json").read_text())
    assert lineage["parent"].endswith("my-instruct") and not (tmp_path / "tiny_ko" / "sft").exists()


@pytest.mark.slow
def test_the_report_of_a_run_started_elsewhere_compares_its_start_and_other_checkpoints(grpo_run, chain, capsys):
    """The report of a run with no SFT of its own: its first column is the start model, PPO's score came from a
    function (no reward model is required), and ``report.compare`` samples other checkpoints alike. Catches the
    report demanding this run's SFT checkpoint or a reward model, and compared columns sampled differently: the
    chain's own SFT checkpoint, identical to the start, must give exactly the start's numbers. A compared checkpoint
    that does not exist is left out and said."""
    from pipeline import report

    out, start, final, _ = grpo_run
    compare = f"report.compare={{same_as_start: {chain}/tiny_ko/sft/final, absent: {out}/nothing/final}}"
    recipe = chain_recipe(out, f"ppo.init_from={start}", *GRPO_RULE, compare, "report.samples_per_prompt=4")
    saved = report.run(recipe)
    said = capsys.readouterr().out
    assert "report.compare.absent:" in said and "left out of the comparison" in said
    assert saved["methods"] == ["sft", "ppo", "same_as_start"]
    assert saved["same_as_start_accuracy"] == saved["sft_accuracy"]
    assert saved["ppo_accuracy"] > saved["sft_accuracy"] + 0.15, saved
    assert "sft" not in saved["stage_seconds"] and saved["stage_seconds"]["ppo"] > 0
    assert "rm_accuracy" not in saved
    md = (out / "tiny_ko" / "report.md").read_text()
    assert f"start ({start})" in md


def test_the_data_stage_keeps_each_prompt_rows_other_columns(tmp_path):
    """Catches a prompt row's ``answer`` (or any other column) lost by the data stage, so a checker never receives
    it; a column renamed by the recipe is kept under its recipe name only. Negative control: the formats' own fields
    are not repeated as columns."""
    import datasets

    from pipeline.data import main

    rows = [{"question": "1 더하기 2는?", "answer": 3, "level": "easy"}, {"question": "2 더하기 2는?", "answer": 4}]
    src = tmp_path / "sums.jsonl"
    src.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    spec = f"[{{path: {src}, columns: {{prompt: question}}}}]"
    assert (
        main(
            [
                "--recipe",
                str(RECIPE),
                f"run.output_dir={tmp_path}",
                f"data.prompts.train={spec}",
                "data.prompts.eval=[]",
                "data.prompts.eval_fraction=0",
            ]
        )
        == 0
    )
    ds = datasets.Dataset.from_parquet(str(tmp_path / "tiny_ko" / "data" / "prompts" / "train.parquet"))
    got = PromptRows.read(ds["messages"], ds["columns"], "train")
    by_prompt = dict(zip(got.prompts, zip(got.columns["answer"], got.columns["level"])))
    assert by_prompt == {"1 더하기 2는?": (3, "easy"), "2 더하기 2는?": (4, None)}
    assert set(got.columns) == {"answer", "level"}  # neither question (renamed to prompt) nor prompt itself


@pytest.mark.slow
def test_ppo_lora_trains_the_control_token_rows_only_when_asked(chain, tmp_path):
    """``ppo.lora.train_control_tokens`` (off by default in PPO: its start learnt them): on, the merged PPO model's
    embedding differs from its start in exactly the two control-token rows; off, not at all. Catches the setting
    being read nowhere, and the rows of every other id moving (``modules_to_save`` would train them all)."""
    from safetensors.torch import load_file

    from pipeline import ppo
    from tests.helpers.chain import fresh_run

    def embedding(folder):
        weights = load_file(str(folder / "model.safetensors"))
        return next(v for k, v in weights.items() if k.endswith("embed_tokens.weight"))

    sizes = ["ppo.method=lora", "ppo.total_episodes=32", "ppo.panel_every=0", "ppo.learning_rate=1e-2"]
    base = embedding(chain / "tiny_ko" / "sft" / "final")
    on = ppo.run(chain_recipe(fresh_run(chain, tmp_path / "on"), *sizes, "ppo.lora.train_control_tokens=true"))
    changed = (embedding(on) != base).any(1).nonzero().flatten().tolist()
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(on)  # the ids from the run's own tokenizer
    assert changed == sorted(tok.convert_tokens_to_ids(["<start_of_turn>", "<end_of_turn>"])), changed
    off = ppo.run(chain_recipe(fresh_run(chain, tmp_path / "off"), *sizes))
    assert torch.equal(embedding(off), base)


@pytest.mark.slow
def test_gae_without_a_reward_model_trains_a_value_model_from_the_start(chain, tmp_path):
    """``estimator: gae`` with ``reward_model: none``: the value model starts from the policy's start (there is no
    reward model to start it from) and is saved beside the policy. Catches a value model still looked for in a
    reward model that does not exist."""
    from pipeline import ppo
    from tests.helpers.chain import fresh_run

    out = fresh_run(chain, tmp_path)
    rules = f"ppo.reward_functions=[{{function: '{POLITE}'}}]"
    final = ppo.run(chain_recipe(out, *NO_RM, rules, "ppo.total_episodes=32", "ppo.panel_every=0"))
    assert (final / "value" / "model.safetensors").is_file()
    lineage = json.loads((final / "value" / "lineage.json").read_text())
    assert lineage["parent"] == "sft/final" and "reward model" not in lineage["inputs"]  # not the rm/ beside it
    assert "loss/value_avg" in ppo_metrics(out)[0] and "reward/polite_reward" in ppo_metrics(out)[0]
