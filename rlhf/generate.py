"""Sampling from any trained policy: ``rlhf generate`` and the interactive ``rlhf chat``.

A policy reference is what the model registry or a run directory holds: an adapter
(``NAME[:VERSION|:ALIAS]`` of the registry, or an adapter directory such as
``runs/tiny/ppo/policy``), or a standalone model (a registered base, or a directory written
by ``rlhf registry export``). An adapter is loaded on the base it was trained on, with the
chat template of its run (``model.chat_template`` in the ``config.yaml`` beside it), so
prompts are formatted exactly as in training.

  rlhf generate REF --prompts FILE [--out OUT.jsonl] [--max-new-tokens N] [--temperature T] [--seed S]
  rlhf generate REF --prompt TEXT [--prompt TEXT ...]      (prints "prompt: ... / completion: ..." pairs)
  rlhf chat REF [--max-new-tokens N] [--temperature T]     (one user turn per line; /reset, /exit)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch

from rlhf.atomic import write_lines


@dataclass
class Policy:
    """A loaded policy: a causal LM (base + adapter, or a standalone model) and its tokenizer."""

    model: torch.nn.Module
    tok: object
    ref: str  # what the user named
    base: str  # the base model directory or hub id it runs on
    adapter: Path | None = None  # the adapter directory, for an adapter policy


def resolve_policy(ref: str, home: str | None = None) -> tuple[str, Path | str]:
    """``("adapter", dir)`` or ``("model", dir or hub id)`` for a policy reference; registry
    references are looked up in the registry of ``home`` (default ``$RLHF_HOME``, then ~/.rlhf).

    Raises:
        rlhf.config.ConfigError: naming ``ref`` when it is neither a directory nor in the registry.
    """
    from rlhf.adapters import ADAPTER_CONFIG
    from rlhf.config import ConfigError

    path = Path(ref)
    if path.is_dir():
        if (path / ADAPTER_CONFIG).is_file():
            return "adapter", path
        if (path / "config.json").is_file():
            return "model", path
        raise ConfigError(f"{ref}: neither an adapter directory ({ADAPTER_CONFIG}) nor a model directory (config.json)")
    from rlhf.registry import Registry

    try:
        entry = Registry.open(home=home).resolve(ref)
    except Exception as e:  # noqa: BLE001 - re-raised naming the reference
        raise ConfigError(f"{ref!r} is neither a directory nor a registry reference ({e})") from None
    if entry.kind == "adapter" and entry.path is not None:
        return "adapter", Path(entry.path)
    if entry.kind == "base":
        from rlhf.registry.export import base_source

        return "model", base_source(entry)[0]
    raise ConfigError(f"{ref}: registry entry {entry.ref} is a {entry.kind}, not a policy")


def load_policy(ref: str, dtype: str | None = None, device: str | None = None, home: str | None = None) -> Policy:
    """Load the policy ``ref`` names (see the module docstring) for generation, in eval mode.

    Raises:
        rlhf.config.ConfigError: when ``ref`` is not a policy (e.g. a reward adapter) or its
            adapter does not name its base model.
    """
    from peft import PeftModel

    from rlhf.adapters import METADATA_FILE
    from rlhf.config import ConfigError
    from rlhf.models import load_causal_lm, load_tokenizer

    from rlhf.resolve import check_safetensors

    kind, where = resolve_policy(ref, home)
    template, saved_dtype = "", "float32"
    if kind == "adapter" or Path(where).is_dir():
        check_safetensors(ref, Path(where))  # a pickled .bin is never loaded: one line, as for bases
    if kind == "adapter":
        meta = Path(where) / METADATA_FILE
        role = json.loads(meta.read_text()).get("role") if meta.is_file() else None
        if role not in (None, "sft", "policy"):
            # a reward or value adapter has a score head, not a language model to sample from
            raise ConfigError(f"{ref}: a {role} adapter, not a policy; pass an sft or policy adapter")
        from rlhf.adapters import adapter_facts

        base, template, saved_dtype = adapter_facts(Path(where))
        if base is None:
            raise ConfigError(f"{ref}: the adapter at {where} does not name its base model (no rlhf_adapter.json)")
    else:
        base = str(where)
    # the tokenizer the adapter was trained with (saved beside it), else the base's as the stages load it
    tok = load_tokenizer(base, chat_template=template, adapter_dir=where if kind == "adapter" else None)
    model = load_causal_lm(base, tok, dtype=dtype or saved_dtype)
    if kind == "adapter":
        model = PeftModel.from_pretrained(model, str(where))
    model.eval()
    if device:
        model.to(device)
    return Policy(model, tok, ref, base, Path(where) if kind == "adapter" else None)


class _PolicyRoles:
    """A loaded policy as the sampling engines see a :class:`rlhf.adapters.RoleModel`: one
    language model that is its own policy role (no role switch, no autocast)."""

    def __init__(self, lm: torch.nn.Module):
        self.base_lm = lm

    @property
    def training(self) -> bool:
        return self.base_lm.training

    def eval(self):
        self.base_lm.eval()

    def train(self, mode: bool = True):
        self.base_lm.train(mode)

    def role(self, name: str):
        return contextlib.nullcontext()

    def autocast(self, device):
        return contextlib.nullcontext()


def engine_for(policy: Policy, *, max_new_tokens: int, temperature: float, engine: str = "hf",
               max_prompt_length: int = 512, batch_size: int = 16):
    """The sampling engine of :mod:`rlhf.generation` for ``policy``: ``hf`` (transformers
    ``generate`` with every knob set, as PPO samples; ``temperature`` 0 decodes greedily) or
    ``vllm`` (the base folder with the policy's adapter folder as a LoRA, or a standalone model
    folder as it is). Decoding stops at any token of :func:`rlhf.models.stop_token_ids` (the
    EOS, the generation config's EOS ids and the chat template's end-of-turn token)."""
    from rlhf.generation import HFEngine, generation_config
    from rlhf.models import stop_token_ids

    tok = policy.tok
    stop = stop_token_ids(tok, policy.model)
    if engine == "vllm":
        from rlhf.generation_vllm import VLLMEngine, check_vllm

        check_vllm("--engine vllm")
        rank = None
        if policy.adapter is not None:
            rank = json.loads((policy.adapter / "adapter_config.json").read_text())["r"]
        return VLLMEngine(None, policy.base, temperature=temperature, stop_ids=stop, pad_id=tok.pad_token_id,
                          response_length=max_new_tokens, max_prompt_length=max_prompt_length,
                          max_num_seqs=batch_size, dtype=next(policy.model.parameters()).dtype, lora_rank=rank,
                          adapter_dir=policy.adapter)
    gen = generation_config(SimpleNamespace(temperature=temperature or 1.0, response_length=max_new_tokens), stop,
                            tok.pad_token_id)
    if temperature == 0:  # greedy: the most likely token at each step
        gen.do_sample, gen.top_k, gen.top_p = False, None, None
    return HFEngine(_PolicyRoles(policy.model), gen, stop, tok.pad_token_id, max_new_tokens)


def sample(policy: Policy, prompts: list[list[dict]], *, max_new_tokens: int = 64, temperature: float = 0.7,
           seed: int = 0, batch_size: int = 16, max_prompt_length: int = 512, engine: str = "hf") -> list[str]:
    """One completion (text) per prompt (message list); ``temperature`` 0 decodes greedily.

    The engine of :func:`engine_for` through :func:`rlhf.evaluation.sample_completions`: prompts
    formatted like PPO's (:func:`rlhf.generation.encode_prompts`), each completion cut at its
    first stop token.
    """
    from rlhf.evaluation import sample_completions

    sampler = engine_for(policy, max_new_tokens=max_new_tokens, temperature=temperature, engine=engine,
                         max_prompt_length=max_prompt_length, batch_size=batch_size)
    device = "cpu" if engine == "vllm" else next(policy.model.parameters()).device
    return sample_completions(sampler, policy.tok, prompts, max_prompt_length=max_prompt_length,
                              batch_size=batch_size, seed=seed, device=device)


def read_prompts(path: str) -> list[list[dict]]:
    """Prompts as message lists from a data file with a ``prompt`` column (string or
    messages), a data-store reference (its test split), or a ``.txt`` file (one per line)."""
    from rlhf.data import load_prompts

    p = Path(path)
    if p.suffix == ".txt":
        return [[{"role": "user", "content": line.strip()}] for line in p.read_text(encoding="utf-8").splitlines()
                if line.strip()]
    return load_prompts(path, split="test")


def _sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per completion (default 64)")
    parser.add_argument("--temperature", type=float, default=0.7, help="sampling temperature; 0 is greedy (default 0.7)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="weights dtype (default: the run's)")
    from rlhf.paths import add_home_option

    add_home_option(parser)


def _check_sampling(prog: str, args: argparse.Namespace) -> None:
    from rlhf.config import ConfigError

    if args.max_new_tokens <= 0 or args.temperature < 0:
        raise ConfigError(f"{prog}: --max-new-tokens must be positive and --temperature at least 0")


def generate_main(argv: list[str]) -> int:
    """``rlhf generate REF --prompts FILE``: JSONL ``{"prompt", "completion"}`` per prompt;
    ``rlhf generate REF --prompt TEXT ...``: readable ``prompt:`` / ``completion:`` pairs."""
    parser = argparse.ArgumentParser(
        prog="rlhf generate",
        description="Sample completions from a trained policy: a registry reference of an sft or policy adapter "
        "(e.g. tiny-policy:1, loaded on its base with its run's chat template), an adapter directory "
        "(runs/tiny/ppo/policy), or a model directory (an `rlhf registry export` or any Hugging Face causal LM).",
    )
    parser.add_argument("ref", metavar="REF|DIR", help="registry reference (NAME[:VERSION]) or adapter / model directory")
    parser.add_argument("--prompts", help="JSONL/JSON/CSV/Parquet with a 'prompt' column, .txt, or NAME[:VERSION]; "
                        "writes JSONL")
    parser.add_argument("--prompt", action="append", default=[], help="a user message (repeatable); prints "
                        "'prompt: ...' / 'completion: ...' pairs unless --out is given")
    parser.add_argument("--out", help="write JSONL here (default: stdout)")
    _sampling_args(parser)
    parser.add_argument("--engine", choices=["hf", "vllm"], default="hf",
                        help="sampling engine: transformers generate (default) or vLLM (needs .venv-vllm: "
                             "bash scripts/setup_vllm.sh)")
    args = parser.parse_args(argv)
    if not args.prompts and not args.prompt:
        parser.error("give --prompts FILE or at least one --prompt TEXT")
    _check_sampling("generate", args)
    prompts = read_prompts(args.prompts) if args.prompts else []
    prompts += [[{"role": "user", "content": text}] for text in args.prompt]
    policy = load_policy(args.ref, dtype=args.dtype, home=args.home)
    texts = sample(policy, prompts, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                   engine=args.engine)
    if not args.prompts and not args.out:
        for text, completion in zip(args.prompt, texts):
            print(f"prompt: {text}\ncompletion: {completion}\n")
        return 0
    lines = [json.dumps({"prompt": p, "completion": t}) for p, t in zip(prompts, texts)]
    if args.out:
        out = Path(args.out)
        write_lines(out, lines)
        print(f"{len(lines)} completions written to {out}", file=sys.stderr)
    else:
        for line in lines:
            print(line)
    return 0


CHAT_HELP = "commands: /help (this list), /reset (start the conversation over), /exit (quit; so does end of input)\n"


def chat_main(argv: list[str], stdin=None, stdout=None) -> int:
    """``rlhf chat REF``: a conversation with a policy, one user turn per input line."""
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    parser = argparse.ArgumentParser(prog="rlhf chat", description="Chat with a policy (one user turn per line; "
                                     "/help lists the commands, /reset starts over, /exit or end of input quits).")
    parser.add_argument("ref", help="registry reference (NAME[:VERSION]) or adapter / exported model directory")
    parser.add_argument("--system", help="a system message opening the conversation")
    _sampling_args(parser)
    args = parser.parse_args(argv)
    _check_sampling("chat", args)
    policy = load_policy(args.ref, dtype=args.dtype, home=args.home)
    opening = [{"role": "system", "content": args.system}] if args.system else []
    history = list(opening)
    interactive = stdin.isatty()
    turn = 0
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            break
        text = line.strip()
        if not text:
            continue
        if text == "/reset":
            history = list(opening)
            stdout.write("(conversation reset)\n")
            continue
        if text == "/help" or (text.startswith("/") and " " not in text):
            # a command, never a message to the model: /help, or a mistyped one
            stdout.write(CHAT_HELP if text == "/help" else f"unknown command {text}; {CHAT_HELP}")
            continue
        history.append({"role": "user", "content": text})
        reply = sample(policy, [history], max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                       seed=args.seed + turn)[0]
        turn += 1
        history.append({"role": "assistant", "content": reply})
        stdout.write(f"assistant> {reply}\n")
        stdout.flush()
    return 0
