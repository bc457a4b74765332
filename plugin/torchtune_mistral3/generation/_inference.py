"""What the plugin's generate and eval recipes share: the model built for inference, and prompts from a config."""

from pathlib import Path
from typing import Any, List, Mapping, Optional

import torch
from omegaconf import DictConfig
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torchtune import config, training
from torchtune.data import Message

from ..checkpointing import load_into_module
from ..datasets import open_image
from ..training import apply_tensor_parallel, materialize, uses_sequence_parallel

_ASSETS_DIR = Path(__file__).resolve().parent.parent / "assets"


def load_inference_model(
    cfg_model: DictConfig,
    checkpointer: Any,
    *,
    device: torch.device,
    dtype: torch.dtype,
    tp_mesh: Optional[DeviceMesh] = None,
    tp_plan: Optional[Mapping[str, Any]] = None,
) -> nn.Module:
    """Build the model on meta, shard it over ``tp_mesh`` (if given), load each rank's slice, switch to eval.

    The same path as the training recipe (meta -> TP -> ``to_empty`` -> RoPE tables -> lazy per-rank load), so
    the 128B model never exists whole on one rank.

    Args:
        cfg_model (DictConfig): the ``model`` config node.
        checkpointer (Any): a :class:`~torchtune_mistral3.checkpointing.Mistral3HFCheckpointer`.
        device (torch.device): where the weights go.
        dtype (torch.dtype): parameter dtype.
        tp_mesh (Optional[DeviceMesh]): 1-D tensor parallel mesh; None for one process. Default is None.
        tp_plan (Optional[Mapping[str, Any]]): the TP plan (required with ``tp_mesh``). Default is None.

    Returns:
        nn.Module: the model in eval mode.

    Raises:
        ValueError: for a sequence-parallel plan (a training layout: a decoding step's one token per sample
            cannot be sharded on the sequence).
    """
    if tp_mesh is not None and tp_mesh.size() > 1 and uses_sequence_parallel(dict(tp_plan)):
        raise ValueError(
            "tensor_parallel_plan.sequence_parallel=True is a training layout: generation and evaluation decode "
            "one token per step, which cannot be sharded over the sequence. Set "
            "tensor_parallel_plan.sequence_parallel=False (the default)."
        )
    with training.set_default_dtype(dtype), torch.device("meta"):
        model = config.instantiate(cfg_model)
    if tp_mesh is not None and tp_mesh.size() > 1:
        apply_tensor_parallel(model, tp_mesh, dict(tp_plan))
    materialize(model, device, rope_dtype=dtype)
    load_into_module(model, checkpointer.reader, dtype=dtype)
    training.validate_no_params_on_meta_device(model)
    return model.eval()


def resolve_image(location: str) -> str:
    """Where to open a prompt's image: a path or URL as given, else under the plugin's bundled assets.

    A relative path missing from the working directory is looked up in the bundled assets
    (``medpix_sample/ct_small.png`` is the demo's image).

    Args:
        location (str): path or ``http(s)://`` URL.

    Returns:
        str: the location to open.

    Raises:
        ValueError: if the path exists neither as given nor under the bundled assets.
    """
    if location.startswith(("http://", "https://")) or Path(location).is_file():
        return location
    bundled = _ASSETS_DIR / location
    if not Path(location).is_absolute() and bundled.is_file():
        return str(bundled)
    raise ValueError(
        f"prompt.user.image: no image at {location!r} (nor under the bundled assets {_ASSETS_DIR}); "
        "give an existing path or URL"
    )


def prompt_messages(prompt: Mapping[str, Any]) -> List[Message]:
    """Messages for one generation prompt given as config (the stock ``generate_v2`` YAML form).

    ``prompt.system`` (optional) is a string; ``prompt.user`` is a string, or ``{image: path or URL, text: str}``.
    The image comes first in the user turn, as in the MedPix training conversations.

    Args:
        prompt (Mapping[str, Any]): the ``prompt`` config node as a plain mapping.

    Returns:
        List[Message]: system (if any) and user messages, then the empty assistant turn to generate.

    Raises:
        ValueError: if ``prompt.user`` is missing or empty, or names an image that cannot be read.
    """
    user = prompt.get("user")
    if isinstance(user, Mapping):
        text, image = user.get("text"), user.get("image")
    else:
        text, image = user, None
    if not isinstance(text, str) or not text.strip():
        raise ValueError("prompt.user must be the question text, or {image: <path or URL>, text: <question>}")
    messages = []
    if prompt.get("system"):
        messages.append(Message(role="system", content=str(prompt["system"])))
    content = [{"type": "text", "content": text.strip()}]
    if image:
        location = resolve_image(str(image))
        if location.startswith(("http://", "https://")):
            from torchtune.data import load_image

            picture = load_image(location)
        else:
            picture = open_image(location)
        content.insert(0, {"type": "image", "content": picture})
    messages.append(Message(role="user", content=content))
    messages.append(Message(role="assistant", content=""))
    return messages
