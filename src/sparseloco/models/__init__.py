"""Small reference models for examples, benchmarks and simulations."""

from sparseloco.models.gpt import GPT, GPTConfig

__all__ = ["GPT", "GPTConfig"]
