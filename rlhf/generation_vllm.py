"""The ``vllm`` sampling engine (``ppo.generation: vllm``): vLLM beside the trainer.

vLLM loads the shared base once, from its folder, and samples the *current* policy at every
rollout: the policy LoRA is written to a fresh temporary folder (peft's layout, safetensors)
and passed as a ``LoRARequest`` with a new LoRA id, so vLLM cannot serve a cached older
adapter; the previous id is removed from the engine. The base is never merged. A standalone
(full-weight) policy, as ``rlhf generate MODEL_DIR`` samples, is simply the folder vLLM loads.
A full-weight policy that trains (a plain causal LM passed as ``model`` instead of a role
model) has its current weights loaded into the running engine at every rollout, in place,
with vLLM's worker method ``reload_weights`` through ``LLM.collective_rpc``: checkpoint names
and tensors, so vLLM's own loader fuses q/k/v and gate/up as it does from the folder.

Sampling is that of the other engines (:func:`rlhf.generation.generation_config`): the same
temperature, top_p 1, top_k 0 (off), min_p 0, no repetition penalty, ``response_length`` new
tokens, ending at any of the project's stop ids (the model's own EOS is ignored: the stop
list is the authority, as for HF ``generate``). Prompts go in as token ids and come back as
token ids (vLLM's tokenizer is never loaded), so any tokenizer the trainer reads works.
vLLM returns each drawn token's logprob after temperature (``logprobs_mode``
``processed_logprobs``); the rollout keeps them as ``Sampled.sampler_logprobs`` for the
mismatch metrics and ``ppo.rollout_is_cap`` (:mod:`rlhf.ppo.mismatch`).

vLLM draws with its own random generator, seeded per request from torch's generator: one
seed gives one rollout, but not the tokens the hf engine draws.

Memory. CPU: the KV cache is sized from the config (``kv_cache_memory_bytes``; the legacy
``VLLM_CPU_KVCACHE_SPACE`` is whole GiB only), ``ppo.vllm_kv_cache_gib`` overrides it.
GPU: vLLM takes ``ppo.vllm_gpu_memory_utilization`` of the device and sleeps between
rollouts (level 1: weights to host memory, KV cache freed), so the update has the memory.
The GPU path is written against vLLM's API but has not been run by the project (no GPU).

vLLM needs its own environment (it pins torch and transformers): ``bash scripts/setup_vllm.sh``
builds ``.venv-vllm``; run ``.venv-vllm/bin/rlhf ...`` there.
"""

from __future__ import annotations

import itertools
import os
import tempfile
from pathlib import Path

import torch

from rlhf.ppo.rollout import finish_responses

__all__ = ["VLLMEngine", "check_vllm", "kv_cache_bytes", "lora_rank_slot", "make_vllm_engine", "SETUP_HINT"]

SETUP_HINT = "build its environment with `bash scripts/setup_vllm.sh` and run `.venv-vllm/bin/rlhf ...`"

# vLLM allocates LoRA slots of these ranks only (vllm.config.lora.MaxLoRARanks)
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def check_vllm(what: str = "ppo.generation: vllm") -> None:
    """Raise a one-line ``ConfigError`` unless vLLM imports and the installed transformers is
    inside the range the installed vLLM declares (read from its package metadata)."""
    from importlib import metadata

    from rlhf.config import ConfigError

    dist_name = None
    for name in ("vllm-cpu", "vllm"):
        try:
            metadata.version(name)
            dist_name = name
            break
        except metadata.PackageNotFoundError:
            continue
    if dist_name is None:
        raise ConfigError(f"{what}: vLLM is not installed in this environment; {SETUP_HINT}")
    from packaging.requirements import Requirement

    import transformers

    for line in metadata.requires(dist_name) or []:
        req = Requirement(line)
        if req.name == "transformers" and req.marker is None and req.specifier \
                and not req.specifier.contains(transformers.__version__, prereleases=True):
            raise ConfigError(f"{what}: {dist_name} {metadata.version(dist_name)} needs transformers{req.specifier}, "
                              f"this environment has {transformers.__version__}; {SETUP_HINT}")
    try:
        import vllm  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means the same thing to the user
        raise ConfigError(f"{what}: vLLM does not import here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                          f"{SETUP_HINT}") from None


def lora_rank_slot(r: int) -> int:
    """The smallest LoRA rank vLLM allocates that holds rank ``r``."""
    for slot in _LORA_RANKS:
        if r <= slot:
            return slot
    raise ValueError(f"LoRA rank {r} is above vLLM's largest ({_LORA_RANKS[-1]})")


def kv_cache_bytes(config, num_seqs: int, max_len: int, dtype: torch.dtype, margin: float = 2.0) -> int:
    """KV cache bytes for ``num_seqs`` sequences of ``max_len`` tokens of a decoder ``config``:
    2 (K and V) x layers x KV heads x head size x element size per token, times ``margin``
    (vLLM's blocks are partly empty), at least 64 MiB."""
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    per_token = 2 * config.num_hidden_layers * heads * head_dim * torch.tensor([], dtype=dtype).element_size()
    return max(64 << 20, int(per_token * num_seqs * max_len * margin))


class VLLMEngine:
    """Sample the policy role of a :class:`rlhf.adapters.RoleModel` with vLLM (see the module doc).

    Args:
        model: the role model; its ``policy`` role is what is sampled (``save_role``), or a
            full-weight causal LM (its weights are loaded into the engine every rollout), or
            ``None`` for a standalone model (``base_path`` is then the policy).
        base_path: the base model folder vLLM loads (the trainer's base).
        temperature: sampling temperature; 0 decodes greedily (tests, ``rlhf generate``).
        stop_ids: a response ends at the first of them.
        pad_id: fills the rows after their stop.
        response_length: most new tokens.
        max_prompt_length: longest prompt (tokens), for vLLM's ``max_model_len``.
        max_num_seqs: most sequences per batch (the rollout batch).
        dtype: weights dtype of the engine (the trainer's, so that logprobs compare).
        lora_rank: the policy LoRA's rank (``None``: no LoRA).
        device: where the trainer runs; ``cuda`` selects the GPU settings.
        gpu_memory_utilization: GPU only, the share of device memory vLLM takes.
        kv_cache_gib: CPU only, KV cache space; default sized from the shape above.
        seed: the engine's seed.
        adapter_dir: a published adapter folder to sample instead of ``model``'s policy role
            (``rlhf generate`` / ``rlhf eval`` of an adapter; it never changes, so one LoRA id).
    """

    name = "vllm"

    def __init__(self, model, base_path: str, *, temperature: float, stop_ids: int | list[int], pad_id: int,
                 response_length: int, max_prompt_length: int, max_num_seqs: int, dtype: torch.dtype = torch.float32,
                 lora_rank: int | None = None, device=None, gpu_memory_utilization: float = 0.3,
                 kv_cache_gib: float | None = None, seed: int = 0, adapter_dir: str | None = None):
        check_vllm()
        from transformers import AutoConfig
        from vllm import LLM

        self.model, self.base_path = model, str(base_path)
        self.adapter_dir = str(adapter_dir) if adapter_dir is not None else None
        self.temperature = float(temperature)
        self.stop_ids = [stop_ids] if isinstance(stop_ids, int) else [int(t) for t in stop_ids]
        self.pad_id, self.response_length = pad_id, response_length
        self.on_gpu = torch.device(device).type == "cuda" if device is not None else False
        config = AutoConfig.from_pretrained(self.base_path)
        limit = getattr(config, "max_position_embeddings", None)
        max_len = max_prompt_length + response_length
        self.max_model_len = min(max_len, limit) if limit else max_len
        kwargs = dict(
            model=self.base_path, dtype=str(dtype).removeprefix("torch."), max_model_len=self.max_model_len,
            max_num_seqs=max_num_seqs, seed=seed, skip_tokenizer_init=True, logprobs_mode="processed_logprobs",
            enable_prefix_caching=False,
        )
        if lora_rank is not None:
            kwargs.update(enable_lora=True, max_loras=1, max_lora_rank=lora_rank_slot(lora_rank))
        if self.on_gpu:
            kwargs.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=True)
        else:
            kwargs.update(enforce_eager=True, kv_cache_memory_bytes=(
                int(kv_cache_gib * (1 << 30)) if kv_cache_gib is not None
                else kv_cache_bytes(config, max_num_seqs, self.max_model_len, dtype)))
            # vLLM pins its OpenMP threads to cores by default; beside a trainer on a shared
            # machine that pins the trainer too. And its engine core runs in this process: a
            # separate engine process would hold a second copy of the runtime and compete for
            # the same few cores while the trainer scores and updates. The user's settings win.
            os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        self.llm = LLM(**kwargs)
        self._ids = itertools.count(1)
        self._lora_id: int | None = None
        self.asleep = False
        if self.on_gpu:
            self.sleep()

    # -- memory (GPU): the engine holds nothing while the trainer updates -------------------
    def sleep(self) -> None:
        if self.on_gpu and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def wake_up(self) -> None:
        if self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def _policy_lora(self, folder: Path):
        """The current policy adapter, written to ``folder``, as a fresh ``LoRARequest``."""
        from vllm.lora.request import LoRARequest

        self.model.save_role("policy", folder)
        if self._lora_id is not None:  # the previous rollout's adapter: no longer the policy
            self.llm.llm_engine.remove_lora(self._lora_id)
        self._lora_id = next(self._ids)
        return LoRARequest(f"policy-{self._lora_id}", self._lora_id, str(folder))

    def _load_full_weights(self) -> None:
        """The full-weight policy's current weights, loaded into the running engine in place
        (vLLM's ``reload_weights`` on every worker; the engine's previous weights are gone)."""
        weights = [(name, t.detach()) for name, t in self.model.state_dict().items()]
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights, "is_checkpoint_format": True})
        self._lora_id = None  # reload_weights drops every loaded LoRA

    def _params(self, n: int):
        from vllm import SamplingParams

        # per-request seeds from torch's generator: the caller's torch.manual_seed fixes the rollout
        seeds = torch.randint(0, 2**31 - 1, (n,)).tolist()
        return [SamplingParams(
            n=1, temperature=self.temperature, top_p=1.0, top_k=0, min_p=0.0, repetition_penalty=1.0,
            presence_penalty=0.0, frequency_penalty=0.0, max_tokens=self.response_length, min_tokens=0,
            stop_token_ids=list(self.stop_ids), ignore_eos=True, logprobs=0, detokenize=False,
            seed=s if self.temperature > 0 else None) for s in seeds]

    @torch.no_grad()
    def sample(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor):
        """Responses (B, response_length) to left-padded prompts (B, P), truncated after the
        stop, with vLLM's logprobs of the drawn tokens (``Sampled.sampler_logprobs``)."""
        prompts = [{"prompt_token_ids": row[m.bool()].tolist()} for row, m in zip(prompt_ids.cpu(), prompt_mask.cpu())]
        params = self._params(len(prompts))
        self.wake_up()
        try:
            with tempfile.TemporaryDirectory(prefix="rlhf-vllm-policy-") as tmp:
                if self.adapter_dir is not None:
                    from vllm.lora.request import LoRARequest

                    lora = LoRARequest("adapter", 1, self.adapter_dir)
                elif self.model is not None and not hasattr(self.model, "save_role"):  # full weights
                    self._load_full_weights()
                    lora = None
                else:
                    lora = self._policy_lora(Path(tmp)) if self.model is not None and "policy" in self._roles() else None
                outs = self.llm.generate(prompts, params, lora_request=lora, use_tqdm=False)
        finally:
            self.sleep()
        B, T = len(prompts), self.response_length
        resp = torch.full((B, T), self.pad_id, dtype=torch.long)
        lps = torch.zeros(B, T, dtype=torch.float32)
        for i, out in enumerate(outs):
            c = out.outputs[0]
            toks = list(c.token_ids)[:T]
            resp[i, :len(toks)] = torch.tensor(toks, dtype=torch.long)
            if c.logprobs is not None:
                lps[i, :len(toks)] = torch.tensor([step[t].logprob for step, t in zip(c.logprobs, toks)])
        device = prompt_ids.device
        return finish_responses(resp.to(device), self.stop_ids, self.pad_id, T, prompt_ids, prompt_mask, lps.to(device))

    def _roles(self) -> set[str]:
        peft = getattr(self.model, "peft", None)
        return set(getattr(peft, "peft_config", {}) or {})


def make_vllm_engine(model, cfg, base_path: str, stop_ids: list[int], pad_id: int, device,
                     lora_rank: int | None = None) -> VLLMEngine:
    """The vllm engine of a PPO (or DPO evaluation) config ``cfg``, for the role model ``model``
    on the base folder ``base_path``, in the trainer's dtype; ``lora_rank`` defaults to ``cfg.lora.r``."""
    dtype = model.base_lm.get_input_embeddings().weight.dtype  # the trainer's, "auto" resolved
    return VLLMEngine(model, base_path, temperature=cfg.temperature, stop_ids=stop_ids, pad_id=pad_id,
                      response_length=cfg.response_length, max_prompt_length=cfg.max_prompt_length,
                      max_num_seqs=cfg.rollout_batch_size, dtype=dtype, lora_rank=lora_rank or cfg.lora.r, device=device,
                      gpu_memory_utilization=cfg.vllm_gpu_memory_utilization, kv_cache_gib=cfg.vllm_kv_cache_gib,
                      seed=cfg.seed)
