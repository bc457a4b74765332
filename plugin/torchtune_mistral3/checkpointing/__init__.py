from ._checkpointer import Mistral3HFCheckpointer
from ._demo_checkpoint import DEMO_HF_CONFIG, write_demo_checkpoint
from ._fp8 import dequantize, quantize_per_tensor
from ._fp8_raw import RawFP8Source
from ._from_hf_config import mistral3_from_hf_config, mistral3_lora_from_hf_config
from ._load import check_all_weights_read, load_into_module, stores_real_lm_head
from ._lora_load import adapter_keys, load_lora_checkpoint
from ._peft import merged_state_dict, save_merged_checkpoint, save_peft_adapter
from ._reader import HFCheckpointReader, LazyStateDict, read_safetensors_header
from ._source import TensorSource
from ._writer import default_fp8_keys, save_distributed, saved_config, write_hf_checkpoint

__all__ = [
    "DEMO_HF_CONFIG",
    "HFCheckpointReader",
    "LazyStateDict",
    "Mistral3HFCheckpointer",
    "RawFP8Source",
    "TensorSource",
    "adapter_keys",
    "check_all_weights_read",
    "default_fp8_keys",
    "dequantize",
    "load_into_module",
    "load_lora_checkpoint",
    "merged_state_dict",
    "mistral3_from_hf_config",
    "mistral3_lora_from_hf_config",
    "quantize_per_tensor",
    "read_safetensors_header",
    "save_distributed",
    "save_merged_checkpoint",
    "save_peft_adapter",
    "saved_config",
    "stores_real_lm_head",
    "write_demo_checkpoint",
    "write_hf_checkpoint",
]
