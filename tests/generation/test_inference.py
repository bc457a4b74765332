"""Loading a model for generation: the sequence-parallel (training) layout is refused before anything is built."""

import pytest
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.device_mesh import init_device_mesh
from torch.testing._internal.distributed.fake_pg import FakeStore
from torchtune_mistral3.generation import load_inference_model
from torchtune_mistral3.models.mistral3 import mistral3_tp_plan


@pytest.fixture
def tp2_mesh():
    # torch's in-process fake backend: a 2-rank mesh without a second process (no collective runs here)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    yield init_device_mesh("cpu", (2,))
    dist.destroy_process_group()


def test_load_inference_model_fails_with_sequence_parallel(tp2_mesh):
    cfg_model = OmegaConf.create({"_component_": "torchtune_mistral3.models.mistral3.mistral3_from_hf_config"})
    with pytest.raises(ValueError, match=r"tensor_parallel_plan.sequence_parallel=False"):
        load_inference_model(
            cfg_model, None, device=torch.device("cpu"), dtype=torch.float32, tp_mesh=tp2_mesh,
            tp_plan=mistral3_tp_plan(sequence_parallel=True),
        )
