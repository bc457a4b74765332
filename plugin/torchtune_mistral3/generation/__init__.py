"""Generation for Mistral 3 VLMs on torchtune's generation utilities, and the generate recipe of plugin configs."""

from ._generate import collate_prompts, generate
from ._inference import load_inference_model, prompt_messages, resolve_image
from ._recipe import Mistral3GenerationRecipe, is_plugin_config, run_generation, sampling_options

__all__ = [
    "Mistral3GenerationRecipe",
    "collate_prompts",
    "generate",
    "is_plugin_config",
    "load_inference_model",
    "prompt_messages",
    "resolve_image",
    "run_generation",
    "sampling_options",
]
