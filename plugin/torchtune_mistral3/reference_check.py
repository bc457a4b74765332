"""Check a run's first logged loss against transformers' ``Mistral3ForConditionalGeneration`` on the same batch.

    python -m torchtune_mistral3.reference_check --config mistral3p5_medpix_demo [key=value ...] [--tolerance 1e-5]

Give the same config name (or path) and overrides as the ``tune run`` command. The check rebuilds the run's
first optimizer step exactly as the recipe does (same dataset, transform, sampler order, collate, per
data-parallel rank), loads the checkpoint with transformers' own loader (FP8 dequantised by transformers),
computes transformers' loss over the answer and ``</s>`` tokens of all those samples (token mean, as the
recipe logs it), reads the first ``loss`` the run wrote to ``<output_dir>/logs``, and compares them.
Exit status 0 when they agree within ``--tolerance`` (relative), 1 otherwise. The default tolerance depends on
the run's ``dtype``: 1e-5 for fp32, 1e-3 for bf16 (two bf16 implementations with different fusion and
rounding order differ by more than 1e-5; bf16 keeps 8 significant bits, a relative step of 3.9e-3).

Needs transformers and accelerate: ``pip install '.[reference]'`` from the repository.
"""

import argparse
import glob
import importlib.util
import json
import os
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch
from omegaconf import DictConfig, OmegaConf

_LOSS = re.compile(r"^Step (\d+) \| .*?\bloss:([-+0-9.eE]+)")
# Default relative tolerance per run dtype (see the module docstring).
DEFAULT_TOLERANCE = {"fp32": 1e-5, "bf16": 1e-3}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
_REFERENCE_PACKAGES = ("transformers", "accelerate")


def require_reference_extra() -> None:
    """Fail at once, naming the extra to install, when transformers or accelerate is missing.

    Raises:
        ImportError: naming the missing packages and ``pip install '.[reference]'``.
    """
    missing = [name for name in _REFERENCE_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(
            f"reference_check needs {' and '.join(missing)} (not installed): install the 'reference' extra, "
            "pip install '.[reference]' from the repository (or pip install 'torchtune-mistral3[reference]' "
            "for a built wheel)"
        )


def load_run_config(config: str, overrides: List[str]) -> DictConfig:
    """Load a config by registered name or path and apply ``key=value`` overrides, as ``tune run`` does.

    Args:
        config (str): config name (``tune ls``) or YAML path.
        overrides (List[str]): ``key=value`` overrides.

    Returns:
        DictConfig: the resolved config.
    """
    from torchtune._recipe_registry import get_all_recipes
    from torchtune.config._utils import _merge_yaml_and_cli_args

    path = config
    if not os.path.isfile(config):
        from torchtune._cli.cp import ROOT

        for recipe in get_all_recipes():
            for c in recipe.configs:
                if c.name == config:
                    path = str(ROOT / "recipes" / "configs" / c.file_path)
    yaml_args = argparse.Namespace(**OmegaConf.to_container(OmegaConf.load(path)))
    cfg = _merge_yaml_and_cli_args(yaml_args, overrides)
    OmegaConf.resolve(cfg)
    return cfg


def first_logged_loss(output_dir: str) -> float:
    """The ``loss`` of step 1 in the newest log file of a run's ``<output_dir>/logs``.

    Args:
        output_dir (str): the run's ``output_dir``.

    Returns:
        float: the first logged loss.

    Raises:
        FileNotFoundError: if the run wrote no log with a step-1 loss.
    """
    logs = sorted(glob.glob(os.path.join(output_dir, "logs", "*.txt")), key=os.path.getmtime)
    for log in reversed(logs):
        for line in Path(log).read_text().splitlines():
            m = _LOSS.match(line)
            if m and m.group(1) == "1":
                return float(m.group(2))
    raise FileNotFoundError(f"no 'Step 1 | loss:...' line in {os.path.join(output_dir, 'logs')}/*.txt")


def first_step_batches(cfg: DictConfig, data_parallel: int = 1) -> List[Dict]:
    """The micro-batches of the run's first optimizer step, over all data-parallel ranks.

    Args:
        cfg (DictConfig): the run's config.
        data_parallel (int): the run's data-parallel degree (processes / (TP x PP)). Default is 1.

    Returns:
        List[Dict]: collated batches (``tokens``, ``labels``, ``encoder_input``).
    """
    from torchdata.stateful_dataloader import StatefulDataLoader
    from torchdata.stateful_dataloader.sampler import StatefulDistributedSampler
    from torchtune import config as tt_config
    from torchtune.config._utils import _get_component_from_path

    transform = tt_config.instantiate(cfg.tokenizer)
    dataset = tt_config.instantiate(cfg.dataset, transform)
    collate = _get_component_from_path(cfg.get("collate_fn", "torchtune.data.padded_collate_sft"))
    steps = int(cfg.get("gradient_accumulation_steps", 1))
    batches = []
    for rank in range(data_parallel):
        sampler = StatefulDistributedSampler(dataset, num_replicas=data_parallel, rank=rank, shuffle=cfg.shuffle)
        sampler.set_epoch(0)
        loader = StatefulDataLoader(
            dataset,
            batch_size=cfg.batch_size,
            sampler=sampler,
            drop_last=True,
            collate_fn=lambda b: collate(b, padding_idx=transform.pad_id, ignore_idx=-100),
        )
        it = iter(loader)
        batches.extend(next(it) for _ in range(steps))
    return batches


def transformers_loss(checkpoint_dir: str, batches: List[Dict], dtype: torch.dtype) -> Tuple[float, int]:
    """Token-mean loss of transformers' model over the label tokens of ``batches``.

    Args:
        checkpoint_dir (str): HF checkpoint directory (FP8 or not).
        batches (List[Dict]): collated batches.
        dtype (torch.dtype): dtype to run the model in.

    Returns:
        Tuple[float, int]: the loss and the number of label tokens it averages over.
    """
    from transformers import Mistral3ForConditionalGeneration

    kwargs = {}
    config = json.loads((Path(checkpoint_dir) / "config.json").read_text())
    if config.get("quantization_config", {}).get("quant_method") == "fp8":
        from transformers import FineGrainedFP8Config

        kwargs["quantization_config"] = FineGrainedFP8Config(
            dequantize=True, weight_block_size=None, activation_scheme="static"
        )
    model = Mistral3ForConditionalGeneration.from_pretrained(
        checkpoint_dir, dtype=dtype, attn_implementation="eager", **kwargs
    ).eval()
    pad_id = config.get("text_config", {}).get("pad_token_id", 11)
    total, tokens = 0.0, 0
    with torch.no_grad():
        for b in batches:
            labels = b["labels"]
            n = int((labels[:, 1:] != -100).sum())
            images = b.get("encoder_input", {}).get("image", {})
            pixel_values = images.get("pixel_values")
            has_images = pixel_values is not None and pixel_values.shape[0] > 0
            out = model(
                input_ids=b["tokens"],
                attention_mask=(b["tokens"] != pad_id).long(),
                pixel_values=pixel_values.to(dtype) if has_images else None,
                image_sizes=images["image_sizes"] if has_images else None,
                labels=labels,
            )
            total += float(out.loss) * n  # transformers averages over the batch's label tokens
            tokens += n
    return total / max(tokens, 1), tokens


def main(argv: Optional[List[str]] = None) -> int:
    """Command-line entry point (see the module docstring).

    Args:
        argv (Optional[List[str]]): arguments; ``sys.argv[1:]`` if None.

    Returns:
        int: 0 if the run's first loss matches transformers' within the tolerance, else 1.
    """
    parser = argparse.ArgumentParser(
        prog="python -m torchtune_mistral3.reference_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="config name (tune ls) or path, as given to tune run")
    parser.add_argument("--data-parallel", type=int, default=1, help="the run's data-parallel degree")
    parser.add_argument(
        "--tolerance", type=float, default=None, help="relative tolerance (default: 1e-5 for fp32, 1e-3 for bf16)"
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as given to tune run")
    args = parser.parse_args(argv)
    require_reference_extra()
    cfg = load_run_config(args.config, args.overrides)
    dtype_name = cfg.get("dtype", "bf16")
    if dtype_name not in _DTYPES:
        raise ValueError(f"dtype={dtype_name!r}: reference_check supports {list(_DTYPES)}")
    tolerance = DEFAULT_TOLERANCE[dtype_name] if args.tolerance is None else args.tolerance
    run_loss = first_logged_loss(cfg.output_dir)
    batches = first_step_batches(cfg, args.data_parallel)
    ref_loss, tokens = transformers_loss(cfg.checkpointer.checkpoint_dir, batches, _DTYPES[dtype_name])
    rel = abs(run_loss - ref_loss) / abs(ref_loss)
    ok = rel <= tolerance
    print(
        json.dumps(
            {
                "run_first_loss": run_loss,
                "transformers_loss": ref_loss,
                "label_tokens": tokens,
                "abs_diff": abs(run_loss - ref_loss),
                "rel_diff": rel,
                "tolerance": tolerance,
                "dtype": dtype_name,
                "match": ok,
            }
        )
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
