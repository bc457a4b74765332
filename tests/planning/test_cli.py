"""The planner's command line refuses misspelt keys and wrong values, as ``tune run`` does, before planning."""

import json
import subprocess
import sys

import pytest
from omegaconf import OmegaConf
from torchtune_mistral3.planning import PLAN_KEY_FILES, check_plan_values, load_config, main


@pytest.mark.parametrize(
    "override, message",
    [
        ("plan.gpu_gb=40", "plan.gpu_gb (did you mean plan.gpu_gib?)"),  # planned 80 GiB and said FITS
        ("plan.world_sise=16", "plan.world_sise (did you mean plan.world_size?)"),  # planned 64 GPUs
        ("tensor_paralel_dim=4", "tensor_paralel_dim (did you mean tensor_parallel_dim?)"),  # ignored
        ("model.vision_trainabl=True", "model.vision_trainabl (did you mean model.vision_trainable?)"),
    ],
)
def test_misspelt_keys_are_refused_with_the_closest_key(override, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "mistral3p5_medpix", override, "plan.time=False"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Unknown config key(s) in the overrides" in err and message in err


def test_the_planners_own_and_the_recipes_keys_pass():
    cfg = load_config("mistral3p5_medpix", ["plan.world_size=64", "plan.gpu_gib=79.6", "plan.images_per_pack=3",
                                           "plan.json=True", "tensor_parallel_dim=8", "batch_size=2"],
                      key_files=PLAN_KEY_FILES)
    assert cfg.plan.world_size == 64
    # a LoRA config's builder arguments are checked against its own builder
    load_config("mistral3p5_medpix_lora", ["model.lora_rank=16"])
    with pytest.raises(ValueError, match="model.lora_rnk"):
        load_config("mistral3p5_medpix_lora", ["model.lora_rnk=16"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("plan.world_size=0", "plan.world_size=0 must be an integer >= 1"),
        ("plan.gpu_gib=-5", "plan.gpu_gib=-5 must be a number > 0"),
        ("plan.image_px=0", "plan.image_px=0 must be an integer >= 1"),
        ("batch_size=0", "batch_size=0"),
        ("gradient_accumulation_steps=0", "gradient_accumulation_steps=0"),
        ("tensor_parallel_dim=0", "tensor_parallel_dim=0"),
    ],
)
def test_wrong_values_are_refused(override, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--config", "mistral3p5_medpix", override, "plan.time=False"])
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err


def test_plan_values_in_range_pass():
    check_plan_values(OmegaConf.create({"world_size": 1, "gpu_gib": 0.5, "image_px": 28, "allocator_margin": 0}))
    with pytest.raises(ValueError, match="plan.world_size=1.5 must be an integer"):
        check_plan_values(OmegaConf.create({"world_size": 1.5}))


def test_python_dash_m_plan_prints_what_main_prints(capsys):
    args = ["--config", "mistral3p5_medpix", "plan.world_size=64", "plan.time=False", "plan.json=True"]
    proc = subprocess.run([sys.executable, "-m", "torchtune_mistral3.plan", *args], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == main(args) == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads(capsys.readouterr().out)
