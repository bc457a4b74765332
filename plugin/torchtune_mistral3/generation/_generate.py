"""Generation with Mistral 3 VLMs on torchtune's :func:`torchtune.generation.generate`.

torchtune's ``generate`` calls ``model(tokens, input_pos=..., mask=...)`` and knows nothing of images. The
image features of a batch of prompts are computed once here (the vision tower runs once per image, whether or
not a KV cache is used) and put into the prompt's ``[IMG]`` positions whenever the model sees the prompt: at
prefill with a KV cache, at every step of a full re-forward without one.
"""

from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchtune import generation
from torchtune.modules.common_utils import local_kv_cache

from ..data import padded_collate_mistral3


class _ImagePromptModel(nn.Module):
    """A Mistral 3 fusion model bound to one batch of prompts and their precomputed image embeddings.

    Args:
        model (nn.Module): a :class:`~torchtune_mistral3.models.mistral3.Mistral3FusionModel`.
        prompt (torch.Tensor): left-padded prompt tokens, shape ``[b, s_p]``.
        image_input (Dict[str, Any]): ``pixel_values``, ``image_sizes``, ``images_per_sample`` of the prompts.
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor, image_input: Dict[str, Any]) -> None:
        super().__init__()
        self.model = model
        self.prompt_len = prompt.shape[1]
        self.image_mask = prompt == model.encoder_tokens["image"]
        model._check_image_tokens(self.image_mask, image_input)
        # [t, d]: every image of the batch, in token order; the only run of the vision tower
        self.features = model.encoders["image"](**image_input)

    @property
    def tok_embeddings(self) -> nn.Module:
        return self.model.tok_embeddings

    @property
    def decoder_max_cache_seq_len(self) -> int:
        return self.model.decoder_max_cache_seq_len

    def caches_are_enabled(self) -> bool:
        return self.model.caches_are_enabled()

    def forward(
        self, tokens: torch.Tensor, *, input_pos: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        """Decoder logits of ``tokens``; calls that start with the prompt get its image embeddings.

        Args:
            tokens (torch.Tensor): the prompt (+ generated tokens), or one new token per sample, ``[b, s]``.
            input_pos (Optional[torch.Tensor]): positions as torchtune's generate passes them. Default is None.
            mask (Optional[torch.Tensor]): attention mask ``[b, s, s_cache]``. Default is None.

        Returns:
            torch.Tensor: logits ``[b, s, v]``.
        """
        # [b, s, d]; generated tokens are embedded as tokens, even an [IMG] id (as transformers does)
        embeds = self.model.tok_embeddings(tokens)
        if tokens.shape[1] >= self.prompt_len:
            image_mask = F.pad(self.image_mask, (0, tokens.shape[1] - self.prompt_len), value=False)
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), self.features.to(embeds.dtype))
        return self.model.decoder(embeds, mask=mask, input_pos=input_pos)


def collate_prompts(samples: Sequence[Dict[str, Any]], pad_id: int) -> Dict[str, Any]:
    """Batch transformed prompts (``transform(sample, inference=True)``) for generation: tokens padded on the left.

    Args:
        samples (Sequence[Dict[str, Any]]): outputs of the model transform with ``tokens`` and ``encoder_input``.
        pad_id (int): padding token id.

    Returns:
        Dict[str, Any]: ``tokens`` LongTensor ``[b, s_max]`` (left-padded) and ``encoder_input`` as
        :func:`~torchtune_mistral3.data.padded_collate_mistral3` builds it.
    """
    batch = padded_collate_mistral3([{**s, "labels": s["tokens"]} for s in samples], padding_idx=pad_id)
    longest = batch["tokens"].shape[1]
    tokens = torch.full((len(samples), longest), pad_id, dtype=torch.long)
    for i, s in enumerate(samples):
        if s["tokens"]:
            tokens[i, longest - len(s["tokens"]) :] = torch.as_tensor(s["tokens"], dtype=torch.long)
    return {"tokens": tokens, "encoder_input": batch["encoder_input"]}


def _check_caches_fit(model: nn.Module, prompt: torch.Tensor, max_generated_tokens: int) -> None:
    """Raise unless the model's KV caches hold ``prompt``'s batch and ``max_generated_tokens`` more positions."""
    cache = next(m.kv_cache for m in model.modules() if getattr(m, "kv_cache", None) is not None)
    needed = prompt.shape[1] + max_generated_tokens
    if cache.k_cache.shape[0] != prompt.shape[0] or model.decoder_max_cache_seq_len < needed:
        raise ValueError(
            f"the model's KV caches are set up for batch {cache.k_cache.shape[0]} and "
            f"{model.decoder_max_cache_seq_len} positions, but this call needs batch {prompt.shape[0]} and {needed}: "
            "call model.setup_caches(...) again with these sizes (after delete_kv_caches), or delete the caches"
        )


@torch.no_grad()
def generate(
    model: nn.Module,
    prompt: torch.Tensor,
    *,
    max_generated_tokens: int,
    pad_id: int,
    encoder_input: Optional[Dict[str, Dict[str, Any]]] = None,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    stop_tokens: Optional[List[int]] = None,
    rng: Optional[torch.Generator] = None,
    use_kv_cache: bool = True,
    custom_generate_next_token=None,
) -> torch.Tensor:
    """Generate from a batch of (image +) text prompts with torchtune's :func:`~torchtune.generation.generate`.

    Args:
        model (nn.Module): a Mistral 3 fusion model. Without KV caches set up, caches are made for this call;
            caches the caller set up (``model.setup_caches``, batch size of ``prompt``, room for the prompt and
            ``max_generated_tokens``) are reset and reused, so that a compiled decode step keeps its buffers.
        prompt (torch.Tensor): left-padded prompt tokens ``[b, s_p]`` (see :func:`collate_prompts`).
        max_generated_tokens (int): most tokens to generate per prompt.
        pad_id (int): padding id of ``prompt``.
        encoder_input (Optional[Dict[str, Dict[str, Any]]]): ``{"image": {...}}`` of the prompts, as the collate
            builds it; None (or no image) for text-only prompts. Default is None.
        temperature (float): sampling temperature; with ``top_k=1`` sampling is greedy. Default is 1.0.
        top_k (Optional[int]): sample among the k likeliest tokens. Default is None.
        stop_tokens (Optional[List[int]]): a sample stops after one of these. Default is None.
        rng (Optional[torch.Generator]): generator for sampling. Default is None.
        use_kv_cache (bool): decode from a KV cache (True) or re-run the whole sequence each step. Default is True.
        custom_generate_next_token (Optional[Callable]): e.g. a compiled
            :func:`~torchtune.generation.generate_next_token` for the decode steps. Default is None.

    Returns:
        torch.Tensor: prompt + generated tokens ``[b, s_p + n]``; tokens after a sample's stop token are 0.

    Raises:
        ValueError: if the caller's caches have another batch size or too few positions.
    """
    image_input = (encoder_input or {}).get("image")
    has_images = image_input is not None and image_input["image_sizes"].shape[0] > 0
    target = _ImagePromptModel(model, prompt, image_input) if has_images else model
    kwargs = dict(
        max_generated_tokens=max_generated_tokens,
        pad_id=pad_id,
        temperature=temperature,
        top_k=top_k,
        stop_tokens=stop_tokens,
        rng=rng,
        custom_generate_next_token=custom_generate_next_token,
    )
    if not use_kv_cache:
        return generation.generate(target, prompt, **kwargs)[0]
    if model.caches_are_setup():
        _check_caches_fit(model, prompt, max_generated_tokens)
        model.reset_caches()
        return generation.generate(target, prompt, **kwargs)[0]
    dtype = model.tok_embeddings.weight.dtype
    with local_kv_cache(
        model,
        batch_size=prompt.shape[0],
        device=prompt.device,
        dtype=dtype,
        decoder_max_seq_len=prompt.shape[1] + max_generated_tokens,
    ):
        return generation.generate(target, prompt, **kwargs)[0]
