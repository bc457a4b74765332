"""Chat tokens of Mistral3Tokenizer / Mistral3Transform against mistral-common's own encoder (v3 and v15)."""

import base64
import json

import numpy as np
import pytest
import torch
from _tekken_files import SHIPPED_TEKKEN, write_tekken
from mistral_common.protocol.instruct.chunk import ImageChunk, TextChunk
from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, UserMessage
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.protocol.instruct.validator import ValidationMode
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image
from torchtune.data import Message
from torchtune_mistral3.models.mistral3._tokenizer import Mistral3Tokenizer
from torchtune_mistral3.models.mistral3._transform import mistral3_transform

RNG = np.random.default_rng(0)


def _noise(width, height):
    return Image.fromarray(RNG.integers(0, 256, (height, width, 3), dtype=np.uint8))


# Images whose sides are multiples of 28 px and below max_image_size need no resizing, so mistral-common (cv2,
# round) and transformers (Pillow, floor) must agree on both the token layout and the pixels.
IMG_A, IMG_B, IMG_C = _noise(56, 84), _noise(140, 28), _noise(224, 196)

CONVERSATIONS = {
    "text_only": [
        ("system", "You are an expert radiologist."),
        ("user", ["What is the normal adult resting heart rate?"]),
        ("assistant", "Between 60 and 100 beats per minute."),
    ],
    "one_image": [
        ("user", [IMG_A, "What imaging modality is this?"]),
        ("assistant", "This is an axial CT image of the chest."),
    ],
    "two_images_one_turn": [
        ("system", "Answer briefly."),
        ("user", [IMG_B, IMG_C, "Compare the two images."]),
        ("assistant", "The second image is larger and shows more of the abdomen."),
    ],
    "two_images_two_turns": [
        ("user", [IMG_C, "Which organ is enlarged?"]),
        ("assistant", "The liver."),
        ("user", ["And in this one?", IMG_A]),
        ("assistant", "The spleen is enlarged here."),
    ],
}


def _torchtune_messages(spec):
    out = []
    for role, content in spec:
        if role == "user":
            items = [{"type": "text", "content": c} if isinstance(c, str) else {"type": "image", "content": c}
                     for c in content]
            out.append(Message(role="user", content=items, masked=True))
        else:
            out.append(Message(role=role, content=content, masked=role != "assistant"))
    return out


def _mistral_request(spec):
    out = []
    for role, content in spec:
        if role == "system":
            out.append(SystemMessage(content=content))
        elif role == "assistant":
            out.append(AssistantMessage(content=content))
        elif len(content) == 1 and isinstance(content[0], str):
            out.append(UserMessage(content=content[0]))
        else:
            out.append(UserMessage(content=[TextChunk(text=c) if isinstance(c, str) else ImageChunk(image=c)
                                            for c in content]))
    return ChatCompletionRequest(messages=out)


@pytest.fixture(scope="module", params=["v3", "v15"])
def tekken_path(request, tmp_path_factory):
    return write_tekken(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def reference(tekken_path):
    return MistralTokenizer.from_file(str(tekken_path), mode=ValidationMode.finetuning)


@pytest.fixture(scope="module")
def transform(tekken_path):
    return mistral3_transform(str(tekken_path), max_seq_len=None)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_tokens_and_pixels_match_mistral_common(reference, transform, name):
    spec = CONVERSATIONS[name]
    expected = reference.encode_chat_completion(_mistral_request(spec))
    out = transform({"messages": _torchtune_messages(spec)})
    assert out["tokens"] == expected.tokens
    images = out["encoder_input"]["image"]["images"]
    assert len(images) == len(expected.images)
    for ours, theirs in zip(images, expected.images):
        assert tuple(ours.shape) == theirs.shape
        # mistral-common divides by 255 in float32, transformers multiplies by 1/255 in float64
        torch.testing.assert_close(ours, torch.from_numpy(theirs), rtol=0, atol=2e-6)


def test_v15_encodes_system_prompt_and_model_settings_blocks(tmp_path):
    tok = Mistral3Tokenizer(str(write_tekken(tmp_path, "v15")))
    tokens, _, _ = tok.tokenize_conversation(_torchtune_messages(CONVERSATIONS["text_only"]))
    text = tok.decode(tokens, skip_special_tokens=False)
    assert text.startswith('<s>[SYSTEM_PROMPT]You are an expert radiologist.[/SYSTEM_PROMPT]'
                           '[MODEL_SETTINGS]{"reasoning_effort": "none"}[/MODEL_SETTINGS][INST]')


def test_text_chat_matches_mistral_common_with_the_shipped_file():
    spec = CONVERSATIONS["text_only"]
    expected = MistralTokenizer.from_file(str(SHIPPED_TEKKEN), mode=ValidationMode.finetuning)
    tokens, mask = Mistral3Tokenizer(str(SHIPPED_TEKKEN)).tokenize_messages(_torchtune_messages(spec))
    assert tokens == expected.encode_chat_completion(_mistral_request(spec)).tokens
    assert len(mask) == len(tokens)


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_mask_covers_exactly_the_answers_and_eos(transform, name):
    spec = CONVERSATIONS[name]
    tok = transform.tokenizer
    out = transform({"messages": _torchtune_messages(spec)})
    trained = [t for t, m in zip(out["tokens"], out["mask"]) if not m]
    # Hand-derived: each answer's plain tekken encoding followed by </s>, in order, and nothing else.
    expected = []
    for role, content in spec:
        if role == "assistant":
            expected += tok.encode(content, add_bos=False, add_eos=False) + [2]
    assert trained == expected
    # ... and every trained run sits right after an [/INST]
    starts = [i for i, m in enumerate(out["mask"]) if not m and (i == 0 or out["mask"][i - 1])]
    assert all(out["tokens"][i - 1] == 4 for i in starts)
    assert len(starts) == sum(role == "assistant" for role, _ in spec)


MULTI_TURN = [
    ("user", ["What is the normal adult resting heart rate?"]),
    ("assistant", "Between 60 and 100 beats per minute."),
    ("user", [IMG_A, "What imaging modality is this?"]),
    ("assistant", "This is an axial CT image of the chest."),
    ("user", ["Which organ is enlarged?"]),
    ("assistant", "The liver."),
]


@pytest.mark.parametrize("masked_turn", [1, 3])
def test_masked_assistant_turn_is_not_trained_on(reference, transform, masked_turn):
    messages = _torchtune_messages(MULTI_TURN)
    messages[masked_turn] = Message(role="assistant", content=MULTI_TURN[masked_turn][1], masked=True)
    out = transform({"messages": messages})
    # the tokens do not depend on the flag: mistral-common's encoding of the whole conversation
    assert out["tokens"] == reference.encode_chat_completion(_mistral_request(MULTI_TURN)).tokens
    # hand-derived mask: the k-th assistant answer (+ </s>) follows the k-th [/INST] (id 4); only the turns not
    # masked are trained on
    tokens, tok = out["tokens"], transform.tokenizer
    ends = [i for i, t in enumerate(tokens) if t == 4]
    answers = [(i, content) for i, (role, content) in enumerate(MULTI_TURN) if role == "assistant"]
    assert len(ends) == len(answers)
    expected = [True] * len(tokens)
    for end, (i, content) in zip(ends, answers):
        answer = tok.encode(content, add_bos=False, add_eos=False) + [2]
        assert tokens[end + 1 : end + 1 + len(answer)] == answer
        if i != masked_turn:
            expected[end + 1 : end + 1 + len(answer)] = [False] * len(answer)
    assert out["mask"] == expected
    assert sum(not m for m in out["mask"]) < sum(not m for m in transform({"messages": _torchtune_messages(
        MULTI_TURN)})["mask"])


def test_prompt_for_generation_matches_mistral_common(tekken_path):
    spec = CONVERSATIONS["two_images_two_turns"][:-1]
    reference = MistralTokenizer.from_file(str(tekken_path), mode=ValidationMode.test)
    expected = reference.encode_chat_completion(_mistral_request(spec)).tokens
    messages = _torchtune_messages(spec) + [Message(role="assistant", content="")]
    out = mistral3_transform(str(tekken_path))({"messages": messages}, inference=True)  # fresh: max_seq_len set
    assert out["tokens"] == expected and out["tokens"][-1] == 4
    assert all(out["mask"])


def test_special_ids_and_plain_text(transform):
    tok = transform.tokenizer
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (1, 2, 11)
    assert (tok.img_id, tok.img_break_id, tok.img_end_id) == (10, 12, 13)
    assert tok.special_tokens["[INST]"] == 3 and tok.vocab_size == 131072
    ids = tok.encode("A lesion in the liver.")
    assert ids[0] == 1 and ids[-1] == 2
    assert tok.decode(ids) == "A lesion in the liver."


@pytest.mark.parametrize(
    "messages, match",
    [
        ([Message("user", "hi"), Message("assistant", [{"type": "image", "content": IMG_A}])], "go only in user"),
        ([Message("user", "hi"), Message("assistant", "   ")], "answer is empty"),
        ([Message("user", "hi"), Message("ipython", "x")], "role 'ipython' is not supported"),
    ],
)
def test_unsupported_conversations_fail_clearly(transform, messages, match):
    with pytest.raises(ValueError, match=match):
        transform.tokenizer.tokenize_conversation(messages)


def test_missing_file_fails_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="tekken.json"):
        Mistral3Tokenizer(str(tmp_path / "nope.json"))


# --- the tekken file against the model: vocabulary size, unreadable files, padded length under PP -----------------


def _demo_model(**text_config):
    """The demo architecture on the meta device (free), with ``text_config`` fields replaced."""
    import copy

    from torchtune_mistral3.checkpointing import DEMO_HF_CONFIG
    from torchtune_mistral3.models.mistral3 import mistral3, mistral3_arguments_from_hf_config

    cfg = copy.deepcopy(DEMO_HF_CONFIG)
    cfg["text_config"].update(text_config)
    with torch.device("meta"):
        return mistral3(**mistral3_arguments_from_hf_config(cfg))


def _tekken_with_vocab(tmp_path, vocab_size):
    import json

    path = write_tekken(tmp_path, "v3")
    data = json.loads(path.read_text())
    data["config"]["default_vocab_size"] = vocab_size
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize("vocab_size", [131072 + 64, 131072 - 72])
def test_tekken_vocabulary_against_the_model_embedding(tmp_path, caplog, vocab_size):
    from torchtune_mistral3.models.mistral3 import check_tokenizer_fits_model

    path = _tekken_with_vocab(tmp_path, vocab_size)
    model = _demo_model()
    n_words = MistralTokenizer.from_file(str(path)).instruct_tokenizer.tokenizer.n_words  # mistral-common's count
    rows = model.tok_embeddings.weight.shape[0]
    assert (n_words, rows) == (vocab_size, 131072)
    tokenizer = Mistral3Tokenizer(str(path))
    if n_words > rows:
        with pytest.raises(ValueError, match=f"{path} has a vocabulary of {n_words} ids but .* has {rows} rows"):
            check_tokenizer_fits_model(tokenizer, [model], pad_to_max_seq_len=False)
    else:
        check_tokenizer_fits_model(tokenizer, [model], pad_to_max_seq_len=False)
        assert f"{path} has a vocabulary of {n_words} ids, the model's token embedding {rows} rows" in caplog.text


@pytest.mark.parametrize(
    "damage, error",
    [
        ("truncated", "JSONDecodeError"),
        ("binary", "UnicodeDecodeError"),
        ("no_config", "KeyError"),
        ("wrong_rank", "AssertionError"),  # a token's bytes that do not match its rank: mistral-common asserts
    ],
)
def test_unreadable_tekken_file_is_named(tmp_path, damage, error):
    path = write_tekken(tmp_path, "v3")
    raw = path.read_bytes()
    data = json.loads(raw)
    data["vocab"][0]["token_bytes"] = base64.b64encode(b" har").decode()
    damaged = {"truncated": raw[: len(raw) // 2], "binary": bytes(range(256)) * 4, "no_config": b"{}",
               "wrong_rank": json.dumps(data).encode()}
    path.write_bytes(damaged[damage])
    with pytest.raises(ValueError, match=f"Tokenizer file {path} is not a readable tekken tokenizer \\({error}"):
        Mistral3Tokenizer(str(path))


def test_padded_length_beyond_the_position_table_is_refused(tmp_path):
    from torchtune_mistral3.models.mistral3 import check_tokenizer_fits_model, mistral3_transform

    model = _demo_model(max_position_embeddings=256)
    transform = mistral3_transform(str(write_tekken(tmp_path, "v3")), max_seq_len=512)
    check_tokenizer_fits_model(transform, [model], pad_to_max_seq_len=False)  # no padding: samples may be short
    with pytest.raises(ValueError, match=r"tokenizer\.max_seq_len=512, but .* max_seq_len=256 \(max_position_emb"):
        check_tokenizer_fits_model(transform, [model], pad_to_max_seq_len=True)
    # the message names what pads (packing alone, without any parallelism, is found on a GPU run)
    with pytest.raises(ValueError, match=r"^dataset\.packed=True pads every batch to tokenizer\.max_seq_len=512"):
        check_tokenizer_fits_model(transform, [model], pad_to_max_seq_len=True, why_padded="dataset.packed=True")
    # the bound is the decoder's own check, which the first forward would hit (here on embedded tokens)
    hidden = torch.zeros(1, 512, model.decoder.norm.scale.shape[0], device="meta")
    with pytest.raises(ValueError, match=r"seq_len \(512\) of input tensor should be smaller than max_seq_len \(256\)"):
        model.decoder(hidden)
    transform.max_seq_len = 256
    check_tokenizer_fits_model(transform, [model], pad_to_max_seq_len=True)
