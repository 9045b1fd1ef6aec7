"""Print one formatted example with its loss mask visible: the fastest review of the data stage.

    python -m pipeline.inspect --recipe recipes/tiny_ko.yaml [--stage sft|preference|prompts] [--split train]
                                [--index 0] [--tokens]

Trained tokens (labels) are shown inside «...»; everything else is masked. ``--tokens`` adds a table of every token
id, its text and its mask.
"""

from __future__ import annotations

import argparse
import sys

from data_prep.gemma_format import END_OF_TURN
from pipeline.core.cli import add_recipe_arguments, print_error, recipe_from
from pipeline.core.config import ConfigError
from pipeline.core.errors import EXIT_INPUT
from pipeline.core.rundir import DATA_SECTIONS, IncompleteError, RunDir, data_output, data_split


def show(tokenizer, ids: list[int], mask: list[int], tokens: bool = False) -> str:
    """The decoded sequence with trained spans in «...» (and optionally a per-token table)."""
    out: list[str] = []
    span: list[int] = []
    current = None
    for tid, m in zip(ids, mask):
        if current is not None and m != current:
            text = tokenizer.decode(span)
            out.append(f"«{text}»" if current else text)
            span = []
        current = m
        span.append(tid)
    if span:
        text = tokenizer.decode(span)
        out.append(f"«{text}»" if current else text)
    lines = ["".join(out)]
    if tokens:
        lines.append(f"{'pos':>4} {'id':>6} {'mask':>4}  token")
        for i, (tid, m) in enumerate(zip(ids, mask)):
            lines.append(f"{i:>4} {tid:>6} {m:>4}  {tokenizer.decode([tid])!r}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(ap)
    ap.add_argument("--stage", choices=DATA_SECTIONS, default="sft")
    ap.add_argument("--split", choices=("train", "eval"), default="train")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--tokens", action="store_true", help="also print every token with its id and mask")
    a = ap.parse_args(argv)
    try:
        data = data_output(RunDir.of(recipe_from(a, check=False)), "the data stage output")
    except (ConfigError, IncompleteError) as e:
        print_error(e)
        return EXIT_INPUT
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()

    path = data.split(a.stage, a.split)
    if path is None:
        print_error(
            f"{data_split(data.path, a.stage, a.split)} does not exist (the recipe has no {a.stage}/{a.split} data)"
        )
        return EXIT_INPUT
    ds = datasets.Dataset.from_parquet(str(path))
    if not 0 <= a.index < len(ds):
        print_error(f"--index {a.index} out of range (0..{len(ds) - 1})")
        return EXIT_INPUT
    row = ds[a.index]
    tok = AutoTokenizer.from_pretrained(data.tokenizer)
    print(f"# {a.stage}/{a.split}[{a.index}] from {row['source']}  (trained tokens in «...»)")
    if a.stage == "sft":
        print(show(tok, row["input_ids"], row["assistant_masks"], a.tokens))
        print(f"# {len(row['input_ids'])} tokens, {sum(row['assistant_masks'])} trained")
    elif a.stage == "preference":
        for which in ("chosen", "rejected"):
            ids = row["prompt_ids"] + row[f"{which}_ids"]
            mask = [0] * len(row["prompt_ids"]) + [1] * len(row[f"{which}_ids"])
            print(f"## {which} (the reward is read at the final token, {END_OF_TURN})")
            print(show(tok, ids, mask, a.tokens))
    else:
        print(show(tok, row["prompt_ids"], [0] * len(row["prompt_ids"]), a.tokens))
        print(f"# {len(row['prompt_ids'])} prompt tokens (ends with the generation prompt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
