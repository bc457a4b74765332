"""Pixtral image processing and the Mistral 3 model transform (tekken chat tokens + image tensors)."""

import functools
import logging
import math
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchtune.data import Message
from torchtune.modules.transforms import Transform
from torchtune.modules.transforms.tokenizers import ModelTokenizer

from ._tokenizer import Mistral3Tokenizer

log = logging.getLogger(__name__)

# CLIP statistics, as in the released Pixtral / Mistral 3 processor configs.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# Pillow modes holding more than 8 bits per pixel (16-bit PNG/TIFF, 32-bit int, 32-bit float).
_HIGH_BIT_DEPTH_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I", "F"})


def _window_from_info(info: Mapping[str, Any]) -> Optional[Tuple[float, float]]:
    """(center, width) of a display window stored with the image (e.g. PNG text ``WindowCenter``), if any."""
    for c_key, w_key in (("WindowCenter", "WindowWidth"), ("window_center", "window_width")):
        if c_key in info and w_key in info:
            try:
                center, width = float(info[c_key]), float(info[w_key])
            except (TypeError, ValueError):
                return None
            return (center, width) if width > 0 else None
    return None


def window_to_uint8(pixels: np.ndarray, window: Optional[Tuple[float, float]] = None) -> np.ndarray:
    """Map high-bit-depth grayscale values to 0..255 through a linear display window.

    The window is ``[center - width / 2, center + width / 2]`` when given (DICOM "WindowCenter/WindowWidth",
    in the units of ``pixels``), else the image's own finite minimum and maximum. Values are clipped to the
    window, scaled linearly and rounded; NaN maps to 0, and a constant image maps to 0.

    Args:
        pixels (np.ndarray): 2-D array of any numeric dtype.
        window (Optional[Tuple[float, float]]): (center, width). Default is None (min/max of the image).

    Returns:
        np.ndarray: uint8 array of the same shape.
    """
    x = pixels.astype(np.float64)
    finite = np.isfinite(x)
    if window is not None:
        low, high = window[0] - window[1] / 2, window[0] + window[1] / 2
    elif finite.any():
        low, high = float(x[finite].min()), float(x[finite].max())
    else:
        low = high = 0.0
    if high <= low:
        return np.zeros(x.shape, dtype=np.uint8)
    scaled = np.clip((np.where(finite, x, low) - low) / (high - low), 0.0, 1.0)
    return np.rint(scaled * 255.0).astype(np.uint8)


def medical_image_to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image mode a medical data set holds to 8-bit RGB.

    Rules:

    - ``"I;16"``, ``"I;16B"``, ``"I"``, ``"F"`` (16-bit CT/MR/X-ray, 32-bit int or float): windowed to 8 bits
      by :func:`window_to_uint8`, using the window stored in ``image.info`` (``WindowCenter`` /
      ``WindowWidth``, e.g. PNG text chunks) when present, else the image's own min/max. A plain
      ``convert("RGB")`` would clip every value above 255 (a saturated, nearly white CT).
    - images with transparency (``"RGBA"``, ``"LA"``, ``"PA"``, ``"P"`` with a transparent index): composited
      over white, as transformers' and mistral-common's processors do.
    - everything else (``"L"``, ``"P"``, ``"1"``, ``"CMYK"``, ``"YCbCr"``, ...): Pillow's ``convert("RGB")``
      (grayscale is replicated into three channels).

    Args:
        image (Image.Image): the image.

    Returns:
        Image.Image: an ``"RGB"`` image of the same size.
    """
    if image.mode == "RGB":
        return image
    if image.mode in _HIGH_BIT_DEPTH_MODES:
        gray = window_to_uint8(np.asarray(image), _window_from_info(image.info))
        return Image.fromarray(gray).convert("RGB")
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def pixtral_image_size(height: int, width: int, *, max_image_size: int, token_size: int) -> Tuple[int, int]:
    """Pixel size (h, w) Pixtral resizes an image to, as transformers' ``PixtralImageProcessor`` computes it.

    If the longest edge exceeds ``max_image_size`` both edges are divided by the same ratio and floored; then
    each edge is rounded up to a multiple of ``token_size`` (patch size x spatial merge, 28 px for Mistral 3).
    A side floored to 0 by an extreme aspect ratio is kept at 1 px (one token) instead.

    Args:
        height (int): image height in pixels.
        width (int): image width in pixels.
        max_image_size (int): the longest allowed edge.
        token_size (int): pixels per image token along one edge.

    Returns:
        Tuple[int, int]: (height, width), multiples of ``token_size``.
    """
    ratio = max(height / max_image_size, width / max_image_size)
    if ratio > 1:
        height, width = max(math.floor(height / ratio), 1), max(math.floor(width / ratio), 1)
    return ((height - 1) // token_size + 1) * token_size, ((width - 1) // token_size + 1) * token_size


class PixtralImageTransform:
    """Image -> normalised pixel tensor, numerically as transformers' ``PixtralImageProcessorPil``.

    Steps: :func:`medical_image_to_rgb`; bicubic resize (Pillow) to :func:`pixtral_image_size`; rescale by
    1/255 (in float64, then float32); subtract the CLIP mean and divide by the CLIP std.

    Args:
        max_image_size (int): longest edge after resizing. Default is 1540.
        patch_size (int): vision patch size in pixels. Default is 14.
        spatial_merge_size (int): patches merged per token along each edge. Default is 2.
        image_mean (Sequence[float]): per-channel mean. Default is the CLIP mean.
        image_std (Sequence[float]): per-channel std. Default is the CLIP std.
    """

    def __init__(
        self,
        *,
        max_image_size: int = 1540,
        patch_size: int = 14,
        spatial_merge_size: int = 2,
        image_mean: Sequence[float] = CLIP_MEAN,
        image_std: Sequence[float] = CLIP_STD,
    ):
        self.max_image_size = max_image_size
        self.patch_size = patch_size
        self.spatial_merge_size = spatial_merge_size
        self.token_size = patch_size * spatial_merge_size
        self._mean = np.asarray(image_mean, dtype=np.float32)
        self._std = np.asarray(image_std, dtype=np.float32)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """Process one image.

        Args:
            image (Image.Image): any Pillow mode (see :func:`medical_image_to_rgb`).

        Returns:
            torch.Tensor: float32 ``[3, h, w]``, h and w multiples of ``token_size``.
        """
        rgb = medical_image_to_rgb(image)
        height, width = pixtral_image_size(
            rgb.height, rgb.width, max_image_size=self.max_image_size, token_size=self.token_size
        )
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), resample=Image.Resampling.BICUBIC)
        x = (np.asarray(rgb).astype(np.float64) * (1 / 255)).astype(np.float32)  # [h, w, 3]
        x = (x - self._mean) / self._std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


class _ImageGrid:
    """Stand-in image transform: a pixel-free ``[3, h, w]`` tensor of the size :class:`PixtralImageTransform` gives."""

    def __init__(self, transform: PixtralImageTransform):
        self._transform = transform
        self.token_size = transform.token_size

    def __call__(self, image: Image.Image) -> torch.Tensor:
        t = self._transform
        height, width = pixtral_image_size(
            image.height, image.width, max_image_size=t.max_image_size, token_size=t.token_size
        )
        return torch.zeros(()).expand(3, height, width)  # no memory: stride 0


class Mistral3Transform(ModelTokenizer, Transform):
    """Model transform for Mistral 3 VLMs: torchtune messages -> tekken tokens, loss mask and image tensors.

    Chat tokens are mistral-common's encoding for the tokenizer version of ``path`` (see
    :class:`Mistral3Tokenizer`); each image becomes ``rows x ([IMG] * cols + [IMG_BREAK])`` tokens with the last
    break replaced by ``[IMG_END]``, for the ``[3, 28 * rows, 28 * cols]`` tensor of
    :class:`PixtralImageTransform`. The mask is True (not trained on) everywhere except the assistant answers
    and their ``</s>``.

    Sequences longer than ``max_seq_len`` are cut on the right, never inside an image block: a cut that would
    fall inside an image's tokens moves to just before that image, and the image (and any later one) is
    dropped from ``encoder_input``. A truncated answer is not given a ``</s>``. If nothing trainable is left
    (the image and question alone fill ``max_seq_len``) a ``ValueError`` says so; raise ``max_seq_len`` or
    lower ``max_image_size`` (a 1540 px square image alone takes 3080 tokens).

    Args:
        path (str): path to the checkpoint's ``tekken.json``.
        max_seq_len (Optional[int]): maximum sequence length. Default is 2048.
        max_image_size (int): longest image edge after resizing. Default is 1540.
        patch_size (int): vision patch size. Default is 14.
        spatial_merge_size (int): patch merge factor of the projector. Default is 2.
    """

    def __init__(
        self,
        path: str,
        *,
        max_seq_len: Optional[int] = 2048,
        max_image_size: int = 1540,
        patch_size: int = 14,
        spatial_merge_size: int = 2,
    ):
        self.image_transform = PixtralImageTransform(
            max_image_size=max_image_size, patch_size=patch_size, spatial_merge_size=spatial_merge_size
        )
        self.tokenizer = Mistral3Tokenizer(path, max_seq_len=None, image_transform=self.image_transform)
        self.max_seq_len = max_seq_len
        self.special_tokens = self.tokenizer.special_tokens
        self.pad_id = self.tokenizer.pad_id
        self.bos_id = self.tokenizer.bos_id
        self.eos_id = self.tokenizer.eos_id
        # read by torchtune's generate recipes: an answer ends with </s>
        self.stop_tokens = [self.eos_id]
        self.image_token_id = self.tokenizer.img_id
        self.vocab_size = self.tokenizer.vocab_size

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Encode plain text (no chat format): :meth:`Mistral3Tokenizer.encode`."""
        return self.tokenizer.encode(text, add_bos=add_bos, add_eos=add_eos)

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        """Decode token ids to text: :meth:`Mistral3Tokenizer.decode`."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)

    def tokenize_messages(self, messages: List[Message], **kwargs: Any) -> Tuple[List[int], List[bool]]:
        """Tokenize a conversation (images included) and truncate it to ``max_seq_len``.

        Args:
            messages (List[Message]): the conversation.
            **kwargs (Any): ``inference`` (bool) as in :meth:`__call__`.

        Returns:
            Tuple[List[int], List[bool]]: tokens and mask (True = not trained on).
        """
        tokens, mask, _ = self._encode(messages, inference=kwargs.get("inference", False))
        return tokens, mask

    def _cut(self, tokens: List[int], mask: List[bool], inference: bool) -> Tuple[int, Optional[int]]:
        """Where to cut a too-long sample: (token count kept, images kept or None for all).

        Raises:
            ValueError: if the cut leaves no trained token (the answer starts after ``max_seq_len``).
        """
        if self.max_seq_len is None or len(tokens) <= self.max_seq_len:
            return len(tokens), None
        cut, kept_images = self.max_seq_len, None
        for k, (start, end) in enumerate(self.tokenizer.image_spans(tokens)):
            if end >= cut:  # image k does not fit whole: cut before it, drop it and all later images
                cut, kept_images = min(cut, start), k
                break
        if not inference and all(mask[:cut]) and not all(mask):
            raise ValueError(
                f"The sample needs {len(tokens)} tokens and its answer starts after max_seq_len={self.max_seq_len} "
                f"(image tokens cannot be cut). Raise max_seq_len, lower max_image_size "
                f"(now {self.image_transform.max_image_size}), or filter such samples out."
            )
        return cut, kept_images

    def _encode(self, messages: List[Message], inference: bool) -> Tuple[List[int], List[bool], List[torch.Tensor]]:
        tokens, mask, images = self.tokenizer.tokenize_conversation(messages, inference=inference)
        cut, kept_images = self._cut(tokens, mask, inference)
        return tokens[:cut], mask[:cut], images[:kept_images]

    @functools.cached_property
    def _length_tokenizer(self) -> Mistral3Tokenizer:
        """The same tokenizer with images reduced to their token grid (no pixels are read or resized)."""
        return Mistral3Tokenizer(self.tokenizer.path, image_transform=_ImageGrid(self.image_transform))

    def untruncated_length(self, messages: List[Message]) -> int:
        """Token count of a training conversation before ``max_seq_len`` cuts it (image headers only, no pixels).

        Args:
            messages (List[Message]): the conversation; images may be opened lazily (not loaded).

        Returns:
            int: the token count, ``</s>`` included.
        """
        return len(self._length_tokenizer.tokenize_conversation(messages)[0])

    def check_length(self, messages: List[Message]) -> int:
        """Check, without processing pixels, that a training conversation keeps a trained token after truncation.

        Only the image sizes are needed (``PIL.Image.open`` reads them from the header), so a data set can be
        checked (and packed) when it is built instead of failing at the step that reads a too-long sample.

        Args:
            messages (List[Message]): the conversation; images may be opened lazily (not loaded).

        Returns:
            int: the sample's token count after truncation (what :meth:`__call__` returns, without pixels).

        Raises:
            ValueError: if the answer would be cut off entirely (the message names the token count, the
                ``max_seq_len`` and what to change), or the conversation cannot be tokenized.
        """
        tokens, mask, _ = self._length_tokenizer.tokenize_conversation(messages)
        return self._cut(tokens, mask, inference=False)[0]

    def __call__(self, sample: Mapping[str, Any], inference: bool = False) -> Mapping[str, Any]:
        """Tokenize ``sample["messages"]`` and process its images.

        Args:
            sample (Mapping[str, Any]): a dict with ``"messages"`` (List[Message]); other keys (metadata such as
                ``mode``) are passed through.
            inference (bool): the conversation ends with the user turn (or an empty assistant turn) and is
                encoded as a generation prompt. Default is False.

        Returns:
            Mapping[str, Any]: the sample without ``"messages"``, plus ``tokens`` (List[int]), ``mask``
            (List[bool]) and ``encoder_input = {"image": {"images": [Tensor[3, h, w], ...]}}``.
        """
        sample = dict(sample)
        messages = sample.pop("messages")
        tokens, mask, images = self._encode(messages, inference=inference)
        sample.update({"tokens": tokens, "mask": mask, "encoder_input": {"image": {"images": images}}})
        return sample


def mistral3_transform(
    path: str,
    max_seq_len: Optional[int] = 2048,
    max_image_size: int = 1540,
    patch_size: int = 14,
    spatial_merge_size: int = 2,
) -> Mistral3Transform:
    """Model transform (tokenizer + image processor) for Mistral Medium 3.5 and the Ministral 3 family.

    Args:
        path (str): path to the checkpoint's ``tekken.json``.
        max_seq_len (Optional[int]): maximum sequence length; None disables truncation. Default is 2048.
        max_image_size (int): longest image edge after resizing (the released processors use 1540).
            Default is 1540.
        patch_size (int): vision patch size (``vision_config.patch_size``). Default is 14.
        spatial_merge_size (int): projector patch merge (``spatial_merge_size``). Default is 2.

    Returns:
        Mistral3Transform: the transform.

    Example:
        >>> transform = mistral3_transform("/data/Mistral-Medium-3.5-128B/tekken.json", max_seq_len=2048)
        >>> out = transform({"messages": messages})
        >>> out["tokens"], out["mask"], out["encoder_input"]["image"]["images"]
    """
    return Mistral3Transform(
        path,
        max_seq_len=max_seq_len,
        max_image_size=max_image_size,
        patch_size=patch_size,
        spatial_merge_size=spatial_merge_size,
    )
