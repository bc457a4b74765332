"""Training precision: the compute, master and gradient-reduction dtypes, bf16 stochastic rounding and FP8 linears.

A run's precision is four config keys (see docs/configs.md):

- ``dtype`` (stock key): the compute dtype, the dtype of the weights in forward and backward and of the
  activations, ``bf16`` or ``fp32``;
- ``master_dtype``: the dtype of the parameters the optimizer updates, their gradients and the optimizer states,
  ``fp32`` (default) or ``bf16``;
- ``reduce_dtype``: the dtype of the data-parallel gradient reduction, ``fp32`` or ``bf16`` (default: the master
  dtype);
- ``fp8_recipe``: ``null`` (default), ``tensorwise`` or ``rowwise``: the text decoder's linears compute in FP8
  (torchao float8 training) on top of the policy above.

``dtype: bf16`` with ``master_dtype: fp32`` is FSDP2's mixed precision, ``MixedPrecisionPolicy(param_dtype=bf16,
reduce_dtype=...)``: fp32 sharded parameters, a bf16 copy all-gathered per layer for forward and backward, bf16
gradients cast to ``reduce_dtype`` for the reduce-scatter and accumulated in fp32. Without data parallelism
(one process, TP, PP, TP x PP) the same FSDP2 policy runs on the data-parallel mesh of size 1, so every layout
computes the same thing by the same code. ``master_dtype: bf16`` is torchtune's pure bf16; with
:class:`StochasticRoundingAdamW` as the optimizer the bf16 parameters are updated with stochastic rounding
(torchao's AdamW), which keeps most of what fp32 master weights give at the memory of pure bf16.
"""

from dataclasses import dataclass
from typing import Any, Callable, List, Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
FP8_RECIPES = ("tensorwise", "rowwise")
# torchao float8 needs FP8 tensor cores: Ada (8.9) and Hopper (9.0) or newer
FP8_MIN_CAPABILITY = (8, 9)
_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class PrecisionPolicy:
    """What a run computes, stores and reduces in.

    Args:
        compute_dtype (torch.dtype): weights in forward/backward and activations (``dtype``).
        master_dtype (torch.dtype): parameters, their gradients and the optimizer states (``master_dtype``).
        reduce_dtype (torch.dtype): data-parallel gradient reduction (``reduce_dtype``).
        fp8_recipe (Optional[str]): torchao float8 scaling of the decoder linears, or None. Default is None.
    """

    compute_dtype: torch.dtype
    master_dtype: torch.dtype
    reduce_dtype: torch.dtype
    fp8_recipe: Optional[str] = None

    @property
    def casts_parameters(self) -> bool:
        """bool: the compute copies of the weights differ from the master (FSDP2 runs even at data parallel 1)."""
        return self.compute_dtype != self.master_dtype

    def mp_policy(self) -> Optional[MixedPrecisionPolicy]:
        """FSDP2's policy for this precision, or None when FSDP2's default (no casts) is it.

        Returns:
            Optional[MixedPrecisionPolicy]: the policy.
        """
        if not self.casts_parameters and self.reduce_dtype == self.master_dtype:
            return None
        param_dtype = self.compute_dtype if self.casts_parameters else None
        return MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=self.reduce_dtype)

    def store_frozen_in_compute_dtype(self, model: nn.Module) -> int:
        """Hold the frozen parameters in the compute dtype when the masters are wider (call before sharding).

        A frozen parameter (the vision tower, the embeddings or head when not trained) has no master to keep:
        FSDP2 would only cast it to the compute dtype before every forward and backward, each micro-batch, and
        hold it at twice the bytes. Stored in the compute dtype, its values are those casts' (the checkpoint is
        read in the master dtype and rounded once, on the copy into the parameter), and FSDP2 skips the cast
        (it needs one dtype among a group's trainable parameters only).

        Args:
            model (nn.Module): the model or a pipeline stage, on any device (meta is fine).

        Returns:
            int: the number of parameter elements now held in the compute dtype.
        """
        if not self.casts_parameters:
            return 0
        moved = 0
        for p in model.parameters():
            if not p.requires_grad and p.dtype == self.master_dtype:
                p.data = p.data.to(self.compute_dtype)
                moved += p.numel()
        return moved

    def describe(self) -> str:
        """str: one line for the log, e.g. ``compute bf16, master fp32, reduce fp32``."""
        text = (
            f"compute {_NAMES[self.compute_dtype]}, master (parameters, gradients, optimizer states) "
            f"{_NAMES[self.master_dtype]}, gradient reduction {_NAMES[self.reduce_dtype]}"
        )
        return text + (f", decoder linears in FP8 ({self.fp8_recipe} scaling)" if self.fp8_recipe else "")


def _dtype_key(cfg: DictConfig, key: str, default: str) -> torch.dtype:
    value = cfg.get(key, None)
    value = default if value is None else str(value)
    if value not in DTYPES:
        raise ValueError(
            f"{key}={value} is not a precision this recipe trains in: set {key} to one of {sorted(DTYPES)}"
        )
    return DTYPES[value]


def uses_stochastic_rounding(cfg_optimizer: Optional[DictConfig]) -> bool:
    """Whether the optimizer config rounds bf16 parameters stochastically.

    Args:
        cfg_optimizer (Optional[DictConfig]): the ``optimizer`` node.

    Returns:
        bool: True for :class:`StochasticRoundingAdamW` or ``bf16_stochastic_round: True`` (torchao's optimizers).
    """
    if cfg_optimizer is None:
        return False
    component = str(cfg_optimizer.get("_component_", ""))
    return component.endswith(StochasticRoundingAdamW.__name__) or bool(
        cfg_optimizer.get("bf16_stochastic_round", False)
    )


def precision_policy(cfg: DictConfig, device: torch.device) -> PrecisionPolicy:
    """Read and check the run's precision keys; refuse what cannot work before anything is built.

    Args:
        cfg (DictConfig): the recipe config (``dtype``, ``master_dtype``, ``reduce_dtype``, ``fp8_recipe``,
            ``optimizer``).
        device (torch.device): the training device.

    Returns:
        PrecisionPolicy: the policy.

    Raises:
        ValueError: for an unknown value, a master dtype below the compute dtype, stochastic rounding on fp32
            parameters, or ``fp8_recipe`` on a device without FP8.
    """
    compute = _dtype_key(cfg, "dtype", "bf16")
    master = _dtype_key(cfg, "master_dtype", "fp32")
    reduce = _dtype_key(cfg, "reduce_dtype", _NAMES[master])
    if compute == torch.float32 and master != torch.float32:
        raise ValueError(
            f"dtype=fp32 with master_dtype={_NAMES[master]}: the master weights must be at least as precise as the "
            "compute. Set master_dtype=fp32, or dtype=bf16 for bf16 compute."
        )
    if uses_stochastic_rounding(cfg.get("optimizer", None)) and master != torch.bfloat16:
        raise ValueError(
            f"the optimizer rounds bf16 parameters stochastically, but master_dtype={_NAMES[master]}: stochastic "
            "rounding replaces fp32 master weights. Set master_dtype=bf16 (with dtype=bf16), or use "
            "torch.optim.AdamW for fp32 master weights."
        )
    fp8 = cfg.get("fp8_recipe", None)
    if fp8 is not None:
        fp8 = str(fp8)
        if fp8 not in FP8_RECIPES:
            raise ValueError(f"fp8_recipe={fp8} is unknown: set fp8_recipe to one of {list(FP8_RECIPES)} or null")
        check_fp8_device(device)
    return PrecisionPolicy(compute, master, reduce, fp8)


def check_fp8_device(device: torch.device) -> None:
    """Refuse FP8 training where the GPU has no FP8 matmul (CPU, or CUDA capability below 8.9).

    Args:
        device (torch.device): the training device.

    Raises:
        ValueError: on CPU or an older GPU, naming the key to unset.
    """
    if device.type != "cuda":
        raise ValueError(
            f"fp8_recipe needs a GPU with FP8 tensor cores (CUDA capability >= 8.9: H100, H200, L40S); this run "
            f"is on {device.type}. Set fp8_recipe=null."
        )
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        raise ValueError(
            f"fp8_recipe needs CUDA capability >= 8.9 (H100, H200, L40S); {torch.cuda.get_device_name(device)} has "
            f"{capability[0]}.{capability[1]}. Set fp8_recipe=null."
        )


def is_decoder_linear(module: nn.Module, fqn: str) -> bool:
    """The FP8 module filter: a linear inside a text decoder layer (not the vision tower, projector or head).

    Args:
        module (nn.Module): a module of the model.
        fqn (str): its fully qualified name.

    Returns:
        bool: True for ``decoder.layers.<i>.*`` linears.
    """
    return type(module) is nn.Linear and fqn.startswith("decoder.layers.")


def convert_to_fp8(model: nn.Module, recipe: str) -> int:
    """Swap the decoder layers' linears for torchao ``Float8Linear`` (before TP, compile and FSDP2).

    Args:
        model (nn.Module): the model or a pipeline stage (meta device is fine: the swap keeps the parameters).
        recipe (str): ``tensorwise`` or ``rowwise`` (torchao's ``Float8LinearRecipeName``).

    Returns:
        int: the number of linears converted.
    """
    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    before = sum(1 for n, m in model.named_modules() if is_decoder_linear(m, n))
    convert_to_float8_training(
        model, config=Float8LinearConfig.from_recipe_name(recipe), module_filter_fn=is_decoder_linear
    )
    return before


def shard_model(
    model: nn.Module,
    shard_conditions: List[Callable[[str, nn.Module], bool]],
    *,
    cpu_offload: bool,
    reshard_after_forward: bool,
    dp_mesh: DeviceMesh,
    mp_policy: Optional[MixedPrecisionPolicy],
) -> None:
    """:func:`torchtune.training.shard_model` with FSDP2's mixed-precision policy.

    Args:
        model (nn.Module): the model (or pipeline stage) to shard.
        shard_conditions (List[Callable[[str, nn.Module], bool]]): which submodules get their own FSDP unit.
        cpu_offload (bool): offload parameters, gradients and optimizer states to CPU.
        reshard_after_forward (bool): free the gathered parameters after forward.
        dp_mesh (DeviceMesh): the data-parallel mesh (size 1 is fine: the casts still happen).
        mp_policy (Optional[MixedPrecisionPolicy]): the precision policy; None for none.

    Raises:
        ValueError: if no submodule matched ``shard_conditions``.
    """
    kwargs: dict = {"reshard_after_forward": reshard_after_forward, "mesh": dp_mesh}
    if cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if mp_policy is not None:
        kwargs["mp_policy"] = mp_policy
    sharded = 0
    for name, module in reversed(list(model.named_modules())):
        if any(condition(name, module) for condition in shard_conditions):
            fully_shard(module, **kwargs)
            sharded += 1
    if sharded == 0:
        raise ValueError("No layer modules were sharded. Please check if shard conditions are working as expected.")
    fully_shard(model, **kwargs)


def _local(t: Any) -> Any:
    return t.to_local() if isinstance(t, DTensor) else t


class StochasticRoundingAdamW(torch.optim.Optimizer):
    """AdamW over bf16 parameters with bf16 states and stochastic rounding of the update (torchao's math).

    Each step runs torchao's ``single_param_adam`` (fp32 arithmetic, then the parameter rounded to bf16 up or
    down with probability given by the dropped bits, so small updates survive on average) on every
    parameter's local shard. torchao's own ``torchao.optim._AdamW(bf16_stochastic_round=True)`` compiles that
    function once per parameter shape, which costs minutes on a CPU: here it is compiled on CUDA and run eagerly
    elsewhere. The random bits come from torch's generator, so the exact resume restores them.

    Args:
        params (Any): parameters or parameter groups.
        lr (float): learning rate. Default is 1e-3.
        betas (tuple): Adam's betas. Default is (0.9, 0.999).
        eps (float): Adam's epsilon. Default is 1e-8.
        weight_decay (float): decoupled weight decay. Default is 0.01.

    Raises:
        ValueError: for a negative learning rate or epsilon, or betas outside [0, 1).
    """

    def __init__(
        self, params: Any, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.01
    ) -> None:
        if lr < 0 or eps < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise ValueError(f"invalid AdamW hyperparameters: lr={lr}, eps={eps}, betas={betas}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure: Optional[Callable] = None) -> Optional[torch.Tensor]:
        """One AdamW step.

        Args:
            closure (Optional[Callable]): re-evaluates the loss. Default is None.

        Returns:
            Optional[torch.Tensor]: the closure's loss, if given.
        """
        from torchao.optim.adam import single_param_adam

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = torch.as_tensor(group["lr"], dtype=torch.float32)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.tensor(0.0)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                local = _local(p)
                fn = single_param_adam
                if local.device.type == "cuda":
                    fn = torch.compile(single_param_adam, fullgraph=True, dynamic=False)
                fn(
                    local,
                    _local(p.grad),
                    state["step"],
                    _local(state["exp_avg"]),
                    _local(state["exp_avg_sq"]),
                    None,
                    lr.to(local.device),
                    group["betas"][0],
                    group["betas"][1],
                    group["weight_decay"],
                    group["eps"],
                    True,
                    local.dtype is torch.bfloat16,
                )
        return loss
