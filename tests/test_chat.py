"""Chatting with a finished checkpoint (``python -m pipeline.chat``): every turn's prompt is the whole conversation in
Gemma's format, answers end at ``<end_of_turn>`` and are greedy generation's when asked for, a script gets exactly one
line per answer, a terminal gets them streamed, and wrong input is one error line."""

from __future__ import annotations

import io
import json
import os
import re
import select
import shutil
import subprocess
import sys
import time

import pytest
import torch

from data_prep.gemma_format import END_OF_TURN, GENERATION_PROMPT, GemmaEncoder, render, stop_token_ids
from pipeline.chat import ANSWER, Sampling, answer_of, converse, load, one_line, prompt_ids, user_turn
from pipeline.core.sampling import generate, left_pad
from tests.helpers import REPO
from tests.helpers.chain import chain_recipe

MAX_NEW = 24
HELDOUT = [json.loads(line)["prompt"] for line in (REPO / "data_prep/tiny_ko/heldout.jsonl").open(encoding="utf-8")]
FIRST, SECOND = HELDOUT[0], HELDOUT[1]  # style prompts the toy SFT model answers and ends within MAX_NEW tokens
SHOWN = re.compile(r"\[chat\] prompt of turn (\d+):\n(.*?)\[chat\] end of prompt\n", re.DOTALL)


@pytest.fixture(scope="module")
def run_copy(chain, tmp_path_factory):
    """A run folder with the session chain's finished SFT checkpoint only (no PPO, no DPO)."""
    out = tmp_path_factory.mktemp("chat")
    shutil.copytree(chain / "tiny_ko" / "sft" / "final", out / "tiny_ko" / "sft" / "final")
    return out


@pytest.fixture(scope="module")
def greedy(run_copy):
    """``greedy(messages) -> (answer, stopped)``: the pipeline's own decoding loop (``pipeline.core.sampling``, not
    ``model.generate``) on the ids the data stage would build for ``messages``, stopping at ``<end_of_turn>``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = run_copy / "tiny_ko" / "sft" / "final"
    tok = AutoTokenizer.from_pretrained(final)
    model = AutoModelForCausalLM.from_pretrained(final).eval()
    encoder = GemmaEncoder(tok)

    def answer(messages: list[dict]) -> tuple[str, bool]:
        ids = encoder.encode(messages, add_generation_prompt=True).input_ids
        g = generate(
            model,
            left_pad([ids], tok.pad_token_id, "cpu"),
            pad_id=tok.pad_token_id,
            stop_ids=stop_token_ids(tok),
            max_new_tokens=MAX_NEW,
        )
        return g.texts(tok)[0].strip(), bool(g.ended_on(tok.convert_tokens_to_ids(END_OF_TURN))[0])

    return answer


def chat(out, *args: str, stdin: str) -> subprocess.CompletedProcess:
    """``python -m pipeline.chat`` on the SFT model of ``out``, greedy, fed ``stdin`` through a pipe."""
    cmd = [sys.executable, "-m", "pipeline.chat", *base_args(out), *args]
    return subprocess.run(
        cmd, cwd=REPO, env=child_env(), input=stdin, capture_output=True, encoding="utf-8", timeout=300
    )


def base_args(out) -> list[str]:
    recipe = ["--recipe", "recipes/tiny_ko.yaml", f"run.output_dir={out}", "tracking.mode=disabled"]
    return [*recipe, "--stage", "sft", "--temperature", "0", "--max-new-tokens", str(MAX_NEW)]


def child_env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUTF8": "1", "HF_HUB_OFFLINE": "1"}


def shown_prompts(stderr: str) -> list[str]:
    """The prompts ``--show-prompt`` printed, in turn order."""
    found = SHOWN.findall(stderr)
    assert [int(n) for n, _ in found] == list(range(1, len(found) + 1)), stderr[-2000:]
    return [text for _, text in found]


def unescape(line: str) -> str:
    """The answer a script's line holds (the escapes ``one_line`` writes, read back)."""
    return line.encode("latin-1", "backslashreplace").decode("unicode_escape")


def sees(prompt: str, user: str, answer: str) -> bool:
    """Whether ``prompt`` holds the exchange ``user`` -> ``answer`` as a user turn followed by its model turn."""
    return f"<start_of_turn>user\n{user}<end_of_turn>\n<start_of_turn>model\n{answer}<end_of_turn>\n" in prompt


def test_a_script_gets_one_line_per_answer_and_turn_two_sees_turn_one(run_copy, greedy):
    """Catches a chat that forgets the conversation (turn 2 prompted with its own question only), a prompt that is
    not Gemma's template byte for byte, answers that are not greedy generation's or run past ``<end_of_turn>``, and
    anything besides the answers on a script's stdout (a loading message, a blank line for the skipped input)."""
    res = chat(run_copy, "--show-prompt", stdin=f"{FIRST}\n\n   \n{SECOND}\n")
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert res.stdout.endswith("\n") and len(lines) == 2, res.stdout

    turn1 = [{"role": "user", "content": FIRST}]
    answer1, stopped1 = greedy(turn1)
    assert stopped1 and answer1, answer1  # the toy ends its turn: the history below holds a whole model turn
    turn2 = [*turn1, {"role": "assistant", "content": answer1}, {"role": "user", "content": SECOND}]
    answer2, _ = greedy(turn2)
    assert lines == [one_line(answer1), one_line(answer2)]

    prompts = shown_prompts(res.stderr)
    assert prompts == [render(turn1, add_generation_prompt=True), render(turn2, add_generation_prompt=True)]
    assert sees(prompts[1], FIRST, answer1) and prompts[1].endswith(GENERATION_PROMPT)


def test_reset_forgets_the_conversation(run_copy, greedy):
    """Catches a ``/reset`` that keeps the history, and is the negative control of the history check above: the
    same ``sees`` check fails on a prompt that does not hold the first exchange."""
    res = chat(run_copy, "--show-prompt", stdin=f"{FIRST}\n/reset\n{SECOND}\n/exit\n{FIRST}\n")
    assert res.returncode == 0, res.stderr[-3000:]
    answer1, _ = greedy([{"role": "user", "content": FIRST}])
    answer2, _ = greedy([{"role": "user", "content": SECOND}])
    assert res.stdout.splitlines() == [one_line(answer1), one_line(answer2)]  # nothing answered after /exit
    prompts = shown_prompts(res.stderr)
    assert prompts[1] == render([{"role": "user", "content": SECOND}], add_generation_prompt=True)
    assert not sees(prompts[1], FIRST, answer1) and FIRST not in prompts[1]
    assert "[chat] history cleared" in res.stderr


def test_a_terminal_gets_the_answer_streamed_then_reset_and_exit(run_copy, greedy):
    """Catches the terminal mode breaking: no prompt, the answer not printed as it is generated (streamed after
    ``model> ``, not as an escaped script line), ``/reset`` or ``/exit`` not understood, a non-zero exit."""
    master, terminal = os.openpty()
    cmd = [sys.executable, "-m", "pipeline.chat", *base_args(run_copy)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=child_env(), stdin=terminal, stdout=terminal, stderr=terminal)
    os.close(terminal)
    seen = bytearray()

    def until(text: str, timeout: float = 120) -> str:
        """Everything the terminal showed up to and including ``text``."""
        needle, end = text.encode(), time.monotonic() + timeout
        while needle not in seen:
            ready, _, _ = select.select([master], [], [], max(0.0, end - time.monotonic()))
            assert ready, f"no {text!r} on the terminal: {seen.decode(errors='replace')[-2000:]}"
            seen.extend(os.read(master, 4096))
        cut = seen.index(needle) + len(needle)
        shown = seen[:cut].decode(errors="replace")
        del seen[:cut]
        return shown

    try:
        until("you> ")
        os.write(master, f"{FIRST}\n".encode())
        answer, _ = greedy([{"role": "user", "content": FIRST}])
        assert f"model> {answer}" in until("you> ")
        os.write(master, b"/reset\n")
        assert "history cleared" in until("you> ")
        os.write(master, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)


def test_a_terminal_answer_is_printed_while_it_is_generated(run_copy, greedy, monkeypatch):
    """Catches a terminal answer printed only once generation is over (the user stares at nothing for a long answer
    of a real model). The negative control is a script's answer, printed whole after the last forward pass."""
    model, tok = load(
        chain_recipe(run_copy), "sft", Sampling(temperature=0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW)
    )
    original = model.forward
    forwards = 0

    def counted(*args, **kwargs):
        nonlocal forwards
        forwards += 1
        return original(*args, **kwargs)

    monkeypatch.setattr(model, "forward", counted)
    writes: list[tuple[int, str]] = []  # (forward passes so far, text written to stdout)

    class Recorder(io.StringIO):
        def write(self, text: str) -> int:
            writes.append((forwards, text))
            return super().write(text)

    def first_answer_write(interactive: bool) -> tuple[int, int, str]:
        """(forward passes when the answer's first text reached stdout, forward passes in all, stdout)."""
        nonlocal forwards
        forwards = 0
        writes.clear()
        monkeypatch.setattr(sys, "stdout", Recorder())
        assert converse(model, tok, [FIRST], interactive=interactive) == 1
        out = "".join(text for _, text in writes)
        return next(n for n, text in writes if text.strip() and text != ANSWER), forwards, out

    answer, _ = greedy([{"role": "user", "content": FIRST}])
    assert len(answer.split()) > 1  # more than one word: the streamer prints it in pieces
    first, total, out = first_answer_write(interactive=True)
    assert out.strip() == f"{ANSWER}{answer}" and first < total, (first, total, writes)
    first, total, out = first_answer_write(interactive=False)
    assert out == f"{one_line(answer)}\n" and first == total


@pytest.mark.parametrize(
    ("stage", "names"),
    [("ppo", "run `make ppo` first"), ("rm", "not a model to chat with")],
)
def test_a_missing_checkpoint_or_unknown_stage_is_one_error_line(run_copy, stage, names):
    """Catches a traceback (or a model loaded anyway: the reward model is no chat model) where the user needs one
    line saying what to run: the default PPO checkpoint is not there, or the stage is not one to chat with."""
    res = chat(run_copy, "--stage", stage, stdin="hello\n")
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: ") and names in res.stderr, res.stderr
    assert "Traceback" not in res.stderr


def test_sampled_answers_end_at_end_of_turn(run_copy):
    """Catches sampling that runs past ``<end_of_turn>``: a terminal streams every generated token, so the user would
    read an invented continuation. The negative control generates with ``<eos>`` as the only stop, the base model's
    generation config, and the toy does run on past its ``<end_of_turn>``."""
    recipe = chain_recipe(run_copy)
    model, tok = load(recipe, "sft", Sampling(temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=MAX_NEW))
    stops = stop_token_ids(tok)
    ids = prompt_ids(GemmaEncoder(tok), [user_turn(FIRST, None, first=True)])
    x = torch.tensor([ids] * 8)

    def sampled() -> list[list[int]]:
        torch.manual_seed(0)
        return model.generate(x, attention_mask=torch.ones_like(x))[:, len(ids) :].tolist()

    def runs_on(row: list[int]) -> bool:
        """Whether a generated row goes on with other tokens after its first stop token."""
        first = next((i for i, t in enumerate(row) if t in stops), len(row))
        return any(t != tok.pad_token_id for t in row[first + 1 :])

    rows = sampled()
    assert all(answer_of(row, stops, tok)[1] for row in rows), tok.batch_decode(rows)  # every sample stopped
    assert not any(runs_on(row) for row in rows), tok.batch_decode(rows)
    model.generation_config.eos_token_id = [tok.eos_token_id]
    assert any(runs_on(row) for row in sampled()), "the negative control did not run past <end_of_turn>"


def test_one_line_keeps_an_answer_on_one_line_and_decodes_back():
    """Catches an answer with a line break taking two lines of a script's stdout (the script then pairs every later
    answer with the wrong question), and an escape that cannot be told apart from a literal backslash-n."""
    text = "첫째 줄\n둘째 \\n 줄\r\n끝\u2028."
    line = one_line(text)
    assert line == "첫째 줄\\n둘째 \\\\n 줄\\r\\n끝\\u2028."
    assert len(f"{line}\n".splitlines()) == 1
    assert unescape(line) == text


@pytest.mark.slow
def test_the_real_gemma_base_is_prompted_in_its_template_and_stops_at_its_end_of_turn(capsys):
    """Catches what the toy cannot show: the real Gemma 3 270M base's own generation config stops at ``<eos>`` only
    (its ``<end_of_turn>`` is id 106, not the toy's 5), so a chat that kept it would stream past every turn; and a
    prompt that the real tokenizer's ids do not spell exactly as Gemma's template."""
    from pipeline.core.config import load_recipe

    recipe = load_recipe(REPO / "recipes" / "gemma3_270m_ko.yaml", ["tracking.mode=disabled"])
    model, tok = load(recipe, "base", Sampling(temperature=0, top_p=1.0, top_k=0, max_new_tokens=8))
    assert model.generation_config.eos_token_id == [106, 1] and not model.generation_config.do_sample
    out = io.StringIO()
    assert converse(model, tok, [FIRST, SECOND], interactive=False, show_prompt=True, out=out) == 2
    lines = out.getvalue().splitlines()
    assert len(lines) == 2, lines
    prompts = shown_prompts(capsys.readouterr().err)
    turn1 = [{"role": "user", "content": FIRST}]
    assert prompts[0] == render(turn1, add_generation_prompt=True)
    turn2 = [*turn1, {"role": "assistant", "content": unescape(lines[0])}, {"role": "user", "content": SECOND}]
    assert prompts[1] == render(turn2, add_generation_prompt=True)
