"""The embedded synthetic task: a tiny word language with a known gold reward.

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
    Bradley-Terry model of the gold reward with temperature ``LABEL_TEMPERATURE``:
    ``P(a preferred) = sigmoid((gold(a) - gold(b)) / T)``. This gives realistic label
    noise (about a quarter of labels disagree with the noiseless gold preference, in the
    range reported for human preference data, e.g. ~63-69% RM validation accuracy in the
    N+ implementation-details paper, arXiv 2403.17031).
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import dataclass
from pathlib import Path

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
LABEL_TEMPERATURE = 0.25
EXPLORATORY_FRACTION = 0.3
_EXPLORATORY_WORDS = CONTENT_WORDS + TOPICS

#: every word the tokenizer knows (special tokens are added by rlhf.tiny).
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


@dataclass
class SyntheticTaskConfig:
    """Sizes of the generated synthetic task files."""

    seed: int = 0
    num_sft: int = 2000
    num_pairs: int = 4000
    num_ppo_prompts: int = 2048
    num_eval_prompts: int = 256
    label_temperature: float = LABEL_TEMPERATURE


def write_task(out_dir: str | Path, cfg: SyntheticTaskConfig) -> dict[str, Path]:
    """Write the synthetic task's files and return their paths.

    Files (JSONL, one object per line):
      * ``sft.jsonl``: ``{"prompt": [user msg], "completion": [assistant msg]}`` (TRL's
        conversational prompt-completion format).
      * ``pairs.jsonl``: ``{"prompt", "chosen", "rejected"}`` conversational preference
        pairs with noisy labels; also ``gold_chosen``/``gold_rejected`` for evaluation only
        (the ingestion keeps only the canonical fields, so training never sees them).
      * ``ppo_prompts.jsonl`` and ``eval_prompts.jsonl``: ``{"prompt": [user msg]}``; the
        eval prompts are disjoint from the training prompts' random stream.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rng = random.Random(cfg.seed)
    paths = {
        "sft": out / "sft.jsonl",
        "pairs": out / "pairs.jsonl",
        "ppo_prompts": out / "ppo_prompts.jsonl",
        "eval_prompts": out / "eval_prompts.jsonl",
    }

    def dump(path: Path, rows) -> None:
        tmp = path.with_suffix(".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        tmp.replace(path)

    def sft_rows():
        for _ in range(cfg.num_sft):
            p = sample_prompt(rng)
            yield {"prompt": _user(p), "completion": _assistant(sample_response(rng, p))}

    def pair_rows():
        for _ in range(cfg.num_pairs):
            p = sample_prompt(rng)
            a, b = sample_pair_response(rng, p), sample_pair_response(rng, p)
            while b == a:
                b = sample_pair_response(rng, p)
            ga, gb = gold_reward(p, a), gold_reward(p, b)
            p_a = 1.0 / (1.0 + math.exp(-(ga - gb) / cfg.label_temperature))
            if rng.random() >= p_a:
                a, b, ga, gb = b, a, gb, ga
            yield {
                "prompt": _user(p),
                "chosen": _assistant(a),
                "rejected": _assistant(b),
                "gold_chosen": ga,
                "gold_rejected": gb,
            }

    dump(paths["sft"], sft_rows())
    dump(paths["pairs"], pair_rows())
    dump(paths["ppo_prompts"], ({"prompt": _user(sample_prompt(rng))} for _ in range(cfg.num_ppo_prompts)))
    eval_rng = random.Random(cfg.seed + 1_000_003)
    dump(paths["eval_prompts"], ({"prompt": _user(sample_prompt(eval_rng))} for _ in range(cfg.num_eval_prompts)))
    return paths
