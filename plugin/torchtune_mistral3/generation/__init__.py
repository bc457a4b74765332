"""Generation for Mistral 3 VLMs on torchtune's generation utilities."""

from ._generate import collate_prompts, generate

__all__ = ["collate_prompts", "generate"]
