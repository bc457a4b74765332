"""Tiny random transformers ``Mistral3ForConditionalGeneration`` models (the numerical reference), built offline.

Other tests import these factories to make tiny checkpoints:

    config = tiny_hf_config()                  # Mistral3Config, every branch active (YaRN, Llama-4 scale, ...)
    model = tiny_hf_model(config)               # fp32, eager attention, deterministic random weights
    model.save_pretrained(path)                 # a checkpoint that mistral3_from_hf_config(path) rebuilds
"""

from typing import Any, Dict, List, Optional, Tuple

import torch

IMG, IMG_BREAK, IMG_END, PAD = 10, 12, 13, 11

# One batch used by the parity tests: sample 0 holds two images of different sizes, sample 1 none.
IMAGE_SIZES_PX = ((56, 84), (84, 56))


def tiny_hf_config(
    *,
    head_dim: int = 24,
    mscale_all_dim: float = 0.0,
    llama_4_scaling_beta: float = 0.1,
    original_max_position_embeddings: int = 16,
    tie_word_embeddings: bool = False,
    vocab_size: int = 256,
    hidden_size: int = 64,
    num_layers: int = 2,
    vision_hidden_size: int = 32,
    vision_layers: int = 2,
    max_position_embeddings: int = 128,
    projector_bias: bool = False,
    **text_overrides: Any,
):
    """A tiny Mistral3Config (text ``ministral3``, vision ``pixtral``) exercising every code path.

    Args:
        head_dim (int): text head dim; 16 equals hidden/heads, anything else does not. Default is 24.
        mscale_all_dim (float): YaRN ``mscale_all_dim`` (0 gives attention factor 1.416 at factor 64). Default is 0.0.
        llama_4_scaling_beta (float): query scale beta. Default is 0.1.
        original_max_position_embeddings (int): YaRN/L4 ``L0``, small so tiny sequences pass it. Default is 16.
        tie_word_embeddings (bool): top-level tying flag (transformers' default would be True). Default is False.
        vocab_size (int): vocabulary. Default is 256.
        hidden_size (int): text width. Default is 64.
        num_layers (int): text layers. Default is 2.
        vision_hidden_size (int): vision width. Default is 32.
        vision_layers (int): vision layers. Default is 2.
        max_position_embeddings (int): text positions. Default is 128.
        projector_bias (bool): ``multimodal_projector_bias``. Default is False.
        **text_overrides (Any): more ``text_config`` fields.

    Returns:
        transformers.Mistral3Config: the config.
    """
    from transformers import Mistral3Config

    text = dict(
        model_type="ministral3",
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=96,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        rope_parameters=dict(
            rope_type="yarn",
            rope_theta=1e6,
            factor=64.0,
            original_max_position_embeddings=original_max_position_embeddings,
            beta_fast=4.0,
            beta_slow=1.0,
            mscale=1.0,
            mscale_all_dim=mscale_all_dim,
            llama_4_scaling_beta=llama_4_scaling_beta,
        ),
    )
    text.update(text_overrides)
    vision = dict(
        model_type="pixtral",
        hidden_size=vision_hidden_size,
        intermediate_size=48,
        num_hidden_layers=vision_layers,
        num_attention_heads=2,
        patch_size=14,
        image_size=112,
        hidden_act="silu",
    )
    return Mistral3Config(
        text_config=text,
        vision_config=vision,
        tie_word_embeddings=tie_word_embeddings,
        multimodal_projector_bias=projector_bias,
        image_token_index=IMG,
    )


def tiny_hf_model(config=None, *, seed: int = 0):
    """A random fp32 ``Mistral3ForConditionalGeneration`` with eager attention, weights drawn from ``seed``.

    Norm weights are randomised too (they start at 1), so a wrong norm or a swapped norm would show.

    Args:
        config (Optional[transformers.Mistral3Config]): the config; None uses :func:`tiny_hf_config`.
        seed (int): RNG seed. Default is 0.

    Returns:
        transformers.Mistral3ForConditionalGeneration: the model in eval mode.
    """
    from transformers import Mistral3ForConditionalGeneration

    config = config if config is not None else tiny_hf_config()
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Mistral3ForConditionalGeneration(config).float().eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or "layernorm" in name or "ln_pre" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
    return model


def image_token_block(height_px: int, width_px: int, merge_px: int = 28) -> List[int]:
    """Pixtral's token layout of one image: rows x ([IMG] * cols + [IMG_BREAK]), the last break -> [IMG_END]."""
    rows, cols = height_px // merge_px, width_px // merge_px
    block = ([IMG] * cols + [IMG_BREAK]) * rows
    block[-1] = IMG_END
    return block


def tiny_batch(
    vocab_size: int = 256,
    seq_len: int = 40,
    image_sizes_px: Tuple[Tuple[int, int], ...] = IMAGE_SIZES_PX,
    seed: int = 0,
) -> Dict[str, Any]:
    """The parity batch: sample 0 = text, image 1, text, image 2, text; sample 1 = text only, right-padded.

    Args:
        vocab_size (int): vocabulary to draw text tokens from (ids >= 20, so no special token). Default is 256.
        seq_len (int): padded sequence length. Default is 40.
        image_sizes_px (Tuple[Tuple[int, int], ...]): (h, w) of sample 0's images. Default is 56x84 and 84x56.
        seed (int): RNG seed. Default is 0.

    Returns:
        Dict[str, Any]: ``tokens`` [2, seq_len] and ``encoder_input`` per the batch contract.
    """
    g = torch.Generator().manual_seed(seed)

    def text(n: int) -> List[int]:
        return torch.randint(20, vocab_size, (n,), generator=g).tolist()

    sample0 = [1] + text(2)
    for h, w in image_sizes_px:
        sample0 += image_token_block(h, w) + text(2)
    sample0 += text(seq_len - len(sample0))
    sample1 = [1] + text(seq_len - 8) + [PAD] * 7
    tokens = torch.tensor([sample0[:seq_len], sample1])

    h_max = max(h for h, _ in image_sizes_px)
    w_max = max(w for _, w in image_sizes_px)
    pixel_values = torch.zeros(len(image_sizes_px), 3, h_max, w_max)
    for i, (h, w) in enumerate(image_sizes_px):
        pixel_values[i, :, :h, :w] = torch.randn(3, h, w, generator=g)
    return {
        "tokens": tokens,
        "encoder_input": {
            "image": {
                "pixel_values": pixel_values,
                "image_sizes": torch.tensor(image_sizes_px),
                "images_per_sample": torch.tensor([len(image_sizes_px), 0]),
            }
        },
    }


def plugin_from_hf(hf_model, checkpoint_dir: Optional[str] = None, **overrides: Any):
    """Build the plugin model for ``hf_model``'s config and load its weights through the key conversion.

    Tensors are cloned, so nothing is shared between the two models.

    Args:
        hf_model (transformers.Mistral3ForConditionalGeneration): the reference.
        checkpoint_dir (Optional[str]): where to write config.json (for ``mistral3_from_hf_config``); a temporary
            directory if None. Default is None.
        **overrides (Any): builder overrides.

    Returns:
        Mistral3FusionModel: the plugin model with the same weights, in eval mode.
    """
    import tempfile

    from torchtune_mistral3.checkpointing import mistral3_from_hf_config
    from torchtune_mistral3.models.mistral3 import mistral3_hf_to_tune

    with tempfile.TemporaryDirectory() as tmp:
        directory = checkpoint_dir or tmp
        hf_model.config.save_pretrained(directory)
        model = mistral3_from_hf_config(directory, **overrides)
    state_dict = {k: v.detach().clone() for k, v in hf_model.state_dict().items()}
    if hf_model.config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    model.load_state_dict(mistral3_hf_to_tune(state_dict), strict=True)
    return model.eval()
