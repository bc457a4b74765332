"""Generation with Mistral 3 VLMs: one prefill of the prompts (images included), then one token per decode step.

The loop is the plugin's own, built from torchtune's generation helpers (padding masks, positions, ``sample``)
because torchtune's :func:`~torchtune.generation.generate` does work a decode step does not need: its model call
returns fp32 logits of every prompt position (``1457 x 131072 x 4`` bytes per prompt on Mistral Medium 3.5), it
concatenates the full-vocabulary logits of every step onto a growing tensor, and it slices the step's mask out of
a ``[b, s, s_cache]`` tensor by a Python index. Here:

- the vision tower runs once per batch of images; the image embeddings go into the prompt's ``[IMG]`` positions
  at prefill (KV cache) or at every step (full recomputation, ``use_kv_cache=False``);
- only the last position is normed and projected to the vocabulary (:func:`last_position_logits`);
- the decode step (:func:`decode_one_token`) takes tensors of fixed shapes only (one token and position per
  sample, a ``[b, 1, s_cache]`` mask updated in place), so ``torch.compile(decode_one_token, fullgraph=True,
  mode="reduce-overhead")`` makes one CUDA graph that every step of every call with that batch and cache size
  replays; in the attention, decoding reads the grouped KV heads of the cache in place.
"""

from contextlib import contextmanager
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torchtune import generation
from torchtune.modules.common_utils import local_kv_cache

from ..data import padded_collate_mistral3


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


def last_position_logits(
    model: nn.Module, embeds: torch.Tensor, *, input_pos: torch.Tensor, mask: Optional[torch.Tensor]
) -> torch.Tensor:
    """Decoder logits of the last position only: the layers see every position, norm and head only the last.

    Args:
        model (nn.Module): a :class:`~torchtune_mistral3.models.mistral3.Mistral3FusionModel`.
        embeds (torch.Tensor): input embeddings ``[b, s, d]`` (tokens embedded, image embeddings in place).
        input_pos (torch.Tensor): positions ``[b, s]``.
        mask (Optional[torch.Tensor]): boolean attention mask ``[b, s, s_kv]`` (True attends); ``s_kv`` is the
            cache length with KV caches, else ``s``.

    Returns:
        torch.Tensor: fp32 logits ``[b, v]``.

    Notation used for tensor shapes:
        - b: batch size
        - s: sequence length of this call
        - s_kv: key/value length
        - d: text hidden size
        - v: vocab size
    """
    decoder = model.decoder
    h = embeds
    for layer in decoder.layers:
        h = layer(h, mask=mask, input_pos=input_pos)
    return decoder.output(decoder.norm(h[:, -1:])).float()[:, 0]


def decode_one_token(
    model: nn.Module,
    tokens: torch.Tensor,
    input_pos: torch.Tensor,
    mask: torch.Tensor,
    q: Optional[torch.Tensor] = None,
    *,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
) -> torch.Tensor:
    """One decode step from the KV caches: the next token of every sample (the unit to ``torch.compile``).

    Every argument has the same shape at every step, so a compiled step (``fullgraph=True``) is one graph.

    Args:
        model (nn.Module): a :class:`~torchtune_mistral3.models.mistral3.Mistral3FusionModel` with KV caches.
        tokens (torch.Tensor): the last token of every sample ``[b, 1]``.
        input_pos (torch.Tensor): its position ``[b, 1]``.
        mask (torch.Tensor): the cache positions it attends ``[b, 1, s_cache]`` (boolean, True attends).
        q (Optional[torch.Tensor]): exponential noise ``[b, v]`` for :func:`torchtune.generation.sample`; None
            draws it inside. Default is None.
        temperature (float): sampling temperature. Default is 1.0.
        top_k (Optional[int]): sample among the k likeliest tokens. Default is None.

    Returns:
        torch.Tensor: next tokens ``[b, 1]`` (int32).
    """
    logits = last_position_logits(model, model.tok_embeddings(tokens), input_pos=input_pos, mask=mask)
    return generation.sample(logits, temperature=temperature, top_k=top_k, q=q)


def kv_cache_length(prompt_len: int, max_generated_tokens: int) -> int:
    """Cache positions ``generate`` sets up for a call: prompt + new tokens, rounded up to a multiple of 16.

    The last dimension of the attention masks is the cache length; a multiple of 16 is the alignment CUDA's
    memory-efficient SDPA kernel wants of a mask (else SDPA pads a copy of it). Positions past the last token are
    never attended.

    Args:
        prompt_len (int): prompt length (with its left padding).
        max_generated_tokens (int): most tokens to generate.

    Returns:
        int: the cache length.
    """
    return -(-(prompt_len + max_generated_tokens) // 16) * 16


@contextmanager
def _kv_caches(model: nn.Module, prompt: torch.Tensor, max_generated_tokens: int) -> Iterator[int]:
    """KV caches for one call, yielding their length: the caller's (reset) or made for the call."""
    if model.caches_are_setup():
        model.reset_caches()
        yield model.decoder_max_cache_seq_len
        return
    length = kv_cache_length(prompt.shape[1], max_generated_tokens)
    dtype = model.tok_embeddings.weight.dtype
    batch_size = prompt.shape[0]
    with local_kv_cache(model, batch_size=batch_size, device=prompt.device, dtype=dtype, decoder_max_seq_len=length):
        yield length


def _zero_after_stop(generated: torch.Tensor, stop_tokens: Optional[List[int]]) -> torch.Tensor:
    """``generated`` ``[b, n]`` with every token after a sample's first stop token set to 0 (torchtune's output)."""
    if not stop_tokens:
        return generated
    hit = torch.isin(generated, torch.tensor(stop_tokens, device=generated.device)).int()
    return generated.masked_fill(hit.cumsum(dim=1) - hit > 0, 0)


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
    decode_step: Optional[Callable[..., torch.Tensor]] = None,
) -> torch.Tensor:
    """Generate from a batch of (image +) text prompts: prefill, then one token per sample per step.

    Masks and positions are torchtune's (:func:`~torchtune.generation.get_causal_mask_from_padding_mask`,
    :func:`~torchtune.generation.get_position_ids_from_padding_mask`), and so are sampling and the output: the
    tokens of :func:`torchtune.generation.generate` for the same model, without its logits.

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
        decode_step (Optional[Callable[..., torch.Tensor]]): the decode step with the signature of
            :func:`decode_one_token`, e.g. ``torch.compile(decode_one_token, fullgraph=True,
            mode="reduce-overhead")``; None is :func:`decode_one_token`. Unused without a KV cache. Default is None.

    Returns:
        torch.Tensor: prompt + generated tokens ``[b, s_p + n]``; tokens after a sample's stop token are 0.

    Raises:
        ValueError: if ``max_generated_tokens`` < 1, the prompt has ``[IMG]`` tokens but no images are given, or
            the caller's caches have another batch size or too few positions.
    """
    if max_generated_tokens < 1:
        raise ValueError(f"max_generated_tokens={max_generated_tokens}: generate at least 1 token (max_new_tokens)")
    b, s_p = prompt.shape
    if use_kv_cache and model.caches_are_setup():
        _check_caches_fit(model, prompt, max_generated_tokens)
    image_token = model.encoder_tokens["image"]
    image_input = (encoder_input or {}).get("image")
    features = None
    if image_input is not None and image_input["image_sizes"].shape[0] > 0:
        model._check_image_tokens(prompt == image_token, image_input)
        # [t, d]: every image of the batch, in token order; the only run of the vision tower
        features = model.encoders["image"](**image_input)
    elif bool((prompt == image_token).any()):
        raise ValueError("the prompt has [IMG] placeholders but no images were given (encoder_input['image'])")

    def embed(tokens: torch.Tensor) -> torch.Tensor:
        # [b, s, d] of tokens that start with the prompt; generated tokens are embedded as tokens, even an [IMG] id
        embeds = model.tok_embeddings(tokens)
        if features is None:
            return embeds
        image_mask = F.pad(prompt == image_token, (0, tokens.shape[1] - s_p), value=False)
        return embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))

    def noise() -> Optional[torch.Tensor]:
        if rng is None:
            return None
        vocab = model.tok_embeddings.num_embeddings
        return torch.empty((b, vocab), device=prompt.device).exponential_(1, generator=rng)

    valid = prompt != pad_id
    # [b, s_p + n]: positions of the prompt (shifted past its left padding) and of the tokens to generate
    positions = generation.get_position_ids_from_padding_mask(F.pad(valid, (0, max_generated_tokens), value=True))
    stop = None if not stop_tokens else torch.tensor(stop_tokens, device=prompt.device)
    stopped = torch.zeros(b, dtype=torch.bool, device=prompt.device)
    sampling = dict(temperature=temperature, top_k=top_k)
    new_tokens: List[torch.Tensor] = []
    if not use_kv_cache:
        tokens = prompt
        for _ in range(max_generated_tokens):
            if stop is not None and bool(stopped.all()):
                break
            s = tokens.shape[1]
            mask = generation.get_causal_mask_from_padding_mask(F.pad(valid, (0, s - s_p), value=True))
            logits = last_position_logits(model, embed(tokens), input_pos=positions[:, :s], mask=mask)
            new_tokens.append(generation.sample(logits, q=noise(), **sampling))
            tokens = torch.cat([tokens, new_tokens[-1]], dim=1)
            if stop is not None:
                stopped |= torch.isin(new_tokens[-1][:, 0], stop)
        return torch.cat([prompt, _zero_after_stop(torch.cat(new_tokens, dim=1).to(prompt.dtype), stop_tokens)], dim=1)

    step = decode_step or decode_one_token
    with _kv_caches(model, prompt, max_generated_tokens) as cache_len:
        mask = generation.get_causal_mask_from_padding_mask(valid, target_seq_len=cache_len)  # [b, s_p, s_cache]
        logits = last_position_logits(model, embed(prompt), input_pos=positions[:, :s_p], mask=mask)
        new_tokens.append(generation.sample(logits, q=noise(), **sampling))
        # the decode steps' fixed-shape inputs: [b, 1, s_cache] cache positions attended, [b, 1] next position
        step_mask = F.pad(valid, (0, cache_len - s_p), value=False)[:, None].contiguous()
        step_pos = positions[:, s_p : s_p + 1].clone()
        for i in range(1, max_generated_tokens):
            if stop is not None:
                stopped |= torch.isin(new_tokens[-1][:, 0], stop)
                if bool(stopped.all()):
                    break
            step_mask[:, :, s_p + i - 1] = True  # the cache slot the step's input token is written to
            # clone: a CUDA-graphed step overwrites its output at the next replay
            new_tokens.append(step(model, new_tokens[-1], step_pos, step_mask, noise(), **sampling).clone())
            step_pos += 1
    return torch.cat([prompt, _zero_after_stop(torch.cat(new_tokens, dim=1).to(prompt.dtype), stop_tokens)], dim=1)
