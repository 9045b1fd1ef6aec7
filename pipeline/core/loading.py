"""Loading tokenizers (and, in later stages, models) from a recipe's model section, the same way for a hub id,
a local directory in hub layout, or the embedded tiny model."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from data_prep.gemma_format import BOS, END_OF_TURN, EOS, PAD, START_OF_TURN, install_chat_template, template_hash
from pipeline.core.config import ModelConfig
from pipeline.core.embedded import resolve_model_path
from pipeline.core.errors import InputError
from pipeline.core.locations import resolve_path


class LoadError(InputError, RuntimeError):
    """A model or tokenizer could not be loaded; the message says which and why."""


def _gated(e: BaseException | None) -> bool:
    """True when ``e`` (or an exception it was raised from) says the hub repository is gated."""
    seen: set[int] = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if type(e).__name__ == "GatedRepoError" or "gated repo" in str(e).lower():
            return True
        e = e.__cause__ or e.__context__
    return False


def load_failure(what: str, loc: str, e: BaseException, hint: str = "") -> LoadError:
    """One clear line for a model or tokenizer that did not load. A gated hub model (every ``google/gemma-*`` is)
    says where to accept its licence and how to give a token; the token itself is never printed or written."""
    if _gated(e):
        return LoadError(
            f"cannot load {what} from {loc!r}: it is a gated model. Accept its licence at https://huggingface.co/{loc} "
            "while logged in, then give this machine a token: set HF_TOKEN in the environment, or run "
            "`hf auth login` (the token is read from there; the pipeline never writes it anywhere)"
        )
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return LoadError(f"cannot load {what} from {loc!r}: {first}{hint}")


def model_location(model: ModelConfig) -> str:
    loc = resolve_model_path(model.name_or_path)
    local = resolve_path(loc)
    return str(local) if local.exists() else loc


def load_tokenizer(model: ModelConfig, location: str | None = None) -> Any:
    """The recipe's tokenizer with the Gemma chat template installed (control tokens checked, pad != eos)."""
    from transformers import AutoTokenizer

    loc = location or (
        model_location(ModelConfig(name_or_path=model.tokenizer)) if model.tokenizer else model_location(model)
    )
    try:
        tok = AutoTokenizer.from_pretrained(
            loc, revision=model.revision if location is None else None, trust_remote_code=model.trust_remote_code
        )
    except Exception as e:  # noqa: BLE001 - one clear line instead of a hub/transformers traceback
        raise load_failure("the tokenizer", loc, e) from None
    return install_chat_template(tok)


def tokenizer_fingerprint(tokenizer: Any) -> dict:
    """What must be identical between stages: vocabulary and merges, special-token ids, chat template."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    blob = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    ids = {
        name: tokenizer.convert_tokens_to_ids(tok)
        for name, tok in (
            ("bos", BOS),
            ("eos", EOS),
            ("pad", PAD),
            ("start_of_turn", START_OF_TURN),
            ("end_of_turn", END_OF_TURN),
        )
    }
    return {
        "hash": hashlib.sha256(blob.encode()).hexdigest()[:16],
        "vocab_size": len(tokenizer),
        "special_ids": ids,
        "chat_template_hash": template_hash(tokenizer.chat_template),
    }


def load_causal_lm(
    model: ModelConfig, location: str | None = None, dtype: Any = None, dropout_off: bool = False
) -> Any:
    """A causal LM from the recipe's base model (or ``location``), safetensors only unless the recipe opts in.
    ``dropout_off``: every dropout rate in the config is 0 before the model is built (``without_dropout``)."""
    from transformers import AutoModelForCausalLM

    return _load(AutoModelForCausalLM, model, location, dtype, dropout_off)


def load_sequence_classifier(model: ModelConfig, location: str, dtype: Any = None, dropout_off: bool = False) -> Any:
    """A one-output sequence classifier (reward or value model) from ``location``."""
    from transformers import AutoModelForSequenceClassification

    return _load(AutoModelForSequenceClassification, model, location, dtype, dropout_off, num_labels=1)


def _warn_pickle(loc: str) -> None:
    """``model.allow_pickle`` is on: say so, and say when the weights about to load really are a pickle file."""
    import sys
    from pathlib import Path

    folder = Path(loc)
    if folder.is_dir():
        if any(folder.glob("*.safetensors")) or not any(folder.glob("*.bin")):
            return  # safetensors are preferred when present: nothing pickled is loaded
        what = f"pickle (.bin) weights from {loc}"
    else:
        what = f"pickle (.bin) weights from {loc} if it has no safetensors"
    print(
        f"warning: model.allow_pickle is on: loading {what}. Unpickling can run arbitrary code; use it only for "
        "checkpoints you trust, and convert them to safetensors.",
        file=sys.stderr,
        flush=True,
    )


def without_dropout(config: Any) -> Any:
    """``config`` (and its sub-configs) with every dropout rate set to 0. It must happen before the model is built:
    Gemma's attention copies ``attention_dropout`` when it is constructed, so zeroing the config afterwards leaves
    dropout on in training mode."""
    seen: list[Any] = []
    stack = [config]
    while stack:
        c = stack.pop()
        if any(c is s for s in seen):
            continue
        seen.append(c)
        for key, value in vars(c).items():
            if "dropout" in key and isinstance(value, float) and value:
                setattr(c, key, 0.0)
            elif hasattr(value, "to_dict") and hasattr(value, "model_type"):  # a sub-config (text_config, ...)
                stack.append(value)
    return config


def disable_dropout(model: Any) -> None:
    """Every dropout module off (LoRA's included): rollout and training log-probs must be the same function. Rates
    that a model copies from its config when it is built are zeroed before loading (``dropout_off``)."""
    from torch import nn

    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    config = getattr(model, "config", None)
    for key in ("attention_dropout", "hidden_dropout", "dropout"):
        if config is not None and getattr(config, key, None):
            setattr(config, key, 0.0)


def _load(cls: Any, model: ModelConfig, location: str | None, dtype: Any, dropout_off: bool, **kwargs: Any) -> Any:
    from transformers import AutoConfig

    loc = location or model_location(model)
    if model.allow_pickle:
        _warn_pickle(loc)
    revision = model.revision if location is None else None
    try:
        if dropout_off:
            config = AutoConfig.from_pretrained(
                loc, revision=revision, trust_remote_code=model.trust_remote_code, **kwargs
            )
            kwargs = {"config": without_dropout(config)}
        return cls.from_pretrained(
            loc,
            revision=revision,
            trust_remote_code=model.trust_remote_code,
            use_safetensors=None if model.allow_pickle else True,
            dtype=dtype if dtype is not None else "auto",
            **kwargs,
        )
    except (OSError, ValueError) as e:
        hint = "" if model.allow_pickle else " (only safetensors weights are loaded unless model.allow_pickle: true)"
        raise load_failure(cls.__name__, loc, e, hint) from None
