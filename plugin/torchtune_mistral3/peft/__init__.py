from ._fp8_lora import FP8LoRALinear, FrozenFP8Linear, dequantize_weight, fp8_linear

__all__ = [
    "FP8LoRALinear",
    "FrozenFP8Linear",
    "dequantize_weight",
    "fp8_linear",
]
