"""Benchmark our PPO stage against TRL 1.12's PPOTrainer on the same shape and batch.

Usage::

    python scripts/bench_ppo.py --shape tiny                # CPU: tiny shape, both sides
    python scripts/bench_ppo.py --shape small               # CPU: 4 layers, 256 wide
    python scripts/bench_ppo.py --shape smollm2-135m        # SmolLM2-135M's shape (30 x 576, vocab 49152)
    python scripts/bench_ppo.py --shape 0.5B                # GPU: Qwen2.5-0.5B shape, bf16
    python scripts/bench_ppo.py --shape 0.5B --modes lora   # only the LoRA comparison
    python scripts/bench_ppo.py --max-size --memory-limit-gb 80   # largest Qwen2.5 shape (to 32B) in 80 GB
    python scripts/download_gpu_wheels.py                   # wheels for a GPU image without trl/datasets
    .venv-vllm/bin/python scripts/bench_ppo.py --shape smollm2 --engines hf,static,vllm   # our engines side by side

``--engines`` runs only our stage, once per sampling engine (``ppo.generation``), each in its own
process on the same workspace, and prints per-phase seconds and generation tokens per second
side by side (no TRL run). The ``vllm`` row needs vLLM: run the script with the vLLM
environment's python (``bash scripts/setup_vllm.sh`` builds it); every row then uses that
environment's libraries. ``smollm2`` is SmolLM2-135M's shape (30 layers, 576 wide, 9 heads of
64, 3 KV heads, vocabulary 49152) on the Qwen2 architecture, randomly initialised.

The vocabulary is 32000 tokens for every shape (the published anchor's; ``--vocab``), except
``--max-size``, which builds each shape with its own Qwen2.5 vocabulary. Offline machines:
the wheels in ``--wheels`` (default ``.whl/``, filled by ``scripts/download_gpu_wheels.py``)
are installed with ``pip install --no-index`` (what the interpreter lacks into
``.bench/site``, trl 1.12.0 into the TRL venv).

Both sides get a randomly initialised model of one shape (weights are irrelevant to speed),
a word-level tokenizer of the shape's vocabulary size built locally (nothing is downloaded),
the same prompt token ids, the same batch, response length, PPO epochs and minibatches. Every
response runs to the full length: TRL gets no stop token, and ours stops on a token random
weights almost never emit (generation only ends early when every row has stopped).

Modes:
  * ``lora``: ours (one frozen base, LoRA roles sft/policy/reward/value) against TRL with
    ``peft_config`` (LoRA r=16 on all linear layers of the policy; TRL keeps a full value
    model and a full reward model beside it, as its PEFT path does).
  * ``full``: TRL with four full models (policy, reference, value, reward). Our stage has no
    full-weight mode, so its row is the same LoRA run; the table says so.

The first batch of each side is warm-up and is excluded. Peak memory is
``torch.cuda.max_memory_allocated`` on a GPU and the worker process's peak RSS on a CPU. Each
side runs in its own process, so neither sees the other's allocations. TRL 1.12 runs from a
separate environment (``.bench/trl112``): a venv whose own site-packages holds only trl
1.12.0 and which reads torch/transformers/peft/accelerate/datasets from this interpreter's
site-packages (a ``.pth`` line), so the trainers are compared on the same libraries. trl is
installed from ``--trl-wheels`` (default ``.bench/wheels``) when it holds the wheel, else from
the package registry. trl 1.12 is never a dependency of the project.

The last line printed is JSON with ``ours_eps_per_s``, ``trl_eps_per_s``, ``speedup``,
``ours_peak_gb``, ``trl_peak_gb``, ``device`` and the phase times ``ours_generate_s``,
``ours_score_s``, ``ours_update_s``, ``trl_generate_s``, ... (per TRL mode under ``modes``; with
``--max-size``: ``max_shape``, its ``peak_gb`` and one row per shape tried). With both modes, the top-level TRL numbers are the harder baseline: TRL's best
episodes per second and its lowest peak memory over the two modes; per-mode numbers are under
``modes``. Targets on one H100 at the 0.5B shape: speedup >= 4 and ours_peak_gb <= trl_peak_gb / 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Run from a checkout without relying on how (or whether) the project was installed.
sys.path.insert(0, str(REPO))

TRL_VERSION = "1.12.0"
TRL_WORKER = Path(__file__).resolve().parent / "_bench_trl_worker.py"

# Qwen2.5 shapes from the published config.json files (hidden, intermediate, layers, heads,
# kv heads, vocab, tied embeddings). "tiny" is the project's tiny default widths on the Qwen2
# architecture with a small vocabulary, small enough for a 2-core CPU.
SHAPES: dict[str, dict] = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "0.5B": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "1.5B": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "3B": dict(hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
               num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "7B": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "14B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=48, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    "32B": dict(hidden_size=5120, intermediate_size=27648, num_hidden_layers=64, num_attention_heads=40,
                num_key_value_heads=8, vocab_size=152064, tie_word_embeddings=False),
    # SmolLM2-135M's widths (a Llama; here on the Qwen2 architecture like the others)
    "smollm2": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, vocab_size=49152, tie_word_embeddings=True),
    # a CPU-sized shape between tiny and 0.5B (not a Qwen2.5 release)
    "small": dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, vocab_size=32000, tie_word_embeddings=True),
}
# --shape smollm2-135m names the same shape (the real model's full name)
SHAPES["smollm2-135m"] = SHAPES["smollm2"]
SMOLLM2_SHAPES = ("smollm2", "smollm2-135m")
MAX_SIZE_ORDER = ["0.5B", "1.5B", "3B", "7B", "14B", "32B"]
# The published anchor (ppo.md: TRL 1.12 at 13.6 s / 16.6 s per batch) used a 32k vocabulary.
DEFAULT_VOCAB = 32000

# Rollout settings per shape family: the GPU setting for the Qwen shapes, and a CPU
# setting for tiny that keeps all three runs (ours, TRL full, TRL LoRA) within about three
# minutes on a busy 2-core machine, where per-call overhead, not arithmetic, sets the pace.
DEFAULTS = {
    "tiny": dict(batch=8, prompt_len=16, response_len=16, num_minibatches=2, ppo_epochs=2, n_batches=2),
    "small": dict(batch=8, prompt_len=16, response_len=16, num_minibatches=2, ppo_epochs=2, n_batches=2),
    "qwen": dict(batch=64, prompt_len=64, response_len=128, num_minibatches=4, ppo_epochs=4, n_batches=3),
    # the engine comparison on a CPU: batch 32 (vLLM's advantage needs a batch), one epoch
    "smollm2": dict(batch=32, prompt_len=32, response_len=32, num_minibatches=2, ppo_epochs=1, n_batches=2),
}

# The tokenizer's chat template wraps a prompt as "<|user|> ... <eos> <|assistant|>": three
# tokens around the content (see rlhf.models.TINY_CHAT_TEMPLATE).
TEMPLATE_TOKENS = 3
# A stop token for ours that no prompt contains and random weights emit with probability ~1/vocab.
STOP_TOKEN = "<|system|>"


@dataclass
class BenchSpec:
    """One benchmark setting, shared by both sides (written to ``spec.json`` in the workspace)."""

    shape: str = "tiny"
    batch: int = 8  # prompts per rollout batch
    prompt_len: int = 16  # tokens per prompt after the chat template
    response_len: int = 16  # generated tokens per response
    num_minibatches: int = 2
    ppo_epochs: int = 2
    n_batches: int = 2  # rollout batches; the first is warm-up
    lora_r: int = 16
    lora_alpha: int = 32
    dtype: str = "float32"  # "bfloat16" on GPUs
    seed: int = 0
    vocab: int = DEFAULT_VOCAB  # vocabulary size of the random model and its tokenizer
    generation: str = "auto"  # our sampling engine (ppo.generation)
    compile: str = "auto"  # ppo.compile
    gradient_checkpointing: bool = False
    micro_batch: int = 0  # rows per forward/backward on our side; 0: the whole minibatch

    def __post_init__(self):
        if self.shape not in SHAPES:
            raise ValueError(f"--shape must be one of {list(SHAPES)}, got {self.shape!r}")
        for key in ("batch", "prompt_len", "response_len", "num_minibatches", "ppo_epochs", "n_batches", "lora_r", "vocab"):
            if getattr(self, key) <= 0:
                raise ValueError(f"--{key.replace('_', '-')} must be positive, got {getattr(self, key)}")
        if self.batch % self.num_minibatches:
            raise ValueError(f"--batch ({self.batch}) must be divisible by --num-minibatches ({self.num_minibatches})")
        if self.prompt_len <= TEMPLATE_TOKENS:
            raise ValueError(f"--prompt-len must exceed the chat template's {TEMPLATE_TOKENS} tokens, got {self.prompt_len}")

    @property
    def minibatch(self) -> int:
        return self.batch // self.num_minibatches

    @property
    def micro_batch_size(self) -> int:
        return min(self.micro_batch, self.minibatch) if self.micro_batch > 0 else self.minibatch

    @property
    def measured_batches(self) -> int:
        return max(self.n_batches - 1, 1)


# ----------------------------------------------------------------------------------------
# workspace: tokenizer, random model, adapters and prompts, shared by both sides


def build_tokenizer(vocab_size: int):
    """A word-level fast tokenizer with exactly ``vocab_size`` tokens and a chat template.

    Specials first (pad, eos, unk, role markers), then the words ``w0, w1, ...``; one word is
    one token, so a prompt's token count is known from its word count.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from rlhf.tasks.synthetic import SPECIAL_TOKENS, TINY_CHAT_TEMPLATE

    words = [f"w{i}" for i in range(vocab_size - len(SPECIAL_TOKENS))]
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + words)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"])
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def qwen2_config(shape: str, tok, vocab: int | None = None):
    """The shape's Qwen2 config; ``vocab`` replaces the published vocabulary size."""
    from transformers import Qwen2Config

    dims = dict(SHAPES[shape], **({"vocab_size": vocab} if vocab else {}))
    return Qwen2Config(**dims, max_position_embeddings=32768, rope_theta=1_000_000.0, rms_norm_eps=1e-6,
                       pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None,
                       use_sliding_window=False)


def build_workspace(spec: BenchSpec, workdir: str | Path) -> Path:
    """Write everything both sides load into ``workdir`` and return it.

    Layout: ``spec.json``; ``model/`` (config, random weights, tokenizer); ``sft_adapter/`` and
    ``reward_adapter/`` (peft LoRA over every decoder linear layer, the reward one with
    ``head.safetensors``); ``prompts.jsonl`` (``{"prompt": str}``) and ``prompt_ids.json``
    (the same prompts chat-templated and tokenized, ``spec.prompt_len`` ids each) for TRL.
    """
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from rlhf.adapters import linear_target_modules, save_head
    from rlhf.generation import encode_prompts

    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(spec.vocab)
    config = qwen2_config(spec.shape, tok, spec.vocab)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.dtype]
    # Big shapes are initialised on the GPU when there is one: CPU init of 7B+ takes minutes.
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(spec.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(work / "model")
    tok.save_pretrained(work / "model")

    targets = linear_target_modules(model)
    for role in ("sft", "reward"):
        lora = LoraConfig(r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=0.0, target_modules=targets,
                          bias="none", task_type="CAUSAL_LM")
        peft_model = get_peft_model(model, lora)
        peft_model.save_pretrained(work / f"{role}_adapter")
        if role == "reward":
            head = torch.nn.Linear(config.hidden_size, 1, bias=False)
            torch.nn.init.normal_(head.weight, std=1.0 / config.hidden_size ** 0.5)
            save_head(head, work / "reward_adapter")
        model = peft_model.unload()  # the bare base again, for the next role's adapter
    del model, peft_model
    if device == "cuda":
        torch.cuda.empty_cache()

    # Prompts: distinct random words, exactly prompt_len tokens once chat-templated.
    rng = random.Random(spec.seed)
    n_words = len(tok) - len(tok.all_special_tokens)
    n_prompts = spec.batch * spec.n_batches
    texts = [" ".join(f"w{rng.randrange(n_words)}" for _ in range(spec.prompt_len - TEMPLATE_TOKENS))
             for _ in range(n_prompts)]
    ids = encode_prompts(tok, [[{"role": "user", "content": t}] for t in texts], max_len=spec.prompt_len + 1)
    bad = [i for i, x in enumerate(ids) if len(x) != spec.prompt_len]
    if bad:
        raise RuntimeError(f"prompt {bad[0]} encodes to {len(ids[bad[0]])} tokens, expected {spec.prompt_len}")
    with open(work / "prompts.jsonl", "w", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"prompt": t}) + "\n")
    (work / "prompt_ids.json").write_text(json.dumps(ids))
    (work / "spec.json").write_text(json.dumps(dataclasses.asdict(spec), indent=2))
    return work


def load_spec(workdir: str | Path) -> BenchSpec:
    return BenchSpec(**json.loads((Path(workdir) / "spec.json").read_text()))


# ----------------------------------------------------------------------------------------
# our side


def peak_memory_gb() -> tuple[float, str]:
    """Peak memory of this process: CUDA allocations on a GPU, else resident set size."""
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "cuda max_memory_allocated"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "peak RSS"  # ru_maxrss is in KiB


def our_config(spec: BenchSpec, workdir: str | Path, out_dir: str | Path, n_batches: int | None = None):
    """The PPOConfig of our side of the benchmark."""
    from rlhf.config import LoraConfigSpec, ModelConfig, PPOConfig

    work = Path(workdir)
    n = n_batches or spec.n_batches
    return PPOConfig(
        model=ModelConfig(name_or_path=str(work / "model"), dtype=spec.dtype),
        sft_adapter=str(work / "sft_adapter"), reward_adapter=str(work / "reward_adapter"),
        prompts=str(work / "prompts.jsonl"),
        total_episodes=spec.batch * n, rollout_batch_size=spec.batch,
        max_prompt_length=spec.prompt_len, response_length=spec.response_len, stop_token=STOP_TOKEN,
        num_ppo_epochs=spec.ppo_epochs, num_mini_batches=spec.num_minibatches,
        per_device_train_batch_size=spec.micro_batch_size,
        generation=spec.generation, compile=spec.compile, gradient_checkpointing=spec.gradient_checkpointing,
        lora=LoraConfigSpec(r=spec.lora_r, alpha=spec.lora_alpha),
        eval_steps=0, save_steps=0, seed=spec.seed, output_dir=str(Path(out_dir) / "ppo"), report_to=["local"],
        # the stage's start and end evaluations are not timed: one held-out prompt keeps them short
        eval_fraction=0.0, eval_min_prompts=1,
        # A benchmark must not stop on a random model's statistics.
        guard_max_kl=1e30, guard_min_entropy=-1.0, guard_min_length=0.0, guard_max_length_fraction=1.01,
    )


def run_ours(workdir: str | Path, out_dir: str | Path, n_batches: int | None = None) -> dict:
    """Run our PPO stage on the workspace and return its timings and peak memory.

    Returns:
        ``{"updates": [{"total_s", "generate_s", "score_s", "update_s"}, ...], "peak_gb",
        "peak_kind", "device"}``; one entry per rollout batch, warm-up included.
    """
    import torch

    from rlhf.stages import STAGES

    spec = load_spec(workdir)
    cfg = our_config(spec, workdir, out_dir, n_batches)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    # the stage synchronises the GPU after each phase, so its phase times are the GPU's
    STAGES["ppo"].run(cfg, group=None, resume=False, task=None, registration=None)  # writes under out_dir/ppo
    rows = [json.loads(line) for line in (Path(out_dir) / "ppo" / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "episodes_per_s" in r]
    updates = [{"total_s": spec.batch / r["episodes_per_s"], "generate_s": r["time/generate_s"],
                "score_s": r["time/score_s"], "update_s": r["time/update_s"],
                "gen_tokens": spec.batch * r["response/length_mean"],
                "logprob_diff_max": r.get("rollout/logprob_diff_max")} for r in rows]
    peak, kind = peak_memory_gb()
    return {"updates": updates, "peak_gb": peak, "peak_kind": kind, "device": device_name()}


def device_name() -> str:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"


# ----------------------------------------------------------------------------------------
# TRL 1.12 environment


def _package_dirs() -> list[str]:
    """This interpreter's package folders (site-packages, dist-packages, user site), in order."""
    import site

    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    dirs += [p for p in sys.path if p.endswith(("site-packages", "dist-packages"))]
    return [d for i, d in enumerate(dirs) if os.path.isdir(d) and d not in dirs[:i]]


def ensure_trl_env(env_dir: Path, wheels: Path | None) -> Path:
    """Create (once per interpreter) the venv that runs TRL 1.12 and return its python.

    The venv's own site-packages holds trl 1.12.0 only, so it shadows any other trl; a
    ``.pth`` file appends this interpreter's package folders, so torch (CUDA build included),
    transformers, peft, accelerate and datasets are the very ones our side uses.
    """
    python = env_dir / "bin" / "python"
    ready = env_dir / f".trl-{TRL_VERSION}-ready"
    stamp = json.dumps({"trl": TRL_VERSION, "parent": sys.executable, "dirs": _package_dirs()})
    if ready.exists() and python.exists() and ready.read_text() == stamp:
        return python
    if env_dir.exists():
        shutil.rmtree(env_dir)
    print(f"[bench] creating the TRL {TRL_VERSION} environment in {env_dir}", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], check=True)
    target = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                            check=True, capture_output=True, text=True).stdout.strip()
    # addsitedir also runs the .pth files of those folders, as this interpreter did at start.
    Path(target, "_rlhf_bench_shared.pth").write_text(
        "import site; " + "; ".join(f"site.addsitedir({d!r})" for d in _package_dirs()) + "\n")
    cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-compile", "--target", target]
    if wheels is not None and any(wheels.glob(f"trl-{TRL_VERSION}-*.whl")):
        cmd += ["--no-index", "--find-links", str(wheels)]  # offline, from download_gpu_wheels.py's folder
    cmd.append(f"trl=={TRL_VERSION}")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"installing trl=={TRL_VERSION} into {env_dir} failed "
                           f"(no registry? put its wheel in {wheels} with --fetch-trl-wheel):\n{proc.stderr[-2000:]}")
    check = subprocess.run([str(python), "-c", "import torch, trl; print(trl.__version__)"], capture_output=True, text=True)
    if check.stdout.strip() != TRL_VERSION:
        raise RuntimeError(f"{python}: expected trl {TRL_VERSION} with torch, got {check.stdout.strip()!r} "
                           f"{check.stderr[-500:]}")
    ready.write_text(stamp)
    return python


def _wheel_dist(path: Path) -> str:
    """Normalised distribution name of a wheel file (``pandas-3.1.1-cp312-...whl`` -> ``pandas``)."""
    return path.name.split("-")[0].lower().replace("_", "-")


def install_missing_wheels(wheels: Path, target: Path) -> list[str]:
    """Install, offline, every wheel of ``wheels`` whose distribution this interpreter lacks,
    into ``target``; put ``target`` on this process's path and on the workers' PYTHONPATH.

    The GPU image has no trl, datasets (and what datasets needs); scripts/download_gpu_wheels.py
    fills ``wheels``. trl itself goes into the TRL venv (``ensure_trl_env``), never here, so
    our side never sees a trl that is not the project's. Returns the installed names.
    """
    from importlib import metadata

    missing = []
    for whl in sorted(wheels.glob("*.whl")):
        name = _wheel_dist(whl)
        if name == "trl":
            continue
        try:
            metadata.version(name)
        except metadata.PackageNotFoundError:
            missing.append(whl)
    if missing:
        target.mkdir(parents=True, exist_ok=True)
        print(f"[bench] installing offline from {wheels}: {', '.join(_wheel_dist(w) for w in missing)}",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps", "--no-compile",
                        "--no-cache-dir", "--upgrade", "--target", str(target), *map(str, missing)], check=True)
    if target.is_dir():
        sys.path.insert(0, str(target))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(target)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return [_wheel_dist(w) for w in missing]


def fetch_trl_wheel(wheels: Path) -> Path:
    """Download trl 1.12.0's wheel into ``wheels`` (to carry to a machine without a registry)."""
    wheels.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--dest", str(wheels),
                    f"trl=={TRL_VERSION}"], check=True)
    return next(wheels.glob(f"trl-{TRL_VERSION}-*.whl"))


# ----------------------------------------------------------------------------------------
# orchestration


def _worker_env(workdir: Path) -> dict:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1",
               WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", TRL_EXPERIMENTAL_SILENCE="1",
               RLHF_HOME=str(workdir / "rlhf_home"))
    env.pop("CUDA_LAUNCH_BLOCKING", None)
    return env


def run_worker(cmd: list[str], workdir: Path, name: str, timeout: float | None) -> tuple[dict | None, str]:
    """Run one side in its own process; return (its result JSON or None, log tail)."""
    log = workdir / f"{name}.log"
    out = workdir / f"{name}.json"
    out.unlink(missing_ok=True)
    print(f"[bench] {name}: running (log {log})", file=sys.stderr, flush=True)
    t0 = time.time()
    with open(log, "w") as f:
        try:
            rc = subprocess.run(cmd + ["--out", str(out)], stdout=f, stderr=subprocess.STDOUT,
                                env=_worker_env(workdir), timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    tail = log.read_text(errors="replace")[-3000:]
    if rc != 0 or not out.exists():
        print(f"[bench] {name}: failed ({rc}) after {time.time() - t0:.0f}s; log tail:\n{tail}", file=sys.stderr)
        return None, tail
    print(f"[bench] {name}: done in {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    return json.loads(out.read_text()), tail


def summarize(result: dict, spec: BenchSpec) -> dict:
    """Mean per-batch times over the measured batches (warm-up excluded) and episodes/s."""
    ups = result["updates"]
    measured = ups[1:] if len(ups) > 1 else ups
    mean = lambda k: sum(u[k] for u in measured) / len(measured)  # noqa: E731
    s = {k: mean(k) for k in ("total_s", "generate_s", "score_s", "update_s")}
    return {"sec_per_batch": s["total_s"], "eps_per_s": spec.batch / s["total_s"], "generate_s": s["generate_s"],
            "score_s": s["score_s"], "update_s": s["update_s"], "peak_gb": result["peak_gb"],
            "peak_kind": result["peak_kind"], "measured_batches": len(measured)}


def format_table(spec: BenchSpec, device: str, ours: dict, trl: dict[str, dict]) -> str:
    """The comparison table: one row per side and mode, ratio rows ours/TRL, phase breakdown."""
    shape = SHAPES[spec.shape]
    lines = [
        f"PPO benchmark: shape {spec.shape} (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
        f"vocab {spec.vocab}), {spec.dtype}, device {device}; ours: generation {spec.generation}, "
        f"compile {spec.compile}, micro-batch {spec.micro_batch_size}, gradient checkpointing "
        f"{'on' if spec.gradient_checkpointing else 'off'}",
        f"batch {spec.batch} prompts x {spec.prompt_len} tokens, {spec.response_len}-token responses, "
        f"{spec.num_minibatches} minibatches x {spec.ppo_epochs} PPO epochs; {spec.n_batches} batches, "
        f"first excluded as warm-up; peak = {ours['peak_kind']}",
        "",
        f"{'run':<34}{'episodes/s':>11}{'s/batch':>10}{'peak GB':>10}{'generate s':>12}{'score s':>10}{'update s':>10}",
    ]

    def row(label: str, r: dict) -> str:
        return (f"{label:<34}{r['eps_per_s']:>11.2f}{r['sec_per_batch']:>10.3f}{r['peak_gb']:>10.3f}"
                f"{r['generate_s']:>12.3f}{r['score_s']:>10.3f}{r['update_s']:>10.3f}")

    lines.append(row("ours (one base, 4 LoRA roles)", ours))
    for mode, r in trl.items():
        label = f"TRL {TRL_VERSION} {'full models' if mode == 'full' else 'LoRA (peft_config)'}"
        lines.append(row(label, r))
    for mode, r in trl.items():
        against = "TRL full (ours is LoRA)" if mode == "full" else "TRL LoRA"
        lines.append(f"{'ratio ours/' + against:<34}{ours['eps_per_s'] / r['eps_per_s']:>10.2f}x"
                     f"{ours['sec_per_batch'] / r['sec_per_batch']:>9.2f}x{ours['peak_gb'] / r['peak_gb']:>9.2f}x"
                     + "".join(f"{_ratio(ours[k], r[k]):>{w}}" for k, w in (("generate_s", 12), ("score_s", 10), ("update_s", 10))))
    lines += ["", "where the time goes (share of each side's seconds per batch):"]
    for label, r in [("ours", ours)] + [(f"TRL {m}", r) for m, r in trl.items()]:
        tot = r["sec_per_batch"]
        lines.append(f"  {label:<10} generate {100 * r['generate_s'] / tot:5.1f}%  score {100 * r['score_s'] / tot:5.1f}%  "
                     f"update {100 * r['update_s'] / tot:5.1f}%")
    lines.append("  (TRL phases: time inside its batch_generation, its no-grad forward/get_reward calls, "
                 "and the rest of the batch)")
    return "\n".join(lines)


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def summary_json(ours: dict, trl: dict[str, dict], device: str, spec: BenchSpec) -> dict:
    """The last line's JSON. With two TRL modes the top level takes TRL's best eps and its
    lowest peak (the harder comparison for us); per-mode numbers are under ``modes``."""
    best_eps = max(trl.items(), key=lambda kv: kv[1]["eps_per_s"])
    low_peak = min(trl.items(), key=lambda kv: kv[1]["peak_gb"])
    return {
        "ours_eps_per_s": round(ours["eps_per_s"], 4),
        "trl_eps_per_s": round(best_eps[1]["eps_per_s"], 4),
        "speedup": round(ours["eps_per_s"] / best_eps[1]["eps_per_s"], 4),
        "ours_peak_gb": round(ours["peak_gb"], 4),
        "trl_peak_gb": round(low_peak[1]["peak_gb"], 4),
        "device": device,
        "shape": spec.shape,
        "trl_eps_mode": best_eps[0],
        "trl_peak_mode": low_peak[0],
        "peak_kind": ours["peak_kind"],
        "ours_sec_per_batch": round(ours["sec_per_batch"], 4),
        **_phases("ours", ours),
        **_phases("trl", best_eps[1]),
        "modes": {m: {"trl_eps_per_s": round(r["eps_per_s"], 4), "speedup": round(ours["eps_per_s"] / r["eps_per_s"], 4),
                      "trl_sec_per_batch": round(r["sec_per_batch"], 4), "trl_peak_gb": round(r["peak_gb"], 4),
                      "peak_ratio": round(ours["peak_gb"] / r["peak_gb"], 4), **_phases("trl", r)}
                  for m, r in trl.items()},
    }


def _phases(side: str, r: dict) -> dict:
    """``{side}_generate_s``, ``{side}_score_s``, ``{side}_update_s``: mean seconds per batch."""
    return {f"{side}_{k}": round(r[k], 4) for k in ("generate_s", "score_s", "update_s")}


def _spec_from_args(args, shape: str, cuda: bool) -> BenchSpec:
    base = DEFAULTS["tiny" if shape == "tiny" else "smollm2" if shape in SMOLLM2_SHAPES else "qwen"]
    kw = {k: (getattr(args, k) if getattr(args, k, None) is not None else v) for k, v in base.items()}
    dtype = args.dtype or ("bfloat16" if cuda else "float32")
    vocab = getattr(args, "vocab", None) or (SHAPES["smollm2"]["vocab_size"] if shape in SMOLLM2_SHAPES else DEFAULT_VOCAB)
    return BenchSpec(shape=shape, dtype=dtype, seed=args.seed, lora_r=args.lora_r, lora_alpha=2 * args.lora_r,
                     vocab=vocab, generation=getattr(args, "generation", "auto"), compile=getattr(args, "compile", "auto"),
                     gradient_checkpointing=bool(getattr(args, "gradient_checkpointing", False)),
                     micro_batch=getattr(args, "micro_batch", None) or 0, **kw)


def _has_cuda() -> bool:
    # Asked in a child process so the orchestrator never holds a CUDA context of its own.
    proc = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                          capture_output=True, text=True)
    return proc.stdout.strip() == "True"


def _self_cmd(*extra: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), *extra]


def bench(args) -> dict:
    cuda = _has_cuda()
    shape = args.shape or ("0.5B" if cuda else "tiny")
    spec = _spec_from_args(args, shape, cuda)
    if Path(args.trl_wheels).is_dir():
        install_missing_wheels(Path(args.trl_wheels), REPO / ".bench" / "site")
    if not cuda and shape != "tiny":
        print(f"[bench] warning: no GPU; the {shape} shape on a CPU will be very slow", file=sys.stderr)
    trl_python = None
    if args.modes:
        trl_python = Path(args.trl_python) if args.trl_python else ensure_trl_env(Path(args.trl_env), Path(args.trl_wheels))
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-ppo-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        (work / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
        built, _ = run_worker(_self_cmd("--_worker", "build", "--workspace", str(work)), work, "build", args.timeout)
        if built is None:
            raise SystemExit("building the benchmark workspace failed")
        ours_raw, _ = run_worker(_self_cmd("--_worker", "ours", "--workspace", str(work)), work, "ours", args.timeout)
        if ours_raw is None:
            raise SystemExit("our PPO run failed")
        ours = summarize(ours_raw, spec)
        trl: dict[str, dict] = {}
        for mode in args.modes:
            res, _ = run_worker([str(trl_python), str(TRL_WORKER), "--workspace", str(work), "--mode", mode],
                                work, f"trl_{mode}", args.timeout)
            if res is not None:
                trl[mode] = summarize(res, spec)
        device = ours_raw["device"]
        if not trl:
            out = {"ours_eps_per_s": round(ours["eps_per_s"], 4), "trl_eps_per_s": None, "speedup": None,
                   "ours_peak_gb": round(ours["peak_gb"], 4), "trl_peak_gb": None, "device": device, "shape": shape,
                   "ours_sec_per_batch": round(ours["sec_per_batch"], 4), **_phases("ours", ours)}
            print(f"ours: {ours['eps_per_s']:.2f} episodes/s, {ours['sec_per_batch']:.3f} s/batch, "
                  f"peak {ours['peak_gb']:.3f} GB ({ours['peak_kind']}); no TRL run completed")
        else:
            print(format_table(spec, device, ours, trl))
            out = summary_json(ours, trl, device, spec)
        return out
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"[bench] workspace kept: {work}", file=sys.stderr)


def engines_bench(args) -> dict:
    """``--engines``: our stage once per sampling engine on one workspace, phases side by side."""
    cuda = _has_cuda()
    shape = args.shape or "smollm2"
    spec = _spec_from_args(args, shape, cuda)
    work = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="bench-engines-"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        (work / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
        built, _ = run_worker(_self_cmd("--_worker", "build", "--workspace", str(work)), work, "build", args.timeout)
        if built is None:
            raise SystemExit("building the benchmark workspace failed")
        rows, device = {}, None
        for name in args.engines:
            raw, _ = run_worker(_self_cmd("--_worker", "ours", "--workspace", str(work), "--generation", name), work,
                                f"ours_{name}", args.timeout)
            if raw is None:
                rows[name] = None
                continue
            device = raw["device"]
            r = summarize(raw, spec)
            measured = raw["updates"][1:] or raw["updates"]
            r["gen_tokens_per_s"] = sum(u["gen_tokens"] for u in measured) / sum(u["generate_s"] for u in measured)
            r["logprob_diff_max"] = max((u["logprob_diff_max"] or 0.0) for u in measured)
            rows[name] = r
        print(format_engines(spec, device or "?", rows))
        return {"shape": shape, "device": device, "batch": spec.batch, "prompt_len": spec.prompt_len,
                "response_len": spec.response_len, "dtype": spec.dtype,
                "engines": {k: (None if v is None else {m: float(f"{v[m]:.4g}") for m in (
                    "generate_s", "gen_tokens_per_s", "score_s", "update_s", "sec_per_batch", "peak_gb",
                    "logprob_diff_max")}) for k, v in rows.items()}}
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep:
            print(f"[bench] workspace kept: {work}", file=sys.stderr)


def format_engines(spec: BenchSpec, device: str, rows: dict[str, dict | None]) -> str:
    """One row per engine: mean seconds per phase over the measured batches, generation tokens/s."""
    shape = SHAPES[spec.shape]
    lines = [f"PPO engines: shape {spec.shape} (hidden {shape['hidden_size']}, {shape['num_hidden_layers']} layers, "
             f"vocab {spec.vocab}), {spec.dtype}, device {device}; batch {spec.batch}, prompt {spec.prompt_len}, "
             f"response {spec.response_len} tokens, {spec.ppo_epochs} epoch(s) x {spec.num_minibatches} minibatches, "
             f"{spec.measured_batches} measured batch(es) after 1 warm-up",
             f"{'engine':<8} {'generate s':>11} {'gen tok/s':>10} {'score s':>9} {'update s':>9} {'s/batch':>9} "
             f"{'peak GB':>8} {'|dlogp| max':>12}"]
    base = rows.get("hf")
    for name, r in rows.items():
        if r is None:
            lines.append(f"{name:<8} failed (see its log)")
            continue
        lines.append(f"{name:<8} {r['generate_s']:>11.2f} {r['gen_tokens_per_s']:>10.1f} {r['score_s']:>9.2f} "
                     f"{r['update_s']:>9.2f} {r['sec_per_batch']:>9.2f} {r['peak_gb']:>8.2f} {r['logprob_diff_max']:>12.2e}")
    if base:
        for name, r in rows.items():
            if r and name != "hf":
                lines.append(f"generation tokens/s, {name} / hf: {r['gen_tokens_per_s'] / base['gen_tokens_per_s']:.2f}x")
    return "\n".join(lines)


def _lora_state(model, targets: list[str], r: int, seed: int, device) -> dict:
    """Random LoRA tensors for every targeted decoder linear, keyed as peft saves them."""
    import torch

    gen = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear) and name.split(".")[-1] in targets and name != "lm_head":
            for key, shape in (("lora_A", (r, mod.in_features)), ("lora_B", (mod.out_features, r))):
                state[f"base_model.model.{name}.{key}.weight"] = torch.randn(
                    shape, generator=gen, device=device) * 0.01
    return state


def random_role_model(spec: BenchSpec, device, members: int = 1):
    """A :class:`rlhf.adapters.RoleModel` of ``spec.shape`` with nothing read from disk: the
    base initialised on ``device`` (random weights of ``spec.dtype``), random in-memory sft
    LoRA (the policy starts as its copy) and ``members`` random reward adapters with heads (the
    value role starts as a copy of the first), in eval mode.

    Returns:
        ``(model, tok, config)``: the model, its word-level tokenizer and the base's config.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.adapters import InMemoryAdapter, RoleModel, linear_target_modules
    from rlhf.models import disable_dropout

    tok = build_tokenizer(spec.vocab)
    config = qwen2_config(spec.shape, tok, spec.vocab)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[spec.dtype]
    torch.manual_seed(spec.seed)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(config, dtype=dtype)
    disable_dropout(base)
    targets = linear_target_modules(base)
    peft_cfg = {"r": spec.lora_r, "lora_alpha": spec.lora_alpha, "target_modules": targets}
    sft = InMemoryAdapter(_lora_state(base, targets, spec.lora_r, spec.seed + 1, device), peft_cfg)
    rewards = []
    for j in range(members):
        head = {"weight": torch.randn(1, config.hidden_size) / config.hidden_size ** 0.5}
        rewards.append(InMemoryAdapter(_lora_state(base, targets, spec.lora_r, spec.seed + 2 + j, device), peft_cfg, head))
    model = RoleModel(base, sft, rewards if members > 1 else rewards[0]).to(device)
    del sft, rewards
    model.eval()  # as rlhf.stages.ppo._build_model: rollouts in eval mode, _ppo_update switches to train
    return model, tok, config


def build_in_memory(spec: BenchSpec, device):
    """Our PPO setup for ``spec`` with nothing read from or written to disk.

    The base is initialised directly on ``device`` (random weights of ``spec.dtype``), the sft
    and reward adapters are random in-memory LoRA states (the policy starts as a copy of sft,
    the value role as a copy of reward), prompts are random token ids.

    Returns:
        ``(setup, cfg)``: a :class:`rlhf.ppo.state.PPOSetup` and the :class:`PPOConfig`.
    """
    import torch

    from rlhf import generation
    from rlhf.config import LoraConfigSpec, ModelConfig, PPOConfig
    from rlhf.generation import make_engine
    from rlhf.ppo.state import PPOSetup

    model, tok, _ = random_role_model(spec, device)
    if spec.gradient_checkpointing:
        model.base_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    cfg = PPOConfig(
        model=ModelConfig(name_or_path="in-memory", dtype=spec.dtype), total_episodes=spec.batch,
        rollout_batch_size=spec.batch, max_prompt_length=spec.prompt_len, response_length=spec.response_len,
        stop_token=STOP_TOKEN, num_ppo_epochs=spec.ppo_epochs, num_mini_batches=spec.num_minibatches,
        per_device_train_batch_size=spec.micro_batch_size, generation=spec.generation, compile=spec.compile,
        gradient_checkpointing=spec.gradient_checkpointing, lora=LoraConfigSpec(r=spec.lora_r, alpha=spec.lora_alpha),
        eval_steps=0, save_steps=0, seed=spec.seed, output_dir="/nonexistent", report_to=["local"],
        guard_max_kl=1e30, guard_min_entropy=-1.0, guard_min_length=0.0, guard_max_length_fraction=1.01)
    stop_ids, pad_id = generation.stop_token_ids(tok, cfg, model.base_lm), tok.pad_token_id
    gen_cfg = generation.generation_config(cfg, stop_ids, pad_id)
    engine = make_engine(cfg.generation, model, gen_cfg, temperature=cfg.temperature, stop_ids=stop_ids, pad_id=pad_id,
                         response_length=cfg.response_length, compile=cfg.compile, device=device)
    rng = random.Random(spec.seed)
    first_word = len(tok.all_special_tokens)
    prompts = [[rng.randrange(first_word, spec.vocab) for _ in range(spec.prompt_len)] for _ in range(spec.batch)]
    s = PPOSetup(model=model, tok=tok, base_path="in-memory", stop_ids=stop_ids,
                 score_suffix=generation.score_suffix(tok, stop_ids), pad_id=pad_id, gen_cfg=gen_cfg,
                 engine=engine, prompt_ids=prompts, eval_ids=[], eval_texts=[], device=torch.device(device),
                 rank=0, world=1, per_rollout_prompts=spec.batch, global_batch=spec.batch, num_updates=1)
    return s, cfg


def run_probe(spec: BenchSpec, memory_limit_gb: float | None = None) -> dict:
    """One full PPO update of ``spec.shape`` built in memory (:func:`build_in_memory`);
    returns its peak memory. ``memory_limit_gb`` caps this process's CUDA memory (e.g. 80
    on a 141 GB H200 asks "does it fit on an 80 GB GPU?")."""
    import torch

    from rlhf.stages import ppo as stage

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    if cuda and memory_limit_gb:
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, memory_limit_gb * 2**30 / total))
    t0 = time.time()
    s, cfg = build_in_memory(spec, device)
    build_s = time.time() - t0
    opt = stage.build_optimization(s.model, cfg, 1)
    t1 = time.time()
    stats = stage.train_update(s, opt, cfg, 0)
    peak, kind = peak_memory_gb()
    return {"shape": spec.shape, "peak_gb": peak, "peak_kind": kind, "device": device_name(),
            "params_b": sum(p.numel() for p in s.model.base_lm.parameters()) / 1e9, "build_s": build_s,
            "update_s": time.time() - t1, "generate_s": stats["time/generate_s"], "score_s": stats["time/score_s"],
            "train_s": stats["time/update_s"], "optimizer_steps": stats.get("optimizer_steps"),
            "memory_limit_gb": memory_limit_gb}


def max_size(args) -> dict:
    """Largest Qwen2.5 shape whose LoRA PPO (one base, four adapters) completes one update.

    Each shape runs in its own process (an out-of-memory error leaves nothing behind), built
    in memory (:func:`run_probe`), with gradient checkpointing and micro-batches of
    ``--micro-batch`` (default 8), smallest shape first; the first failure ends the search.
    """
    cuda = _has_cuda()
    shapes = args.shapes or MAX_SIZE_ORDER
    if Path(args.trl_wheels).is_dir():
        install_missing_wheels(Path(args.trl_wheels), REPO / ".bench" / "site")
    if not cuda:
        print("[bench] warning: no GPU; --max-size measures peak RSS on the CPU", file=sys.stderr)
    results, best = [], None
    for shape in shapes:
        spec = _spec_from_args(args, shape, cuda)
        spec = dataclasses.replace(spec, n_batches=1, gradient_checkpointing=True, micro_batch=args.micro_batch or 8,
                                   vocab=args.vocab or SHAPES[shape]["vocab_size"],
                                   ppo_epochs=args.ppo_epochs or 1)
        work = Path(tempfile.mkdtemp(prefix=f"bench-probe-{shape}-", dir=args.workdir))
        try:
            (work / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
            cmd = _self_cmd("--_worker", "probe", "--workspace", str(work))
            if args.memory_limit_gb:
                cmd += ["--memory-limit-gb", str(args.memory_limit_gb)]
            res, tail = run_worker(cmd, work, "probe", args.timeout)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        oom = "OutOfMemoryError" in tail or "out of memory" in tail.lower()
        row = {"shape": shape, "ok": res is not None, "device": res["device"] if res else None,
               "peak_gb": round(res["peak_gb"], 3) if res else None,
               "update_s": round(res["update_s"], 3) if res else None,
               "failure": None if res else ("out of memory" if oom else "error (see log above)")}
        if res:
            row.update({k: (round(v, 3) if isinstance(v, float) else v) for k, v in res.items() if k not in row})
        results.append(row)
        print(f"{shape:>5}: " + (f"one PPO update done, peak {row['peak_gb']:.2f} GB, {row['update_s']:.1f} s"
                                 if res else f"failed: {row['failure']}"), flush=True)
        if res is None:
            break  # bigger shapes need more memory still
        best = row
    return {"max_shape": best["shape"] if best else None, "peak_gb": best["peak_gb"] if best else None,
            "device": best["device"] if best else ("cuda" if cuda else "cpu"),
            "memory_limit_gb": args.memory_limit_gb, "results": results}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=list(SHAPES), default=None,
                   help="Model shape (default: 0.5B on a GPU, tiny on a CPU).")
    p.add_argument("--modes", default="full,lora",
                   help="TRL modes to compare against, comma-separated from full,lora; empty: ours only.")
    p.add_argument("--batch", type=int, default=None, help="Prompts per rollout batch (tiny 8, Qwen shapes 64).")
    p.add_argument("--prompt-len", type=int, default=None, help="Tokens per prompt (tiny 16, Qwen shapes 64).")
    p.add_argument("--response-len", type=int, default=None, help="Tokens per response (tiny 16, Qwen shapes 128).")
    p.add_argument("--num-minibatches", type=int, default=None, help="PPO minibatches per epoch (tiny 2, Qwen shapes 4).")
    p.add_argument("--ppo-epochs", type=int, default=None, help="PPO epochs per batch (tiny 2, Qwen shapes 4).")
    p.add_argument("--n-batches", type=int, default=None,
                   help="Rollout batches per side, the first is warm-up (tiny 2, Qwen shapes 3).")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank on both sides (alpha = 2r).")
    p.add_argument("--vocab", type=int, default=None,
                   help=f"Vocabulary size (default {DEFAULT_VOCAB}, the published anchor's; --max-size: the shape's own).")
    p.add_argument("--engines", default=None,
                   help="Compare our sampling engines instead of TRL: comma-separated from hf,static,merged,vllm "
                        "(default shape smollm2).")
    p.add_argument("--generation", choices=["auto", "hf", "static", "merged", "vllm"], default="auto",
                   help="Our sampling engine (ppo.generation; auto: static on a GPU, hf on a CPU).")
    p.add_argument("--compile", choices=["auto", "on", "off"], default="auto",
                   help="torch.compile our static engine's decode step (ppo.compile; auto: on a GPU only).")
    p.add_argument("--gradient-checkpointing", action="store_true", help="Gradient checkpointing on our side.")
    p.add_argument("--micro-batch", type=int, default=None,
                   help="Our rows per forward/backward (default: the whole minibatch; --max-size: 8).")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="--max-size: cap this process's GPU memory (e.g. 80 on an H200 to ask about 80 GB GPUs).")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                   help="Weights dtype (default: bfloat16 on a GPU, float32 on a CPU).")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-size", action="store_true",
                   help="Find the largest Qwen2.5 shape whose LoRA PPO completes a batch on this GPU.")
    p.add_argument("--shapes", default=None, help="Shapes tried by --max-size, comma-separated, smallest first.")
    p.add_argument("--trl-env", default=str(REPO / ".bench" / "trl112"), help="Where the TRL 1.12 venv lives.")
    p.add_argument("--trl-wheels", "--wheels", default=str(REPO / ".whl"),
                   help="Wheel folder of scripts/download_gpu_wheels.py: trl 1.12.0 and what the GPU image lacks "
                        "(datasets, ...), installed offline from it when present.")
    p.add_argument("--trl-python", default=None, help="A python that already has trl 1.12.0 (skips the venv).")
    p.add_argument("--fetch-trl-wheel", action="store_true",
                   help="Download trl 1.12.0's wheel into --trl-wheels and exit (all wheels: download_gpu_wheels.py).")
    p.add_argument("--workdir", default=None, help="Workspace folder (default: a temporary one, removed after).")
    p.add_argument("--keep", action="store_true", help="Keep the temporary workspace (models, logs).")
    p.add_argument("--timeout", type=float, default=None, help="Seconds allowed per worker process.")
    p.add_argument("--_worker", choices=["build", "ours", "probe"], default=None, help=argparse.SUPPRESS)
    p.add_argument("--workspace", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in ("full", "lora")]
    if bad:
        p.error(f"--modes: unknown mode {bad[0]!r}; choose from full, lora")
    args.modes = modes
    if args.engines is not None:
        args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
        bad = [e for e in args.engines if e not in ("hf", "static", "merged", "vllm")]
        if bad or not args.engines:
            p.error(f"--engines: unknown engine {bad[0]!r}; choose from hf, static, merged, vllm" if bad
                    else "--engines: name at least one engine")
    if args.shapes is not None:
        args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
        bad = [s for s in args.shapes if s not in SHAPES]
        if bad:
            p.error(f"--shapes: unknown shape {bad[0]!r}; choose from {', '.join(SHAPES)}")
    for key in ("batch", "prompt_len", "response_len", "num_minibatches", "ppo_epochs", "n_batches", "lora_r", "vocab",
                "micro_batch"):
        v = getattr(args, key)
        if v is not None and v <= 0:
            p.error(f"--{key.replace('_', '-')} must be positive, got {v}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args._worker:
        work = Path(args.workspace)
        if args._worker == "build":
            build_workspace(load_spec(work), work)
            result = {"workspace": str(work)}
        elif args._worker == "probe":
            result = run_probe(load_spec(work), args.memory_limit_gb)
        else:
            if args.generation != "auto":  # --engines: this worker's engine
                spec = dataclasses.replace(load_spec(work), generation=args.generation)
                (work / "spec.json").write_text(json.dumps(dataclasses.asdict(spec)))
            result = run_ours(work, work / f"ours_run_{args.generation}")
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(json.dumps(result))
        tmp.replace(args.out)
        return 0
    if args.fetch_trl_wheel:
        print(fetch_trl_wheel(Path(args.trl_wheels)))
        return 0
    try:
        _spec_from_args(args, args.shape or "tiny", cuda=False)  # validate the settings before any work
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = max_size(args) if args.max_size else engines_bench(args) if args.engines else bench(args)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
