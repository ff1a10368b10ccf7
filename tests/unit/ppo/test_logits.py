"""Chunked fp32 log-probabilities and entropy against the naive full log_softmax."""

from __future__ import annotations

import pytest
import torch

from rlhf.ppo import entropy_from_logits, logprobs_from_logits


def _naive_logprobs(logits, labels, temperature=1.0):
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def _naive_entropy(logits, temperature=1.0):
    logp = torch.log_softmax(logits.float() / temperature, -1)
    return -(logp.exp() * logp).sum(-1)


def _inputs(seed=0, batch=3, length=7, vocab=101, dtype=torch.float32, scale=4.0):
    gen = torch.Generator().manual_seed(seed)
    logits = (torch.randn(batch, length, vocab, generator=gen) * scale).to(dtype)
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    return logits, labels


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_logprobs_and_entropy_match_naive_fp32(temperature):
    logits, labels = _inputs()
    lp = logprobs_from_logits(logits, labels, temperature)
    assert lp.shape == (3, 7) and lp.dtype == torch.float32
    torch.testing.assert_close(lp, _naive_logprobs(logits, labels, temperature), atol=1e-6, rtol=0)
    ent = entropy_from_logits(logits, temperature)
    torch.testing.assert_close(ent, _naive_entropy(logits, temperature), atol=1e-6, rtol=0)


def test_bf16_inputs_match_upcast_naive():
    logits, labels = _inputs(dtype=torch.bfloat16)
    lp = logprobs_from_logits(logits, labels, 0.7)
    assert lp.dtype == torch.float32
    torch.testing.assert_close(lp, _naive_logprobs(logits, labels, 0.7), atol=1e-6, rtol=0)
    torch.testing.assert_close(entropy_from_logits(logits, 0.7), _naive_entropy(logits, 0.7), atol=1e-6, rtol=0)


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 8, 15, 10_000])
def test_chunk_size_does_not_change_results(chunk_size):
    # 1 and 3 split each row along time, 7 is one row, 8/15 group rows, 10k is one chunk.
    logits, labels = _inputs(seed=1)
    reference_lp = logprobs_from_logits(logits, labels, 0.7, chunk_size=10_000)
    reference_ent = entropy_from_logits(logits, 0.7, chunk_size=10_000)
    assert torch.equal(logprobs_from_logits(logits, labels, 0.7, chunk_size=chunk_size), reference_lp)
    assert torch.equal(entropy_from_logits(logits, 0.7, chunk_size=chunk_size), reference_ent)


@pytest.mark.parametrize("chunk_size", [2, 7, None])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradients_match_naive(chunk_size, dtype):
    logits, labels = _inputs(seed=2, dtype=dtype)
    weights = torch.randn(3, 7, generator=torch.Generator().manual_seed(3))

    def grads(fn):
        leaf = logits.clone().requires_grad_()
        (grad,) = torch.autograd.grad((fn(leaf) * weights).sum(), leaf)
        return grad

    got = grads(lambda x: logprobs_from_logits(x, labels, 0.7, chunk_size=chunk_size))
    want = grads(lambda x: _naive_logprobs(x, labels, 0.7))
    assert got.dtype == dtype
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16 grads are rounded to bf16
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)
    got = grads(lambda x: entropy_from_logits(x, 0.7, chunk_size=chunk_size))
    want = grads(lambda x: _naive_entropy(x, 0.7))
    torch.testing.assert_close(got.float(), want.float(), atol=10 * tol, rtol=tol)


def test_gradcheck_float64():
    # logits upcast to fp32 inside, so check our analytic backward against
    # finite differences at fp32-appropriate tolerances.
    logits, labels = _inputs(seed=4, batch=2, length=3, vocab=5, scale=1.0)
    logits = logits.double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda x: logprobs_from_logits(x, labels, 0.8, chunk_size=2), (logits,), eps=1e-3, atol=1e-3, rtol=1e-3
    )
    assert torch.autograd.gradcheck(
        lambda x: entropy_from_logits(x, 0.8, chunk_size=2), (logits,), eps=1e-3, atol=1e-3, rtol=1e-3
    )


def test_non_contiguous_slice_like_a_causal_lm_shift():
    # Training takes logits[:, context-1:-1] of the full sequence: a strided view.
    full, _ = _inputs(seed=5, length=12)
    labels = torch.randint(0, 101, (3, 7), generator=torch.Generator().manual_seed(6))
    logits = full[:, 4:11]
    assert not logits.is_contiguous()
    torch.testing.assert_close(
        logprobs_from_logits(logits, labels, chunk_size=3), _naive_logprobs(logits, labels), atol=1e-6, rtol=0
    )


def test_no_full_fp32_vocab_tensor_is_kept_for_backward():
    # The point of the chunked Function: autograd saves the bf16 logits and
    # small per-token tensors, never a (batch, len, vocab) fp32 copy.
    logits, labels = _inputs(dtype=torch.bfloat16)
    leaf = logits.clone().requires_grad_()
    saved = []

    def pack(t):
        saved.append((t.dtype, t.numel()))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logprobs_from_logits(leaf, labels, 0.7, chunk_size=4)
        entropy_from_logits(leaf, 0.7, chunk_size=4)
    assert saved, "the hook saw nothing; the test would be vacuous"
    assert not any(dtype == torch.float32 and n >= logits.numel() for dtype, n in saved), saved
    # The naive path does keep one, which is what this guards against.
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _naive_logprobs(leaf, labels, 0.7)
    assert any(dtype == torch.float32 and n >= logits.numel() for dtype, n in saved)


def test_masked_vocab_entries_do_not_produce_nan():
    logits, labels = _inputs(seed=7, vocab=11)
    logits[..., -3:] = -torch.inf  # e.g. padded vocabulary slots masked out
    labels = labels % 8
    leaf = logits.clone().requires_grad_()
    ent = entropy_from_logits(leaf, 0.7)
    lp = logprobs_from_logits(leaf, labels, 0.7)
    (ent.sum() + lp.sum()).backward()
    assert torch.isfinite(ent).all() and torch.isfinite(lp).all() and torch.isfinite(leaf.grad).all()
    torch.testing.assert_close(ent, _naive_entropy(logits[..., :-3], 0.7), atol=1e-6, rtol=0)


def test_bad_arguments():
    logits, labels = _inputs()
    with pytest.raises(ValueError, match="temperature"):
        logprobs_from_logits(logits, labels, 0.0)
    with pytest.raises(ValueError, match="labels"):
        logprobs_from_logits(logits, labels[:, :3])
    with pytest.raises(ValueError, match="chunk_size"):
        entropy_from_logits(logits, chunk_size=0)
