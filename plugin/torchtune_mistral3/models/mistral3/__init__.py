from ._attention import block_causal_mask, packed_attention_prefers_flex
from ._component_builders import ministral3_decoder, mistral3, mistral3_projector, pixtral_vision_encoder
from ._convert_weights import hf_key_to_tune, mistral3_hf_to_tune, mistral3_tune_to_hf, tune_key_to_hf
from ._fusion import Mistral3FusionModel, Mistral3ImageEncoder
from ._lora_builders import (
    ministral3_3b_lora,
    ministral3_8b_lora,
    ministral3_14b_lora,
    mistral3_lora,
    mistral3p5_128b_lora,
)
from ._model_builders import (
    ministral3_3b,
    ministral3_8b,
    ministral3_14b,
    mistral3_arguments_from_hf_config,
    mistral3p5_128b,
)
from ._parallelism import mistral3_pp_stage_extras, mistral3_tp_plan
from ._position_embeddings import Llama4QueryScale, PixtralRotaryPositionalEmbeddings, YarnRotaryPositionalEmbeddings
from ._sizes import HF_REPO_TO_SIZE, NAMED_SIZES
from ._tokenizer import Mistral3Tokenizer, check_tokenizer_fits_model
from ._transform import Mistral3Transform, PixtralImageTransform, medical_image_to_rgb, mistral3_transform

__all__ = [
    "block_causal_mask",
    "packed_attention_prefers_flex",
    "ministral3_3b_lora",
    "ministral3_8b_lora",
    "ministral3_14b_lora",
    "mistral3_lora",
    "mistral3p5_128b_lora",
    "Mistral3Tokenizer",
    "check_tokenizer_fits_model",
    "Mistral3Transform",
    "PixtralImageTransform",
    "medical_image_to_rgb",
    "mistral3_transform",
    "mistral3_pp_stage_extras",
    "mistral3_tp_plan",
    "Llama4QueryScale",
    "Mistral3FusionModel",
    "Mistral3ImageEncoder",
    "PixtralRotaryPositionalEmbeddings",
    "YarnRotaryPositionalEmbeddings",
    "hf_key_to_tune",
    "HF_REPO_TO_SIZE",
    "NAMED_SIZES",
    "ministral3_14b",
    "ministral3_3b",
    "ministral3_8b",
    "ministral3_decoder",
    "mistral3",
    "mistral3_arguments_from_hf_config",
    "mistral3_hf_to_tune",
    "mistral3_projector",
    "mistral3_tune_to_hf",
    "mistral3p5_128b",
    "pixtral_vision_encoder",
    "tune_key_to_hf",
]
