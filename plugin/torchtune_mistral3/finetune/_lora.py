"""The LoRA fine-tuning recipe: torchtune's ``lora_finetune_distributed``, extended for Mistral 3 VLMs.

``tune run lora_finetune_distributed`` and ``lora_finetune_single_device`` (recipes/) run
:class:`Mistral3LoRAFinetuneRecipe` for configs whose model comes from ``torchtune_mistral3``; every other config
runs the stock recipe unchanged.

:class:`Mistral3LoRAFinetuneRecipe` is the plugin's ``full_finetune_distributed`` recipe
(:class:`Mistral3FullFinetuneRecipe`: one-process launch, CPU/gloo, lazy FP8-aware loading, VLM batches,
validation, step checkpoints and exact resume) with a LoRA delta:

- the model is a LoRA builder (``mistral3_lora_from_hf_config``, ``*_lora``); only the adapters train (the
  builder freezes the rest, and only trainable parameters reach the optimizer);
- frozen FP8 base linears (``model.fp8_base: True``) are loaded as the checkpoint's FP8 bytes and scales;
  adapters are initialised from ``seed`` and their key, so every data-parallel layout starts alike;
- checkpoints write the PEFT adapter to ``<output_dir>/epoch_<N>/adapter/`` and, with
  ``save_merged_model: True``, the merged model as an HF checkpoint in ``<output_dir>/epoch_<N>/``.

Extra keys beyond the full recipe's: ``save_merged_model`` (default False). ``master_dtype`` must equal ``dtype``
(the adapters train in the compute dtype; FSDP2's cast to a lower compute dtype would also cast the FP8 base).
Data parallel (FSDP2) only: ``tensor_parallel_dim`` and ``pipeline_parallel_dim`` must be 1.
"""

from omegaconf import DictConfig
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import _CHECKPOINT_PREFIX

from torchtune_mistral3.checkpointing import adapter_keys, load_lora_checkpoint
from torchtune_mistral3.checkpointing._peft import LoRAAdapterSaver
from torchtune_mistral3.training import ParallelDims

from ._full import Mistral3FullFinetuneRecipe


class Mistral3LoRAFinetuneRecipe(Mistral3FullFinetuneRecipe):
    """LoRA fine-tuning of Mistral 3 vision-language models (see the module docstring).

    Args:
        cfg (DictConfig): the parsed config.

    Raises:
        ValueError: for a tensor- or pipeline-parallel layout, or a model that trains whole parts besides
            the adapters (the PEFT adapter could not carry them).
    """

    def __init__(self, cfg: DictConfig) -> None:
        dims = ParallelDims.from_config(cfg)  # before the launch's check: this recipe has no TP or PP at all
        for key, degree in (("tensor_parallel_dim", dims.tp), ("pipeline_parallel_dim", dims.pp)):
            if degree != 1:
                raise ValueError(f"{key}={degree}: the LoRA recipe runs data parallel (FSDP2) only; set {key}=1")
        super().__init__(cfg)
        if self._precision.casts_parameters:
            # FSDP2's mixed precision would cast the frozen FP8 base to the compute dtype before its all-gather
            raise ValueError(
                f"master_dtype={cfg.get('master_dtype')} differs from dtype={cfg.get('dtype')}: the LoRA recipe keeps "
                "the adapters in the compute dtype; set master_dtype to the same value as dtype"
            )
        self._save_merged_model = bool(cfg.get("save_merged_model", False))

    def setup(self, cfg: DictConfig) -> None:
        """Set up as the full recipe, then save adapters instead of the full model.

        Args:
            cfg (DictConfig): the parsed config.
        """
        super().setup(cfg)
        adapters = set(adapter_keys(self._model))
        # parameter names carry activation checkpointing's wrapper prefix, state-dict keys (the adapters') do not
        full_parts = [
            n for n, p in self._model.named_parameters()
            if p.requires_grad and n.replace(_CHECKPOINT_PREFIX, "") not in adapters
        ]
        if full_parts or not adapters:
            raise ValueError(
                f"the LoRA recipe trains adapters only, but the model trains {full_parts[:4] or 'no adapter'}: use "
                "a *_lora model builder with vision_trainable/projector_trainable/decoder_trainable 'lora' or 'frozen'"
            )
        self._checkpointer = LoRAAdapterSaver(self._checkpointer, save_merged_model=self._save_merged_model)

    def _load_weights(self, part: nn.Module) -> None:
        load_lora_checkpoint(part, self._checkpointer.reader, dtype=self._dtype, seed=self.seed)
