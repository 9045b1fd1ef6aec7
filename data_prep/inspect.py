"""Print one formatted example with its loss mask visible: the fastest review of the data stage.

    python -m data_prep.inspect --recipe recipes/tiny_ko.yaml [--stage sft|preference|prompts] [--split train]
                                [--index 0] [--tokens]

Trained tokens (labels) are shown inside «...»; everything else is masked. ``--tokens`` adds a table of every token
id, its text and its mask.
"""

from __future__ import annotations

import argparse
import sys

from pipeline.atomic import IncompleteError, require_complete
from pipeline.config import ConfigError, load_recipe


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
    ap.add_argument("--recipe", required=True)
    ap.add_argument("--stage", choices=("sft", "preference", "prompts"), default="sft")
    ap.add_argument("--split", choices=("train", "eval"), default="train")
    ap.add_argument("--index", type=int, default=0)
    ap.add_argument("--tokens", action="store_true", help="also print every token with its id and mask")
    ap.add_argument("overrides", nargs="*")
    a = ap.parse_args(argv)
    try:
        recipe = load_recipe(a.recipe, a.overrides)
        data_dir = require_complete(recipe.run_dir / "data", "the data stage output")
    except (ConfigError, IncompleteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import datasets
    from transformers import AutoTokenizer

    datasets.disable_progress_bars()

    path = data_dir / a.stage / f"{a.split}.parquet"
    if not path.is_file():
        print(f"error: {path} does not exist (the recipe has no {a.stage}/{a.split} data)", file=sys.stderr)
        return 2
    ds = datasets.Dataset.from_parquet(str(path))
    if not 0 <= a.index < len(ds):
        print(f"error: --index {a.index} out of range (0..{len(ds) - 1})", file=sys.stderr)
        return 2
    row = ds[a.index]
    tok = AutoTokenizer.from_pretrained(data_dir / "tokenizer")
    print(f"# {a.stage}/{a.split}[{a.index}] from {row['source']}  (trained tokens in «...»)")
    if a.stage == "sft":
        print(show(tok, row["input_ids"], row["assistant_masks"], a.tokens))
        print(f"# {len(row['input_ids'])} tokens, {sum(row['assistant_masks'])} trained")
    elif a.stage == "preference":
        for which in ("chosen", "rejected"):
            ids = row["prompt_ids"] + row[f"{which}_ids"]
            mask = [0] * len(row["prompt_ids"]) + [1] * len(row[f"{which}_ids"])
            print(f"## {which} (the reward is read at the final token, <end_of_turn>)")
            print(show(tok, ids, mask, a.tokens))
    else:
        print(show(tok, row["prompt_ids"], [0] * len(row["prompt_ids"]), a.tokens))
        print(f"# {len(row['prompt_ids'])} prompt tokens (ends with the generation prompt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
