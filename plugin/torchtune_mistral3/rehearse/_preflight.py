"""Pre-flight checks of a checkpoint directory that the recipe's own setup does not make."""

import json
from pathlib import Path
from typing import Any


def check_tokenizer_matches_config(tokenizer: Any, checkpoint_dir: str) -> None:
    """Raise if the transform would lay out image tokens differently from what the checkpoint's model expects.

    The recipe checks the vocabulary against the embedding (``check_tokenizer_fits_model``); a mismatch of the
    image geometry (patch size, patch merge) or of the ``[IMG]`` token id would only show at the first batch,
    as a count of image tokens that differs from the image features.

    Args:
        tokenizer (Any): the recipe's ``Mistral3Transform``.
        checkpoint_dir (str): the checkpoint directory (its ``config.json``).

    Raises:
        ValueError: naming ``config.json``, the tokenizer and the key to set.
    """
    path = Path(checkpoint_dir) / "config.json"
    config = json.loads(path.read_text())
    vision = config.get("vision_config") or {}
    image = getattr(tokenizer, "image_transform", None)
    wanted = [
        ("tokenizer.patch_size", getattr(image, "patch_size", None), "vision_config.patch_size",
         vision.get("patch_size")),
        ("tokenizer.spatial_merge_size", getattr(image, "spatial_merge_size", None), "spatial_merge_size",
         config.get("spatial_merge_size", 2)),
        ("the tokenizer's [IMG] id", getattr(tokenizer, "image_token_id", None), "image_token_index",
         config.get("image_token_index", config.get("image_token_id", 10))),
    ]
    for ours, value, theirs, expected in wanted:
        if value is not None and expected is not None and value != expected:
            key = ours if ours.startswith("tokenizer.") else "tokenizer.path (a tekken.json of this model)"
            raise ValueError(
                f"{ours} is {value} but '{path}' has {theirs}={expected}: the image tokens of a batch would not "
                f"match the image features; set {key} to match the checkpoint"
            )
