"""The checkpointer ``_component_`` for torchtune recipes: FP8-aware, lazy HF loading and atomic HF saving."""

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Union

import torch
from torch import nn
from torchtune import training
from torchtune.training.checkpointing._utils import (
    RECIPE_STATE_DIRNAME,
    FormattedCheckpointFiles,
    check_outdir_not_in_ckptdir,
    get_largest_iter_folder,
    get_recipe_checkpoint_path,
    safe_torch_load,
)

from torchtune_mistral3.checkpointing._load import check_all_weights_read
from torchtune_mistral3.checkpointing._reader import HFCheckpointReader
from torchtune_mistral3.checkpointing._writer import (
    DEFAULT_MAX_SHARD_BYTES,
    default_fp8_keys,
    save_distributed,
    write_hf_checkpoint,
)

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32}


class Mistral3HFCheckpointer:
    """Read and write Hugging Face ``Mistral3ForConditionalGeneration`` checkpoints (bf16 or FP8 on disk).

    A drop-in for torchtune's ``FullModelHFCheckpointer`` in ``full_finetune_distributed``:

    - ``load_checkpoint()`` returns ``{"model": mapping}`` where the mapping reads and dequantises one tensor
      per lookup (plugin keys), so no rank builds the whole state dict. Recipes that place tensors
      themselves use :attr:`reader` with :func:`~torchtune_mistral3.checkpointing.load_into_module`, which
      reads only each rank's slices.
    - ``save_checkpoint()`` writes ``<output_dir>/epoch_<N>/`` as HF safetensors shards + index +
      ``config.json`` (bf16, no ``quantization_config``; or per-tensor FP8 again with ``save_fp8``) plus the
      source's tokenizer/processor files, via a temporary directory that is renamed when complete.
      :meth:`save_distributed` does the same from a parallelised model without gathering it on one rank.

    Args:
        checkpoint_dir (str): HF checkpoint directory (``config.json`` + safetensors).
        checkpoint_files (Optional[Union[List[str], Dict[str, str]]]): file names, or torchtune's
            ``{filename_format, max_filename}``. Default is None: the sharded index if present, else every
            ``*.safetensors``.
        model_type (str): kept for the recipe, which reads it as a string. Default is "MISTRAL3".
        output_dir (str): where checkpoints are saved; must not lie inside ``checkpoint_dir``.
        adapter_checkpoint (Optional[str]): not supported (full fine-tuning only). Default is None.
        recipe_checkpoint (Optional[str]): recipe state file, relative to ``output_dir``. Default is None:
            ``recipe_state/recipe_state.pt``.
        resume_from_checkpoint (bool): deprecated alias of ``should_load_recipe_state``. Default is False.
        safe_serialization (bool): must be True (only safetensors is written). Default is True.
        should_load_recipe_state (bool): resume: load the model from the newest ``output_dir/epoch_<N>`` and
            the recipe state. Default is False.
        save_fp8 (bool): write FP8 E4M3 with one bf16 ``weight_scale_inv`` per tensor (``amax / 448``) for
            the weights that were FP8 in the source (the text linears if none were), keeping the source's
            ``activation_scale``. Default is False.
        save_dtype (Optional[str]): dtype of the other saved tensors, "bf16" or "fp32"; None keeps the
            model's. Default is "bf16".
        max_shard_size_gb (float): size bound of one saved file. Default is 5.
        ignore_unexpected_keys (Optional[Union[str, List[str]]]): regular expressions for checkpoint keys
            (HF names as stored, matched from the start with ``re.match``) to leave out on purpose. Every other
            stored weight must be read by some parameter of the model (:meth:`check_model_keys`). Default is
            None.
        max_image_size (Optional[int]): the transform's longest image edge (``${tokenizer.max_image_size}``),
            written to the saved ``preprocessor_config.json`` so transformers resizes images as training did.
            Default is None (the vision tower's ``image_size``).

    Raises:
        ValueError: if ``output_dir`` is missing or inside ``checkpoint_dir``, ``safe_serialization`` is
            False, an adapter is given, or ``save_dtype`` is unknown.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        checkpoint_files: Optional[Union[List[str], Dict[str, str]]] = None,
        model_type: str = "MISTRAL3",
        output_dir: Optional[str] = None,
        adapter_checkpoint: Optional[str] = None,
        recipe_checkpoint: Optional[str] = None,
        resume_from_checkpoint: bool = False,
        safe_serialization: bool = True,
        should_load_recipe_state: bool = False,
        *,
        save_fp8: bool = False,
        save_dtype: Optional[str] = "bf16",
        max_shard_size_gb: float = DEFAULT_MAX_SHARD_BYTES / 1024**3,
        ignore_unexpected_keys: Optional[Union[str, List[str]]] = None,
        max_image_size: Optional[int] = None,
    ) -> None:
        if output_dir is None:
            raise ValueError("Mistral3HFCheckpointer needs output_dir (where checkpoints are saved)")
        if not safe_serialization:
            raise ValueError("Mistral3HFCheckpointer writes safetensors only; set safe_serialization: True")
        if adapter_checkpoint is not None:
            raise ValueError("Mistral3HFCheckpointer does full-model checkpoints only; remove adapter_checkpoint")
        if save_dtype is not None and save_dtype not in _DTYPES:
            raise ValueError(f"save_dtype must be one of {sorted(_DTYPES)} or null, got '{save_dtype}'")
        self._checkpoint_dir = Path(checkpoint_dir)
        self._output_dir = Path(output_dir)
        check_outdir_not_in_ckptdir(ckpt_dir=self._checkpoint_dir, out_dir=self._output_dir)
        try:
            self._output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise type(e)(
                f"Cannot create output_dir {self._output_dir} ({e.strerror or e}): choose another output_dir=... "
                "or fix the permissions"
            ) from None
        self._model_type = model_type
        self._should_load_recipe_state = should_load_recipe_state or resume_from_checkpoint
        self._save_fp8 = save_fp8
        self._save_dtype = _DTYPES[save_dtype] if save_dtype is not None else None
        self._max_shard_bytes = int(max_shard_size_gb * 1024**3)
        self._max_image_size = max_image_size

        if isinstance(checkpoint_files, Mapping):
            checkpoint_files = FormattedCheckpointFiles.from_dict(dict(checkpoint_files)).build_checkpoint_filenames()
        elif checkpoint_files is not None:
            checkpoint_files = [str(f) for f in checkpoint_files]
        self._recipe_checkpoint = get_recipe_checkpoint_path(
            self._output_dir, recipe_checkpoint, should_load_recipe_state=self._should_load_recipe_state
        )
        if self._should_load_recipe_state:
            latest = get_largest_iter_folder(self._output_dir)
            if latest is None:
                raise ValueError(
                    f"should_load_recipe_state is set but '{self._output_dir}' holds no epoch_<N> checkpoint"
                )
            self._model_dir, checkpoint_files = self._output_dir / latest, None
        else:
            self._model_dir = self._checkpoint_dir
        if isinstance(ignore_unexpected_keys, str):
            ignore_unexpected_keys = [ignore_unexpected_keys]
        ignored = [str(p) for p in ignore_unexpected_keys or []]
        self._reader = HFCheckpointReader(self._model_dir, checkpoint_files, ignore_unexpected_keys=ignored)
        if self._reader.ignored_keys:
            logger.info(
                f"Leaving out {len(self._reader.ignored_keys)} checkpoint keys that ignore_unexpected_keys matches: "
                f"{self._reader.ignored_keys[:8]}{' ...' if len(self._reader.ignored_keys) > 8 else ''}"
            )
        # The base checkpoint is what the saved files mirror (FP8 layout, activation scales, tokenizer),
        # also when resuming from one of our own bf16 saves.
        self._source = (
            self._reader
            if self._model_dir == self._checkpoint_dir
            else HFCheckpointReader(self._checkpoint_dir, ignore_unexpected_keys=ignored)
        )

    @property
    def reader(self) -> HFCheckpointReader:
        """HFCheckpointReader: the checkpoint the model weights are loaded from (for ``load_into_module``)."""
        return self._reader

    def check_model_keys(self, model: nn.Module) -> None:
        """Raise if the checkpoint holds weights that no parameter of ``model`` reads.

        Call it on every rank with the whole model (e.g. on the meta device, before pipeline stages are cut
        or anything is sharded): see :func:`~torchtune_mistral3.checkpointing.check_all_weights_read`.

        Args:
            model (nn.Module): the full model, plugin key names.

        Raises:
            ValueError: naming the checkpoint directory and the unread keys.
        """
        check_all_weights_read(self._reader, model.state_dict().keys())

    def load_checkpoint(self) -> Dict[str, Any]:
        """Return the model weights as a lazy mapping, plus the recipe state when resuming.

        Returns:
            Dict[str, Any]: ``{"model": LazyStateDict}`` (plugin keys; FP8 weights dequantised to fp32 on
            lookup, everything else as stored) and, when resuming, the saved recipe state's keys.
        """
        state: Dict[str, Any] = {training.MODEL_KEY: self._reader.state_dict()}
        if self._should_load_recipe_state:
            state.update(safe_torch_load(self._recipe_checkpoint, mmap=False))
        return state

    def _fp8_options(self, keys: List[str]) -> Dict[str, Any]:
        if not self._save_fp8:
            return {"fp8_keys": (), "activation_scales": None}
        fp8_keys = self._source.fp8_keys() or default_fp8_keys(keys)
        return {"fp8_keys": fp8_keys, "activation_scales": self._source.activation_scales()}

    def save_checkpoint(
        self,
        state_dict: Dict[str, Any],
        epoch: int,
        intermediate_checkpoint: bool = False,
        adapter_only: bool = False,
    ) -> None:
        """Write ``state_dict["model"]`` to ``<output_dir>/epoch_<epoch>`` and, mid-training, the recipe state.

        Args:
            state_dict (Dict[str, Any]): ``"model"`` (full plugin state dict on this rank) and recipe keys.
            epoch (int): names the output directory.
            intermediate_checkpoint (bool): also write ``recipe_state/recipe_state.pt`` for resuming.
                Default is False.
            adapter_only (bool): not supported. Default is False.

        Raises:
            ValueError: if ``adapter_only`` is set.
        """
        if adapter_only:
            raise ValueError("Mistral3HFCheckpointer does not save adapters; set adapter_only=False")
        model = state_dict[training.MODEL_KEY]
        path = write_hf_checkpoint(
            model,
            self._output_dir / f"epoch_{epoch}",
            config=self._source.config,
            source_dir=self._checkpoint_dir,
            dtype=self._save_dtype,
            max_shard_bytes=self._max_shard_bytes,
            max_image_size=self._max_image_size,
            **self._fp8_options(list(model)),
        )
        logger.info(f"Model checkpoint saved to {path}")
        if intermediate_checkpoint:
            recipe_state = {k: v for k, v in state_dict.items() if k != training.MODEL_KEY}
            target = self._output_dir / RECIPE_STATE_DIRNAME / "recipe_state.pt"
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.partial")
            torch.save(recipe_state, tmp)
            os.replace(tmp, target)
            logger.info(f"Recipe state saved to {target}")

    def save_distributed(
        self,
        module: Union[nn.Module, Sequence[nn.Module]],
        epoch: int,
        *,
        mesh: Optional[Any] = None,
        pp_dim: str = "pp",
    ) -> Path:
        """Save a parallelised model to ``<output_dir>/epoch_<epoch>`` from every rank; see :func:`save_distributed`.

        Args:
            module (Union[nn.Module, Sequence[nn.Module]]): the model, or this rank's pipeline stage(s).
            epoch (int): names the output directory.
            mesh (Optional[DeviceMesh]): the world mesh. Default is None (one stage, rank 0 writes).
            pp_dim (str): name of the pipeline dimension of ``mesh``. Default is "pp".

        Returns:
            Path: the checkpoint directory.
        """
        return save_distributed(
            module,
            self._output_dir / f"epoch_{epoch}",
            config=self._source.config,
            source_dir=self._checkpoint_dir,
            mesh=mesh,
            pp_dim=pp_dim,
            dtype=self._save_dtype,
            max_shard_bytes=self._max_shard_bytes,
            max_image_size=self._max_image_size,
            **self._fp8_options(self._reader.keys()),
        )
