from ._fp8_lora import FP8LoRALinear, FrozenFP8Linear, dequantize_weight, fp8_linear
from ._load import AdapterInit, adapter_keys, load_lora_checkpoint

__all__ = [
    "AdapterInit",
    "FP8LoRALinear",
    "FrozenFP8Linear",
    "adapter_keys",
    "dequantize_weight",
    "fp8_linear",
    "load_lora_checkpoint",
]
