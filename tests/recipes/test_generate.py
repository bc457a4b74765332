"""`tune run generate` and `tune run dev/generate_v2_distributed` with plugin configs (CPU, gloo).

The reference is transformers' greedy ``generate`` on the same checkpoint (FP8 dequantised by transformers'
own loader) and the same prompt tokens; TP 2 must give the one-process tokens.
"""

import ast
import json
import re

import pytest
import torch
from torchtune_mistral3.checkpointing import write_demo_checkpoint
from torchtune_mistral3.generation import prompt_messages, sampling_options
from torchtune_mistral3.models.mistral3 import mistral3_transform

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


def test_stock_generation_config_still_runs_the_stock_recipe(tmp_path, tune):
    """`tune run generate --config generation` (torchtune's own config, a tiny Llama-2 and SentencePiece model
    swapped in by overrides) runs torchtune's InferenceRecipe, whose greedy text equals torchtune's generate here."""
    import sentencepiece
    from torchtune import generation
    from torchtune.data import Message
    from torchtune.models.llama2 import llama2, llama2_tokenizer

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(["tell me a joke about the scan", "what imaging modality is shown here"] * 40))
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "spm"), vocab_size=48, model_type="bpe", bos_id=1, eos_id=2,
        unk_id=0, pad_id=-1, hard_vocab_limit=False, minloglevel=2,
    )
    vocab = sentencepiece.SentencePieceProcessor(model_file=str(tmp_path / "spm.model")).vocab_size()
    dims = dict(vocab_size=vocab, num_layers=2, num_heads=4, num_kv_heads=2, embed_dim=32, max_seq_len=128)
    torch.manual_seed(0)
    model = llama2(**dims).eval()
    (tmp_path / "ckpt").mkdir()
    torch.save(model.state_dict(), tmp_path / "ckpt" / "model.pt")
    proc = tune(
        "run", "generate", "--config", "generation", "device=cpu", "dtype=fp32", "max_new_tokens=6", "top_k=1",
        "checkpointer._component_=torchtune.training.FullModelTorchTuneCheckpointer",
        f"checkpointer.checkpoint_dir={tmp_path / 'ckpt'}", "checkpointer.checkpoint_files=[model.pt]",
        f"output_dir={tmp_path / 'out'}", f"tokenizer.path={tmp_path / 'spm.model'}",
        "model._component_=torchtune.models.llama2.llama2", *[f"model.{k}={v}" for k, v in dims.items()],
    )
    log = proc.stdout + proc.stderr
    assert "Model is initialized with precision torch.float32." in log  # the stock InferenceRecipe's own line
    assert "Model loaded in" not in log  # not the plugin's generation
    tokenizer = llama2_tokenizer(str(tmp_path / "spm.model"), prompt_template=None)  # as the stock config has it
    messages = [Message(role="user", content="Tell me a joke."), Message(role="assistant", content="")]
    prompt = torch.tensor(tokenizer({"messages": messages}, inference=True)["tokens"])
    with torch.no_grad():
        model.setup_caches(batch_size=1, dtype=torch.float32, decoder_max_seq_len=prompt.numel() + 6)
        out, _ = generation.generate(model, prompt, max_generated_tokens=6, pad_id=tokenizer.pad_id, top_k=1,
                                     stop_tokens=tokenizer.stop_tokens)
    assert out.shape[1] > prompt.numel()
    assert tokenizer.decode(out[0].tolist()) in log
