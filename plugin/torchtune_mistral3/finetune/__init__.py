"""The fine-tuning recipes (full and LoRA) behind ``tune run full_finetune_distributed`` and the LoRA recipe names.

Importing this package imports torchtune's stock recipe scripts that the classes extend.
"""

from ._full import Mistral3FullFinetuneRecipe
from ._lora import Mistral3LoRAFinetuneRecipe

__all__ = ["Mistral3FullFinetuneRecipe", "Mistral3LoRAFinetuneRecipe"]
