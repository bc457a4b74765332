"""A checkpoint the plugin saves serves in transformers as it was trained: same pixels, image tokens, greedy tokens.

transformers' ``PixtralProcessor`` needs torchvision; without it ``AutoImageProcessor`` gives the PIL Pixtral
processor, called here with ``patch_size = patch_size * spatial_merge_size`` of ``processor_config.json``, as
``PixtralProcessor`` calls it.
"""

import io
import json

import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torchtune.data import Message
from torchtune_mistral3.checkpointing import Mistral3HFCheckpointer, write_demo_checkpoint
from torchtune_mistral3.datasets import MEDPIX_SAMPLE_DIR
from torchtune_mistral3.generation import collate_prompts, generate, load_inference_model
from torchtune_mistral3.models.mistral3 import medical_image_to_rgb, mistral3_transform

MAX_IMAGE_SIZE = 112
# CT_small 128x128, MR_small 64x64 (grows to 84), JPEG2000 1024x256 (wide), RG3_UNCI 512x512
CASES = ("CT_small", "MR_small", "JPEG2000", "RG3_UNCI")


def _images():
    rows = pq.read_table(MEDPIX_SAMPLE_DIR / "train.parquet").to_pylist()
    rows += pq.read_table(MEDPIX_SAMPLE_DIR / "validation.parquet").to_pylist()
    by_case = {r["case_id"]: r["image_id"]["bytes"] for r in rows}
    return {c: medical_image_to_rgb(Image.open(io.BytesIO(by_case[c]))) for c in CASES}


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    source = write_demo_checkpoint(str(root / "source"))
    ckpt = Mistral3HFCheckpointer(
        checkpoint_dir=str(source), output_dir=str(root / "out"), save_dtype="fp32", max_image_size=MAX_IMAGE_SIZE
    )
    state = ckpt.load_checkpoint()["model"]
    ckpt.save_checkpoint({"model": {k: state[k].clone() for k in state.keys()}}, epoch=0)
    return root / "out" / "epoch_0"


@pytest.fixture(scope="module")
def transform(export):
    return mistral3_transform(str(export / "tekken.json"), max_seq_len=None, max_image_size=MAX_IMAGE_SIZE)


def _prompt(transform, image, question="What is shown?"):
    content = [{"type": "image", "content": image}, {"type": "text", "content": question}]
    messages = [Message(role="user", content=content), Message(role="assistant", content="")]
    return transform({"messages": messages}, inference=True)


def test_image_processor_gives_the_training_pixels_and_image_tokens(export, transform):
    from transformers import AutoImageProcessor

    processor = json.loads((export / "processor_config.json").read_text())
    hf = AutoImageProcessor.from_pretrained(export)
    token_px = processor["patch_size"] * processor["spatial_merge_size"]
    for case, image in _images().items():
        theirs = hf(images=[image], patch_size=token_px, return_tensors="pt")
        sample = _prompt(transform, image)
        (ours,) = sample["encoder_input"]["image"]["images"]
        h, w = theirs["image_sizes"][0].tolist()
        assert (h, w) == tuple(ours.shape[1:]) and max(h, w) <= MAX_IMAGE_SIZE, case
        assert torch.equal(theirs["pixel_values"][0, :, :h, :w], ours), case
        # PixtralProcessor's count: one [IMG] per token_px x token_px cell
        assert sample["tokens"].count(transform.image_token_id) == (h // token_px) * (w // token_px), case


def test_tokenizer_and_generation_config_load(export, transform):
    from transformers import AutoTokenizer, GenerationConfig

    generation = GenerationConfig.from_pretrained(export)
    assert (generation.eos_token_id, generation.pad_token_id, generation.bos_token_id) == (
        transform.eos_id, transform.pad_id, transform.bos_id,
    )
    tokenizer = AutoTokenizer.from_pretrained(export)
    text = "Axial CT of the chest."
    assert tokenizer.encode(text, add_special_tokens=False) == transform.encode(text, add_bos=False, add_eos=False)


def test_transformers_greedy_generate_from_the_export_equals_the_plugin(export, transform):
    from transformers import AutoImageProcessor, GenerationConfig, Mistral3ForConditionalGeneration

    image = _images()["CT_small"]
    sample = _prompt(transform, image, "What imaging modality and plane is shown?")
    hf = Mistral3ForConditionalGeneration.from_pretrained(export, dtype=torch.float32, attn_implementation="eager")
    pixels = AutoImageProcessor.from_pretrained(export)(images=[image], patch_size=28, return_tensors="pt")
    with torch.no_grad():
        theirs = hf.eval().generate(
            input_ids=torch.tensor([sample["tokens"]]),
            pixel_values=pixels["pixel_values"],
            image_sizes=pixels["image_sizes"],
            generation_config=GenerationConfig.from_pretrained(export),
            max_new_tokens=6,
        )[0, len(sample["tokens"]) :]


    from omegaconf import OmegaConf

    ckpt = Mistral3HFCheckpointer(checkpoint_dir=str(export), output_dir=str(export.parent / "unused"))
    cfg_model = OmegaConf.create(
        {"_component_": "torchtune_mistral3.checkpointing.mistral3_from_hf_config", "checkpoint_dir": str(export)}
    )
    model = load_inference_model(cfg_model, ckpt, device=torch.device("cpu"), dtype=torch.float32)
    batch = collate_prompts([sample], pad_id=transform.pad_id)
    ours = generate(
        model, batch["tokens"], encoder_input=batch["encoder_input"], max_generated_tokens=6,
        pad_id=transform.pad_id, top_k=1, stop_tokens=transform.stop_tokens,
    )[0, len(sample["tokens"]) :]
    assert ours.tolist() == theirs.tolist()
