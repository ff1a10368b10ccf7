"""head_logprobs: logprobs and entropy straight from hidden states, with the model's logit
post-processing inside the chunked computation, equal the naive full-vocabulary fp32
computation, values and gradients (hidden, weight, bias), for every transform."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo import LogitTransform, head_logprobs

TRANSFORMS = {
    "plain": LogitTransform(),
    "granite": LogitTransform(scale=1 / 4.0),  # logits / logits_scaling
    "cohere": LogitTransform(scale=0.0625),  # logits * logit_scale
    "gemma2": LogitTransform(softcap=1.5),  # final soft-capping, strong on these logits
    "scaled_and_capped": LogitTransform(scale=3.0, softcap=2.0),
}


def _naive(hidden, weight, bias, labels, temperature, transform: LogitTransform):
    x = torch.nn.functional.linear(hidden, weight, bias).float()
    z = x * transform.scale
    if transform.softcap is not None:
        z = torch.tanh(z / transform.softcap) * transform.softcap
    logp = torch.log_softmax(z / temperature, dim=-1)
    return logp.gather(-1, labels[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_matches_naive_values_and_gradients(name, chunk):
    transform = TRANSFORMS[name]
    gen = torch.Generator().manual_seed(0)
    B, T, H, V = 3, 4, 8, 11
    hidden = torch.randn(B, T, H, generator=gen) * 2
    weight = torch.randn(V, H, generator=gen)
    bias = torch.randn(V, generator=gen)
    labels = torch.randint(0, V, (B, T), generator=gen)
    w_lp, w_ent = torch.randn(B, T, generator=gen), torch.randn(B, T, generator=gen)

    def run(fn):
        h, w, b = (t.clone().requires_grad_(True) for t in (hidden, weight, bias))
        lp, ent = fn(h, w, b)
        ((lp * w_lp).sum() + (ent * w_ent).sum()).backward()
        return lp.detach(), ent.detach(), h.grad, w.grad, b.grad

    got = run(lambda h, w, b: head_logprobs(h, w, b, labels, 0.7, transform, chunk_size=chunk))
    want = run(lambda h, w, b: _naive(h, w, b, labels, 0.7, transform))
    for g, w in zip(got, want):
        assert (g - w).abs().max() < 1e-5
    # the transform matters: without it the logprobs differ (the comparison is sharp)
    if name != "plain":
        plain, _ = head_logprobs(hidden, weight, bias, labels, 0.7)
        assert (plain - got[0]).abs().max() > 1e-2


def test_only_entropy_or_only_logprobs_in_the_loss():
    gen = torch.Generator().manual_seed(1)
    hidden = torch.randn(2, 3, 5, generator=gen, requires_grad=True)
    weight = torch.randn(7, 5, generator=gen)
    labels = torch.randint(0, 7, (2, 3), generator=gen)
    lp, _ = head_logprobs(hidden, weight, None, labels, 1.0)
    (g,) = torch.autograd.grad(lp.sum(), hidden)
    want_lp, _ = _naive(hidden, weight, None, labels, 1.0, LogitTransform())
    (w,) = torch.autograd.grad(want_lp.sum(), hidden)
    assert (g - w).abs().max() < 1e-5
    _, ent = head_logprobs(hidden, weight, None, labels, 1.0)
    (g,) = torch.autograd.grad(ent.sum(), hidden)
    _, want_ent = _naive(hidden, weight, None, labels, 1.0, LogitTransform())
    (w,) = torch.autograd.grad(want_ent.sum(), hidden)
    assert (g - w).abs().max() < 1e-5


@pytest.mark.parametrize("transform", [LogitTransform(softcap=3.0), LogitTransform(scale=1.0 / 7.0)],
                         ids=["gemma-softcap", "granite-scaling"])
def test_bf16_post_processing_happens_in_the_heads_dtype(transform):
    """Gemma's soft-cap and Granite's scaling run in bf16 in the model's forward (bf16 head
    output, then tanh / division in bf16); sampling sees those logits. Ours must match them,
    not the same transform applied in fp32 (which differs by bf16 rounding, ~1e-3 in logprob)."""
    g = torch.Generator().manual_seed(0)
    hidden = (torch.randn(2, 6, 32, generator=g) * 2).to(torch.bfloat16)
    weight = (torch.randn(50, 32, generator=g) * 2).to(torch.bfloat16)
    labels = torch.randint(0, 50, (2, 6), generator=g)
    head = torch.nn.functional.linear(hidden, weight)  # bf16
    model_side = torch.log_softmax(transform.apply(head).float(), -1).gather(-1, labels[..., None]).squeeze(-1)
    fp32_side = torch.log_softmax(transform.apply(head.float()), -1).gather(-1, labels[..., None]).squeeze(-1)
    assert (model_side - fp32_side).abs().max() > 1e-3  # the two differ: the test can tell them apart
    ours, _ = head_logprobs(hidden, weight, None, labels, 1.0, transform)
    assert torch.allclose(ours, model_side, atol=1e-6, rtol=0)
