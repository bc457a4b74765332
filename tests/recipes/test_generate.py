"""`tune run generate` and `tune run dev/generate_v2_distributed` with plugin configs (CPU, gloo).

The reference is transformers' greedy ``generate`` on the same checkpoint (FP8 dequantised by transformers'
own loader) and the same prompt tokens; TP 2 must give the one-process tokens.
"""

import ast
import json
import re

import pytest
import torch
from torchtune_mistral3.generation import prompt_messages, sampling_options
from torchtune_mistral3.models.mistral3 import mistral3_transform, write_demo_checkpoint

pytestmark = pytest.mark.integration

CONFIG = "mistral3p5_medpix_demo_generation"
QUESTION = "What imaging modality and plane is shown?"
NEW_TOKENS = 8


def _generated(proc):
    return ast.literal_eval(re.search(r"Generated tokens: (\[[^\]]*\])", proc.stdout + proc.stderr)[1])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_demo_checkpoint(str(tmp_path_factory.mktemp("demo") / "ckpt"))


def _overrides(checkpoint, tmp_path):
    return [f"checkpoint_dir={checkpoint}", f"output_dir={tmp_path / 'out'}", f"max_new_tokens={NEW_TOKENS}"]


@pytest.fixture(scope="module")
def one_process(checkpoint, tmp_path_factory):
    from conftest import run_tune

    proc = run_tune("run", "generate", "--config", CONFIG, *_overrides(checkpoint, tmp_path_factory.mktemp("g1")))
    return _generated(proc)


def _transformers_greedy(checkpoint, max_new_tokens):
    from transformers import FineGrainedFP8Config, Mistral3ForConditionalGeneration

    transform = mistral3_transform(str(checkpoint / "tekken.json"), max_seq_len=None, max_image_size=112)
    prompt = {"user": {"image": "medpix_sample/ct_small.png", "text": QUESTION}}
    sample = transform({"messages": prompt_messages(prompt)}, inference=True)
    (image,) = sample["encoder_input"]["image"]["images"]
    model = Mistral3ForConditionalGeneration.from_pretrained(
        checkpoint,
        dtype=torch.float32,
        attn_implementation="eager",
        quantization_config=FineGrainedFP8Config(dequantize=True, weight_block_size=None, activation_scheme="static"),
    ).eval()
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([sample["tokens"]]),
            pixel_values=image[None],
            image_sizes=torch.tensor([image.shape[1:]]),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=transform.eos_id,
            pad_token_id=transform.pad_id,
        )
    return out[0, len(sample["tokens"]) :].tolist(), sample


def test_tune_run_generate_greedy_equals_transformers(one_process, checkpoint):
    theirs, sample = _transformers_greedy(checkpoint, NEW_TOKENS)
    assert sample["tokens"].count(transform_img_id(checkpoint)) == 16  # 112 px CT slice -> 4 x 4 image tokens
    assert len(one_process) == NEW_TOKENS
    assert one_process == theirs


def transform_img_id(checkpoint):
    return mistral3_transform(str(checkpoint / "tekken.json")).image_token_id


def test_tensor_parallel_2_gives_the_one_process_tokens(one_process, checkpoint, tmp_path, tune):
    proc = tune(
        "run", "--nproc_per_node", "2", "dev/generate_v2_distributed", "--config", CONFIG,
        *_overrides(checkpoint, tmp_path),
    )
    assert "tensor parallel 2" in proc.stdout + proc.stderr
    assert _generated(proc) == one_process


def test_missing_image_names_the_key_and_the_path():
    with pytest.raises(ValueError, match=r"prompt.user.image: no image at 'nowhere/scan.png'"):
        prompt_messages({"user": {"image": "nowhere/scan.png", "text": QUESTION}})


def test_empty_question_is_refused():
    with pytest.raises(ValueError, match="prompt.user must be the question text"):
        prompt_messages({"user": {"image": "medpix_sample/ct_small.png", "text": " "}})


def test_sampling_options():
    assert sampling_options(json_cfg(greedy=True, temperature=0.3, top_k=5)) == {"temperature": 1.0, "top_k": 1}
    assert sampling_options(json_cfg(greedy=False, temperature=0.3, top_k=5)) == {"temperature": 0.3, "top_k": 5}
    with pytest.raises(ValueError, match="temperature > 0"):
        sampling_options(json_cfg(greedy=False, temperature=0.0))


def json_cfg(**kwargs):
    from omegaconf import OmegaConf

    return OmegaConf.create(json.loads(json.dumps(kwargs)))
