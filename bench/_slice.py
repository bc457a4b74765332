"""The width-faithful Mistral Medium 3.5 slice the step-speed benchmark trains, and one synthetic MedPix-like batch.

The slice keeps every width of the 128B model (text hidden 12288, FFN 28672, 96 query / 8 KV heads of 128,
vocabulary 131072, untied head, YaRN RoPE with the Llama-4 query scale; the full 48-layer Pixtral tower and the
projector) and only cuts the number of decoder layers. The same HF ``config.json`` dict builds both the
transformers model and the plugin model (through ``mistral3_from_hf_config``), so both sides do the same work.
"""

import json
import os
import tempfile
from typing import Dict, Optional

import torch

IMG, IMG_BREAK, IMG_END, BOS, EOS, INST, INST_END = 10, 12, 13, 1, 2, 3, 4

# RoPE as in the Devstral-2 / MM3.5 config (theta 1e6, YaRN x64 over 4096, beta_fast 4, mscale_all_dim 0);
# llama_4_scaling_beta 0.1 (the Ministral-3 value) so that the query-scale op runs on both sides.
_ROPE = {
    "rope_type": "yarn",
    "type": "yarn",
    "rope_theta": 1e6,
    "factor": 64.0,
    "original_max_position_embeddings": 4096,
    "beta_fast": 4.0,
    "beta_slow": 1.0,
    "mscale": 1.0,
    "mscale_all_dim": 0.0,
    "llama_4_scaling_beta": 0.1,
}

FULL = {
    "text": dict(vocab_size=131072, hidden_size=12288, intermediate_size=28672, num_attention_heads=96,
                 num_key_value_heads=8, head_dim=128),
    "vision": dict(hidden_size=1664, intermediate_size=8192, num_hidden_layers=48, num_attention_heads=16,
                   head_dim=104, patch_size=14, image_size=1540),
}
TINY = {
    "text": dict(vocab_size=1024, hidden_size=256, intermediate_size=512, num_attention_heads=8,
                 num_key_value_heads=2, head_dim=32),
    "vision": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   head_dim=16, patch_size=14, image_size=1540),
}


def slice_hf_config(num_layers: int, tiny: bool = False) -> Dict:
    """HF ``config.json`` content of the slice (``Mistral3ForConditionalGeneration``, text ``ministral3``)."""
    dims = TINY if tiny else FULL
    rope = dict(_ROPE)
    if tiny:
        rope["original_max_position_embeddings"] = 16  # positions >= 16 exercise the Llama-4 scale on CPU
    text = dict(
        model_type="ministral3", num_hidden_layers=num_layers, hidden_act="silu", max_position_embeddings=262144,
        rms_norm_eps=1e-5, pad_token_id=11, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        rope_parameters=rope, **dims["text"],
    )
    vision = dict(
        model_type="pixtral", num_channels=3, hidden_act="silu", rope_parameters={"rope_type": "default",
        "rope_theta": 10000.0}, **dims["vision"],
    )
    return dict(
        architectures=["Mistral3ForConditionalGeneration"], model_type="mistral3", text_config=text,
        vision_config=vision, image_token_index=IMG, projector_hidden_act="gelu", vision_feature_layer=-1,
        multimodal_projector_bias=False, spatial_merge_size=2, tie_word_embeddings=False, torch_dtype="bfloat16",
    )


def write_config_dir(cfg: Dict) -> str:
    """Write ``cfg`` as ``config.json`` into a fresh temporary directory (for ``mistral3_from_hf_config``)."""
    d = tempfile.mkdtemp(prefix="mm35_slice_")
    with open(os.path.join(d, "config.json"), "w") as f:
        json.dump(cfg, f)
    return d


def write_result(result: Dict, path: Optional[str]) -> None:
    """Write a benchmark's result as JSON to ``path`` (its folder made), or nothing when ``path`` is None.

    Benchmarks call it after each phase, so a run stopped part-way keeps what it measured.
    """
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)


def image_layout(rows: int, cols: int) -> list:
    """Tokens of one image of ``rows x cols`` merged tokens: rows x ([IMG]*cols + [IMG_BREAK]), last -> [IMG_END]."""
    out = []
    for _ in range(rows):
        out += [IMG] * cols + [IMG_BREAK]
    out[-1] = IMG_END
    return out


def make_batch(cfg: Dict, batch_size: int, seq_len: int, image_px: int, device: str, seed: int = 0) -> Dict:
    """One MedPix-like batch: per sample one ``image_px`` square image, a question, and an answer filling the rest.

    Labels are -100 up to ``[/INST]`` (prompt and image tokens) and the answer tokens after it; no padding
    (every position is a real token), so tokens/s counts real work on both sides.

    Returns:
        Dict: ``tokens`` [B,S], ``labels`` [B,S], ``pixel_values`` [B,3,H,W] (bf16), ``image_sizes`` [B,2],
        ``images_per_sample`` [B], ``image_tokens`` (int, merged tokens per image), ``patches`` (per image).
    """
    g = torch.Generator().manual_seed(seed)
    vocab = cfg["text_config"]["vocab_size"]
    patch = cfg["vision_config"]["patch_size"]
    merge = cfg["spatial_merge_size"]
    if image_px % (patch * merge):
        raise ValueError(f"image side {image_px} px is not a multiple of {patch * merge}")
    side = image_px // (patch * merge)
    layout = image_layout(side, side)
    question = 48
    tokens, labels = [], []
    for _ in range(batch_size):
        prompt = [BOS, INST] + layout + torch.randint(100, vocab, (question,), generator=g).tolist() + [INST_END]
        n_answer = seq_len - len(prompt)
        if n_answer < 2:
            raise ValueError(f"seq_len {seq_len} leaves no room for an answer after {len(prompt)} prompt tokens")
        answer = torch.randint(100, vocab, (n_answer - 1,), generator=g).tolist() + [EOS]
        tokens.append(prompt + answer)
        labels.append([-100] * len(prompt) + answer)
    pixel_values = torch.randn(batch_size, 3, image_px, image_px, generator=g)
    return {
        "tokens": torch.tensor(tokens, device=device),
        "labels": torch.tensor(labels, device=device),
        "pixel_values": pixel_values.to(device=device, dtype=torch.bfloat16),
        "image_sizes": torch.tensor([[image_px, image_px]] * batch_size, device=device),
        "images_per_sample": torch.ones(batch_size, dtype=torch.long, device=device),
        "image_tokens": side * side,
        "patches": (image_px // patch) ** 2,
    }


def count_params(cfg: Dict) -> Dict[str, int]:
    """Parameter counts of the slice by part, from the dims alone (what the FLOP formula multiplies)."""
    t, v = cfg["text_config"], cfg["vision_config"]
    h, f, nl = t["hidden_size"], t["intermediate_size"], t["num_hidden_layers"]
    q, kv = t["num_attention_heads"] * t["head_dim"], t["num_key_value_heads"] * t["head_dim"]
    layer_mm = h * q + 2 * h * kv + q * h + 3 * h * f
    dv, fv, p = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    m = cfg["spatial_merge_size"]
    vision_layer_mm = 4 * dv * dv + 3 * dv * fv
    return {
        "decoder_layer_matmul": layer_mm,
        "decoder_layers_matmul": nl * layer_mm,
        "embedding": t["vocab_size"] * h,
        "lm_head": t["vocab_size"] * h,
        "vision_matmul": v["num_hidden_layers"] * vision_layer_mm + 3 * p * p * dv,
        "projector_matmul": m * m * dv * dv + dv * h + h * h,
    }


def step_flops(cfg: Dict, batch_size: int, seq_len: int, image_tokens: int, patches: int) -> Dict[str, float]:
    """Model FLOPs of one training step (forward + backward) of the slice.

    Text (trained): ``6 * (L * P_layer + P_head) * T + 12 * L * S * (n_h * d_h) * T`` with ``T = B * S`` tokens;
    the attention term counts the full (non-causal) score matrix, as NVIDIA's and torchtitan's MFU formulas do.
    Projector (trained): ``6 * P_proj * B * image_tokens``. Vision tower (frozen, forward only):
    ``2 * P_vision * B * patches + 4 * B * patches**2 * d_v``. The embedding lookup counts zero.
    """
    t, v = cfg["text_config"], cfg["vision_config"]
    pc = count_params(cfg)
    tokens = batch_size * seq_len
    text = 6 * (pc["decoder_layers_matmul"] + pc["lm_head"]) * tokens
    attn = 12 * t["num_hidden_layers"] * seq_len * t["num_attention_heads"] * t["head_dim"] * tokens
    proj = 6 * pc["projector_matmul"] * batch_size * image_tokens
    vision = 2 * pc["vision_matmul"] * batch_size * patches + 4 * batch_size * patches**2 * v["hidden_size"] * v[
        "num_hidden_layers"]
    return {"text": float(text), "attention": float(attn), "projector": float(proj), "vision": float(vision),
            "total": float(text + attn + proj + vision), "text_only": float(text + attn)}
