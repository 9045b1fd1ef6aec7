"""The output heads (``pipeline.core.heads``; T12 and T19 of docs/ppo.md): log-probs of soft-capped,
temperature-scaled logits and their hand-written gradient against autograd's naive composition, the same numbers
with and without gradients, fp32 heads under bf16 autocast, settings read from the text config, and the allocator's
peak within ``ppo.logits_memory_mb``."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from pipeline.core import heads
from tests.helpers.memory import allocator_peak

D = torch.float64


class ToyLM(nn.Module):
    """An output head with the attributes the heads read: ``get_output_embeddings`` and a config."""

    def __init__(self, vocabulary: int, hidden: int, cap: float | None = None, scale: float = 1.0):
        super().__init__()
        self.head = nn.Linear(hidden, vocabulary, bias=False)
        with torch.no_grad():
            self.head.weight.mul_(scale)
        self.config = SimpleNamespace(final_logit_softcapping=cap, vocab_size=vocabulary)

    def get_output_embeddings(self) -> nn.Module:
        return self.head


def naive_logprobs(logits: torch.Tensor, tokens: torch.Tensor, cap: float | None, temperature: float):
    """log_softmax(cap * tanh(logits / cap) / T)[token] by autograd's composition."""
    z = torch.tanh(logits / cap) * cap if cap else logits
    return torch.log_softmax(z / temperature, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


# T12 ----------------------------------------------------------------------------------------------------------
def test_t12_entropy():
    """Entropy of softmax(logits / T) against hand-computed numbers (uniform: log 4; [1, 2, 3, 4] / 10, at T 1
    and 0.7, computed to 30 digits)."""
    assert float(heads.entropy(torch.zeros(1, 4, dtype=D) / 0.7)[0]) == pytest.approx(math.log(4), abs=1e-12)
    logits = torch.log(torch.tensor([[1.0, 2.0, 3.0, 4.0]], dtype=D))
    assert float(heads.entropy(logits)[0]) == pytest.approx(1.2798542258, abs=1e-9)
    assert float(heads.entropy(logits / 0.7)[0]) == pytest.approx(1.1964389638, abs=1e-9)


# T19: log-probs and their gradient ------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [None, 3.0])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_t19_head_logprobs_and_gradient_equal_the_naive_composition(cap, temperature):
    """Catches a wrong hand-written backward (a missing one-hot term, the soft-cap's derivative left out, the
    temperature applied twice): value and gradient equal autograd's composition to 1e-12 in float64, and gradcheck
    passes (it also calls the backward twice: nothing in it may overwrite what it kept). Negative controls: the
    backward without the one-hot term, and with the soft-cap's derivative taken as 1, are told apart."""
    torch.manual_seed(0)
    logits = (3 * torch.randn(6, 13, dtype=D)).requires_grad_(True)
    tokens = torch.randint(0, 13, (6,))
    weights = torch.randn(6, dtype=D)
    naive = naive_logprobs(logits, tokens, cap, temperature)
    (expected,) = torch.autograd.grad((naive * weights).sum(), logits)
    out = heads.logprob_of(logits, tokens, cap, temperature)
    (got,) = torch.autograd.grad((out * weights).sum(), logits)
    assert torch.allclose(out, naive, atol=1e-12) and torch.allclose(got, expected, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x: heads.logprob_of(x, tokens, cap, temperature), (logits,))

    z = (torch.tanh(logits.detach() / cap) * cap if cap else logits.detach()) / temperature
    no_onehot = -torch.softmax(z, -1) * weights.unsqueeze(-1) / temperature
    assert not torch.allclose(no_onehot, expected, atol=1e-3)
    if cap:
        onehot = torch.zeros_like(z).scatter_(-1, tokens.unsqueeze(-1), 1.0)
        cap_as_identity = (onehot - torch.softmax(z, -1)) * weights.unsqueeze(-1) / temperature
        assert not torch.allclose(cap_as_identity, expected, atol=1e-3)


@pytest.mark.parametrize("cap", [None, 30.0])
def test_t19_rollout_and_training_heads_give_the_same_numbers(cap):
    """Catches a rollout head (no gradients: ``scaled_logits`` and ``logprobs_and_entropy``) that computes in another
    order than the training head (``token_logprobs``): PPO's first ratio is then not exactly 1. They are bitwise
    equal; the entropy equals the naive one to 1e-5. Negative control: dividing the logits by T instead of the hidden
    states (the linear head's order) is not bitwise equal."""
    torch.manual_seed(0)
    model, x, tok = ToyLM(512, 32, cap, scale=8.0), torch.randn(40, 32), torch.randint(0, 512, (40,))
    trained = heads.token_logprobs(model, x.requires_grad_(True), tok, 0.7, "fp32")
    with torch.no_grad():
        lp, ent = heads.logprobs_and_entropy(heads.scaled_logits(model, x, 0.7, "fp32"), tok, True)
        logits = model.head(x).double()
        z = (torch.tanh(logits / cap) * cap if cap else logits) / 0.7
        naive_entropy = -(torch.softmax(z, -1) * torch.log_softmax(z, -1)).sum(-1)
    assert torch.equal(lp, trained.detach())
    assert torch.allclose(ent.double(), naive_entropy, atol=1e-5)
    if not cap:
        other_order = torch.log_softmax(model.head(x).detach() / 0.7, -1).gather(-1, tok[:, None]).squeeze(-1)
        assert not torch.equal(other_order, lp)


# T19: fp32 heads under bf16 autocast ---------------------------------------------------------------------------
def test_t19_fp32_head_under_bf16_autocast_is_not_rounded_to_bf16():
    """Catches a head that autocast runs in bf16 although ``ppo.head_precision: fp32`` asks otherwise: at logits of
    16-32 bf16 steps are 0.125, and log-probs err by up to ~0.06. The fp32 head equals a float64 reference within
    1e-4 (measured ~2e-6, float32 rounding); ``auto`` under the same autocast misses it by more than 0.01 (the
    control: the rounding the setting exists to avoid)."""
    torch.manual_seed(0)
    model, x, tok = ToyLM(1024, 64, scale=12.0), torch.randn(64, 64), torch.randint(0, 1024, (64,))
    with torch.no_grad():
        reference = naive_logprobs(model.head.double()(x.double()), tok, None, 0.7)
        model.head.float()
        assert model.head(x).abs().max() > 16  # logits where bf16 rounds coarsely
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fp32 = heads.token_logprobs(model, x, tok, 0.7, "fp32")
            auto = heads.token_logprobs(model, x, tok, 0.7, "auto")
    assert (fp32.double() - reference).abs().max() < 1e-4
    assert (auto.double() - reference).abs().max() > 0.01


def test_t19_score_heads_are_fp32_under_bf16_autocast():
    """Catches a value or reward head whose score autocast rounds to bf16 (a reward of 45 in steps of 0.25):
    ``token_values`` equals the fp32 score of the same hidden states within 1e-4. Negative control: the head called
    under the same autocast is off by more than 0.01."""

    class Backbone(nn.Module):
        def forward(self, input_ids, attention_mask, position_ids, use_cache):
            return SimpleNamespace(last_hidden_state=torch.sin(input_ids.float().unsqueeze(-1) * torch.arange(16.0)))

    classifier = nn.Module()
    classifier.base_model_prefix, classifier.model = "model", Backbone()
    classifier.score = nn.Linear(16, 1, bias=False)
    torch.manual_seed(0)
    with torch.no_grad():
        classifier.score.weight.normal_(0, 30.0)
    ids = torch.arange(12).view(2, 6)
    with torch.no_grad():
        exact = classifier.score(classifier.model(ids, None, None, False).last_hidden_state).squeeze(-1)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fp32 = heads.token_values(classifier, ids, None, None)
            auto = classifier.score(classifier.model(ids, None, None, False).last_hidden_state).squeeze(-1).float()
    assert torch.allclose(fp32, exact, atol=1e-4) and (auto - exact).abs().max() > 0.01


# T19: settings from the text config -------------------------------------------------------------------------
def test_t19_soft_cap_and_vocabulary_come_from_the_text_config():
    """Catches the soft-cap read from the top config (a multimodal wrapper's holds none: its language model's
    ``final_logit_softcapping`` would be ignored, and its logits uncapped). Negative control: the top config has no
    such key."""
    from transformers import Gemma2Config, Gemma3Config

    text = Gemma2Config(vocab_size=300, final_logit_softcapping=5.0).to_dict()
    top = Gemma3Config(text_config={**text, "model_type": "gemma3_text"})
    top.text_config.final_logit_softcapping = 5.0
    wrapper = SimpleNamespace(config=top)
    assert heads.softcap(wrapper) == 5.0 and heads.vocabulary_size(wrapper) == 300
    assert getattr(top, "final_logit_softcapping", None) is None  # the old reading: no cap

    model = ToyLM(64, 8, cap=None, scale=50.0)
    model.config = top  # a capped text config behind a wrapper config
    model.config.text_config.vocab_size = 64
    z = heads.scaled_logits(model, torch.randn(4, 8), 1.0, "fp32")
    assert z.abs().max() <= 5.0 and model.head(torch.randn(4, 8)).abs().max() > 5.0


# T19: memory ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cap", [None, 30.0], ids=["linear", "softcap"])
@pytest.mark.parametrize("autocast, precision", [(False, "fp32"), (True, "fp32"), (True, "auto")])
def test_t19_the_heads_peak_stays_within_logits_memory_mb(cap, autocast, precision):
    """Catches a ``ppo.logits_memory_mb`` that understates what the head holds: the allocator's peak over the head's
    forward and backward (and the rollout's no-gradient head with the entropy) for as many positions as
    ``logit_positions`` allows stays within the budget, on every path (soft-cap, bf16 autocast with an fp32 or a bf16
    head). Only (positions x vocabulary) tensors are measured: the head's weight is frozen here. Negative control:
    the old reading, 4 bytes per logit (the fp32 logits alone), lets twice the positions through, whose peak is
    over the budget."""
    vocabulary, hidden, budget_mb = 32768, 32, 48
    model = ToyLM(vocabulary, hidden, cap)
    model.head.weight.requires_grad_(False)

    def peak(n: int, grad: bool) -> int:
        x, tok = torch.randn(n, hidden, requires_grad=grad), torch.randint(0, vocabulary, (n,))

        def run():
            with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                if grad:
                    heads.token_logprobs(model, x, tok, 0.7, precision).sum().backward()
                else:
                    heads.logprobs_and_entropy(heads.scaled_logits(model, x, 0.7, precision), tok, True)

        run()  # warm-up: one-time allocations are not the head's
        return allocator_peak(run)

    budget = budget_mb << 20
    n = heads.logit_positions(model, budget_mb, precision)
    assert n > 100
    assert peak(n, grad=True) <= budget and peak(n, grad=False) <= budget
    old_n = budget // (4 * vocabulary)
    assert peak(old_n, grad=True) > budget
