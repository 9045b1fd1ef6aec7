"""Cross-stage consistency gate: every checkpoint a stage starts from must speak exactly the data stage's format.

Before the reward model and PPO start, the tokenizer of each input checkpoint is compared with the one the data
stage used (vocabulary and merges hash, chat-template hash, special-token ids), pad must differ from eos, the
checkpoint's model config must agree on the pad id, and the reward model must score at the token PPO rollouts stop
on. Anything that differs stops the stage with a message naming what differs and where.
"""

from __future__ import annotations

import json
from pathlib import Path

from data_prep.gemma_format import END_OF_TURN
from pipeline.core.errors import InputError
from pipeline.core.loading import load_failure, tokenizer_fingerprint
from pipeline.core.reward_stats import RewardStats
from pipeline.core.rundir import MODEL_CONFIG, read_manifest

FIELDS = ("hash", "vocab_size", "special_ids", "chat_template_hash")


class ConsistencyError(InputError, RuntimeError):
    """Stage inputs disagree on the tokenizer or the chat format."""


def check_inputs(
    data_dir: Path, checkpoints: dict[str, Path | str], stop_token: str = END_OF_TURN, foreign: tuple[str, ...] = ()
) -> None:
    """Raise ConsistencyError unless every checkpoint matches the data stage's tokenizer and format. ``checkpoints``
    maps a name to a local folder or a hub id; the names in ``foreign`` are models this pipeline did not write (a
    hub or instruct model a stage starts from): their chat template is not compared, since every stage renders
    with Gemma's own (``install_chat_template``), but their vocabulary and control-token ids are."""
    expected = read_manifest(data_dir).tokenizer
    problems = []
    ids = expected["special_ids"]
    if ids["pad"] == ids["eos"]:
        problems.append(f"the data stage's tokenizer uses the same id for pad and eos ({ids['pad']})")
    for name, ckpt in checkpoints.items():
        got, config = _tokenizer_and_config(name, ckpt, name in foreign)
        for field in FIELDS:
            if got[field] != expected[field]:
                problems.append(
                    f"{name} ({ckpt}): tokenizer {field} is {got[field]!r}, the data stage's is {expected[field]!r}"
                )
        if config.get("pad_token_id") not in (None, ids["pad"]):
            problems.append(
                f"{name} ({ckpt}): config pad_token_id {config.get('pad_token_id')} is not the "
                f"tokenizer's pad id {ids['pad']}"
            )
        stats = RewardStats.read(Path(ckpt)) if Path(ckpt).is_dir() else None
        if stats is not None and stats.scored_at != stop_token:
            problems.append(f"{name} ({ckpt}): scores at {stats.scored_at!r}, but rollouts stop at {stop_token!r}")
    if problems:
        raise ConsistencyError("stage inputs are inconsistent:\n  - " + "\n  - ".join(problems))


def _tokenizer_and_config(name: str, ckpt: Path | str, foreign: bool) -> tuple[dict, dict]:
    """The tokenizer fingerprint and model config of a local folder or a hub model (a load failure is one line)."""
    from transformers import AutoConfig, AutoTokenizer

    from data_prep.gemma_format import FormatError, install_chat_template

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(ckpt))
        if Path(ckpt).is_dir():
            config = json.loads((Path(ckpt) / MODEL_CONFIG).read_text(encoding="utf-8"))
        else:
            config = AutoConfig.from_pretrained(str(ckpt)).to_dict()
    except (OSError, ValueError) as e:
        raise load_failure(f"the tokenizer of {name}", str(ckpt), e) from None
    if foreign:
        try:
            install_chat_template(tokenizer)
        except FormatError as e:
            raise ConsistencyError(f"{name} ({ckpt}): its tokenizer cannot write Gemma's format: {e}") from None
    return tokenizer_fingerprint(tokenizer), config
