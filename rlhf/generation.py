"""Sampling: prompts in, responses out, through one of the engines of :data:`ENGINES` (``ppo.generation``).

Besides the engines (``hf``, ``static``, ``merged`` here; ``vllm`` in :mod:`rlhf.generation_vllm`),
every sampler's surroundings live here: prompt encoding and padding, the complete sampling
config, the stop tokens, the reward model's score suffix and decoding. The PPO stage, policy
evaluation (:mod:`rlhf.evaluation`), ``rlhf generate`` and ``rlhf eval`` share them.

Generation is the largest piece of a PPO batch (``../shared/docs/ppo.md``: 7.4 s of about 15
at the Qwen2.5-0.5B shape with HF ``generate``, a dynamic cache and a LoRA adapter; 1.13 s
with a static cache, compiled). Every engine samples exactly like HF ``generate`` with
:func:`generation_config`: fp32 logits of the last position divided by the
temperature, softmax, one ``torch.multinomial`` draw per row and step, finished rows padded.
So for one seed the engines draw the same tokens (fp32; ``tests/integration/ppo``).

* :class:`HFEngine` (``hf``): ``transformers`` ``generate`` with its dynamic cache.
* :class:`StaticEngine` (``static``): our own decode loop over a preallocated
  ``StaticCache``. Prompt widths are rounded up to a multiple of ``bucket`` tokens (extra left
  padding, masked), so a run sees a few (batch, width) shapes and ``torch.compile`` builds a
  bounded number of graphs, one per shape (prefill runs eagerly; only the one-token decode
  step is compiled, with CUDA graphs on a GPU). The policy LoRA is active for the whole
  loop: the role is set once outside the compiled region, never switched inside it. The
  model runs in eval mode (some transformers versions turn the KV cache off in train mode
  with gradient checkpointing on; ppo.md pitfalls).
* :class:`MergedEngine` (``merged``): the static loop on a separate copy of the base with
  the policy LoRA merged into its weights (no LoRA matmuls while sampling), refreshed before
  every rollout, so after every update. The shared base is never merged and unmerged in
  place: rounding would drift the reference, reward and value roles (ppo.md pitfalls). It
  costs one more copy of the base's weights.

Whatever the engine, the rollout's logprobs come from the scoring forward
(:func:`rlhf.scoring.score_rollout`), the same computation as the training forward, so
the first PPO ratio is 1 even where the sampling forward differs by rounding (merged bf16).
"""

from __future__ import annotations

import copy
import inspect
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

from rlhf.config import ConfigError, on_for_device
from rlhf.ppo.rollout import Sampled, finish_responses

if TYPE_CHECKING:
    from rlhf.config import PPOConfig

__all__ = ["ENGINES", "Engine", "HFEngine", "MergedEngine", "StaticEngine", "bucket_width", "build_engine",
           "choose_engine", "decode_responses", "encode_prompts", "generate", "generation_config", "left_pad",
           "make_engine", "resolve_compile", "resolve_engine", "score_suffix", "stop_token_ids"]

# Prompt widths are rounded up to a multiple of this many tokens; with max_prompt_length 256
# a run compiles at most 4 widths per batch size.
DEFAULT_BUCKET = 64


def resolve_engine(name: str, device) -> str:
    """``auto`` -> ``static`` on CUDA, ``hf`` elsewhere; other names pass through (``vllm``:
    :mod:`rlhf.generation_vllm`, built by the stage, which knows the base folder)."""
    if name != "auto" and name not in ENGINES:
        raise ValueError(f"ppo.generation must be one of {', '.join(['auto', *ENGINES])}; got {name!r}")
    if name != "auto":
        return name
    return "static" if torch.device(device).type == "cuda" else "hf"


def resolve_compile(name: str | bool, device) -> bool:
    """``auto`` -> compile on CUDA only (on a CPU it needs a C compiler and minutes)."""
    return name if isinstance(name, bool) else on_for_device(name, device, "ppo.compile")


def bucket_width(width: int, bucket: int = DEFAULT_BUCKET) -> int:
    """``width`` rounded up to a multiple of ``bucket`` (at least one bucket)."""
    return max(bucket, -(-width // bucket) * bucket)


def _stop_list(stop_ids: int | list[int]) -> list[int]:
    return [stop_ids] if isinstance(stop_ids, int) else [int(t) for t in stop_ids]


class _SamplerLogprobs:
    """A logits processor that keeps the logprob of each drawn token, as HF ``generate`` drew it.

    transformers applies user processors before its temperature warper, so this one sees the
    unwarped scores and divides by ``temperature`` itself (top_k 0 and top_p 1 change nothing
    else). Call ``k`` it keeps the (B, V) log-softmax; call ``k + 1`` reads the token drawn
    from it off ``input_ids``; :meth:`finish` reads the last one off the output. O(B x V)
    memory, not O(B x T x V) as ``output_scores`` would hold.
    """

    def __init__(self, temperature: float):
        self.temperature = float(temperature)
        self.last: torch.Tensor | None = None
        self.drawn: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.last is not None:
            self.drawn.append(self.last.gather(1, input_ids[:, -1:]).squeeze(1))
        self.last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        return scores

    def finish(self, response: torch.Tensor) -> torch.Tensor:
        """(B, T) logprobs of the T tokens of ``response`` (B, T)."""
        if self.last is not None and len(self.drawn) < response.shape[1]:
            self.drawn.append(self.last.gather(1, response[:, len(self.drawn):len(self.drawn) + 1]).squeeze(1))
        self.last = None
        if not self.drawn:
            return torch.zeros(response.shape, dtype=torch.float32, device=response.device)
        return torch.stack(self.drawn, dim=1)


class _EvalMode:
    """Eval mode for the block, then the previous mode back (a module walk per rollout, not per step)."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.was_training = module, module.training

    def __enter__(self):
        self.module.eval()

    def __exit__(self, *exc):
        self.module.train(self.was_training)


class HFEngine:
    """``transformers`` ``generate`` with a dynamic cache (the reference engine).

    Args:
        model: the :class:`rlhf.adapters.RoleModel`; sampling runs under its policy role.
        gen_cfg: a complete ``GenerationConfig`` (:func:`generation_config`).
    """

    name = "hf"

    def __init__(self, model, gen_cfg, stop_ids: int | list[int], pad_id: int, response_length: int):
        self.model, self.gen_cfg = model, gen_cfg
        self.stop_ids, self.pad_id, self.response_length = _stop_list(stop_ids), pad_id, response_length

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Sampled:
        """Responses (B, response_length) to left-padded prompts (B, P), truncated after the stop."""
        from transformers import GenerationConfig

        # transformers fills every field we leave unset (None) from the model's own
        # generation_config.json (min_p, min_length, suppress_tokens, ...), so the model's
        # defaults are swapped for neutral ones during the call: only ``gen_cfg`` counts.
        from transformers import LogitsProcessorList

        lm = self.model.base_lm
        keep = _SamplerLogprobs(self.gen_cfg.temperature if self.gen_cfg.do_sample else 1.0)
        saved, lm.generation_config = lm.generation_config, GenerationConfig()
        try:
            with self.model.role("policy"), _EvalMode(self.model), self.model.autocast(prompt_ids.device):
                out = lm.generate(input_ids=prompt_ids, attention_mask=prompt_mask, generation_config=self.gen_cfg,
                                  logits_processor=LogitsProcessorList([keep]))
        finally:
            lm.generation_config = saved
        resp = out[:, prompt_ids.shape[1]:]
        return finish_responses(resp, self.stop_ids, self.pad_id, self.response_length, prompt_ids, prompt_mask,
                       keep.finish(resp))


class StaticEngine:
    """Our decode loop over a preallocated static KV cache, optionally compiled.

    Args:
        model: the :class:`rlhf.adapters.RoleModel`; sampling runs under its policy role.
        temperature: sampling temperature (top_k 0, top_p 1: nothing else shapes the logits).
        compile: ``torch.compile`` the one-token decode step (CUDA graphs on a GPU).
        bucket: prompt widths are rounded up to a multiple of this.
        stop_check_every: decode steps between checks that every row has stopped (each check
            is a host sync).
    """

    name = "static"

    def __init__(self, model, temperature: float, stop_ids: int | list[int], pad_id: int, response_length: int,
                 compile: bool = False, bucket: int = DEFAULT_BUCKET, stop_check_every: int = 8):
        self.model, self.temperature = model, float(temperature)
        self.stop_ids, self.pad_id, self.response_length = _stop_list(stop_ids), pad_id, response_length
        self.compile, self.bucket, self.stop_check_every = compile, bucket, stop_check_every
        self._caches: dict[tuple, object] = {}  # (batch, length, dtype, device) -> StaticCache
        self._step = None  # the (compiled) decode step of the sampling LM
        self.shapes_seen: set[tuple[int, int]] = set()  # (batch, bucketed width): one graph each
        self._params: dict[type, set[str]] = {}  # forward() parameter names per model class

    def _lm(self):
        """The causal LM that samples (the shared base with the policy LoRA)."""
        return self.model.base_lm

    def _sampling(self, device):
        """Context of one rollout: the policy role (set once, outside any compiled code), eval
        mode, and the role model's autocast (bf16 LoRA matmuls on CUDA, as in scoring)."""
        return _Both(self.model.role("policy"), _EvalMode(self.model), self.model.autocast(device))

    def _cache(self, lm, batch: int, length: int, dtype, device):
        from transformers import StaticCache

        key = (batch, length, dtype, str(device))
        cache = self._caches.get(key)
        if cache is None:
            # one cache per shape, reused across rollouts: constant addresses for CUDA graphs
            cache = StaticCache(config=lm.config, max_cache_len=length)
            self._caches[key] = cache
        else:
            cache.reset()
        return cache

    def _forward_kwargs(self, lm, cache, position: int, q_len: int, device) -> dict:
        params = self._params.get(type(lm))
        if params is None:  # read once per model class, not per decode step
            params = self._params[type(lm)] = set(inspect.signature(type(lm).forward).parameters)
        # transformers renamed past_key_values to cache (5.2x; the old name warns until 5.40)
        kw = {"cache" if "cache" in params else "past_key_values": cache, "use_cache": True}
        # transformers <= 5.2x takes the cache write position explicitly; later versions track
        # it inside the cache (and no longer accept the argument)
        if "cache_position" in params:
            kw["cache_position"] = torch.arange(position, position + q_len, device=device)
        return kw

    def _decode_step(self, lm):
        if self._step is None:
            def step(input_ids, attention_mask, position_ids, **kw):
                return lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                          logits_to_keep=1, **kw).logits[:, -1]

            self._step = step
            if self.compile:
                mode = "reduce-overhead" if next(lm.parameters()).is_cuda else None
                self._step = torch.compile(step, mode=mode, dynamic=False, fullgraph=False)
        return self._step

    def _draw(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One token per row, exactly as HF sampling: fp32 copy, / T, softmax, multinomial;
        and the drawn tokens' logprobs (B,)."""
        scores = logits.to(copy=True, dtype=torch.float32) / self.temperature
        tok = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1)
        return tok.squeeze(1), torch.log_softmax(scores, dim=-1).gather(1, tok).squeeze(1)

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Sampled:
        """Responses (B, response_length) to left-padded prompts (B, P), truncated after the stop."""
        B, P = prompt_ids.shape
        T = self.response_length
        W = bucket_width(P, self.bucket)
        device = prompt_ids.device
        # extra left padding up to the bucket's width; masked, so it changes nothing
        ids = torch.nn.functional.pad(prompt_ids, (W - P, 0), value=self.pad_id)
        mask = torch.nn.functional.pad(prompt_mask.long(), (W - P, 0), value=0)
        # one (B, W + T) mask for every step: later positions are hidden by causality anyway,
        # and a fixed shape keeps the compiled decode step to one graph per bucket
        full_mask = torch.cat([mask, torch.ones(B, T, dtype=mask.dtype, device=device)], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        next_pos = positions[:, -1:] + 1  # (B, 1): the first response token's position
        self.shapes_seen.add((B, W))
        out = torch.full((B, T), self.pad_id, dtype=prompt_ids.dtype, device=device)
        out_lp = torch.zeros(B, T, dtype=torch.float32, device=device)
        unfinished = torch.ones(B, dtype=torch.bool, device=device)
        stops = torch.tensor(self.stop_ids, dtype=prompt_ids.dtype, device=device)
        with self._sampling(device):
            lm = self._lm()
            cache = self._cache(lm, B, W + T, next(lm.parameters()).dtype, device)
            logits = lm(input_ids=ids, attention_mask=full_mask, position_ids=positions, logits_to_keep=1,
                        **self._forward_kwargs(lm, cache, 0, W, device)).logits[:, -1]
            step = self._decode_step(lm)
            for t in range(T):
                tok, lp = self._draw(logits)
                tok = torch.where(unfinished, tok, torch.full_like(tok, self.pad_id))
                out[:, t] = tok
                out_lp[:, t] = lp
                unfinished &= ~torch.isin(tok, stops)
                if t == T - 1 or ((t + 1) % self.stop_check_every == 0 and not bool(unfinished.any())):
                    break
                logits = step(tok[:, None], full_mask, next_pos + t, **self._forward_kwargs(lm, cache, W + t, 1, device))
        return finish_responses(out, self.stop_ids, self.pad_id, T, prompt_ids, prompt_mask, out_lp)


class MergedEngine(StaticEngine):
    """The static loop on a separate merged copy of base + policy LoRA (see the module doc).

    The copy is the base causal LM with every LoRA layer replaced by a plain copy of its base
    linear layer; before each rollout its weights are set to ``W_base + delta_policy`` (peft's
    ``get_delta_weight``), computed from the frozen base, so nothing accumulates.
    """

    name = "merged"

    def __init__(self, model, *args, **kwargs):
        super().__init__(model, *args, **kwargs)
        from peft.tuners.lora import LoraLayer

        lm = model.base_lm
        self._merged = copy.deepcopy(lm)
        self._pairs: list[tuple[object, torch.nn.Linear]] = []
        sources = dict(lm.named_modules())
        for name, module in list(self._merged.named_modules()):
            if isinstance(module, LoraLayer):
                plain = module.base_layer
                self._merged.set_submodule(name, plain)
                self._pairs.append((sources[name], plain))
        for p in self._merged.parameters():
            p.requires_grad_(False)
        self._merged.eval()

    def _lm(self):
        return self._merged

    def _sampling(self, device):
        return _Both()  # the copy has no roles, no fp32 LoRA matrices, and is always in eval mode

    @torch.no_grad()
    def refresh(self) -> None:
        """Set the copy's weights to base + the policy's current LoRA delta."""
        for lora_layer, plain in self._pairs:
            base = lora_layer.base_layer.weight
            if "policy" in lora_layer.lora_A:
                delta = lora_layer.get_delta_weight("policy")
                plain.weight.copy_((base.float() + delta.float()).to(plain.weight.dtype))
            else:
                plain.weight.copy_(base)

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Sampled:
        self.refresh()  # every rollout follows an update (or the start): sample the current policy
        return super().sample(prompt_ids, prompt_mask)


class _Both:
    """Enter several context managers as one (``contextlib.ExitStack`` without the ceremony)."""

    def __init__(self, *ctxs):
        self.ctxs = ctxs

    def __enter__(self):
        for c in self.ctxs:
            c.__enter__()

    def __exit__(self, *exc):
        for c in reversed(self.ctxs):
            c.__exit__(*exc)


def make_engine(name: str, model, gen_cfg, *, temperature: float, stop_ids: int | list[int], pad_id: int, response_length: int,
                compile: str | bool = "auto", device=None):
    """The engine ``name`` (``auto``/``hf``/``static``/``merged``) for ``model`` on ``device``."""
    device = device if device is not None else next(model.parameters()).device
    name = resolve_engine(name, device)
    if name == "vllm":
        raise ValueError("make_engine: the vllm engine is built by rlhf.generation_vllm.make_vllm_engine (it needs the base folder)")
    if name == "hf":
        return HFEngine(model, gen_cfg, stop_ids, pad_id, response_length)
    cls = StaticEngine if name == "static" else MergedEngine
    return cls(model, temperature, stop_ids, pad_id, response_length, compile=resolve_compile(compile, device))


# ---------------------------------------------------------------------------------------
# prompts in, responses out: what every caller of an engine needs around it


def _render_prompt(tok, msgs: list[dict]) -> list[int]:
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tok(text, add_special_tokens=False).input_ids


def shorter_prompts(msgs: list[dict]) -> Iterator[list[dict]]:
    """``msgs`` with ever more early turns dropped, one at a time: the system turn (if any)
    and the last turn stay, and the kept turns start with a user turn. The one rule for a too
    long prompt, in PPO's prompts (:func:`encode_prompts`) and the reward model's held-out
    pairs (:func:`rlhf.stages.common.fit_pair`)."""
    system = list(msgs[:1]) if msgs and msgs[0].get("role") == "system" else []
    rest = list(msgs[len(system):])
    while len(rest) > 1:
        rest = rest[1:]
        while len(rest) > 1 and rest[0].get("role") != "user":
            rest = rest[1:]
        yield system + rest


def encode_prompts(tok, prompts: list[list[dict]], max_len: int) -> list[list[int]]:
    """Chat-template each prompt (with the generation prompt), at most ``max_len`` tokens.

    A longer prompt loses whole early turns, never part of a message: the system turn (if
    any) and the last turn stay, and the kept turns start with a user turn. Only when the
    system turn and the last turn alone are too long is the prompt cut from the left (its
    last ``max_len`` tokens). Both counts are reported in one warning.
    """
    out, dropped_turns, cut = [], 0, 0
    for msgs in prompts:
        ids = _render_prompt(tok, msgs)
        if len(ids) > max_len:
            for shorter in shorter_prompts(msgs):
                ids = _render_prompt(tok, shorter)
                if len(ids) <= max_len:
                    break
            dropped_turns += 1
            if len(ids) > max_len:
                cut += 1
                ids = ids[-max_len:]
        out.append(ids)
    if dropped_turns:
        import warnings

        warnings.warn(f"{dropped_turns} of {len(prompts)} prompts are longer than max_prompt_length={max_len} tokens: "
                      f"{dropped_turns - cut} lost early turns (the system turn kept), {cut} were cut from the left "
                      "inside a message (the last turn alone is too long); raise max_prompt_length to keep them whole",
                      stacklevel=2)
    return out


def left_pad(seqs: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        if s:
            ids[i, width - len(s):] = torch.tensor(s)
            mask[i, width - len(s):] = 1
    return ids.to(device), mask.to(device)


def generation_config(cfg: PPOConfig, stop_ids: int | list[int], pad_id: int):
    """A complete sampling config: every knob set, so the model's generation_config.json
    (e.g. a baked-in top_k or repetition penalty) cannot leak into PPO sampling. Generation
    ends at any of ``stop_ids``."""
    from transformers import GenerationConfig

    return GenerationConfig(
        do_sample=True, temperature=cfg.temperature, top_k=0, top_p=1.0, min_p=None, typical_p=1.0,
        repetition_penalty=1.0, no_repeat_ngram_size=0, max_new_tokens=cfg.response_length, min_new_tokens=0,
        eos_token_id=_stop_list(stop_ids), pad_token_id=pad_id, bos_token_id=None, num_beams=1, use_cache=True,
        suppress_tokens=None, begin_suppress_tokens=None, bad_words_ids=None, forced_eos_token_id=None,
    )


def generate(model, prompt_ids, prompt_mask, gen_cfg, stop_ids: int | list[int], pad_id: int,
             response_length: int) -> Sampled:
    """Sample responses with the policy role (eval mode) through HF ``generate`` (the ``hf``
    engine of :mod:`rlhf.generation`); truncate each after its first stop token (any of
    ``stop_ids``) and pad to exactly ``response_length``."""
    return HFEngine(model, gen_cfg, stop_ids, pad_id, response_length).sample(prompt_ids, prompt_mask)


def score_suffix(tok, stop_ids: list[int]) -> list[int]:
    """Tokens the chat template writes after an assistant turn's stop token.

    TRL's RewardTrainer scores the last token of the chat-templated conversation; for
    ChatML that is the newline after ``<|im_end|>``, not the stop token. PPO appends these
    tokens after a response's stop token before scoring, so the reward model scores where
    it was trained to. Empty when the template ends the turn with the stop token."""
    sentinel = "rlhfscoresentinel"
    msgs = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": sentinel}]
    text = tok.apply_chat_template(msgs, tokenize=False)
    tail = tok(text[text.rindex(sentinel) + len(sentinel):], add_special_tokens=False).input_ids
    while tail and tail[0] not in stop_ids:  # whitespace the template puts before the stop token
        tail = tail[1:]
    return [t for t in tail[1:]] if tail else []


def stop_token_ids(tok, cfg: PPOConfig, lm=None) -> list[int]:
    """Token ids that end a response: ``ppo.stop_token`` (one token or a list), or by default
    :func:`rlhf.models.stop_token_ids`: the tokenizer's EOS, every EOS id of the model's
    generation config (Qwen2.5 Instruct ships two: ``<|im_end|>`` and ``<|endoftext|>``) and
    the chat template's end-of-turn token (``<|im_end|>`` on Qwen2.5 base, whose EOS is
    ``<|endoftext|>``)."""
    from rlhf.models import stop_token_ids as default_stop_ids

    if cfg.stop_token is None:
        ids = default_stop_ids(tok, lm)
    else:
        ids = []
        for name in cfg.stop_token if isinstance(cfg.stop_token, list) else [cfg.stop_token]:
            i = tok.convert_tokens_to_ids(name)
            if i is None or i == tok.unk_token_id:
                raise ValueError(f"ppo.stop_token {name!r} is not a single token of the tokenizer")
            ids.append(i)
    ids = list(dict.fromkeys(i for i in ids if i is not None))
    if tok.pad_token_id in ids:
        raise ValueError(f"ppo.stop_token: the pad token {tok.pad_token!r} cannot also be a stop token")
    return ids


def decode_responses(tok, batch: Sampled | ScoredRollout) -> list[str]:
    texts = []
    for ids, m in zip(batch.response_ids, batch.response_mask):
        n = int(m.sum())
        texts.append(tok.decode(ids[:n].tolist(), skip_special_tokens=True))
    return texts


# ---------------------------------------------------------------------------------------
# the engines by name


class Engine(Protocol):
    """What the PPO loop, the evaluation and DPO's evaluation ask of a sampling engine."""

    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Sampled:
        """Responses (B, response_length) to left-padded prompts (B, P), truncated after the
        first stop token, with the sampler's logprobs of the drawn tokens."""


@dataclass(frozen=True)
class EngineSpec:
    """One row of :data:`ENGINES`."""

    build: Callable[..., Engine]  # build(model, cfg, *, gen_cfg, stop_ids, pad_id, device, base_path) -> Engine
    shardable: bool = False  # runs inside FSDP2's weight gathering (a sharded role model)
    multi_process: bool = True  # one engine per process under accelerate launch


def _hf(model, cfg, *, gen_cfg, stop_ids, pad_id, device, base_path):
    return HFEngine(model, gen_cfg, stop_ids, pad_id, cfg.response_length)


def _static(model, cfg, *, gen_cfg, stop_ids, pad_id, device, base_path):
    return StaticEngine(model, cfg.temperature, stop_ids, pad_id, cfg.response_length,
                        compile=resolve_compile(cfg.compile, device))


def _merged(model, cfg, *, gen_cfg, stop_ids, pad_id, device, base_path):
    return MergedEngine(model, cfg.temperature, stop_ids, pad_id, cfg.response_length,
                        compile=resolve_compile(cfg.compile, device))


def _vllm(model, cfg, *, gen_cfg, stop_ids, pad_id, device, base_path):
    from rlhf.generation_vllm import make_vllm_engine

    return make_vllm_engine(model, cfg, base_path, stop_ids, pad_id, device)


#: ``ppo.generation`` names (besides ``auto``): a new engine is a class with ``sample`` and a row here.
ENGINES: dict[str, EngineSpec] = {
    "hf": EngineSpec(_hf, shardable=True),
    "static": EngineSpec(_static),
    "merged": EngineSpec(_merged),
    "vllm": EngineSpec(_vllm, multi_process=False),
}


def choose_engine(name: str, device, sharded: bool) -> str:
    """The generation engine to build: ``name`` resolved for ``device``.

    Under FSDP2 only ``hf`` has been run inside the weight-gathering context; ``static``
    (compiled graphs over a static cache) and ``merged`` (a merged copy of base + policy)
    would hold or bake full weights outside it. ``auto`` therefore falls back to ``hf`` on a
    sharded model, and an explicit ``static``/``merged`` is refused.

    Raises:
        ConfigError: naming ``ppo.generation`` when the engine cannot run on a sharded model.
    """
    resolved = resolve_engine(name, device)
    spec = ENGINES[resolved]
    if not spec.multi_process:
        from rlhf import distributed as dist

        if dist.is_distributed():
            raise ConfigError(f"ppo.generation: {resolved!r} runs in one process only (one engine beside one trainer); "
                              "use 'hf' or 'auto' under accelerate launch")
        return resolved
    if sharded and not spec.shardable:
        if name != "auto":
            raise ConfigError(f"ppo.generation: {name!r} is not supported under FSDP2 (sharded weights); use 'hf' or 'auto'")
        return "hf"
    return resolved


def build_engine(cfg: PPOConfig, model, *, gen_cfg, stop_ids: list[int], pad_id: int, device, base_path: str,
                 sharded: bool = False) -> Engine:
    """The sampling engine ``cfg.generation`` names, resolved for ``device`` (:func:`choose_engine`)."""
    name = choose_engine(cfg.generation, device, sharded=sharded)
    return ENGINES[name].build(model, cfg, gen_cfg=gen_cfg, stop_ids=stop_ids, pad_id=pad_id, device=device,
                               base_path=base_path)
