"""Tekken tokenizer for Mistral 3 VLMs: mistral-common's chat encoding of torchtune messages, with images."""

import logging
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from mistral_common.exceptions import MistralCommonException
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.normalize import get_normalizer
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode, get_validator
from mistral_common.tokens.tokenizers.base import SpecialTokenPolicy, SpecialTokens, TokenizerVersion
from mistral_common.tokens.tokenizers.image import (
    ImageConfig,
    ImageEncoder,
    ImageEncoding,
    SpecialImageIDs,
    image_from_chunk,
)
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from mistral_common.tokens.tokenizers.tekken import Tekkenizer
from PIL import Image
from torch import nn
from torchtune.data import Message
from torchtune.modules import TransformerDecoder
from torchtune.modules.transforms.tokenizers import BaseTokenizer, ModelTokenizer

log = logging.getLogger(__name__)


class _PixtralImageEncoder(ImageEncoder):
    """mistral-common image encoder whose pixels and token grid come from a torchtune-side image transform.

    mistral-common lays out the chat; this encoder only decides, per image, the pixel tensor (transformers'
    rounding, Pillow bicubic) and the matching ``[IMG]``/``[IMG_BREAK]``/``[IMG_END]`` run.
    """

    def __init__(self, image_transform: Callable[[Image.Image], torch.Tensor], token_size: int, ids: SpecialImageIDs):
        super().__init__(ImageConfig(image_patch_size=token_size, max_image_size=1 << 30), ids)
        self._image_transform = image_transform
        self._token_size = token_size

    def __call__(self, content: Any) -> ImageEncoding:
        pixels = self._image_transform(image_from_chunk(content))  # [3, h, w]
        rows, cols = pixels.shape[1] // self._token_size, pixels.shape[2] // self._token_size
        ids = self.special_ids
        tokens = ([ids.img] * cols + [ids.img_break]) * rows
        tokens[-1] = ids.img_end
        return ImageEncoding(tokens=tokens, image=pixels.numpy())


class Mistral3Tokenizer(ModelTokenizer, BaseTokenizer):
    """Tekken tokenizer (``tekken.json``) with mistral-common's chat format for the file's version.

    The chat tokens are exactly those of ``MistralTokenizer.from_file(path).encode_chat_completion`` (finetuning
    validation): v3 puts the system prompt in front of the last user message, v7+ in a ``[SYSTEM_PROMPT]`` block,
    v15 adds the ``[MODEL_SETTINGS]`` block with the file's default settings. Images inside user messages are
    encoded by ``image_transform`` (a ``[3, h, w]`` tensor; h and w multiples of ``token_size``).

    Only assistant messages are trained on (their ``masked`` flag is honoured); system and user turns are always
    masked.

    Args:
        path (str): path to ``tekken.json``.
        max_seq_len (Optional[int]): kept for torchtune's interface; truncation is done by the model transform.
            Default is None.
        image_transform (Optional[Callable[[Image.Image], torch.Tensor]]): image -> ``[3, h, w]`` tensor with a
            ``token_size`` attribute (pixels per image token). Default is None (images are rejected).

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not a readable tekken tokenizer (truncated, not JSON, fields missing), or
            not of version v3 or later; the message names the file.
    """

    def __init__(
        self,
        path: str,
        max_seq_len: Optional[int] = None,
        image_transform: Optional[Callable[[Image.Image], torch.Tensor]] = None,
    ):
        if not Path(path).is_file():
            raise FileNotFoundError(f"Tokenizer file {path} does not exist; point `path` at a tekken.json")
        try:
            reference = MistralTokenizer.from_file(str(path), mode=ValidationMode.finetuning)
        # JSONDecodeError, UnicodeDecodeError; AssertionError: tiktoken's check of the merge ranks ((0, b' har'))
        except (ValueError, KeyError, TypeError, AssertionError, MistralCommonException) as e:
            raise ValueError(
                f"Tokenizer file {path} is not a readable tekken tokenizer ({type(e).__name__}: {e}); it may be "
                "truncated or another file: copy tekken.json again from the checkpoint's repository"
            ) from e
        tekken = reference.instruct_tokenizer.tokenizer
        if not isinstance(tekken, Tekkenizer) or tekken.version < TokenizerVersion.v3:
            raise ValueError(f"{path}: a tekken tokenizer of version >= v3 is needed, got {tekken.version}")
        self.path = str(path)
        self.max_seq_len = max_seq_len
        self.version = tekken.version
        self._tekken = tekken
        self.bos_id = tekken.bos_id
        self.eos_id = tekken.eos_id
        self.pad_id = tekken.pad_id
        self.vocab_size = tekken.n_words
        self.img_id = tekken.get_special_token(SpecialTokens.img.value)
        self.img_break_id = tekken.get_special_token(SpecialTokens.img_break.value)
        self.img_end_id = tekken.get_special_token(SpecialTokens.img_end.value)
        self.end_inst_id = tekken.get_special_token(SpecialTokens.end_inst.value)
        self.special_tokens: Dict[str, int] = {
            t.value: tekken.get_special_token(t.value) for t in SpecialTokens if tekken.is_special(t.value)
        }

        image_encoder = None
        if image_transform is not None:
            token_size = image_transform.token_size
            file_cfg = tekken.image
            if file_cfg is not None and file_cfg.image_patch_size * file_cfg.spatial_merge_size != token_size:
                log.warning(
                    "%s declares %d px image tokens (patch %d x merge %d); the model transform uses %d px "
                    "(the vision model's patch x spatial_merge_size), which wins.",
                    path,
                    file_cfg.image_patch_size * file_cfg.spatial_merge_size,
                    file_cfg.image_patch_size,
                    file_cfg.spatial_merge_size,
                    token_size,
                )
            ids = SpecialImageIDs(img=self.img_id, img_break=self.img_break_id, img_end=self.img_end_id)
            image_encoder = _PixtralImageEncoder(image_transform, token_size, ids)
        instruct_cls = type(reference.instruct_tokenizer)
        self._instruct = instruct_cls(tekken, image_encoder=image_encoder)
        normalizer, version = get_normalizer(tekken.version, tekken.model_settings_builder), tekken.version
        # Two front ends on one instruct tokenizer: training conversations end with the answer, prompts do not.
        self._train = MistralTokenizer(self._instruct, get_validator(version, ValidationMode.finetuning), normalizer)
        self._prompt = MistralTokenizer(self._instruct, get_validator(version, ValidationMode.test), normalizer)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = True) -> List[int]:
        """Encode plain text (no chat format).

        Args:
            text (str): the text.
            add_bos (bool): prepend ``<s>``. Default is True.
            add_eos (bool): append ``</s>``. Default is True.

        Returns:
            List[int]: token ids.
        """
        return self._tekken.encode(text, bos=add_bos, eos=add_eos)

    def decode(self, token_ids: List[int], skip_special_tokens: bool = True) -> str:
        """Decode token ids.

        Args:
            token_ids (List[int]): token ids.
            skip_special_tokens (bool): drop control tokens, else print them (``[INST]``...). Default is True.

        Returns:
            str: the text.
        """
        policy = SpecialTokenPolicy.IGNORE if skip_special_tokens else SpecialTokenPolicy.KEEP
        return self._tekken.decode(list(token_ids), special_token_policy=policy)

    def tokenize_messages(self, messages: List[Message], **kwargs: Any) -> Tuple[List[int], List[bool]]:
        """Tokenize a conversation (torchtune's ``ModelTokenizer`` interface; images' pixels are dropped).

        Args:
            messages (List[Message]): the conversation.
            **kwargs (Any): ``inference`` (bool), see :meth:`tokenize_conversation`.

        Returns:
            Tuple[List[int], List[bool]]: tokens and mask (True = not trained on).
        """
        tokens, mask, _ = self.tokenize_conversation(messages, inference=kwargs.get("inference", False))
        return tokens, mask

    def tokenize_conversation(
        self, messages: List[Message], *, inference: bool = False
    ) -> Tuple[List[int], List[bool], List[torch.Tensor]]:
        """Tokenize a conversation with mistral-common and mask everything but the trained assistant turns.

        Args:
            messages (List[Message]): system (optional), then alternating user / assistant messages; user
                content may hold images (``{"type": "image", "content": PIL.Image}``).
            inference (bool): encode a generation prompt: a trailing empty assistant message is dropped and the
                conversation must end with a user turn. Default is False.

        Returns:
            Tuple[List[int], List[bool], List[torch.Tensor]]: tokens, mask (True = not trained on; all True for
            a prompt), and the image tensors in token order.

        Raises:
            ValueError: for an unsupported role, an image outside a user turn, an empty assistant turn, or a
                conversation mistral-common rejects.
        """
        if inference and messages and messages[-1].role == "assistant" and not messages[-1].text_content.strip():
            messages = messages[:-1]
        request_messages = [self._to_mistral(i, m) for i, m in enumerate(messages)]
        tokenizer = self._prompt if inference else self._train
        try:
            tokenized = tokenizer.encode_chat_completion(ChatCompletionRequest(messages=request_messages))
        except (MistralCommonException, AssertionError) as e:
            raise ValueError(f"mistral-common ({self.version.value}) rejected the conversation: {e}") from e
        tokens = tokenized.tokens
        images = [torch.from_numpy(a) for a in tokenized.images]
        mask = [True] * len(tokens)
        if inference:  # a prompt has nothing to train on
            return tokens, mask, images
        cursor = 0
        for i, m in enumerate(messages):
            if m.role != "assistant":
                continue
            answer = self._instruct.encode_assistant_message(request_messages[i], is_before_last_user_message=False)
            start = self._find_after_inst(tokens, answer, cursor)
            if start is None:
                raise ValueError(f"message {i}: could not find the assistant tokens after an [/INST] token")
            if not m.masked:
                mask[start : start + len(answer)] = [False] * len(answer)
            cursor = start + len(answer)
        return tokens, mask, images

    def image_spans(self, tokens: List[int]) -> List[Tuple[int, int]]:
        """Positions of the image blocks in ``tokens``.

        Args:
            tokens (List[int]): token ids.

        Returns:
            List[Tuple[int, int]]: (first, last) index of each image block, inclusive, in order.
        """
        spans, start = [], None
        for i, t in enumerate(tokens):
            if t in (self.img_id, self.img_break_id) and start is None:
                start = i
            elif t == self.img_end_id:
                spans.append((i if start is None else start, i))
                start = None
        return spans

    def _find_after_inst(self, tokens: List[int], answer: List[int], cursor: int) -> Optional[int]:
        n = len(answer)
        for p in range(cursor, len(tokens)):
            if tokens[p] == self.end_inst_id and tokens[p + 1 : p + 1 + n] == answer:
                return p + 1
        return None

    def _to_mistral(self, index: int, message: Message) -> Any:
        """Convert one torchtune message to mistral-common's message type."""
        texts = [c["content"] for c in message.content if c["type"] == "text"]
        has_image = any(c["type"] == "image" for c in message.content)
        if message.role == "system":
            if has_image:
                raise ValueError(f"message {index}: images go only in user messages")
            return SystemMessage(content="".join(texts))
        if message.role == "assistant":
            if has_image:
                raise ValueError(f"message {index}: images go only in user messages")
            text = "".join(texts)
            if not text.strip():
                raise ValueError(f"message {index}: the assistant answer is empty")
            return AssistantMessage(content=text)
        if message.role == "user":
            if not has_image and len(texts) == 1:
                return UserMessage(content=texts[0])
            chunks = []
            for c in message.content:
                if c["type"] == "text":
                    chunks.append(TextChunk(text=c["content"]))
                elif c["type"] == "image":
                    if self._instruct.image_encoder is None:
                        raise ValueError(f"message {index} holds an image but the tokenizer has no image_transform")
                    chunks.append(ImageChunk(image=c["content"]))
                else:
                    raise ValueError(f"message {index}: unsupported content type {c['type']!r}")
            return UserMessage(content=chunks)
        raise ValueError(f"message {index}: role {message.role!r} is not supported (system, user, assistant only)")


def check_tokenizer_fits_model(
    tokenizer: Any,
    model_parts: List[nn.Module],
    *,
    pad_to_max_seq_len: bool,
    why_padded: str = "pipeline_parallel_dim > 1 (and compile=True with tensor_parallel_dim > 1)",
) -> None:
    """Check at setup that the tokenizer's ids and sequence lengths fit the model (call after building both).

    Vocabulary: the tekken vocabulary (``n_words``: ``config.default_vocab_size``, special tokens included,
    the number of ids mistral-common can produce) must not exceed the model's token embedding (``vocab_size``
    of the checkpoint's ``text_config``): a larger one fails at the first sample using a high id. In every
    released Mistral 3 checkpoint the two are equal (131072); a smaller vocabulary only leaves embedding rows
    unused (as a padded embedding, e.g. transformers' ``resize_token_embeddings(pad_to_multiple_of=...)``,
    does), so it gets a warning. Sequence length: when batches are padded to ``tokenizer.max_seq_len``
    (pipeline parallelism) it must fit the model's position table (``max_position_embeddings``, or
    ``model.max_seq_len`` if set). Each rank checks the parts it holds (under pipeline parallelism the
    embedding and the head live on the first and last stage).

    Args:
        tokenizer (Any): the recipe's tokenizer (``Mistral3Transform`` or ``Mistral3Tokenizer``): ``vocab_size``,
            ``max_seq_len`` and the file ``path`` (or ``tokenizer.path``).
        model_parts (List[nn.Module]): this rank's model, or its pipeline stages.
        pad_to_max_seq_len (bool): whether every batch is padded to ``tokenizer.max_seq_len``.
        why_padded (str): what pads the batches, for the messages (the config keys). Default names pipeline
            and compiled tensor parallelism.

    Raises:
        ValueError: if the vocabulary is larger than the embedding, or padded batches exceed the model's
            position table (or ``tokenizer.max_seq_len`` is unset); the message names the file, keys and sizes.
    """
    path = getattr(tokenizer, "path", None) or getattr(getattr(tokenizer, "tokenizer", None), "path", "?")
    rows = _model_vocab_size(model_parts)
    if rows is not None and tokenizer.vocab_size > rows:
        raise ValueError(
            f"Tokenizer file {path} has a vocabulary of {tokenizer.vocab_size} ids but the model's token embedding "
            f"has {rows} rows (text_config.vocab_size): ids >= {rows} would index past it. Use the tekken.json of "
            "the checkpoint you train."
        )
    if rows is not None and tokenizer.vocab_size < rows:
        log.warning(
            "Tokenizer file %s has a vocabulary of %d ids, the model's token embedding %d rows "
            "(text_config.vocab_size): rows >= %d are never used. Released Mistral 3 checkpoints match exactly; "
            "check that this is the checkpoint's own tekken.json.",
            path,
            tokenizer.vocab_size,
            rows,
            tokenizer.vocab_size,
        )
    if not pad_to_max_seq_len:
        return
    if tokenizer.max_seq_len is None:
        raise ValueError(
            f"{why_padded} pads every batch to tokenizer.max_seq_len: set it (e.g. 2048)"
        )
    positions = [m.max_seq_len for part in model_parts for m in part.modules() if isinstance(m, TransformerDecoder)]
    if positions and tokenizer.max_seq_len > min(positions):
        raise ValueError(
            f"{why_padded} pads every batch to tokenizer.max_seq_len={tokenizer.max_seq_len}, but the "
            f"model's position table holds max_seq_len={min(positions)} (max_position_embeddings of the "
            f"checkpoint's config.json, or model.max_seq_len): set tokenizer.max_seq_len<={min(positions)}."
        )


def _model_vocab_size(model_parts: List[nn.Module]) -> Optional[int]:
    """Rows of the token embedding (or the output head) among ``model_parts``; None if neither is here."""
    for part in model_parts:
        for name, module in part.named_modules():
            if isinstance(module, nn.Embedding) and name.endswith("tok_embeddings"):
                return module.num_embeddings
            if isinstance(module, nn.Linear) and name.endswith("decoder.output"):
                return module.out_features
    return None
