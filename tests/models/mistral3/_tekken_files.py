"""Tekken tokenizer files for tests, built offline from the one mistral-common ships (tekken_240911.json, v3)."""

import json
from pathlib import Path

import mistral_common
from mistral_common.tokens.tokenizers.tekken import Tekkenizer

SHIPPED_TEKKEN = Path(mistral_common.__file__).parent / "data" / "tekken_240911.json"
# Mistral 3 geometry (patch 14, 2x2 merge -> 28 px per image token), as in the released checkpoints' tekken.json.
MISTRAL3_IMAGE = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
# v15 control tokens beyond the 20 fixed ranks; ranks chosen here (the real file's ranks do not matter for tests).
V15_EXTRA = {
    32: "[ARGS]", 33: "[CALL_ID]", 34: "[THINK]", 35: "[/THINK]", 36: "[MODEL_SETTINGS]", 37: "[/MODEL_SETTINGS]"
}


def write_tekken(directory: Path, version: str, max_image_size: int = 1540) -> Path:
    """Write ``tekken_<version>.json``: the shipped vocab with Mistral 3 image geometry (v3) or as a v15 file."""
    data = json.loads(SHIPPED_TEKKEN.read_text())
    data["image"] = {**MISTRAL3_IMAGE, "max_image_size": max_image_size}
    if version == "v15":
        data["config"]["version"] = "v15"
        specials = [dict(t) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS]
        n_special = data["config"]["default_num_special_tokens"]
        for rank in range(len(specials), n_special):
            specials.append({"rank": rank, "token_str": V15_EXTRA.get(rank, f"<SPECIAL_{rank}>"), "is_control": True})
        data["special_tokens"] = specials
        data["model_settings_builder"] = {"reasoning_effort": {"values": ["none", "high"], "default": "none"}}
    elif version != "v3":
        raise ValueError(version)
    path = Path(directory) / f"tekken_{version}.json"
    path.write_text(json.dumps(data))
    return path
