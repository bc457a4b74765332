from ._convert_weights import hf_key_to_tune, mistral3_hf_to_tune, mistral3_tune_to_hf, tune_key_to_hf

__all__ = [
    "hf_key_to_tune",
    "mistral3_hf_to_tune",
    "mistral3_tune_to_hf",
    "tune_key_to_hf",
]
