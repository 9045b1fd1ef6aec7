"""Chat in the terminal with a finished model of a run: the PPO, DPO or SFT checkpoint, or the recipe's base model.

    make chat RECIPE=recipes/tiny_ko.yaml [STAGE=ppo] [CHAT_ARGS="--temperature 0 --show-prompt"]
    python -m pipeline.chat --recipe recipes/tiny_ko.yaml [--stage ppo|dpo|sft|base] [--temperature 0.7]
                            [--top-p 0.95] [--top-k 64] [--max-new-tokens 256] [--seed N] [--system TEXT]
                            [--show-prompt] [key.sub=value ...]

Each turn is the whole conversation so far in Gemma's format (``data_prep.gemma_format``: the ids built turn by turn,
as training built them, ending with the generation prompt ``<start_of_turn>model\\n``); the model answers until it
ends its turn (``<end_of_turn>``, or ``<eos>``), and the answer, decoded without control tokens and stripped, becomes
the model turn of the history. An answer that reaches ``--max-new-tokens`` first is kept as it is, and said on
stderr. ``/reset`` clears the history, ``/exit`` (or end of input, Ctrl-D) quits. Control-token text typed by the user
(``<end_of_turn>``) stays plain text. Gemma has no system role: ``--system`` is folded into the first user turn, as
``data_prep.gemma_format.to_turns`` does.

On a terminal the answer is streamed as it is generated. Read from a pipe or a file (a script), every non-blank line
of stdin is one user turn (or a command), and every answer is printed on exactly one line of stdout, nothing else:
backslashes are doubled and line breaks written as the escapes ``\\n``, ``\\r`` or ``\\uXXXX``, so a line decodes back
to the answer. Everything else (loading, notes, ``--show-prompt``'s rendered prompt with its control tokens) goes to
stderr.

Sampling is what the options say and nothing else: ``--temperature 0`` is greedy; otherwise temperature, top-p and
top-k sampling (``--top-k 0`` and ``--top-p 1`` turn those off), seeded by ``--seed`` (default ``run.seed``). The
checkpoint's ``generation_config.json`` is not read (a repetition penalty or a top-k saved there would change the
answers); generation stops at the tokenizer's own stop ids.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from data_prep.gemma_format import MODEL, GemmaEncoder, Turn, stop_token_ids, to_turns
from pipeline.core.checkpoint import require_checkpoint
from pipeline.core.cli import add_recipe_arguments, guarded, recipe_from
from pipeline.core.config import ConfigError, Recipe
from pipeline.core.loading import load_causal_lm, load_tokenizer, model_location
from pipeline.core.rundir import RunDir

STAGES = ("ppo", "dpo", "sft", "base")
BASE = "base"
RESET, EXIT = "/reset", "/exit"
PROMPT = "you> "
ANSWER = "model> "
# Every character str.splitlines() breaks a line at, besides "\n" and "\r" (escaped by name).
_LINE_BREAKS = "\v\f\x1c\x1d\x1e\x85\u2028\u2029"


@dataclass(frozen=True)
class Sampling:
    """How each answer is generated."""

    temperature: float
    """0: greedy; otherwise the softmax temperature."""
    top_p: float
    """Nucleus sampling: the smallest set of tokens holding this probability (1: off)."""
    top_k: int
    """Sample among the k most likely tokens (0: off)."""
    max_new_tokens: int
    """The longest answer, in tokens."""


def check_sampling(s: Sampling) -> None:
    """Refuse sampling options that have no meaning, naming the option."""
    if s.temperature < 0:
        raise ConfigError(f"--temperature {s.temperature}: must be >= 0 (0 is greedy)")
    if not 0 < s.top_p <= 1:
        raise ConfigError(f"--top-p {s.top_p}: must be in (0, 1]")
    if s.top_k < 0:
        raise ConfigError(f"--top-k {s.top_k}: must be >= 0 (0 is off)")
    if s.max_new_tokens < 1:
        raise ConfigError(f"--max-new-tokens {s.max_new_tokens}: must be >= 1")


def generation_config(s: Sampling, stop_ids: Sequence[int], pad_id: int) -> Any:
    """A generation config that holds exactly ``s``, stopping at ``stop_ids``; it replaces the model's own, so that
    nothing saved with the checkpoint changes the answers (transformers fills every unset field from the model's)."""
    from transformers import GenerationConfig

    sampled = {"temperature": s.temperature, "top_p": s.top_p, "top_k": s.top_k} if s.temperature > 0 else {}
    return GenerationConfig(
        do_sample=s.temperature > 0,
        max_new_tokens=s.max_new_tokens,
        eos_token_id=list(stop_ids),
        pad_token_id=pad_id,
        **sampled,
    )


# --------------------------------------------------------------------------------------------------------------
# The conversation: turns, prompt ids, answers
# --------------------------------------------------------------------------------------------------------------


def user_turn(text: str, system: str | None, first: bool) -> Turn:
    """The user turn of ``text``, stripped as the template strips it; the first one carries ``system`` folded in."""
    messages = [{"role": "system", "content": system}] if system and first else []
    return to_turns([*messages, {"role": "user", "content": text}])[0]


def prompt_ids(encoder: GemmaEncoder, turns: Sequence[Turn]) -> list[int]:
    """The ids of ``turns`` followed by the generation prompt, built turn by turn from the control-token ids."""
    contents = encoder.tokenize_contents([content for _, content in turns])
    return encoder.assemble(turns, contents, add_generation_prompt=True).input_ids


def answer_of(new_ids: Sequence[int], stop_ids: Sequence[int], tokenizer: Any) -> tuple[str, bool]:
    """``(text, stopped)`` of generated ids: the text before the first stop id (all of it when none came), decoded
    without control tokens and stripped."""
    stop = next((i for i, t in enumerate(new_ids) if t in stop_ids), None)
    kept = list(new_ids if stop is None else new_ids[:stop])
    return tokenizer.decode(kept, skip_special_tokens=True).strip(), stop is not None


def one_line(text: str) -> str:
    """``text`` on one line: backslashes doubled, ``\\n`` and ``\\r`` written as those two characters, any other line
    break as ``\\uXXXX``."""
    escaped = text.replace("\\", "\\\\").replace("\n", "\\n").replace("\r", "\\r")
    return "".join(f"\\u{ord(c):04x}" if c in _LINE_BREAKS else c for c in escaped)


def reply(
    model: Any, tokenizer: Any, ids: list[int], stop_ids: Sequence[int], streamer: Any = None
) -> tuple[str, bool]:
    """The model's answer to the prompt ``ids`` under its generation config: ``(text, stopped)``, streamed to
    ``streamer`` as it is generated when one is given."""
    import torch

    x = torch.tensor([ids], device=model.device)
    with torch.inference_mode():
        out = model.generate(x, attention_mask=torch.ones_like(x), streamer=streamer)
    return answer_of(out[0, x.size(1) :].tolist(), stop_ids, tokenizer)


def say(line: str) -> None:
    """A note on stderr: stdout holds the answers alone."""
    print(f"[chat] {line}", file=sys.stderr, flush=True)


def typed_lines() -> Iterator[str]:
    """Lines typed at the terminal after the prompt, with line editing, until Ctrl-D or Ctrl-C."""
    try:
        import readline  # noqa: F401 - line editing and history for input()
    except ImportError:
        pass
    while True:
        try:
            yield input(PROMPT)
        except (EOFError, KeyboardInterrupt):
            print(file=sys.stderr)
            return


def converse(
    model: Any,
    tokenizer: Any,
    lines: Iterable[str],
    *,
    interactive: bool,
    system: str | None = None,
    show_prompt: bool = False,
    out: TextIO | None = None,
) -> int:
    """Answer every user line of ``lines`` with the whole conversation so far; returns the number of answers.
    ``interactive``: stream each answer to stdout; otherwise print it to ``out`` (stdout) on one line."""
    from transformers import TextStreamer

    out = out or sys.stdout
    encoder = GemmaEncoder(tokenizer, control_tokens="as_text")
    stop_ids = stop_token_ids(tokenizer)
    history: list[Turn] = []
    answered = 0
    for line in lines:
        text = line.strip()
        if not text:
            continue
        if text == EXIT:
            break
        if text == RESET:
            history = []
            say("history cleared")
            continue
        turns = [*history, user_turn(text, system, first=not history)]
        ids = prompt_ids(encoder, turns)
        if show_prompt:
            shown = tokenizer.decode(ids, skip_special_tokens=False)
            say(f"prompt of turn {answered + 1}:\n{shown}[chat] end of prompt")
        streamer = None
        if interactive:
            print(ANSWER, end="", flush=True)
            streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
        try:
            answer, stopped = reply(model, tokenizer, ids, stop_ids, streamer)
        except KeyboardInterrupt:
            print(file=sys.stderr)
            say("interrupted: this turn is not kept")
            continue
        if not interactive:
            print(one_line(answer), file=out, flush=True)
        if not stopped:
            limit = model.generation_config.max_new_tokens
            say(f"the answer reached --max-new-tokens ({limit}) before the model ended its turn; kept as it is")
        history = [*turns, (MODEL, answer)]
        answered += 1
    return answered


# --------------------------------------------------------------------------------------------------------------
# The model to chat with
# --------------------------------------------------------------------------------------------------------------


def chat_device() -> tuple[str, Any]:
    """``(device, dtype)``: the GPU when CUDA is available, in bf16 where it is supported; else the CPU in fp32."""
    import torch

    if torch.cuda.is_available():
        return "cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float32
    return "cpu", torch.float32


def model_folder(recipe: Recipe, stage: str) -> str:
    """Where the model of ``stage`` is: a finished checkpoint of the run, or (``base``) the recipe's base model."""
    if stage not in STAGES:
        raise ConfigError(f"--stage {stage!r}: not a model to chat with (choose {', '.join(STAGES)})")
    if stage == BASE:
        return model_location(recipe.model)
    final = RunDir.of(recipe).stage(stage).final
    return str(
        require_checkpoint(final, f"the {stage} checkpoint (run `make {stage}` first, or choose another --stage)")
    )


def load(recipe: Recipe, stage: str, sampling: Sampling) -> tuple[Any, Any]:
    """``(model, tokenizer)`` of ``stage`` on the chat device, the model's generation config replaced by ``sampling``."""
    folder = model_folder(recipe, stage)
    device, dtype = chat_device()
    say(f"loading the {stage} model from {folder} on {device}")
    location = None if stage == BASE else folder
    tokenizer = load_tokenizer(recipe.model, location)
    model = load_causal_lm(recipe.model, location, dtype=dtype).to(device).eval()
    model.generation_config = generation_config(sampling, stop_token_ids(tokenizer), tokenizer.pad_token_id)
    return model, tokenizer


def run(
    recipe: Recipe, stage: str, sampling: Sampling, seed: int | None, system: str | None, show_prompt: bool
) -> int:
    """Chat with the model of ``stage`` on stdin, a terminal or a script, until ``/exit`` or the end of the input;
    returns the number of answers."""
    check_sampling(sampling)
    model, tokenizer = load(recipe, stage, sampling)
    from transformers import set_seed

    set_seed(recipe.run.seed if seed is None else seed)
    interactive = sys.stdin.isatty()
    if interactive:
        say(f"{recipe.run.name} {stage}: {RESET} clears the history, {EXIT} or Ctrl-D quits")
    lines = typed_lines() if interactive else sys.stdin
    return converse(model, tokenizer, lines, interactive=interactive, system=system, show_prompt=show_prompt)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Chat with a finished model of a run.")
    add_recipe_arguments(ap)
    ap.add_argument("--stage", default="ppo", help=f"the model to chat with: {', '.join(STAGES)} (default: ppo)")
    ap.add_argument("--temperature", type=float, default=0.7, help="0 is greedy (default: 0.7)")
    ap.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling, 1 is off (default: 0.95)")
    ap.add_argument(
        "--top-k", type=int, default=64, help="sample among the k likeliest tokens, 0 is off (default: 64)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=256, help="the longest answer in tokens (default: 256)")
    ap.add_argument("--seed", type=int, default=None, help="sampling seed (default: run.seed)")
    ap.add_argument("--system", default=None, help="text folded into the first user turn (Gemma has no system role)")
    ap.add_argument(
        "--show-prompt", action="store_true", help="print each turn's prompt, control tokens and all, to stderr"
    )
    args = ap.parse_intermixed_args(argv)
    sampling = Sampling(args.temperature, args.top_p, args.top_k, args.max_new_tokens)
    return guarded(
        "chat", lambda: run(recipe_from(args), args.stage, sampling, args.seed, args.system, args.show_prompt)
    )


if __name__ == "__main__":
    sys.exit(main())
