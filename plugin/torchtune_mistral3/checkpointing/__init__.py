from ._checkpointer import Mistral3HFCheckpointer
from ._fp8 import dequantize, quantize_per_tensor
from ._load import check_all_weights_read, load_into_module, stores_real_lm_head
from ._reader import HFCheckpointReader, LazyStateDict, read_safetensors_header
from ._writer import default_fp8_keys, save_distributed, saved_config, write_hf_checkpoint

__all__ = [
    "HFCheckpointReader",
    "LazyStateDict",
    "check_all_weights_read",
    "Mistral3HFCheckpointer",
    "default_fp8_keys",
    "dequantize",
    "load_into_module",
    "quantize_per_tensor",
    "read_safetensors_header",
    "save_distributed",
    "saved_config",
    "stores_real_lm_head",
    "write_hf_checkpoint",
]

from ._fp8_raw import RawFP8Source  # noqa: E402
from ._peft import merged_state_dict, save_merged_checkpoint, save_peft_adapter  # noqa: E402

__all__ += ["RawFP8Source", "merged_state_dict", "save_merged_checkpoint", "save_peft_adapter"]
