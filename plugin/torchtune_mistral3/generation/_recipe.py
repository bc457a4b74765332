"""The generate recipe of plugin configs, behind the stock names ``generate`` and ``dev/generate_v2_distributed``."""

import time
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from omegaconf import DictConfig, OmegaConf
from torchtune import config, training, utils

from ..training import check_checkpoint_dir, ensure_single_process_env
from ._generate import collate_prompts, generate
from ._inference import load_inference_model, prompt_messages

log = utils.get_logger("INFO")

def sampling_options(cfg: DictConfig) -> Dict[str, Any]:
    """``temperature`` and ``top_k`` of the config; ``greedy: True`` (the default) overrides both.

    Args:
        cfg (DictConfig): the parsed config.

    Returns:
        Dict[str, Any]: keyword arguments of :func:`~torchtune_mistral3.generation.generate`.

    Raises:
        ValueError: if sampling is asked for with a temperature that is not positive.
    """
    if cfg.get("greedy", True):
        return {"temperature": 1.0, "top_k": 1}
    temperature = float(cfg.get("temperature", 1.0))
    if temperature <= 0:
        raise ValueError(f"temperature={temperature}: sampling needs temperature > 0 (or set greedy=True)")
    top_k = cfg.get("top_k", None)
    return {"temperature": temperature, "top_k": None if top_k is None else int(top_k)}


class Mistral3GenerationRecipe:
    """Answer one (image +) question prompt with a Mistral 3 VLM, on one process or tensor parallel.

    Keys: ``model``, ``tokenizer`` (the model transform), ``checkpointer``, ``prompt`` (``system``, ``user``: text
    or ``{image, text}``), ``max_new_tokens``, ``greedy`` (default True) or ``temperature`` + ``top_k``, ``seed``,
    ``enable_kv_cache`` (default True), ``device``, ``dtype``, ``prepare_checkpoint`` (optional component run
    first, e.g. the demo's tiny checkpoint), ``tensor_parallel_plan`` (used when launched on several processes:
    tensor parallelism over all of them).

    Args:
        cfg (DictConfig): the parsed config.
    """

    def __init__(self, cfg: DictConfig) -> None:
        ensure_single_process_env()
        self._device = utils.get_device(device=cfg.device)
        self._dtype = training.get_dtype(dtype=cfg.dtype, device=self._device)
        if not dist.is_initialized():
            dist.init_process_group(backend="gloo" if self._device.type == "cpu" else "nccl")
        self.world_size, self.rank = utils.get_world_size_and_rank()
        self._is_rank_zero = self.rank == 0
        self._sampling = sampling_options(cfg)
        # a bad prompt (missing image, empty question) fails before the model loads
        prompt = cfg.get("prompt", None)
        self._messages = None if prompt is None else prompt_messages(OmegaConf.to_container(prompt, resolve=True))
        training.set_seed(seed=cfg.get("seed", None))

    def setup(self, cfg: DictConfig) -> None:
        """Build the transform and the model (sharded when several processes run).

        Args:
            cfg (DictConfig): the parsed config.
        """
        node = cfg.get("prepare_checkpoint", None)
        if node is not None and node.get("_component_", None) is not None:
            if self._is_rank_zero:
                config.instantiate(node)
            dist.barrier()
        else:
            check_checkpoint_dir(cfg.checkpointer.get("checkpoint_dir", None), cfg.get("hf_repo", None))
        checkpointer = config.instantiate(cfg.checkpointer)
        tp_mesh, plan = None, None
        if self.world_size > 1:
            tp_mesh = dist.init_device_mesh(self._device.type, (self.world_size,), mesh_dim_names=("tp",))
            plan = config.instantiate(cfg.tensor_parallel_plan)
        t0 = time.perf_counter()
        self.model = load_inference_model(
            cfg.model, checkpointer, device=self._device, dtype=self._dtype, tp_mesh=tp_mesh, tp_plan=plan
        )
        utils.log_rank_zero(
            log, f"Model loaded in {time.perf_counter() - t0:.2f} s, {self._dtype}, tensor parallel {self.world_size}"
        )
        self.transform = config.instantiate(cfg.tokenizer)

    @torch.inference_mode()
    def generate(self, cfg: DictConfig) -> List[int]:
        """Generate the answer to ``cfg.prompt``, log it with its speed; return the generated token ids.

        Args:
            cfg (DictConfig): the parsed config.

        Returns:
            List[int]: generated ids (up to and including the stop token).
        """
        if self._messages is None:
            raise ValueError("the config has no prompt: set prompt.user (text, or {image: <path or URL>, text: ...})")
        sample = self.transform({"messages": self._messages}, inference=True)
        batch = collate_prompts([sample], pad_id=self.transform.pad_id)
        utils.batch_to_device(batch, self._device)
        prompt = batch["tokens"]
        t0 = time.perf_counter()
        out = generate(
            self.model,
            prompt,
            encoder_input=batch["encoder_input"],
            max_generated_tokens=int(cfg.max_new_tokens),
            pad_id=self.transform.pad_id,
            stop_tokens=self.transform.stop_tokens,
            use_kv_cache=bool(cfg.get("enable_kv_cache", True)),
            **self._sampling,
        )
        elapsed = time.perf_counter() - t0
        generated = out[0, prompt.shape[1] :].tolist()
        if self.transform.eos_id in generated:
            generated = generated[: generated.index(self.transform.eos_id) + 1]
        if self._is_rank_zero:
            log.info(f"Prompt: {prompt.shape[1]} tokens ({int((prompt == self.transform.image_token_id).sum())} image)")
            log.info(f"Generated tokens: {generated}")
            log.info(f"Answer: {self.transform.decode(generated)}")
            log.info(f"{len(generated)} tokens in {elapsed:.2f} s: {len(generated) / elapsed:.2f} tokens/s")
        return generated

    def cleanup(self) -> None:
        """Tear down the process group."""
        dist.destroy_process_group()
