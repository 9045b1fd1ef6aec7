"""Held-out prompts that training rows also ask: each held-out prompt's last user turn against every user turn of
the training splits of a data folder, after one normalisation. The data stage records the count in its manifest
and the report shows it per source; both call this.
"""

from __future__ import annotations

import json
import unicodedata
from pathlib import Path
from typing import Any

from data_prep.gemma_format import USER, GemmaEncoder

OVERLAP_SOURCES = {
    "sft": "the SFT training rows",
    "preference": "the preference training prompts",
    "prompts": "the PPO training prompts",
}


def heldout_overlap(folder: Path, tokenizer: Any, heldout: list[str]) -> tuple[dict[str, int], int]:
    """How many held-out prompts (their last user turn) are also a user turn of a training row, per source (the
    train splits of ``OVERLAP_SOURCES``, 0 for one the recipe does not have), and how many are in any of them.

    The last user turn is what a held-out prompt asks; it is compared with every user turn of the training rows,
    after ``normalise_prompt``, so a question trained on inside a longer dialogue counts too."""
    held = [normalise_prompt(t) for t in heldout]
    hit_any = [False] * len(held)
    counts = {}
    for source in OVERLAP_SOURCES:
        path = Path(folder) / source / "train.parquet"
        path = path if path.is_file() else None
        seen = (
            set()
            if path is None
            else (sft_user_turns(path, tokenizer) if source == "sft" else message_user_turns(path))
        )
        hits = [t in seen for t in held]
        counts[source] = sum(hits)
        hit_any = [a or b for a, b in zip(hit_any, hits)]
    return counts, sum(hit_any)


def normalise_prompt(text: str) -> str:
    """A prompt as the held-out check compares it: NFC, every run of whitespace one space, ends stripped."""
    return " ".join(unicodedata.normalize("NFC", text).split())


def sft_user_turns(path: Path, tokenizer: Any) -> set[str]:
    """The normalised user turns of the SFT rows in ``path``. SFT rows keep only ids: each user turn is the content
    between ``<start_of_turn>user\n`` and the next ``<end_of_turn>`` (content never holds that token: the data stage
    refuses control-token text or keeps it as plain text), decoded once per distinct turn."""
    import numpy as np
    import pyarrow.parquet as pq

    enc = GemmaEncoder(tokenizer)
    header = enc.header_ids[USER]
    segments: dict[bytes, list[int]] = {}
    for chunk in pq.read_table(path, columns=["input_ids"]).column("input_ids").chunks:
        flat = chunk.flatten().to_numpy()  # every row's ids end to end: a user turn never crosses a row's end
        starts = np.flatnonzero(flat == enc.sot_id)
        for j, hid in enumerate(header):
            starts = starts[(starts + 1 + j < len(flat))]
            starts = starts[flat[starts + 1 + j] == hid]
        starts = starts + 1 + len(header)
        ends_at = np.flatnonzero(flat == enc.eot_id)
        ends = ends_at[np.minimum(np.searchsorted(ends_at, starts), len(ends_at) - 1)] if len(ends_at) else starts
        for a, b in zip(starts.tolist(), ends.tolist()):
            if b >= a:
                seg = flat[a:b]
                segments.setdefault(seg.tobytes(), seg.tolist())
    return {normalise_prompt(t) for t in tokenizer.batch_decode(list(segments.values()), skip_special_tokens=False)}


def message_user_turns(path: Path) -> set[str]:
    """The normalised user turns of the ``messages`` column (preference and PPO prompt rows)."""
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["messages"]).column("messages").to_pylist()
    return {normalise_prompt(m["content"]) for row in column for m in json.loads(row) if m["role"] == USER}


def heldout_texts(path: Path) -> list[str]:
    """What each held-out prompt of a prompts split asks: its last turn (a user turn)."""
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["messages"]).column("messages").to_pylist()
    return [json.loads(m)[-1]["content"] for m in column]
