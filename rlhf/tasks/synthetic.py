"""The embedded synthetic task: a tiny word language with a known gold reward.

Everything of the task lives here: its vocabulary, data generation, gold reward, the
held-out pairs for the reward model's gold accuracy, the word-level tokenizer and the
``builtin:tiny`` base model built over that vocabulary, and its one config class.
:class:`SyntheticTask` implements :class:`rlhf.tasks.Task`; nothing outside this module
uses the vocabulary.

Why a synthetic task: the default pipeline must run offline on a CPU in minutes and still
show an honest RLHF effect. A language of ~70 words lets a 2-layer, 64-wide model learn it,
and a programmatic gold reward lets us measure what real runs cannot: how well the reward
model agrees with the truth, and whether PPO improved the policy on the truth rather than
on the learned proxy.

The task:
  * A prompt asks for a short note on a topic: ``"write a note about cats please"``.
  * A response is a few words from the content vocabulary.
  * Gold reward (used for evaluation only, never for training):
      mean word value over the response words (+1 warm words, +0.5 pleasant, 0 filler,
      -1 harsh words), plus ``TOPIC_BONUS`` if the prompt's topic word appears in the
      response, minus ``SHORT_PENALTY`` if the response has fewer than ``MIN_WORDS`` words.
  * SFT demonstrations are sampled from a broad, mediocre "human writer" distribution, so
    the SFT policy sits near the middle of the gold scale and there is headroom.
  * Preference pairs are two samples (mostly demonstration-like, some exploratory, see
    ``sample_pair_response``) labelled by a
    Bradley-Terry model of the gold reward with temperature ``task.label_temperature`` (0.25 by default):
    ``P(a preferred) = sigmoid((gold(a) - gold(b)) / T)``. This gives realistic label
    noise (about a quarter of labels disagree with the noiseless gold preference, in the
    range reported for human preference data, e.g. ~63-69% RM validation accuracy in the
    N+ implementation-details paper, arXiv 2403.17031).

The ``weak`` task (``task.name: weak``) is built for a reward model that is deliberately
weak: the synthetic task's prompts, demonstrations and gold reward, but labellers with a
habit the gold reward does not share. On a fraction ``task.spurious_fraction`` of the pairs
(0.75 by default) the labeller prefers the response with more filler words (``FILLER``:
"very", "quite", "then"...), whatever they say, and falls back to the gold Bradley-Terry
label only when both have as many; the other pairs are labelled as in the synthetic task.
Filler words are worth 0 to the gold reward, so they dilute its mean word value: a reward
model that learns the habit, and a policy that pleases it, gain nothing by the judge. The
reward model's held-out accuracy (against the labellers) stays high, so the reward gate
passes, while its accuracy against the gold preference is poor: what a user with biased
preference data and a judge kept outside the pipeline meets (issue 30).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import sys
from collections.abc import Iterator
from pathlib import Path

from rlhf.config import SyntheticTaskConfig

TOPICS = ["cats", "dogs", "rain", "coffee", "music", "trains", "books", "gardens"]
WARM = ["bright", "warm", "kind", "gentle", "lovely", "joyful", "calm", "brave", "clever", "sweet"]
PLEASANT = ["fine", "neat", "fresh", "soft", "clear", "quiet", "easy", "bold", "fair", "good"]
FILLER = ["the", "and", "then", "very", "quite", "some", "many", "often", "still", "just"]
HARSH = ["dull", "cold", "rude", "harsh", "gloomy", "bitter", "noisy", "lazy", "broken", "grim"]
PROMPT_WORDS = ["write", "a", "note", "about", "please", "tell", "me", "describe", "short", "on"]

WORD_VALUE: dict[str, float] = {
    **{w: 1.0 for w in WARM},
    **{w: 0.5 for w in PLEASANT},
    **{w: 0.0 for w in FILLER},
    **{w: -1.0 for w in HARSH},
}
CONTENT_WORDS = WARM + PLEASANT + FILLER + HARSH
TOPIC_BONUS = 0.5
MIN_WORDS = 3
SHORT_PENALTY = 1.0
EXPLORATORY_FRACTION = 0.3
_EXPLORATORY_WORDS = CONTENT_WORDS + TOPICS

#: every word the tokenizer knows (the special tokens are added by build_tiny_tokenizer).
VOCABULARY = sorted(set(TOPICS + CONTENT_WORDS + PROMPT_WORDS))

_PROMPT_TEMPLATES = [
    "write a note about {t}",
    "write a short note about {t} please",
    "tell me about {t}",
    "describe {t} please",
    "a short note on {t}",
    "please describe {t}",
]


def topic_of(prompt: str) -> str | None:
    """The topic word of a prompt, or None when it names no known topic."""
    for word in prompt.split():
        if word in TOPICS:
            return word
    return None


def gold_reward(prompt: str, response: str) -> float:
    """Programmatic gold reward of a response to a prompt (see the module docstring).

    Unknown words (anything outside the content vocabulary, including leftover special
    tokens) count as 0-valued words, so degenerate outputs are not rewarded.
    """
    words = response.split()
    if not words:
        return -SHORT_PENALTY
    score = sum(WORD_VALUE.get(w, 0.0) for w in words) / len(words)
    topic = topic_of(prompt)
    if topic is not None and topic in words:
        score += TOPIC_BONUS
    if len(words) < MIN_WORDS:
        score -= SHORT_PENALTY
    return score


#: the format task's gold reward (see :func:`format_gold_reward`)
FORMAT_TARGET_WORDS = 5
FORMAT_OPENING_BONUS = 1.0
FORMAT_LENGTH_PENALTY = 0.25


def format_gold_reward(prompt: str, response: str) -> float:
    """Gold reward of the embedded ``format`` task: a format and a counting constraint,
    blind to what the words mean (unlike :func:`gold_reward`).

    ``FORMAT_OPENING_BONUS`` when the response opens with the prompt's topic word, minus
    ``FORMAT_LENGTH_PENALTY`` per word away from exactly ``FORMAT_TARGET_WORDS`` words.
    """
    words = response.split()
    topic = topic_of(prompt)
    score = FORMAT_OPENING_BONUS if words and topic is not None and words[0] == topic else 0.0
    return score - FORMAT_LENGTH_PENALTY * abs(len(words) - FORMAT_TARGET_WORDS)


#: gold reward of each embedded task (``task.name``); the weak task's judge is the synthetic one
GOLD_REWARDS = {"synthetic": gold_reward, "format": format_gold_reward, "weak": gold_reward}


def filler_count(response: str) -> int:
    """How many filler words ``response`` holds: the weak task's labellers' habit."""
    return sum(w in FILLER for w in response.split())


def sample_prompt(rng: random.Random) -> str:
    return rng.choice(_PROMPT_TEMPLATES).format(t=rng.choice(TOPICS))


def sample_response(rng: random.Random, prompt: str) -> str:
    """A demonstration from the broad "human writer" distribution: 4-8 words, uniform over
    the content vocabulary, mentioning the topic half of the time."""
    n = rng.randint(4, 8)
    words = [rng.choice(CONTENT_WORDS) for _ in range(n)]
    topic = topic_of(prompt)
    if topic is not None and rng.random() < 0.5:
        words[rng.randrange(n)] = topic
    return " ".join(words)


def sample_pair_response(rng: random.Random, prompt: str) -> str:
    """A response for preference data: mostly from the demonstration distribution, the rest
    (``EXPLORATORY_FRACTION``) from a broader exploratory one (1-10 content or topic words in
    any mix), as preference data
    gathered from several models covers more than one writer's habits. Without that
    coverage the reward model is blind to what the demonstrations never show (off-topic
    words, empty answers) and PPO finds and exploits those blind spots."""
    if rng.random() >= EXPLORATORY_FRACTION:
        return sample_response(rng, prompt)
    return " ".join(rng.choice(_EXPLORATORY_WORDS) for _ in range(rng.randint(1, 10)))


def _user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _assistant(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


class SyntheticTask:
    """The embedded tasks behind :class:`rlhf.tasks.Task` (``cfg.name`` picks the gold reward).

    The rows are drawn from one seeded stream in a fixed order (SFT demonstrations, then
    preference pairs, then training prompts); the evaluation prompts and the held-out pairs
    each come from their own seed, disjoint from the training data's stream.
    """

    def __init__(self, cfg: SyntheticTaskConfig):
        self.cfg = cfg
        self.name = cfg.name
        self._gold = GOLD_REWARDS[cfg.name]
        self._rows: dict[str, list[dict]] | None = None

    def _generate(self) -> dict[str, list[dict]]:
        if self._rows is not None:
            return self._rows
        cfg = self.cfg
        rng = random.Random(cfg.seed)
        sft = []
        for _ in range(cfg.num_sft):
            p = sample_prompt(rng)
            sft.append({"prompt": _user(p), "completion": _assistant(sample_response(rng, p))})
        pairs = []
        for _ in range(cfg.num_pairs):
            p = sample_prompt(rng)
            a, b = sample_pair_response(rng, p), sample_pair_response(rng, p)
            while b == a:
                b = sample_pair_response(rng, p)
            ga, gb = self._gold(p, a), self._gold(p, b)
            p_a = 1.0 / (1.0 + math.exp(-(ga - gb) / cfg.label_temperature))
            # the weak task's labeller: more filler words win, whatever the gold reward says
            if cfg.name == "weak" and rng.random() < cfg.spurious_fraction and filler_count(a) != filler_count(b):
                p_a = float(filler_count(a) > filler_count(b))
            if rng.random() >= p_a:
                a, b, ga, gb = b, a, gb, ga
            # gold_* are for inspection only: ingestion keeps the canonical fields, so
            # training never sees them
            pairs.append({"prompt": _user(p), "chosen": _assistant(a), "rejected": _assistant(b),
                          "gold_chosen": ga, "gold_rejected": gb})
        train_prompts = [{"prompt": _user(sample_prompt(rng))} for _ in range(cfg.num_ppo_prompts)]
        eval_rng = random.Random(cfg.seed + 1_000_003)
        eval_prompts = [{"prompt": _user(sample_prompt(eval_rng))} for _ in range(cfg.num_eval_prompts)]
        self._rows = {"sft": sft, "pairs": pairs, "train": train_prompts, "eval": eval_prompts}
        return self._rows

    def sft_examples(self) -> list[dict]:
        """``{"prompt": [user msg], "completion": [assistant msg]}`` demonstrations."""
        return self._generate()["sft"]

    def preference_pairs(self) -> list[dict]:
        """``{"prompt", "chosen", "rejected"}`` conversational pairs with noisy labels."""
        return self._generate()["pairs"]

    def prompts(self, split: str) -> list[dict]:
        """``{"prompt": [user msg]}`` rows of the ``"train"`` or ``"eval"`` split."""
        if split not in ("train", "eval"):
            raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
        return self._generate()[split]

    def evaluate(self, prompt: str, completion: str) -> float:
        """The gold reward (:func:`gold_reward` or :func:`format_gold_reward`)."""
        return self._gold(prompt, completion)

    def response_pairs(self) -> Iterator[tuple[str, str, str]]:
        """Endless ``(prompt, response_a, response_b)`` from the demonstration distribution,
        with a seed no training file used."""
        rng = random.Random(self.cfg.seed + 2_000_029)
        while True:
            prompt = sample_prompt(rng)
            yield prompt, sample_response(rng, prompt), sample_response(rng, prompt)


# ----------------------------------------------------------------------------------------
# the tokenizer and the ``builtin:tiny`` base model over the task's language

SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>", "<|system|>", "<|user|>", "<|assistant|>"]

# A chat template for the word-level tiny tokenizer. Each turn ends with <eos>, which is
# also the stop token of generation, so SFT teaches the policy to stop.
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|> ' + message['content'] + ' <eos> ' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|> ' }}{% endif %}"
)

TINY_SHAPE = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=128,
    tie_word_embeddings=True,
)


def build_tiny_tokenizer():
    """A word-level fast tokenizer over the synthetic task's vocabulary, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + VOCABULARY)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    # Word pieces are whole words: decoding joins them with single spaces.
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"],
    )
    tok.chat_template = TINY_CHAT_TEMPLATE
    tok.padding_side = "left"
    return tok


def build_tiny_base(out_dir: str | Path, seed: int = 0, **shape) -> Path:
    """Write the tiny base model (tokenizer + briefly pretrained 2-layer Llama) to ``out_dir``.

    ``shape`` overrides entries of :data:`TINY_SHAPE` (``builtin:tiny`` takes none): e.g.
    ``head_dim=32`` for vLLM, whose CPU attention needs head sizes of 32 or more.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = Path(out_dir)
    tok = build_tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
        bos_token_id=None,
        **(TINY_SHAPE | shape),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    pretrain_tiny(model, tok, seed)
    from rlhf.atomic import write_dir

    def fill(tmp: Path) -> None:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)

    return write_dir(out, fill)


def pretrain_tiny(model, tok, seed: int, steps: int = 300, batch: int = 32) -> None:
    """Give the tiny base what a real pretrained base has: knowledge of its language.

    A random-init model with frozen embeddings cannot be taught anything useful by a LoRA
    adapter, unlike a real pretrained base. So the tiny base is trained for a few seconds on
    generic text of the synthetic language: chat-shaped transcripts whose words are drawn
    uniformly from the whole vocabulary (no task preferences, random lengths). SFT then
    teaches the task's style on top, as with a real base.
    """
    import torch

    from rlhf import distributed
    from rlhf.tracking import StageProgress

    rng = random.Random(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    model.train()
    # minutes on a busy CPU: say so, and show the steps (a bar, or periodic lines in a log)
    bar = StageProgress("tiny base", steps, unit="step", enabled=distributed.is_main())
    if distributed.is_main():
        print(f"[tiny base] building builtin:tiny once: pretraining a 2-layer model for {steps} steps",
              file=sys.stderr, flush=True)

    def transcript() -> str:
        turns = []
        for _ in range(rng.randint(1, 2)):
            for role in ("user", "assistant"):
                words = " ".join(rng.choice(VOCABULARY) for _ in range(rng.randint(1, 10)))
                turns.append(f"<|{role}|> {words} <eos>")
        return " ".join(turns)

    for _ in range(steps):
        enc = tok([transcript() for _ in range(batch)], padding=True, return_tensors="pt")
        labels = enc.input_ids.masked_fill(enc.attention_mask == 0, -100)
        loss = model(**enc, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        bar.update(1, {"loss": loss.detach()})
    bar.close()
    model.eval()


def tiny_base(root: Path, seed: int = 0) -> Path:
    """The ``builtin:tiny`` base under ``root``, built on first use.

    The directory is keyed by the shape, vocabulary, tokens, template and seed, so a change
    to any of them builds a new base instead of reusing a stale one.
    """
    key = hashlib.sha256(json.dumps([TINY_SHAPE, VOCABULARY, SPECIAL_TOKENS, TINY_CHAT_TEMPLATE, seed]).encode()).hexdigest()[:12]
    out = Path(root) / f"tiny-{key}"
    if not (out / "config.json").exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        build_tiny_base(out, seed=seed)
    return out
