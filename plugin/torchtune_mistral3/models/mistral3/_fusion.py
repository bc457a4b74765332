"""Early fusion of the Pixtral encoder + projector with the Ministral-3 decoder.

Image embeddings replace the ``[IMG]`` placeholder tokens, one embedding per token, before the first decoder layer.
"""

from typing import Any, Dict, List, Optional

import torch
from torch import nn
from torchtune.modules import TransformerDecoder
from torchtune.modules.model_fusion import EarlyFusionModel
from torchtune.modules.peft import set_trainable_params

from ._projector import Mistral3Projector
from ._vision_encoder import PixtralVisionEncoder, patch_grid_sizes


class Mistral3ImageEncoder(nn.Module):
    """Vision tower followed by the projector: images in, text-width embeddings (one per ``[IMG]`` token) out.

    Args:
        vision (PixtralVisionEncoder): the vision tower (``encoders.image.vision``).
        projector (Mistral3Projector): the projector (``encoders.image.projector``).
    """

    def __init__(self, vision: PixtralVisionEncoder, projector: Mistral3Projector) -> None:
        super().__init__()
        self.vision = vision
        self.projector = projector

    def tokens_per_image(self, image_sizes: torch.Tensor) -> List[int]:
        """Number of embeddings (``[IMG]`` tokens) each image produces.

        Args:
            image_sizes (torch.Tensor): (height, width) in pixels, shape ``[n, 2]``.

        Returns:
            List[int]: ``(h / (patch_size * merge)) * (w / (patch_size * merge))`` per image.
        """
        merge = self.projector.spatial_merge_size
        grids = patch_grid_sizes(image_sizes, self.vision.patch_size)
        return [(rows // merge) * (cols // merge) for rows, cols in grids]

    def forward(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        images_per_sample: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """Embed a batch of images.

        Args:
            pixel_values (torch.Tensor): images zero-padded bottom/right, shape ``[n, c, h_max, w_max]``.
            image_sizes (torch.Tensor): true (height, width) in pixels, shape ``[n, 2]``.
            images_per_sample (Optional[torch.Tensor]): images of each sample, shape ``[b]``; unused here (the
                fusion model checks it), accepted so the batch's encoder kwargs pass through. Default is None.

        Returns:
            torch.Tensor: embeddings of all images in order, shape ``[t, d]``.

        Notation used for tensor shapes:
            - n: number of images in the batch
            - b: batch size
            - c: image channels
            - t: total number of image tokens
            - d: text hidden size
        """
        grids = patch_grid_sizes(image_sizes, self.vision.patch_size)
        return self.projector(self.vision(pixel_values, grids), grids)


class Mistral3FusionModel(EarlyFusionModel):
    """:class:`~torchtune.modules.model_fusion.EarlyFusionModel` for Mistral 3, with finer freezing and checks.

    Differences from the stock class: every token is embedded and image embeddings are then scattered into the
    ``[IMG]`` positions (as transformers does, so the ``[IMG]`` row gets no gradient either way); the number of
    ``[IMG]`` tokens of every sample is checked against its images; and trainability is set per part.

    Args:
        decoder (TransformerDecoder): text decoder (its ``tok_embeddings`` move to ``self.tok_embeddings``; state
            dict keys stay ``decoder.tok_embeddings.*``).
        image_encoder (Mistral3ImageEncoder): vision tower + projector (``encoders.image``); the projector must
            have been passed to ``register_fusion_module``.
        image_token_id (int): id of ``[IMG]``.
        vision_trainable (bool): train the vision tower. Default is False.
        projector_trainable (bool): train the projector. Default is True.
        embeddings_trainable (bool): train the token embeddings. Default is True.
        output_trainable (bool): train the output head (with tied embeddings it must equal
            ``embeddings_trainable``). Default is True.
        decoder_trainable (bool): train the decoder layers and final norm. Default is True.

    Raises:
        ValueError: if the output head is tied to the embeddings but their trainable flags differ.
    """

    def __init__(
        self,
        decoder: TransformerDecoder,
        image_encoder: Mistral3ImageEncoder,
        image_token_id: int,
        *,
        vision_trainable: bool = False,
        projector_trainable: bool = True,
        embeddings_trainable: bool = True,
        output_trainable: bool = True,
        decoder_trainable: bool = True,
    ) -> None:
        tied = not isinstance(decoder.output, nn.Module)
        if tied and output_trainable != embeddings_trainable:
            raise ValueError(
                "the output head is tied to the token embeddings (tie_word_embeddings=true), so output_trainable "
                f"({output_trainable}) must equal embeddings_trainable ({embeddings_trainable})"
            )
        super().__init__(
            decoder,
            encoders={"image": image_encoder},
            encoder_tokens={"image": image_token_id},
            decoder_trainable=decoder_trainable,
            encoders_trainable=vision_trainable,
            fusion_trainable=projector_trainable,
        )
        # The stock flags tie embeddings and head to the decoder body; split them.
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        part_flags = {"tok_embeddings.": embeddings_trainable, "decoder.output.": output_trainable}
        for name, _ in self.named_parameters():
            for prefix, flag in part_flags.items():
                if name.startswith(prefix):
                    (trainable.add if flag else trainable.discard)(name)
        set_trainable_params(self, trainable)

    def setup_caches(
        self,
        batch_size: int,
        dtype: torch.dtype,
        *,
        encoder_max_seq_len: Optional[int] = None,
        decoder_max_seq_len: Optional[int] = None,
    ) -> None:
        """Set up the decoder's key/value caches for generation (torchtune's KV-cache API).

        Early fusion has no cross-attention: image embeddings sit in the decoder's own sequence, so their keys
        and values live in the decoder cache and ``encoder_max_seq_len`` (which the stock recipes pass) is
        not used.

        Args:
            batch_size (int): batch size of the caches.
            dtype (torch.dtype): dtype of the caches.
            encoder_max_seq_len (Optional[int]): accepted for the stock recipes' call; unused. Default is None.
            decoder_max_seq_len (Optional[int]): cache length (prompt + new tokens); None means the decoder's
                ``max_seq_len``. Default is None.
        """
        self.decoder.setup_caches(batch_size, dtype, decoder_max_seq_len=decoder_max_seq_len)

    @property
    def decoder_max_cache_seq_len(self) -> int:
        """Length of the decoder's key/value caches (set by :meth:`setup_caches`), read by torchtune's generate."""
        return self.decoder.decoder_max_cache_seq_len

    def _check_image_tokens(self, image_mask: torch.Tensor, image_input: Dict[str, Any]) -> None:
        """Raise a ValueError naming the first sample whose ``[IMG]`` count differs from its images' embeddings."""
        found = image_mask.sum(dim=1).tolist()
        per_image = self.encoders["image"].tokens_per_image(image_input["image_sizes"])
        images_per_sample = image_input.get("images_per_sample")
        if images_per_sample is None:
            # Without the per-sample split only the batch total can be checked.
            counts, expected = [sum(found)], [sum(per_image)]
            where = ["the batch"]
        else:
            counts_per_sample = images_per_sample.tolist()
            if len(counts_per_sample) != len(found) or sum(counts_per_sample) != len(per_image):
                raise ValueError(
                    f"images_per_sample {counts_per_sample} does not fit a batch of {len(found)} samples "
                    f"and {len(per_image)} images"
                )
            counts, expected, where, start = found, [], [], 0
            for i, n in enumerate(counts_per_sample):
                expected.append(sum(per_image[start : start + n]))
                where.append(f"sample {i} of the batch ({n} image(s))")
                start += n
        for count, want, name in zip(counts, expected, where):
            if count != want:
                raise ValueError(
                    f"{name} has {count} [IMG] tokens but its images give {want} image embeddings "
                    f"(image token id {self.encoder_tokens['image']}); the token layout and the images disagree, "
                    "check the model transform and collate (truncation must not cut an image's tokens)"
                )

    def forward(
        self,
        tokens: torch.Tensor,
        *,
        mask: Optional[torch.Tensor] = None,
        encoder_input: Optional[Dict[str, Dict[str, Any]]] = None,
        input_pos: Optional[torch.Tensor] = None,
        **kwargs: Dict[str, Any],
    ) -> torch.Tensor:
        """Embed tokens, put image embeddings into the ``[IMG]`` positions, run the decoder.

        Args:
            tokens (torch.Tensor): token ids, shape ``[b, s]``.
            mask (Optional[torch.Tensor]): decoder attention mask ``[b, s, s]``; None means causal. Default is None.
            encoder_input (Optional[Dict[str, Dict[str, Any]]]): ``{"image": {"pixel_values", "image_sizes",
                "images_per_sample"}}`` (see the batch contract); None for text-only batches. Default is None.
            input_pos (Optional[torch.Tensor]): positions ``[b, s]``; None means ``0..s-1``. Default is None.
            **kwargs (Dict[str, Any]): ignored; matches :class:`~torchtune.modules.TransformerDecoder`.

        Returns:
            torch.Tensor: logits ``[b, s, v]`` in fp32, or a list of chunks after ``set_num_output_chunks``.

        Raises:
            ValueError: if ``encoder_input`` has other keys than ``"image"``, or a sample's ``[IMG]`` count does
                not match its images.

        Notation used for tensor shapes:
            - b: batch size
            - s: sequence length
            - d: text hidden size
            - v: vocab size
        """
        image_mask = tokens == self.encoder_tokens["image"]
        # [b, s, d]
        embeds = self.tok_embeddings(tokens)
        if encoder_input is not None:
            if encoder_input.keys() != self.encoders.keys():
                raise ValueError(f"encoder_input has keys {list(encoder_input)}, expected {list(self.encoders)}")
            image_input = encoder_input["image"]
            self._check_image_tokens(image_mask, image_input)
            features = self.encoders["image"](**image_input)
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), features.to(embeds.dtype))
        elif bool(image_mask.any()):
            raise ValueError("tokens contain [IMG] placeholders but no encoder_input was given")
        return self.decoder(embeds, mask=mask, input_pos=input_pos)
