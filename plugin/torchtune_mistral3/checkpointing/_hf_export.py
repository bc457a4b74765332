"""The files beside the weights that make a saved checkpoint serve in transformers as it was trained.

``preprocessor_config.json`` (Pixtral image processor: longest edge = the training transform's
``max_image_size``, bicubic, 1/255, CLIP mean/std), ``processor_config.json`` (patch size, merge size, image
tokens) and ``generation_config.json`` (bos/eos/pad ids, greedy). The tokenizer (``tekken.json``) is copied from
the source checkpoint by the writer; transformers' ``AutoTokenizer`` reads it through mistral-common.
"""

import json
from pathlib import Path
from typing import List, Optional, Sequence, Union

from ..models.mistral3._transform import CLIP_MEAN, CLIP_STD

PREPROCESSOR_CONFIG = "preprocessor_config.json"
PROCESSOR_CONFIG = "processor_config.json"
GENERATION_CONFIG = "generation_config.json"

# tekken's control token ids (mistral-common); ministral3 config.json files carry them too
_BOS, _EOS, _PAD = 1, 2, 11


def write_hf_processor_files(
    checkpoint_dir: Union[str, Path],
    *,
    config: dict,
    max_image_size: Optional[int],
    image_mean: Sequence[float] = CLIP_MEAN,
    image_std: Sequence[float] = CLIP_STD,
) -> List[Path]:
    """Write the processor, image-processor and generation configs of a saved checkpoint.

    The processor files always describe the training transform (a source checkpoint's copies are replaced); a
    ``generation_config.json`` copied from the source is kept.

    Args:
        checkpoint_dir (Union[str, Path]): the saved checkpoint (``epoch_<N>``).
        config (dict): its ``config.json`` (patch size, merge size, token ids).
        max_image_size (Optional[int]): the training transform's longest image edge; None takes the vision
            tower's ``image_size``.
        image_mean (Sequence[float]): per-channel mean of the transform. Default is the CLIP mean.
        image_std (Sequence[float]): per-channel std of the transform. Default is the CLIP std.

    Returns:
        List[Path]: the files written.
    """
    directory = Path(checkpoint_dir)
    vision = config.get("vision_config", {})
    text = config.get("text_config", {})
    patch = int(vision.get("patch_size", 14))
    longest = int(max_image_size if max_image_size is not None else vision.get("image_size", 1540))
    image_processor = {
        "image_processor_type": "PixtralImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"longest_edge": longest},
        # the processor multiplies it by spatial_merge_size: images are cut to multiples of patch * merge
        "patch_size": {"height": patch, "width": patch},
        "resample": 3,  # PIL bicubic, as the training transform
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image_mean),
        "image_std": list(image_std),
    }
    processor = {
        "processor_class": "PixtralProcessor",
        "patch_size": patch,
        "spatial_merge_size": int(config.get("spatial_merge_size", 2)),
        "image_token": "[IMG]",
        "image_break_token": "[IMG_BREAK]",
        "image_end_token": "[IMG_END]",
    }
    generation = {
        "bos_token_id": int(text.get("bos_token_id", _BOS)),
        "eos_token_id": int(text.get("eos_token_id", _EOS)),
        "pad_token_id": int(text.get("pad_token_id", _PAD)),
        "do_sample": False,  # the plugin's generate and eval default to greedy
    }
    written = []
    for name, content in (
        (PREPROCESSOR_CONFIG, image_processor),
        (PROCESSOR_CONFIG, processor),
        (GENERATION_CONFIG, generation),
    ):
        path = directory / name
        if name == GENERATION_CONFIG and path.exists():
            continue  # the source model's generation defaults (copied by the writer) are kept
        path.write_text(json.dumps(content, indent=2) + "\n")
        written.append(path)
    return written
