"""The embedded default model: a tiny Gemma-architecture causal LM and a tokenizer trained on the shipped text.

Built deterministically, offline, in seconds, in ``save_pretrained`` layout, so every stage loads it exactly as it
loads ``google/gemma-2b``. A recipe names it ``embedded:tiny-gemma-ko``; it is built on first use into
``build/embedded/tiny-gemma-ko/``.

    python -m pipeline.core.embedded tiny-gemma-ko [--out DIR]
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

from data_prep.gemma_format import BOS, END_OF_TURN, EOS, PAD, START_OF_TURN, UNK, install_chat_template
from data_prep.tiny_ko import DATA_DIR
from pipeline.core.atomic import atomic_dir, clean_stale
from pipeline.core.locations import EMBEDDED_PREFIX, REPO_ROOT
from pipeline.core.rundir import is_complete

# Gemma's own order for the first four ids; the turn markers follow.
SPECIAL_TOKENS = [PAD, EOS, BOS, UNK, START_OF_TURN, END_OF_TURN]


@dataclass(frozen=True)
class TinySpec:
    vocab_size: int = 1200
    """BPE vocabulary trained on the shipped text (the model's embedding is rounded up to a multiple of 64)."""
    hidden_size: int = 128
    intermediate_size: int = 512
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 1
    head_dim: int = 32
    max_position_embeddings: int = 512
    seed: int = 0
    model_vocab_size: int | None = None
    """Embedding rows; None: the tokenizer's size rounded up to 64. Larger, like Gemma's, for benchmarks."""


EMBEDDED_MODELS = {
    "tiny-gemma-ko": TinySpec(),
    # The PPO benchmark model: Gemma-like full-vocabulary logits (32768 ids, an eighth of Gemma's 256k).
    "bench-gemma-32k": TinySpec(
        hidden_size=256,
        intermediate_size=1024,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=64,
        model_vocab_size=32768,
    ),
}


def corpus_texts() -> list[str]:
    """Every text of the shipped data, in a fixed order (the tokenizer's training corpus)."""
    texts: list[str] = []
    for name in ("sft", "preference", "prompts", "heldout"):
        with open(DATA_DIR / f"{name}.jsonl", encoding="utf-8") as fh:
            for line in fh:
                row = json.loads(line)
                for m in row.get("messages", []):
                    texts.append(m["content"])
                texts.extend(row[k] for k in ("prompt", "chosen", "rejected") if isinstance(row.get(k), str))
    # Role headers appear in every formatted dialogue; weight them as they occur so they become single tokens.
    texts += ["user\n", "model\n"] * len(texts)
    return texts


def build_tokenizer(vocab_size: int = 1200):
    """Byte-level BPE with Gemma's special tokens, automatic <bos>, every digit its own token, and the chat template.

    Newlines are their own pre-tokens, so ids built per turn equal the ids of the rendered text.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\n", behavior="isolated"),
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_texts(), trainer=trainer)
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
        padding_side="left",
        model_max_length=TinySpec.max_position_embeddings,
    )
    return install_chat_template(hf)


def build_model(spec: TinySpec, tokenizer):
    import torch
    from transformers import GemmaConfig, GemmaForCausalLM, GenerationConfig

    vocab = spec.model_vocab_size or -(-len(tokenizer) // 64) * 64
    config = GemmaConfig(
        vocab_size=vocab,
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads,
        num_key_value_heads=spec.num_key_value_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_position_embeddings,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=True,
        attention_dropout=0.0,
    )
    torch.manual_seed(spec.seed)
    model = GemmaForCausalLM(config)
    eot = tokenizer.convert_tokens_to_ids(END_OF_TURN)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=[tokenizer.eos_token_id, eot],
        pad_token_id=tokenizer.pad_token_id,
    )
    return model


def build(name: str, out: Path) -> Path:
    """Write the embedded model ``name`` to ``out`` (atomically)."""
    spec = EMBEDDED_MODELS[name]
    tokenizer = build_tokenizer(spec.vocab_size)
    model = build_model(spec, tokenizer)
    with atomic_dir(out, {"embedded": name}) as tmp:
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)
    return out


def embedded_dir(name: str) -> Path:
    return REPO_ROOT / "build" / "embedded" / name


def resolve_model_path(name_or_path: str) -> str:
    """A recipe's model location as ``from_pretrained`` takes it; builds an embedded model on first use."""
    if not name_or_path.startswith(EMBEDDED_PREFIX):
        return name_or_path
    name = name_or_path[len(EMBEDDED_PREFIX) :]
    if name not in EMBEDDED_MODELS:
        raise ValueError(f"unknown embedded model {name!r} (known: {', '.join(EMBEDDED_MODELS)})")
    out = embedded_dir(name)
    if not is_complete(out):
        clean_stale(out.parent)
        build(name, out)
    return str(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("name", choices=sorted(EMBEDDED_MODELS))
    ap.add_argument("--out", type=Path, default=None, help="output folder (default build/embedded/NAME)")
    a = ap.parse_args()
    out = build(a.name, a.out) if a.out else Path(resolve_model_path(EMBEDDED_PREFIX + a.name))
    print(out)


if __name__ == "__main__":
    main()
