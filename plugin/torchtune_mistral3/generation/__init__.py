"""Generation for Mistral 3 VLMs (a prefill, then a decode step made to compile) and the generate recipe."""

from ._generate import collate_prompts, decode_one_token, generate, kv_cache_length, last_position_logits
from ._inference import load_inference_model, prompt_messages, resolve_image
from ._recipe import Mistral3GenerationRecipe, sampling_options

__all__ = [
    "Mistral3GenerationRecipe",
    "collate_prompts",
    "decode_one_token",
    "generate",
    "kv_cache_length",
    "last_position_logits",
    "load_inference_model",
    "prompt_messages",
    "resolve_image",
    "sampling_options",
]
