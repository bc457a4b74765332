"""Loading a model for generation: the sequence-parallel (training) layout is refused before anything is built."""

import pytest
import torch
from omegaconf import OmegaConf
from torchtune_mistral3.generation import load_inference_model
from torchtune_mistral3.models.mistral3 import mistral3_tp_plan


def test_load_inference_model_fails_with_sequence_parallel(fake_tp2_mesh):
    cfg_model = OmegaConf.create({"_component_": "torchtune_mistral3.checkpointing.mistral3_from_hf_config"})
    with pytest.raises(ValueError, match=r"tensor_parallel_plan.sequence_parallel=False"):
        load_inference_model(
            cfg_model, None, device=torch.device("cpu"), dtype=torch.float32, tp_mesh=fake_tp2_mesh,
            tp_plan=mistral3_tp_plan(sequence_parallel=True),
        )
