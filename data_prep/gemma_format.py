"""Gemma's instruction format, exactly: rendered text, token ids and loss masks.

The official Gemma chat template renders

    <bos><start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n{content}<end_of_turn>\n

with ``assistant`` written as ``model``, each content stripped of surrounding whitespace, no ``<eos>``, and the
generation prompt ``<start_of_turn>model\n``. Gemma has no system role: a leading system message is folded into
the first user turn as ``{system}\n\n{user}`` (the Gemma 3 convention; the system text itself is not stripped).

Token ids are built per turn from the tokenizer's own control-token ids and never by tokenizing a rendered
string (that is how a second ``<bos>`` or a control token typed by a user sneaks in). Labels cover each model
turn's content and its ``<end_of_turn>``; everything else (``<bos>``, user turns, role headers, the newline after
``<end_of_turn>``) is masked.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

FORMATTER_VERSION = "gemma-format-2"  # 2: prompt rows keep their other columns

BOS, EOS, PAD, UNK = "<bos>", "<eos>", "<pad>", "<unk>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
USER, MODEL = "user", "model"
GENERATION_PROMPT = f"{START_OF_TURN}{MODEL}\n"
_ROLE_ALIASES = {"user": USER, "assistant": MODEL, "model": MODEL}

# The chat template saved with every tokenizer this project writes. It renders exactly what ``render`` renders
# (system folding included) and refuses what ``to_turns`` refuses, so ``tokenizer.apply_chat_template`` downstream
# reproduces the training format.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- else -%}"
    "{%- set ns = namespace(text='') -%}"
    "{%- for item in messages[0]['content'] -%}"
    "{%- if item['type'] == 'text' -%}{%- set ns.text = ns.text + item['text'] -%}{%- endif -%}"
    "{%- endfor -%}"
    "{%- set first_user_prefix = ns.text + '\\n\\n' -%}"
    "{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}"
    "{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}"
    "{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if message['role'] not in ['user', 'assistant', 'model'] -%}"
    "{{ raise_exception('Gemma has no role ' + message['role'] + '; use system (first only), user, assistant') }}"
    "{%- endif -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}"
    "{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}"
    "{{ message['content'] | trim }}"
    "{%- else -%}"
    "{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{ '<end_of_turn>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"
)


def template_hash(template: str = CHAT_TEMPLATE) -> str:
    return hashlib.sha256(template.encode()).hexdigest()[:16]


class FormatError(ValueError):
    """A dialogue that cannot be written in Gemma's format; the message is the reason."""


Turn = tuple[str, str]  # (role "user" | "model", content)


def _content_text(content: Any, strip: bool, index: int) -> str:
    if isinstance(content, str):
        return content.strip() if strip else content
    if isinstance(content, list) and content:
        parts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise FormatError(f"message {index}: content parts must be {{'type': 'text', 'text': str}}")
            parts.append(part["text"].strip() if strip else part["text"])
        return "".join(parts)
    if content is None:
        raise FormatError(f"message {index}: content is null")
    raise FormatError(f"message {index}: content must be a string, got {type(content).__name__}")


def to_turns(messages: Sequence[Any]) -> list[Turn]:
    """OpenAI-style messages -> Gemma turns, checking roles and folding a leading system message.

    Raises FormatError for: a non-list or empty list, non-dict messages, unknown roles, a system message anywhere
    but first, roles that do not alternate user/model starting with user, and null/empty content.
    """
    if not isinstance(messages, (list, tuple)):
        raise FormatError(f"messages must be a list, got {type(messages).__name__}")
    if not messages:
        raise FormatError("no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise FormatError(f"message {i}: must be an object with role and content, got {type(m).__name__}")
        if "role" not in m:
            raise FormatError(f"message {i}: missing field 'role'")
        if "content" not in m:
            raise FormatError(f"message {i}: missing field 'content'")
        if not isinstance(m["role"], str):
            raise FormatError(f"message {i}: role must be a string, got {type(m['role']).__name__}")
    system = None
    start = 0
    if messages[0]["role"] == "system":
        system = _content_text(messages[0]["content"], strip=False, index=0)
        if not system.strip():
            raise FormatError("message 0: system content is empty")
        start = 1
        if len(messages) == 1:
            raise FormatError("a system message must be followed by a user turn")
    turns: list[Turn] = []
    for i in range(start, len(messages)):
        m = messages[i]
        role = m["role"]
        if role == "system":
            raise FormatError(f"message {i}: a system message is only allowed first")
        if role not in _ROLE_ALIASES:
            raise FormatError(f"message {i}: unknown role {role!r} (expected system, user, assistant)")
        role = _ROLE_ALIASES[role]
        expected = USER if len(turns) % 2 == 0 else MODEL
        if role != expected:
            raise FormatError(
                f"message {i}: roles out of order: expected a {'user' if expected == USER else 'assistant'} turn, "
                f"got {m['role']} (roles alternate user/assistant starting with user)"
            )
        text = _content_text(m["content"], strip=True, index=i)
        if not text:
            raise FormatError(f"message {i}: {m['role']} content is empty")
        if system is not None and not turns:
            text = f"{system}\n\n{text}"
        turns.append((role, text))
    return turns


def render_turns(turns: Sequence[Turn], add_generation_prompt: bool = False) -> str:
    text = BOS + "".join(f"{START_OF_TURN}{role}\n{content}{END_OF_TURN}\n" for role, content in turns)
    return text + GENERATION_PROMPT if add_generation_prompt else text


def render(messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
    """The exact Gemma-format text of OpenAI-style ``messages`` (what the model is trained and prompted on)."""
    return render_turns(to_turns(messages), add_generation_prompt)


# --------------------------------------------------------------------------------------------------------------
# Token ids and masks
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Encoded:
    input_ids: list[int]
    labels_mask: list[int]  # 1 where the token is trained on (model content and its <end_of_turn>)


class GemmaEncoder:
    """Builds ids and loss masks per turn from a tokenizer that carries Gemma's control tokens.

    ``control_tokens="reject"`` makes content containing control-token text an error; ``"as_text"`` tokenizes
    such text as ordinary characters so it can never become a real control token.
    """

    def __init__(self, tokenizer: Any, control_tokens: str = "reject"):
        self.tokenizer = tokenizer
        self.control_tokens = control_tokens
        self.bos_id = self._single_id(BOS, "bos_token_id")
        self.eos_id = self._single_id(EOS, "eos_token_id")
        self.pad_id = self._single_id(PAD, "pad_token_id")
        self.sot_id = self._single_id(START_OF_TURN)
        self.eot_id = self._single_id(END_OF_TURN)
        if self.pad_id == self.eos_id:
            raise FormatError("the tokenizer's pad token is its eos token; Gemma needs a distinct <pad>")
        self.header_ids = {
            role: self._plain_ids(f"{role}\n") for role in (USER, MODEL)
        }  # role header after <start_of_turn>
        self.newline_ids = self._plain_ids("\n")
        heads = {role: [self.sot_id, *self.header_ids[role]] for role in (USER, MODEL)}
        self._heads = (heads, {role: [0] * len(h) for role, h in heads.items()})
        tail = [self.eot_id, *self.newline_ids]
        self._tails = (tail, {USER: [0] * len(tail), MODEL: [1] + [0] * len(self.newline_ids)})
        # Every special (control) string of this tokenizer, checked in content.
        specials = {BOS, EOS, PAD, START_OF_TURN, END_OF_TURN}
        decoder = getattr(tokenizer, "added_tokens_decoder", {}) or {}
        specials.update(tok.content for tok in decoder.values() if getattr(tok, "special", False))
        self.control_strings = tuple(sorted(s for s in specials if s))

    def _single_id(self, text: str, attr: str | None = None) -> int:
        tok_id = self.tokenizer.convert_tokens_to_ids(text)
        unk = getattr(self.tokenizer, "unk_token_id", None)
        if tok_id is None or (tok_id == unk and text != UNK):
            raise FormatError(f"the tokenizer has no {text} token (not a Gemma tokenizer?)")
        if attr is not None and getattr(self.tokenizer, attr, None) != tok_id:
            raise FormatError(
                f"the tokenizer's {attr} is {getattr(self.tokenizer, attr, None)}, not {text} ({tok_id})"
            )
        return tok_id

    def _plain_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    # -- content checks --------------------------------------------------------------------------------------
    def find_control(self, text: str) -> str | None:
        for s in self.control_strings:
            if s in text:
                return s
        return None

    def check_turns(self, turns: Sequence[Turn]) -> None:
        if self.control_tokens == "reject" and self.find_control("\x00".join(c for _, c in turns)):
            for i, (role, content) in enumerate(turns):
                found = self.find_control(content)
                if found:
                    raise FormatError(
                        f"turn {i} ({role}) contains the control-token text {found!r}; it would become a real "
                        "control token (set data.control_tokens: as_text to keep it as plain text)"
                    )

    # -- tokenization -----------------------------------------------------------------------------------------
    def tokenize_contents(self, texts: list[str]) -> list[list[int]]:
        """One batched fast-tokenizer call for many contents, control-token text kept as plain text."""
        if self.control_tokens == "as_text":
            return [
                self._tokenize_as_text(t) if self.find_control(t) else ids for t, ids in zip(texts, self._batch(texts))
            ]
        return self._batch(texts)

    def _batch(self, texts: list[str]) -> list[list[int]]:
        if not texts:
            return []
        # The Rust tokenizer directly: the transformers wrapper's per-encoding conversion costs as much as the
        # tokenization itself. Same ids (no special tokens added, added tokens matched the same way).
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:
            fast = getattr(backend, "encode_batch_fast", backend.encode_batch)
            return [e.ids for e in fast(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _tokenize_as_text(self, text: str) -> list[int]:
        # Split every control string after its first character: "<" + "end_of_turn>" cannot match the token.
        pieces: list[str] = []
        rest = text
        while True:
            hits = [(rest.find(s), s) for s in self.control_strings if s in rest]
            if not hits:
                pieces.append(rest)
                break
            pos, s = min(hits)
            pieces.extend([rest[:pos], s[:1], s[1:]])
            rest = rest[pos + len(s) :]
        ids: list[int] = []
        for piece in pieces:
            if piece:
                ids.extend(self._batch([piece])[0])
        return ids

    def assemble(
        self,
        turns: Sequence[Turn],
        content_ids: Sequence[list[int]],
        add_generation_prompt: bool = False,
        trailing_newline: bool = True,
    ) -> Encoded:
        """Ids and mask for ``turns`` given each turn's content ids (same order)."""
        ids = [self.bos_id]
        mask = [0]
        heads, head_masks = self._heads
        tail, tail_masks = self._tails
        for (role, _), cids in zip(turns, content_ids):
            ids += heads[role]
            ids += cids
            ids += tail
            mask += head_masks[role]
            mask += [1 if role == MODEL else 0] * len(cids)
            mask += tail_masks[role]
        if not trailing_newline and turns:
            del ids[-len(self.newline_ids) :]
            del mask[-len(self.newline_ids) :]
        if add_generation_prompt:
            gen = [self.sot_id, *self.header_ids[MODEL]]
            ids += gen
            mask += [0] * len(gen)
        return Encoded(ids, mask)

    def encode(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> Encoded:
        """Ids and loss mask of one dialogue (OpenAI-style messages)."""
        turns = to_turns(messages)
        self.check_turns(turns)
        return self.assemble(turns, self.tokenize_contents([c for _, c in turns]), add_generation_prompt)

    def response_ids(self, content_ids: list[int]) -> list[int]:
        """A model response as the policy generates it: content then ``<end_of_turn>``."""
        return [*content_ids, self.eot_id]


def install_chat_template(tokenizer: Any) -> Any:
    """Give ``tokenizer`` the Gemma chat template (and check it has the control tokens)."""
    GemmaEncoder(tokenizer)  # raises FormatError when control tokens are missing or pad == eos
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def stop_token_ids(tokenizer: Any) -> list[int]:
    """The ids a model turn may end on: ``<end_of_turn>`` (what training teaches), then ``<eos>``. Generation stops
    at either; the reward is read at the stop token."""
    return [tokenizer.convert_tokens_to_ids(END_OF_TURN), tokenizer.eos_token_id]
