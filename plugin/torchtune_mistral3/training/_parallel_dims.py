"""Parallel degrees (pipeline x data x tensor) and the 3-D device mesh, validated once."""

from dataclasses import dataclass

from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torchtune.modules import MultiHeadAttention
from torchtune.modules.model_fusion import DeepFusionModel, EarlyFusionModel


@dataclass(frozen=True)
class ParallelDims:
    """Pipeline, data and tensor parallel degrees of one job.

    Data parallelism (FSDP2) takes what is left of the world size: ``dp = world_size // (pp * tp)``.
    The mesh dims are ordered ``("pp", "dp", "tp")`` so that the tensor parallel group (most
    communication) is made of neighbouring ranks, i.e. of GPUs of one host.

    Args:
        world_size (int): number of processes.
        pp (int): pipeline parallel degree, config key ``pipeline_parallel_dim``. Default is 1.
        tp (int): tensor parallel degree, config key ``tensor_parallel_dim``. Default is 1.

    Raises:
        ValueError: if a degree is below 1 or ``pp * tp`` does not divide ``world_size``.
    """

    world_size: int
    pp: int = 1
    tp: int = 1

    def __post_init__(self):
        for key, value in (("pipeline_parallel_dim", self.pp), ("tensor_parallel_dim", self.tp)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}.")
        if self.world_size % (self.pp * self.tp) != 0:
            raise ValueError(
                f"World size {self.world_size} is not divisible by pipeline_parallel_dim ({self.pp}) x "
                f"tensor_parallel_dim ({self.tp}) = {self.pp * self.tp}. Launch a multiple of "
                f"{self.pp * self.tp} processes or change pipeline_parallel_dim / tensor_parallel_dim."
            )

    @property
    def dp(self) -> int:
        """int: data parallel (FSDP) degree, the rest of the world size."""
        return self.world_size // (self.pp * self.tp)

    @property
    def pp_enabled(self) -> bool:
        """bool: whether the model is split into pipeline stages."""
        return self.pp > 1

    @property
    def tp_enabled(self) -> bool:
        """bool: whether layers are tensor parallel."""
        return self.tp > 1

    @property
    def dp_enabled(self) -> bool:
        """bool: whether parameters are sharded with FSDP2."""
        return self.dp > 1

    def build_mesh(self, device_type: str) -> DeviceMesh:
        """Build the ``("pp", "dp", "tp")`` device mesh (size-1 dims included, so every sub-mesh exists).

        Args:
            device_type (str): ``"cuda"`` or ``"cpu"``.

        Returns:
            DeviceMesh: the 3-D mesh; use ``mesh["pp"]``, ``mesh["dp"]``, ``mesh["tp"]``.
        """
        return init_device_mesh(device_type, (self.pp, self.dp, self.tp), mesh_dim_names=("pp", "dp", "tp"))


def validate_tensor_parallel(model: nn.Module, tp: int) -> None:
    """Check that every decoder attention module can be split ``tp`` ways.

    Only the decoder is checked: the vision tower and projector stay replicated.

    Args:
        model (nn.Module): a ``TransformerDecoder`` or a fusion model with a ``decoder``.
        tp (int): tensor parallel degree.

    Raises:
        ValueError: naming the module, its head counts and the divisors that would work.
    """
    if tp == 1:
        return
    decoder = model.decoder if isinstance(model, (EarlyFusionModel, DeepFusionModel)) else model
    for name, module in decoder.named_modules():
        if not isinstance(module, MultiHeadAttention):
            continue
        counts = {"num_heads": module.num_heads, "num_kv_heads": module.num_kv_heads, "embed_dim": module.embed_dim}
        bad = {k: v for k, v in counts.items() if v % tp != 0}
        if bad:
            common = counts["num_kv_heads"]
            divisors = [d for d in range(1, common + 1) if all(v % d == 0 for v in counts.values())]
            raise ValueError(
                f"tensor_parallel_dim={tp} does not divide {', '.join(f'{k}={v}' for k, v in bad.items())} of "
                f"decoder.{name}. Set tensor_parallel_dim to one of {divisors}."
            )


def validate_pipeline_stages(num_layers: int, num_stages: int) -> None:
    """Check that every pipeline stage can get at least one decoder layer.

    Args:
        num_layers (int): decoder layers of the model.
        num_stages (int): ``pipeline_parallel_dim`` x stages per rank.

    Raises:
        ValueError: if there are more stages than layers.
    """
    if num_stages > num_layers:
        raise ValueError(
            f"{num_stages} pipeline stages for a decoder of {num_layers} layers: every stage needs at least "
            f"one layer. Lower pipeline_parallel_dim (or the stages per rank of the schedule)."
        )
