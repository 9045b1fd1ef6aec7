"""Row formats: detect them from the columns and convert each row into Gemma turns.

SFT rows become a dialogue (turns ending on a model turn); preference rows a shared prompt (turns ending on a user
turn) with a chosen and a rejected response; prompt rows a prompt (turns ending on a user turn). Every problem is a
FormatError whose message is the reason; the caller adds the file and row.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from data_prep.gemma_format import MODEL, USER, FormatError, Turn, to_turns

SFT_FORMATS = ("messages", "sharegpt", "alpaca", "prompt_completion")
PREFERENCE_FORMATS = ("pairs", "pairs_messages", "hh_rlhf")
PROMPT_FORMATS = ("prompt", "prompt_messages", "messages", "alpaca")
FORMATS = {"sft": SFT_FORMATS, "preference": PREFERENCE_FORMATS, "prompts": PROMPT_FORMATS}

_SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class TurnKeys:
    """How a dataset's messages name their role and content fields, and its role names mapped to ``system``,
    ``user`` or ``assistant`` (the recipe's ``columns: {role: ..., content: ...}`` and ``roles:``)."""

    role: str | None = None  # None: the format's own key (``role``; ShareGPT ``from``)
    content: str | None = None  # None: ``content``; ShareGPT ``value``
    roles: tuple[tuple[str, str], ...] = ()

    @classmethod
    def of(cls, columns: dict[str, str], roles: dict[str, str]) -> TurnKeys:
        return cls(columns.get("role"), columns.get("content"), tuple(sorted(roles.items())))


DEFAULT_KEYS = TurnKeys()
TURN_KEYS = ("role", "content")  # ``columns:`` keys that name fields inside messages, not columns of a row


def _messages(
    value: Any,
    field: str,
    keys: TurnKeys,
    role_key: str = "role",
    content_key: str = "content",
    known: dict[str, str] | None = None,
) -> list:
    """A row's message list with each message as ``{role, content}``: read under the dataset's own keys, its role
    names mapped. With the standard keys and no mapping the list is returned as it is (the common, fast case)."""
    role_key, content_key = keys.role or role_key, keys.content or content_key
    mapping = {**(known or {}), **dict(keys.roles)}
    if role_key == "role" and content_key == "content" and not mapping:
        return value
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise FormatError(f"{field}[{i}] must be an object with {role_key}/{content_key}, got {type(m).__name__}")
        for k in (role_key, content_key):
            if k not in m:
                raise FormatError(f"{field}[{i}]: missing field {k!r}")
        role = m[role_key]
        if known is not None and role not in mapping:
            raise FormatError(
                f"{field}[{i}]: unknown role {role!r} (expected {', '.join(mapping)}; map others with roles:)"
            )
        out.append({"role": mapping.get(role, role) if isinstance(role, str) else role, "content": m[content_key]})
    return out


@dataclass
class Pair:
    prompt: list[Turn]
    chosen: str
    rejected: str
    margin: float | None = None


def map_columns(row: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename ``{canonical: actual}`` columns; a mapped column missing from the row is an error."""
    if not columns:
        return row
    out = dict(row)
    for canonical, actual in columns.items():
        if canonical in TURN_KEYS:
            continue
        if actual not in row:
            raise FormatError(f"missing field {actual!r} (mapped to {canonical!r})")
        out[canonical] = row[actual]
    return out


def detect(stage: str, row: dict[str, Any]) -> str:
    """The format of a dataset, judged from its first row."""
    keys = set(row)
    if stage == "sft":
        if "messages" in keys:
            return "messages"
        if "conversations" in keys:
            return "sharegpt"
        if {"instruction", "output"} <= keys:
            return "alpaca"
        if {"prompt", "completion"} <= keys:
            return "prompt_completion"
    elif stage == "preference":
        if {"chosen", "rejected"} <= keys:
            if isinstance(row["chosen"], list):
                return "pairs_messages"
            if "prompt" in keys:
                return "pairs"
            if isinstance(row["chosen"], str) and "Human:" in row["chosen"]:
                return "hh_rlhf"
    elif stage == "prompts":
        if "prompt" in keys:
            return "prompt_messages" if isinstance(row["prompt"], list) else "prompt"
        if "messages" in keys:
            return "messages"
        if "instruction" in keys:
            return "alpaca"
    expected = {
        "sft": "messages | conversations | instruction+output | prompt+completion",
        "preference": "prompt+chosen+rejected (strings) | chosen+rejected (message lists) | HH-RLHF transcripts",
        "prompts": "prompt (string or message list) | messages | instruction",
    }[stage]
    raise FormatError(
        f"cannot detect the {stage} format from columns {sorted(keys)} (expected {expected}); "
        "set format: and columns: in the recipe"
    )


def _text(row: dict[str, Any], key: str, optional: bool = False) -> str | None:
    if key not in row:
        if optional:
            return None
        raise FormatError(f"missing field {key!r}")
    value = row[key]
    if value is None:
        if optional:
            return None
        raise FormatError(f"field {key!r} is null")
    if not isinstance(value, str):
        raise FormatError(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        if optional:
            return None
        raise FormatError(f"field {key!r} is empty")
    return value


def _list(row: dict[str, Any], key: str) -> list:
    if key not in row:
        raise FormatError(f"missing field {key!r}")
    value = row[key]
    if value is None:
        raise FormatError(f"field {key!r} is null")
    if not isinstance(value, list):
        raise FormatError(f"field {key!r} must be a list of messages, got {type(value).__name__}")
    return value


def _with_system(row: dict[str, Any], messages: list[dict]) -> list[dict]:
    system = _text(row, "system", optional=True)
    return ([{"role": "system", "content": system}] if system else []) + messages


def _sharegpt(conv: list, keys: TurnKeys) -> list[dict]:
    return _messages(conv, "conversations", keys, "from", "value", _SHAREGPT_ROLES)


def _alpaca_user(row: dict[str, Any]) -> str:
    instruction = _text(row, "instruction")
    extra = _text(row, "input", optional=True)
    return f"{instruction.strip()}\n\n{extra.strip()}" if extra else instruction


def sft_dialogue(fmt: str, row: dict[str, Any], keys: TurnKeys = DEFAULT_KEYS) -> list[Turn]:
    """An SFT row -> Gemma turns ending on a model turn."""
    if fmt == "messages":
        messages = _messages(_list(row, "messages"), "messages", keys)
    elif fmt == "sharegpt":
        messages = _sharegpt(_list(row, "conversations"), keys)
    elif fmt == "alpaca":
        messages = _with_system(
            row,
            [{"role": "user", "content": _alpaca_user(row)}, {"role": "assistant", "content": _text(row, "output")}],
        )
    elif fmt == "prompt_completion":
        messages = _with_system(
            row,
            [
                {"role": "user", "content": _text(row, "prompt")},
                {"role": "assistant", "content": _text(row, "completion")},
            ],
        )
    else:
        raise FormatError(f"{fmt!r} is not an SFT format")
    turns = to_turns(messages)
    if turns[-1][0] != MODEL:
        raise FormatError("the dialogue ends on a user turn (an SFT dialogue must end with an assistant turn)")
    return turns


_HH_MARK = re.compile(r"\n\n(Human|Assistant): ?")


def _hh_parse(text: str, which: str) -> list[dict]:
    if not text.startswith("\n\n"):
        text = "\n\n" + text
    parts = _HH_MARK.split(text)
    if parts[0].strip():
        raise FormatError(f"{which}: text before the first 'Human:' turn")
    messages = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        messages.append({"role": "user" if speaker == "Human" else "assistant", "content": content})
    if not messages:
        raise FormatError(f"{which}: no 'Human:' / 'Assistant:' turns found")
    return messages


def _split_last_model(messages: list[dict], which: str) -> tuple[list[Turn], str]:
    turns = to_turns(messages)
    if turns[-1][0] != MODEL:
        raise FormatError(f"{which} does not end with an assistant turn")
    if len(turns) < 2:
        raise FormatError(f"{which} has no prompt before the response")
    return turns[:-1], turns[-1][1]


def preference_pair(fmt: str, row: dict[str, Any], keys: TurnKeys = DEFAULT_KEYS) -> Pair:
    """A preference row -> shared prompt turns + chosen and rejected responses."""
    if fmt == "pairs":
        prompt = to_turns(_with_system(row, [{"role": "user", "content": _text(row, "prompt")}]))
        chosen, rejected = _text(row, "chosen").strip(), _text(row, "rejected").strip()
    elif fmt == "pairs_messages":
        full = {}
        for which in ("chosen", "rejected"):
            msgs = _messages(_list(row, which), which, keys)
            if "prompt" in row and row["prompt"] is not None:
                p = row["prompt"]
                if isinstance(p, list):
                    msgs = _messages(p, "prompt", keys) + msgs
                elif isinstance(p, str):
                    if not (msgs and isinstance(msgs[0], dict) and msgs[0].get("role") in ("user", "system")):
                        msgs = [{"role": "user", "content": p}] + msgs
                else:
                    raise FormatError(f"field 'prompt' must be a string or a message list, got {type(p).__name__}")
            full[which] = _split_last_model(msgs, which)
        (prompt, chosen), (prompt_r, rejected) = full["chosen"], full["rejected"]
        if prompt != prompt_r:
            raise FormatError("chosen and rejected do not share the same prompt messages")
    elif fmt == "hh_rlhf":
        prompt, chosen = _split_last_model(_hh_parse(_text(row, "chosen"), "chosen"), "chosen")
        prompt_r, rejected = _split_last_model(_hh_parse(_text(row, "rejected"), "rejected"), "rejected")
        if prompt != prompt_r:
            raise FormatError("chosen and rejected transcripts have different prompts")
    else:
        raise FormatError(f"{fmt!r} is not a preference format")
    if prompt[-1][0] != USER:
        raise FormatError("the prompt does not end on a user turn")
    if chosen == rejected:
        raise FormatError("chosen and rejected are identical")
    margin = None
    if row.get("margin") is not None:
        m = row["margin"]
        if isinstance(m, bool) or not isinstance(m, (int, float, str)):
            raise FormatError(f"field 'margin' must be a number, got {type(m).__name__}")
        try:
            margin = float(m)
        except ValueError:
            raise FormatError(f"field 'margin' must be a number, got {m!r}") from None
    return Pair(prompt, chosen, rejected, margin)


class PromptTurns(list):
    """A prompt's turns (a list of ``Turn``) with the row's other columns (``columns``): what reward functions
    receive beside the prompt, e.g. a math set's ``answer``."""

    columns: dict[str, Any]


# The fields each prompt format reads; every other column of a row is kept with its prompt.
PROMPT_FIELDS = {
    "prompt": ("prompt", "system"),
    "prompt_messages": ("prompt", "system"),
    "messages": ("messages",),
    "alpaca": ("instruction", "input", "output", "system"),
}


def prompt_turns(fmt: str, row: dict[str, Any], keys: TurnKeys = DEFAULT_KEYS) -> PromptTurns:
    """A prompt row -> turns ending on a user turn (the generation prompt is added when encoding), carrying the row's
    other columns."""
    turns = PromptTurns(_prompt_turns(fmt, row, keys))
    turns.columns = {k: v for k, v in row.items() if k not in PROMPT_FIELDS[fmt]}
    return turns


def _prompt_turns(fmt: str, row: dict[str, Any], keys: TurnKeys) -> list[Turn]:
    if fmt in ("prompt", "prompt_messages"):  # a string or a message list, row by row
        if isinstance(row.get("prompt"), list):
            messages = _messages(_list(row, "prompt"), "prompt", keys)
        else:
            messages = _with_system(row, [{"role": "user", "content": _text(row, "prompt")}])
    elif fmt == "messages":
        messages = _messages(_list(row, "messages"), "messages", keys)
    elif fmt == "alpaca":
        messages = _with_system(row, [{"role": "user", "content": _alpaca_user(row)}])
    else:
        raise FormatError(f"{fmt!r} is not a prompt format")
    turns = to_turns(messages)
    if turns[-1][0] != USER:
        raise FormatError("a prompt must end on a user turn")
    return turns
