"""Log-probabilities and entropy from logits, in fp32, chunk by chunk.

The naive ``torch.log_softmax(logits.float() / T, -1).gather(...)`` builds a
``(batch, len, vocab)`` fp32 tensor, and autograd keeps it (or the softmax)
alive until backward: for 64 x 192 tokens and a 152k vocabulary that is
7.5 GB per call, usually more than the model's own activations. Here the
forward upcasts one chunk of tokens at a time and keeps only the ``(tokens,)``
log-normaliser; backward recomputes each chunk's softmax from the original
(possibly bf16) logits. Peak extra memory is one chunk of fp32 vocabulary rows,
and results equal the naive fp32 computation: upcasting per chunk is the same
arithmetic as upcasting everything first.

:func:`head_logprobs` goes one step further for PPO: from hidden states, it applies the
LM head and the architecture's own logit post-processing (:class:`LogitTransform`:
Granite's scaling, Gemma's soft-capping, ...) inside each chunk, so no ``(batch, len,
vocab)`` logits exist in any dtype and the logprobs are those of the distribution the
model samples from.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx, once_differentiable

__all__ = ["LogitTransform", "entropy_from_logits", "head_logprobs", "logprobs_from_logits"]

# Default chunk: about 2**25 fp32 elements (128 MiB) of vocabulary rows.
_DEFAULT_CHUNK_ELEMENTS = 2**25


def _chunk_indices(batch: int, length: int, chunk_tokens: int) -> Iterator[tuple]:
    """Index tuples covering a ``(batch, length)`` grid, about ``chunk_tokens`` each.

    Whole rows are grouped when a row fits in a chunk; otherwise each row is
    split along time. Only basic slicing is used, so every chunk of a
    (possibly non-contiguous) logits tensor is a view, never a copy.
    """
    if length == 0 or batch == 0:
        return
    rows_per_chunk = chunk_tokens // length
    if rows_per_chunk >= 1:
        for b0 in range(0, batch, rows_per_chunk):
            yield (slice(b0, b0 + rows_per_chunk),)
    else:
        for b in range(batch):
            for t0 in range(0, length, chunk_tokens):
                yield (b, slice(t0, t0 + chunk_tokens))


def _as_3d(logits: Tensor) -> Tensor:
    """View ``(..., len, vocab)`` logits as ``(batch, len, vocab)``."""
    if logits.dim() < 2:
        raise ValueError(f"logits must be (..., vocab) with at least 2 dims, got {tuple(logits.shape)}")
    if logits.dim() == 2:
        return logits.unsqueeze(0)
    return logits.reshape(-1, logits.shape[-2], logits.shape[-1])


def _resolve_chunk(chunk_size: int | None, vocab: int) -> int:
    if chunk_size is None:
        return max(1, _DEFAULT_CHUNK_ELEMENTS // max(vocab, 1))
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1 token, got {chunk_size}")
    return chunk_size


class _SelectedLogprobs(torch.autograd.Function):
    """log_softmax(logits / T) at ``labels``, with a recomputing backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, logits: Tensor, labels: Tensor, temperature: float, chunk_tokens: int
    ) -> Tensor:
        batch, length, _ = logits.shape
        out = torch.empty((batch, length), dtype=torch.float32, device=logits.device)
        log_norm = torch.empty_like(out)
        for idx in _chunk_indices(batch, length, chunk_tokens):
            scaled = logits[idx].to(torch.float32) / temperature
            lab = labels[idx].unsqueeze(-1)
            selected = torch.log_softmax(scaled, dim=-1).gather(-1, lab).squeeze(-1)
            out[idx] = selected
            # log Z = x_label - log p_label; all backward needs besides the logits.
            log_norm[idx] = scaled.gather(-1, lab).squeeze(-1) - selected
        ctx.save_for_backward(logits, labels, log_norm)
        ctx.temperature = temperature
        ctx.chunk_tokens = chunk_tokens
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, labels, log_norm = ctx.saved_tensors
        temperature, chunk_tokens = ctx.temperature, ctx.chunk_tokens
        grad_logits = torch.empty_like(logits)
        batch, length, _ = logits.shape
        for idx in _chunk_indices(batch, length, chunk_tokens):
            scaled = logits[idx].to(torch.float32) / temperature
            go = grad_out[idx].to(torch.float32).unsqueeze(-1)
            # d log p_y / d x = onehot(y) - softmax(x); x = logits / T.
            grad = torch.exp(scaled - log_norm[idx].unsqueeze(-1)).mul_(-go)
            grad.scatter_add_(-1, labels[idx].unsqueeze(-1), go)
            grad_logits[idx] = grad.div_(temperature).to(logits.dtype)
        return grad_logits, None, None, None


def _p_times(logp: Tensor, x: Tensor) -> Tensor:
    """``p * x`` with ``0 * (-inf) = 0``, for vocabularies with -inf (masked) logits."""
    return torch.where(logp > -torch.inf, torch.exp(logp) * x, torch.zeros((), device=x.device))


class _Entropy(torch.autograd.Function):
    """Entropy of softmax(logits / T), with a recomputing backward."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, logits: Tensor, temperature: float, chunk_tokens: int
    ) -> Tensor:
        batch, length, _ = logits.shape
        out = torch.empty((batch, length), dtype=torch.float32, device=logits.device)
        for idx in _chunk_indices(batch, length, chunk_tokens):
            logp = torch.log_softmax(logits[idx].to(torch.float32) / temperature, dim=-1)
            out[idx] = -_p_times(logp, logp).sum(-1)
        ctx.save_for_backward(logits, out)
        ctx.temperature = temperature
        ctx.chunk_tokens = chunk_tokens
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor):  # type: ignore[override]
        logits, entropy = ctx.saved_tensors
        temperature, chunk_tokens = ctx.temperature, ctx.chunk_tokens
        grad_logits = torch.empty_like(logits)
        batch, length, _ = logits.shape
        for idx in _chunk_indices(batch, length, chunk_tokens):
            logp = torch.log_softmax(logits[idx].to(torch.float32) / temperature, dim=-1)
            go = grad_out[idx].to(torch.float32).unsqueeze(-1)
            # dH/dx_j = -p_j * (log p_j + H); x = logits / T.
            grad = _p_times(logp, logp + entropy[idx].unsqueeze(-1)).mul_(-go)
            grad_logits[idx] = grad.div_(temperature).to(logits.dtype)
        return grad_logits, None, None


def _check_temperature(temperature: float) -> float:
    temperature = float(temperature)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return temperature


def logprobs_from_logits(
    logits: Tensor, labels: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """Log-probabilities of ``labels`` under ``softmax(logits / temperature)``.

    Training must divide by the same temperature the rollout sampled with,
    otherwise the PPO ratio is not 1 on the first minibatch (N+ paper, arXiv
    2403.17031).

    Args:
        logits: ``(batch, response_len, vocab)`` in any float dtype (bf16 is
            upcast per chunk), already aligned so that ``logits[:, t]`` predicts
            ``labels[:, t]``. Any number of leading dims is accepted.
        labels: ``(batch, response_len)`` token ids, same leading shape.
        temperature: the sampling temperature.
        chunk_size: tokens per fp32 chunk; default keeps a chunk near 128 MiB
            (``2**25 // vocab`` tokens).

    Returns:
        ``(batch, response_len)`` fp32 log-probabilities, differentiable
        w.r.t. ``logits``.
    """
    temperature = _check_temperature(temperature)
    if labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must match the leading dims of logits {tuple(logits.shape)}"
        )
    logits3 = _as_3d(logits)
    labels3 = labels.reshape(logits3.shape[:-1]).long()
    chunk = _resolve_chunk(chunk_size, logits.shape[-1])
    out = _SelectedLogprobs.apply(logits3, labels3, temperature, chunk)
    return out.reshape(labels.shape)


def entropy_from_logits(
    logits: Tensor, temperature: float = 1.0, chunk_size: int | None = None
) -> Tensor:
    """Entropy of ``softmax(logits / temperature)`` at every position.

    Args:
        logits: ``(batch, response_len, vocab)`` in any float dtype; any number
            of leading dims.
        temperature: the sampling temperature.
        chunk_size: tokens per fp32 chunk, as in :func:`logprobs_from_logits`.

    Returns:
        ``(batch, response_len)`` fp32 entropies in nats, differentiable
        w.r.t. ``logits`` (for an entropy bonus).
    """
    temperature = _check_temperature(temperature)
    logits3 = _as_3d(logits)
    chunk = _resolve_chunk(chunk_size, logits.shape[-1])
    out = _Entropy.apply(logits3, temperature, chunk)
    return out.reshape(logits.shape[:-1])


# ---------------------------------------------------------------------------------------
# From hidden states: LM head, the model's own logit post-processing, then logprobs


@dataclass(frozen=True)
class LogitTransform:
    """What a causal LM does to its LM head's output ``x`` before sampling from it.

    ``z = scale * x``, then, when ``softcap`` is set, ``z = softcap * tanh(z / softcap)``.
    Granite divides by ``logits_scaling`` (scale = 1 / logits_scaling), Cohere multiplies
    by ``logit_scale``, Gemma-2/3 soft-cap with ``final_logit_softcapping``. Sampling uses
    the post-processed logits, so training logprobs must too.
    """

    scale: float = 1.0
    softcap: float | None = None

    def apply(self, x: Tensor) -> Tensor:
        """``z`` from the LM head output ``x`` (any shape)."""
        z = x * self.scale if self.scale != 1.0 else x
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        return z

    def derivative(self, x: Tensor) -> Tensor | float:
        """``dz/dx`` elementwise (a float when it is constant)."""
        if self.softcap is None:
            return self.scale
        t = torch.tanh(x * (self.scale / self.softcap))
        return self.scale * (1.0 - t * t)


class _HeadLogprobs(torch.autograd.Function):
    """Logprobs of ``labels`` and entropy under ``softmax(transform(h W^T + b) / T)``,
    ``chunk_tokens`` rows of ``h`` at a time; backward recomputes each chunk's logits."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: FunctionCtx, hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor,
        temperature: float, transform: LogitTransform, chunk_tokens: int,
    ) -> tuple[Tensor, Tensor]:
        n = hidden.shape[0]
        logprobs = torch.empty(n, dtype=torch.float32, device=hidden.device)
        entropy = torch.empty_like(logprobs)
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            # the head and its post-processing (soft-cap, scaling) run in the model's dtype,
            # as in the model's own forward, so bf16 rounding matches what generate() sampled
            # from (post-processing in fp32 was off by 2e-3 to 1e-2 in logprob); the rest is fp32
            x = torch.nn.functional.linear(hidden[s:e], weight, bias)
            logp = torch.log_softmax(transform.apply(x).float() / temperature, dim=-1)
            logprobs[s:e] = logp.gather(-1, labels[s:e, None]).squeeze(-1)
            entropy[s:e] = -_p_times(logp, logp).sum(-1)
        ctx.save_for_backward(hidden, weight, bias, labels, entropy)
        ctx.temperature, ctx.transform, ctx.chunk_tokens = temperature, transform, chunk_tokens
        return logprobs, entropy

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_logprobs: Tensor | None, grad_entropy: Tensor | None):  # type: ignore[override]
        hidden, weight, bias, labels, entropy = ctx.saved_tensors
        temperature, transform, chunk_tokens = ctx.temperature, ctx.transform, ctx.chunk_tokens
        n = hidden.shape[0]
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_b = bias is not None and ctx.needs_input_grad[2]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        for s in range(0, n, chunk_tokens):
            e = min(s + chunk_tokens, n)
            x = torch.nn.functional.linear(hidden[s:e], weight, bias)
            logp = torch.log_softmax(transform.apply(x).float() / temperature, dim=-1)
            x = x.float()
            # s = z / T:  d log p_y / ds = onehot(y) - p;  dH/ds_j = -p_j (log p_j + H)
            g = torch.zeros_like(logp)
            if grad_logprobs is not None:
                go = grad_logprobs[s:e, None].float()
                g = torch.exp(logp).mul_(-go)
                g.scatter_add_(-1, labels[s:e, None], go)
            if grad_entropy is not None:
                g = g - _p_times(logp, logp + entropy[s:e, None]) * grad_entropy[s:e, None].float()
            g = g.div_(temperature) * transform.derivative(x)  # back through z / T and z(x)
            if need_h:
                grad_h[s:e] = (g.to(weight.dtype) @ weight).to(hidden.dtype)
            if need_w:
                grad_w += g.t() @ hidden[s:e].float()
            if need_b:
                grad_b += g.sum(0)
        return (grad_h, grad_w.to(weight.dtype) if need_w else None, grad_b.to(bias.dtype) if need_b else None,
                None, None, None, None)


def head_logprobs(
    hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, temperature: float = 1.0,
    transform: LogitTransform = LogitTransform(), chunk_size: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Logprobs of ``labels`` and the entropy, straight from hidden states.

    The vocabulary logits exist one chunk of tokens at a time (never for the whole batch,
    in any dtype), with the model's own post-processing (``transform``) applied inside the
    chunk, so the result is what the model samples from at temperature ``temperature``.

    Args:
        hidden: ``(batch, response_len, hidden)`` hidden states, aligned so that position
            ``t`` predicts ``labels[:, t]``.
        weight: ``(vocab, hidden)`` LM head weight; ``bias``: ``(vocab,)`` or None.
        labels: ``(batch, response_len)`` token ids.
        temperature: the sampling temperature.
        transform: the model's logit post-processing.
        chunk_size: tokens per chunk; default keeps a chunk's fp32 logits near 128 MiB.

    Returns:
        ``(logprobs, entropy)``, each ``(batch, response_len)`` fp32, differentiable w.r.t.
        ``hidden`` (and ``weight``/``bias`` when they require grad).
    """
    temperature = _check_temperature(temperature)
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels {tuple(labels.shape)} must match the leading dims of hidden {tuple(hidden.shape)}")
    flat = hidden.reshape(-1, hidden.shape[-1])
    chunk = _resolve_chunk(chunk_size, weight.shape[0])
    lp, ent = _HeadLogprobs.apply(flat, weight, bias, labels.reshape(-1).long(), temperature, transform, chunk)
    return lp.reshape(labels.shape), ent.reshape(labels.shape)
