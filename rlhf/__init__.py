"""rlhf: staged RLHF training (SFT -> reward model -> PPO) with one base model and LoRA roles."""

__version__ = "0.1.0"
