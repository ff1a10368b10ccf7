"""One frozen base model, many LoRA roles: sft, policy, reward, value.

PPO needs four networks. Instead of four model copies and two optimizers over full
weights (TRL's PPOTrainer ran out of memory at 7B on one 80 GB GPU, trl issue 2719), we
keep one frozen base and switch LoRA adapters:

  * ``sft``    frozen; the reference policy (the SFT adapter itself, not the bare base:
               disabling adapters would give the base model, the mistake of TRL's PEFT
               path, trl issues 1340 and 495).
  * ``policy`` trainable; starts as an exact copy of ``sft``.
  * ``reward`` frozen; the reward model's LoRA plus its score head.
  * ``value``  trainable; starts as a copy of ``reward``, head included (critic
               initialised from the reward model, N+ details, arXiv 2403.17031).

When the SFT stage fine-tuned all weights, the base *is* the SFT model: the ``sft`` role
is the base with adapters disabled, and ``policy`` starts as a zero-initialised LoRA.

The adapter directory layout is defined here once (:data:`ADAPTER_CONFIG` ...): peft's
``adapter_config.json`` + ``adapter_model.safetensors``; reward/value directories also hold
``head.safetensors`` (``weight`` (1, hidden), optional ``bias`` (1,)); a published artifact
adds ``rlhf_adapter.json`` (role, base, provenance) and ``config.yaml`` (the resolved stage
config). Everything is safetensors or JSON/YAML; nothing is unpickled.
"""

from __future__ import annotations

import json
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

# The adapter directory layout. The first two names are peft's own (save_pretrained writes
# them), so a published adapter loads with peft directly.
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
HEAD_FILE = "head.safetensors"  # score head of reward/value roles
METADATA_FILE = "rlhf_adapter.json"  # {"role", "base_path", ...} written by rlhf.stages.common.publish
CONFIG_FILE = "config.yaml"  # the resolved config of the stage that produced the artifact

ROLES = ("sft", "policy", "reward", "value")
TRAINABLE = ("policy", "value")


def linear_target_modules(model: torch.nn.Module) -> list[str]:
    """Names (last component) of every nn.Linear inside the decoder blocks.

    We resolve 'all-linear' ourselves so that the causal-LM and the sequence-classifier
    views of one base get identical adapters (peft's own 'all-linear' can pick up the
    classifier's ``score`` layer), which lets roles copy each other's weights.
    """
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    names = {n.split(".")[-1] for n, m in decoder.named_modules() if isinstance(m, torch.nn.Linear)}
    return sorted(names)


@dataclass(frozen=True)
class InMemoryAdapter:
    """An adapter that was never written to disk (the benchmark's size probe builds 14B-32B
    shapes on the GPU and must not write tens of GB): what an adapter directory holds.

    Attributes:
        state: peft LoRA tensors, keyed as in ``adapter_model.safetensors``.
        config: the ``adapter_config.json`` fields (r, lora_alpha, target_modules, ...).
        head: ``{"weight": (1, hidden), optional "bias": (1,)}`` for reward adapters, else None.
    """

    state: dict
    config: dict
    head: dict | None = None


def read_lora_weights(adapter_dir: str | Path | InMemoryAdapter) -> tuple[dict, dict]:
    """LoRA tensors and peft config of a saved adapter (head tensors are not included)."""
    if isinstance(adapter_dir, InMemoryAdapter):
        return adapter_dir.state, adapter_dir.config
    adapter_dir = Path(adapter_dir)
    cfg_path, weights_path = adapter_dir / ADAPTER_CONFIG, adapter_dir / ADAPTER_WEIGHTS
    for p in (cfg_path, weights_path):
        if not p.is_file():
            raise FileNotFoundError(f"adapter file missing: {p}")
    state = {k: v for k, v in load_file(str(weights_path)).items() if "lora_" in k}
    if not state:
        raise ValueError(f"{weights_path}: holds no LoRA tensors")
    return state, json.loads(cfg_path.read_text())


def read_head(adapter_dir: str | Path | InMemoryAdapter) -> dict[str, torch.Tensor]:
    if isinstance(adapter_dir, InMemoryAdapter):
        if adapter_dir.head is None:
            raise ValueError("in-memory reward adapter has no head")
        return adapter_dir.head
    path = Path(adapter_dir) / HEAD_FILE
    if not path.is_file():
        raise FileNotFoundError(f"score head missing: {path} (reward adapters need {HEAD_FILE})")
    head = load_file(str(path))
    if "weight" not in head or head["weight"].ndim != 2 or head["weight"].shape[0] != 1:
        raise ValueError(f"{path}: 'weight' must have shape (1, hidden)")
    return head


def save_head(head: torch.nn.Linear, adapter_dir: str | Path) -> None:
    tensors = {"weight": head.weight.detach().float().cpu().contiguous()}
    if head.bias is not None:
        tensors["bias"] = head.bias.detach().float().cpu().contiguous()
    save_file(tensors, str(Path(adapter_dir) / HEAD_FILE))


def _lora_config(peft_cfg: dict, target_modules: list[str] | None = None):
    """A LoRA config for a role: the saved adapter's shape, dropout off (PPO needs
    deterministic train-mode forwards)."""
    from peft import LoraConfig

    return LoraConfig(
        r=peft_cfg["r"],
        lora_alpha=peft_cfg["lora_alpha"],
        lora_dropout=0.0,
        target_modules=target_modules or peft_cfg["target_modules"],
        use_rslora=peft_cfg.get("use_rslora", False),
        bias="none",
        task_type="CAUSAL_LM",
    )


class RoleModel(torch.nn.Module):
    """A causal LM base with LoRA roles and two scalar heads (reward, value).

    Args:
        base: the causal LM (frozen).
        sft_adapter: SFT adapter directory, or None when the base itself is the SFT model.
        reward_adapter: reward adapter directory (with its score head), or None for a model
            without reward and value roles (sampling and KL only, e.g. DPO's evaluation); or
            a list of them, an ensemble: the first is the ``reward`` role, the others the
            frozen roles ``reward-1``, ``reward-2``, ... (:attr:`reward_roles`), each with its
            own LoRA and head on the same base, so that all score one mixed-adapter batch.
        policy_lora: LoRA shape for a fresh policy when ``sft_adapter`` is None
            (dict with r, lora_alpha, target_modules).
        with_value: build the ``value`` role (LoRA + head). False for critic-free
            estimators: no memory, parameters or optimizer state for a critic.
    """

    def __init__(self, base, sft_adapter: str | None, reward_adapter: str | list | None, policy_lora: dict | None = None,
                 with_value: bool = True):
        super().__init__()
        from peft import get_peft_model, set_peft_model_state_dict

        from rlhf.models import disable_dropout

        for p in base.parameters():
            p.requires_grad_(False)
        disable_dropout(base)  # PPO runs its forwards in train mode
        members = list(reward_adapter) if isinstance(reward_adapter, (list, tuple)) else (
            [] if reward_adapter is None else [reward_adapter])
        reward_adapter = members[0] if members else None
        self.has_sft_adapter = sft_adapter is not None
        self.has_reward = reward_adapter is not None
        # the ensemble's members: "reward" (the value role's start) and "reward-1", "reward-2", ...
        self.reward_roles = tuple("reward" if i == 0 else f"reward-{i}" for i in range(len(members)))
        with_value = with_value and self.has_reward  # the value role starts as a copy of the reward role
        self.roles = tuple(r for r in ROLES if (r != "value" or with_value) and (r != "reward" or self.has_reward)
                           ) + self.reward_roles[1:]

        reward_state, reward_cfg = read_lora_weights(reward_adapter) if self.has_reward else (None, None)
        if sft_adapter is not None:
            sft_state, sft_cfg = read_lora_weights(sft_adapter)
            policy_cfg, policy_state = sft_cfg, sft_state
        else:
            policy_cfg = dict(policy_lora or {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"})
            if policy_cfg["target_modules"] == "all-linear":
                # resolved like every other role's; left to peft, a fresh adapter would get
                # its model-type default (q_proj, v_proj only)
                policy_cfg["target_modules"] = linear_target_modules(base)
            policy_state = None

        first = "policy"
        self.peft = get_peft_model(base, _lora_config(policy_cfg), adapter_name=first)
        load = []
        if policy_state is not None:
            load.append(("policy", policy_state))
            self.peft.add_adapter("sft", _lora_config(sft_cfg))
            load.append(("sft", sft_state))
        for name in ("reward", "value")[: 2 if with_value else 1] if self.has_reward else ():
            self.peft.add_adapter(name, _lora_config(reward_cfg))
            load.append((name, reward_state))
        for name, member in zip(self.reward_roles[1:], members[1:]):
            member_state, member_cfg = read_lora_weights(member)
            self.peft.add_adapter(name, _lora_config(member_cfg))
            load.append((name, member_state))
        for name, state in load:
            result = set_peft_model_state_dict(self.peft, state, adapter_name=name)
            missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k]
            if missing:
                raise ValueError(f"adapter for role {name!r} does not fit the base model: unexpected keys {missing[:3]}")

        self.heads = torch.nn.ModuleDict()
        dtype = next(base.parameters()).dtype
        hidden = base.config.get_text_config().hidden_size if hasattr(base.config, "get_text_config") else base.config.hidden_size
        heads = [(name, False, member) for name, member in zip(self.reward_roles, members)]
        if with_value:
            heads.insert(1, ("value", True, reward_adapter))
        for name, trainable, member in heads:
            head = read_head(member)
            if head["weight"].shape[1] != hidden:
                raise ValueError(f"{member}/{HEAD_FILE}: hidden size {head['weight'].shape[1]} != base {hidden}")
            lin = torch.nn.Linear(hidden, 1, bias="bias" in head)
            with torch.no_grad():
                lin.weight.copy_(head["weight"])
                if "bias" in head:
                    lin.bias.copy_(head["bias"])
            lin.to(dtype=torch.float32)
            lin.requires_grad_(trainable)
            self.heads[name] = lin
        self._compute_dtype = dtype
        # the logits generate() samples from are the head's output post-processed by the
        # architecture (Granite scaling, Gemma soft-capping, ...); verified once here
        from rlhf.models import check_logit_transform, logit_transform

        self.logit_transform = logit_transform(base)
        check_logit_transform(base, self.logit_transform)
        self._install_role_handles()
        self.active_role: str | None = None
        self.activate("policy")

    # ---- role switching -------------------------------------------------------------

    def _install_role_handles(self) -> None:
        """Point every LoRA layer at one shared active-adapter list, once.

        peft's ``set_adapter`` walks every module of the model and sets ``requires_grad``
        on each adapter (35 ms at 24 layers, 104 ms at 64; PPO switches about 80 times per
        batch). peft's layers read their active adapters from ``layer._active_adapter``
        (a str or a list) at every forward, so all layers here share one list object and a
        switch rewrites that list in place: constant time whatever the depth. The ``sft``
        role without an adapter (full-SFT base) is the empty list, which peft's forward
        treats as "no adapter" exactly like ``disable_adapter()``. Trainable flags are set
        here once: they do not depend on the active role. peft's own ``set_adapter`` must not
        be called on this model afterwards (it would replace the shared list per layer).
        """
        from peft.tuners.lora import LoraLayer

        self._lora_layers = [m for m in self.peft.modules() if isinstance(m, LoraLayer)]
        self._active_adapters: list[str] = ["policy"]
        for layer in self._lora_layers:
            layer._active_adapter = self._active_adapters
            for attr in ("lora_A", "lora_B"):
                for key, sub in getattr(layer, attr).items():
                    sub.requires_grad_(key in TRAINABLE)
        self.peft.base_model.active_adapter = self._active_adapters

    def activate(self, role: str) -> None:
        """Make ``role`` the active adapter, in constant time (see ``_install_role_handles``)."""
        if role not in self.roles:
            raise ValueError(f"unknown role {role!r}; roles of this model: {self.roles}")
        self._active_adapters[:] = [] if (role == "sft" and not self.has_sft_adapter) else [role]
        self.active_role = role

    @contextmanager
    def role(self, role: str):
        """Run the block under ``role``, then restore the previous role."""
        previous = self.active_role
        self.activate(role)
        try:
            yield self
        finally:
            if previous is not None:
                self.activate(previous)

    def adapter_name(self, role: str) -> str:
        """The peft adapter name that computes ``role`` in a mixed-adapter batch
        (``__base__`` for the sft role of a full-SFT base, which has no adapter)."""
        return "__base__" if (role == "sft" and not self.has_sft_adapter) else role

    # ---- forwards -------------------------------------------------------------------

    @property
    def base_lm(self):
        return self.peft.base_model.model

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Last hidden states of the active role. Positions come from the attention mask so
        left padding does not shift them. Returns (B, L, H)."""
        position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
        with self.autocast(input_ids.device):
            out = self.base_lm.get_decoder()(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
            )
        return out.last_hidden_state

    def autocast(self, device: torch.device):
        """bf16 autocast on CUDA when the base is bf16: the LoRA matrices (kept in fp32 by
        peft) then run on the bf16 tensor cores too. Elsewhere exact: no autocast. Used by
        every forward of the roles (generation, scoring, update), so all compute alike."""
        if device.type == "cuda" and self._compute_dtype == torch.bfloat16:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return nullcontext()

    def lm_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of selected hidden states (..., H) -> (..., V), post-processed
        as the model's own forward does (the logits it samples from)."""
        return self.logit_transform.apply(self.base_lm.get_output_embeddings()(hidden))

    def token_logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, temperature: float):
        """Logprobs of ``labels`` (B, T) and entropies (B, T), fp32, at ``temperature`` from
        hidden states (B, T, H) whose position t predicts ``labels[:, t]``; the vocabulary
        logits exist one chunk of tokens at a time (:func:`rlhf.ppo.head_logprobs`)."""
        from rlhf.ppo import head_logprobs

        head = self.base_lm.get_output_embeddings()
        return head_logprobs(hidden, head.weight, head.bias, labels, temperature, self.logit_transform)

    def values(self, role: str, hidden: torch.Tensor) -> torch.Tensor:
        """Scalar head of the reward or value role on hidden states (..., H) -> (...,) fp32."""
        return self.heads[role](hidden.float()).squeeze(-1)

    # ---- saving ---------------------------------------------------------------------

    def save_role(self, role: str, out_dir: str | Path) -> None:
        """Save one role as a standalone peft adapter dir (+ head for reward/value)."""
        from peft import get_peft_model_state_dict

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        # LoRA weights only: never the embeddings, even when a pad row was added (every
        # loader rebuilds that row as zeros; see rlhf.models.load_causal_lm)
        state = get_peft_model_state_dict(self.peft, adapter_name=role, save_embedding_layers=False)
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(out / ADAPTER_WEIGHTS))
        cfg = self.peft.peft_config[role].to_dict()
        cfg["target_modules"] = sorted(cfg["target_modules"]) if isinstance(cfg["target_modules"], (set, list)) else cfg["target_modules"]
        (out / ADAPTER_CONFIG).write_text(json.dumps(cfg, indent=2, default=str))
        if role in self.heads:
            save_head(self.heads[role], out)

    def load_role(self, role: str, adapter_dir: str | Path) -> None:
        """Overwrite ``role``'s LoRA weights (and head, for reward/value) with those that
        :meth:`save_role` wrote to ``adapter_dir``; the role's shape must match."""
        from peft import set_peft_model_state_dict

        state, _ = read_lora_weights(adapter_dir)
        set_peft_model_state_dict(self.peft, state, adapter_name=role)
        if role in self.heads:
            head = read_head(adapter_dir)
            with torch.no_grad():
                self.heads[role].weight.copy_(head["weight"])
                if "bias" in head and self.heads[role].bias is not None:
                    self.heads[role].bias.copy_(head["bias"])

    def trainable_parameters(self, role: str) -> list[torch.nn.Parameter]:
        params = [p for n, p in self.peft.named_parameters() if f".{role}." in n and "lora_" in n]
        if role in self.heads:
            params += list(self.heads[role].parameters())
        return params


def adapter_facts(adapter_dir: Path) -> tuple[str | None, str, str]:
    """``(base path, chat template, dtype)`` recorded beside a published adapter."""
    import yaml

    base = None
    meta = adapter_dir / METADATA_FILE
    if meta.is_file():
        base = json.loads(meta.read_text()).get("base_path")
    template, dtype = "", "float32"
    cfg = adapter_dir / CONFIG_FILE
    if cfg.is_file():
        model = (yaml.safe_load(cfg.read_text()) or {}).get("model", {}) or {}
        template, dtype = model.get("chat_template") or "", model.get("dtype") or "float32"
    return base, template, dtype
