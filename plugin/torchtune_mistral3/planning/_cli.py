r"""Print the per-GPU memory and the step time a config's layout needs, before booking GPUs.

    python -m torchtune_mistral3.plan --config mistral3p5_medpix plan.world_size=64 plan.gpu_gib=79.6
    python -m torchtune_mistral3.plan --config my.yaml tensor_parallel_dim=4 pipeline_parallel_dim=4 \
        plan.world_size=32 enable_activation_checkpointing=False

``--config`` takes a registered config name or a YAML path; ``key=value`` overrides use the recipe's keys
(``tensor_parallel_dim``, ``pipeline_parallel_dim``, ``pipeline_schedule``, ``pipeline_microbatches``,
``pipeline_split``, ``batch_size``, ``gradient_accumulation_steps``, ``tokenizer.max_seq_len``,
``enable_activation_checkpointing``, ``compile``, ``dtype``, ``optimizer.*``, ``loss.num_output_chunks``,
``model.*_trainable``). Keys under ``plan.`` are the planner's own:

- ``plan.world_size``: GPUs in all (data parallel = world / (TP x PP)); default TP x PP.
- ``plan.gpu_gib``: memory of one GPU in GiB; default 80 (an H100-80GB reports 79.6).
- ``plan.size``: a named size (mistral3p5_128b, ministral3_3b/8b/14b) when ``checkpoint_dir`` holds no
  config.json; default from the config's ``hf_repo``.
- ``plan.image_px`` (default 532, a 512 px MedPix image after Pixtral resizing), ``plan.images_per_sample``
  (default 1), ``plan.images_per_pack`` (with ``dataset.packed=True``, where ``batch_size`` counts packs of
  ``max_seq_len`` tokens; default: the samples a pack holds at MedPix's mean of 575 tokens, times
  ``images_per_sample``), ``plan.allocator_margin`` (default 0.10), ``plan.reserve_gib`` (default 2), ``plan.json``
  (print JSON instead of the tables).
- Step time (``planning/_step_plan.py``): ``plan.time`` (default True; False prints memory only), ``plan.gpu``
  (h100 or h200; default h100), ``plan.cost_table`` (a ``bench/step_costs.py`` JSON; default the shipped one),
  ``plan.nvlink_gbps`` (TP all-reduce bus bandwidth, default 360), ``plan.pp_link_gbps`` (pipeline link per GPU,
  default 45), ``plan.tp_overlap`` (share of the decoder layers' TP collectives assumed hidden, as sequence
  parallelism + async TP would; default 0, a what-if), ``plan.tower_split`` (the tower's images shared over the TP
  group; default: the config's ``tensor_parallel_tower``, which is ``split`` under TP unless set to ``replicate``),
  ``plan.real_tokens_per_sample`` (default: the image's layout positions + 150 text tokens, or the mean sample
  length where the padding model has lengths), ``plan.sample_lengths`` (a JSON file: a list of the data's sample
  lengths in tokens, or an object with a ``sample_lengths`` list, as ``bench/e2e.py`` writes; default: the MedPix
  model of ``planning/_padding_model.py`` at the config's ``tokenizer.max_image_size``). Where the recipe pads a
  batch to its longest sample (no pipeline, no compiled TP, not packed), the plan computes the expected longest of
  ``batch_size`` (x data parallel) samples drawn from these lengths, not ``max_seq_len``.

Override keys are checked as ``tune run`` checks them (a misspelt key is refused with the closest valid one), and
counts and ``plan.*`` numbers must be positive (exit code 2 with the message).

With ``pipeline_parallel_dim`` > 1 and no ``pipeline_split``, both plans use the recipe's cost-balanced split
(:func:`~torchtune_mistral3.planning.cost_balanced_stage_extras`).
"""

import argparse
import json
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from torchtune_mistral3.models.mistral3 import HF_REPO_TO_SIZE, NAMED_SIZES
from torchtune_mistral3.training._config_keys import check_config_values, check_override_keys, training_recipe_files
from torchtune_mistral3.training._parallel_dims import ParallelDims, WorldSizeError
from torchtune_mistral3.training._tower_split import tower_mode

from ._memory_plan import (
    Layout,
    MemoryPlan,
    build_meta_model,
    format_plan,
    lora_options,
    model_dims,
    plan_memory,
)
from ._step_plan import (
    DEFAULT_MAX_IMAGE_SIZE,
    HBM_TBPS,
    NVLINK_ALLREDUCE_GBPS,
    PP_LINK_GBPS,
    CostTable,
    Hardware,
    cost_balanced_extras,
    format_step_plan,
    plan_step,
)

# the source files whose ``cfg`` reads are the planner's own ``plan.*`` keys: ``key_files`` of :func:`load_config`
PLAN_KEY_FILES = (__file__,)
_BYTES = {"fp32": 4, "float32": 4, "bf16": 2, "bfloat16": 2}
_TRAINABLE_FLAGS = ("vision_trainable", "projector_trainable", "embeddings_trainable", "output_trainable",
                    "decoder_trainable")


# recipe keys the plans use, and the planner's own numbers: (keys, the least value allowed, strictly above it)
_RECIPE_COUNTS = ("batch_size", "gradient_accumulation_steps", "pipeline_microbatches", "tensor_parallel_dim",
                  "pipeline_parallel_dim")
_PLAN_LIMITS = (
    (("world_size", "image_px", "images_per_sample", "images_per_pack", "seq_len"), 1, False),
    (("gpu_gib", "nvlink_gbps", "pp_link_gbps", "real_tokens_per_sample"), 0, True),
    (("allocator_margin", "reserve_gib"), 0, False),
)


def check_plan_values(plan: DictConfig) -> None:
    """Refuse ``plan.*`` numbers the planner would misread (``plan.world_size=0``, ``plan.gpu_gib=-5``).

    Args:
        plan (DictConfig): the config's ``plan`` section.

    Raises:
        ValueError: naming every wrong key and the range it must lie in.
    """
    problems = []
    for keys, least, strict in _PLAN_LIMITS:
        for key in keys:
            value = plan.get(key, None)
            if value is None:
                continue
            whole = keys[0] == "world_size"
            number = not isinstance(value, bool) and isinstance(value, int if whole else (int, float))
            if not number or value < least or (strict and value == least):
                kind = "an integer" if whole else "a number"
                problems.append(f"plan.{key}={value!r} must be {kind} {'>' if strict else '>='} {least}")
    if problems:
        raise ValueError("; ".join(problems))


def _dtype_bytes(cfg: DictConfig, key: str, default: str) -> int:
    value = str(cfg.get(key, None) or default)
    if value not in _BYTES:
        raise ValueError(f"{key}={value} is not one of {sorted(_BYTES)}")
    return _BYTES[value]


def load_config(config: str, overrides: List[str], key_files: Sequence[str] = ()) -> DictConfig:
    """Load a registered config (by name) or a YAML file, then apply ``key=value`` overrides.

    The override keys are checked as ``tune run`` checks them (a misspelt key is refused, with the closest valid
    one), against the training recipe's keys and those that ``key_files`` read.

    Args:
        config (str): config name from the plugin's manifest, or a path.
        overrides (List[str]): ``key=value`` strings.
        key_files (Sequence[str]): further source files whose ``cfg`` reads are valid keys (the planner's own
            ``plan.*``). Default is none.

    Returns:
        DictConfig: the merged config.

    Raises:
        FileNotFoundError: if ``config`` is neither a file nor a registered name.
        ValueError: for an override key nothing reads.
    """
    from torchtune_mistral3._registry import CONFIGS_DIR, MANIFEST

    path = Path(config)
    if not path.is_file():
        names = {c["name"]: c["file"] for c in json.loads(MANIFEST.read_text())["configs"]}
        if config not in names:
            raise FileNotFoundError(f"--config {config!r} is neither a file nor one of {sorted(names)}")
        path = CONFIGS_DIR / names[config]
    yaml = OmegaConf.load(path)
    cfg = OmegaConf.merge(yaml, OmegaConf.from_dotlist(overrides))
    keys = [o.split("=", 1)[0] for o in overrides]
    check_override_keys(yaml, cfg, keys, [*training_recipe_files(cfg), *key_files], where="in the overrides")
    return cfg


def layout_from_config(cfg: DictConfig) -> Tuple[Layout, dict]:
    """Translate recipe keys (and ``plan.*``) into a :class:`Layout` and the planner's own options.

    Args:
        cfg (DictConfig): the merged config.

    Returns:
        Tuple[Layout, dict]: the layout, and ``{"gpu_gib", "allocator_margin", "reserve_gib", "json"}``.

    Raises:
        ValueError: if ``plan.world_size`` is not a multiple of TP x PP, or the optimizer is not modelled.
    """
    plan = cfg.get("plan", {}) or {}
    check_config_values(cfg, counts=_RECIPE_COUNTS)
    check_plan_values(plan)
    try:
        dims = ParallelDims.from_config(cfg, plan.get("world_size", None))
    except WorldSizeError as e:
        raise ValueError(f"plan.world_size={e.world_size} is not a multiple of TP x PP = {e.tp * e.pp}") from None
    tp, pp, world = dims.tp, dims.pp, dims.world_size
    opt = cfg.get("optimizer", {}) or {}
    component = str(opt.get("_component_", "torch.optim.AdamW")).rsplit(".", 1)[-1].lower()
    # bf16 stochastic rounding (torchao's AdamW math) steps one parameter at a time: no foreach temporaries
    per_parameter = component in ("stochasticroundingadamw", "_adamw")
    if component in ("adam", "adamw"):
        optimizer = component
    elif per_parameter:
        optimizer = "adamw"
    elif component == "sgd":
        optimizer = "sgd_momentum" if float(opt.get("momentum", 0.0)) else "sgd"
    else:
        raise ValueError(f"optimizer {opt.get('_component_')} is not modelled (Adam, AdamW or SGD)")
    compute_bytes = _dtype_bytes(cfg, "dtype", "bf16")
    # the recipe's default master dtype is fp32 (training/_precision.py)
    master_bytes = _dtype_bytes(cfg, "master_dtype", "fp32") if compute_bytes == 2 else 4
    loss = cfg.get("loss", {}) or {}
    chunks = int(loss.get("num_output_chunks", 8)) if "Chunked" in str(loss.get("_component_", "")) else 1
    tokenizer = cfg.get("tokenizer", {}) or {}
    split = cfg.get("pipeline_split", None)
    layout = Layout(
        tp=tp,
        pp=pp,
        dp=world // (tp * pp),
        microbatches=int(cfg.get("pipeline_microbatches", None) or pp) if pp > 1 else 1,
        schedule=str(cfg.get("pipeline_schedule", "1F1B")),
        stages_per_rank=cfg.get("pipeline_stages_per_rank", None),
        layer_split=list(split) if split is not None else None,
        seq_len=int(plan.get("seq_len", tokenizer.get("max_seq_len", 2048))),
        batch_size=int(cfg.get("batch_size", 1)),
        grad_accum=int(cfg.get("gradient_accumulation_steps", 1)),
        activation_checkpointing=bool(cfg.get("enable_activation_checkpointing", False)),
        compile=bool(cfg.get("compile", False)),
        dtype_bytes=compute_bytes,
        master_bytes=master_bytes,
        optimizer=optimizer,
        optimizer_fused=bool(opt.get("fused", False)) or per_parameter,
        num_output_chunks=chunks,
        images_per_sample=int(plan.get("images_per_sample", 1)),
        image_px=int(plan.get("image_px", 532)),
        packed=bool((cfg.get("dataset", {}) or {}).get("packed", False)),
        images_per_pack=int(plan["images_per_pack"]) if plan.get("images_per_pack", None) is not None else None,
        sequence_parallel=bool((cfg.get("tensor_parallel_plan", {}) or {}).get("sequence_parallel", False)),
        sharded_layers=list(cfg.get("custom_sharded_layers", None) or []),
    )
    layout.tower_split = tower_mode(cfg.get("tensor_parallel_tower", None), tp) == "split"
    options = {
        "gpu_gib": float(plan.get("gpu_gib", 80.0)),
        "allocator_margin": float(plan.get("allocator_margin", 0.10)),
        "reserve_gib": float(plan.get("reserve_gib", 2.0)),
        "json": bool(plan.get("json", False)),
        "time": bool(plan.get("time", True)),
        "gpu": str(plan.get("gpu", "h100")).lower(),
        "cost_table": plan.get("cost_table", None),
        "nvlink_gbps": float(plan.get("nvlink_gbps", NVLINK_ALLREDUCE_GBPS)),
        "pp_link_gbps": float(plan.get("pp_link_gbps", PP_LINK_GBPS)),
        "tp_overlap": float(plan.get("tp_overlap", 0.0)),
        # the recipe's tensor_parallel_tower (split by default under TP); plan.tower_split overrides it
        "tower_split": bool(plan.get("tower_split", layout.tower_split)),
        "real_tokens_per_sample": plan.get("real_tokens_per_sample", None),
    }
    layout.tower_split = options["tower_split"]  # plan.tower_split decides for both plans
    if not 0.0 <= options["tp_overlap"] <= 1.0:
        raise ValueError(f"plan.tp_overlap={options['tp_overlap']} must lie in [0, 1] (share of the TP collectives "
                         "hidden)")
    if options["gpu"] not in HBM_TBPS:
        raise ValueError(f"plan.gpu={options['gpu']} is not one of {sorted(HBM_TBPS)}")
    return layout, options


def _sample_lengths(cfg: DictConfig) -> Optional[List[int]]:
    """The lengths in the ``plan.sample_lengths`` JSON file, or None (the planner's MedPix model)."""
    plan = cfg.get("plan", {}) or {}  # named ``plan`` so that the key check sees ``plan.sample_lengths`` read
    path = plan.get("sample_lengths", None)
    if path is None:
        return None
    data = json.loads(Path(path).read_text())
    lengths = data.get("sample_lengths") if isinstance(data, dict) else data
    if not isinstance(lengths, list) or not lengths or not all(isinstance(x, int) and x > 0 for x in lengths):
        raise ValueError(f"plan.sample_lengths={path}: expected a JSON list of positive token counts (or an object "
                         "whose 'sample_lengths' is one), as bench/e2e.py writes")
    return lengths


def plan_config(cfg: DictConfig) -> Tuple[MemoryPlan, dict]:
    """Build the config's model on the meta device and plan its layout's memory (and step time, ``plan.time``).

    Args:
        cfg (DictConfig): the merged config.

    Returns:
        Tuple[MemoryPlan, dict]: the memory plan and the planner options; ``options["step"]`` holds the
        :class:`~torchtune_mistral3.planning._step_plan.StepPlan` (None with ``plan.time=False``).
    """
    layout, options = layout_from_config(cfg)
    model_cfg = cfg.get("model", {}) or {}
    lora = lora_options(model_cfg)  # a LoRA builder takes its *_trainable choices with its LoRA arguments
    flags = {k: bool(model_cfg[k]) for k in _TRAINABLE_FLAGS if k in model_cfg and lora is None}
    flags["max_seq_len"] = layout.seq_len
    component = str(model_cfg.get("_component_", "")).rsplit(".", 1)[-1].removesuffix("_lora")
    plan = cfg.get("plan", {}) or {}
    size = plan.get("size") or (component if component in NAMED_SIZES else HF_REPO_TO_SIZE.get(cfg.get("hf_repo")))
    model = build_meta_model(model_cfg.get("checkpoint_dir", cfg.get("checkpoint_dir")), size=size, lora=lora, **flags)
    table = CostTable.load(options["cost_table"])
    if layout.pp > 1 and layout.layer_split is None:  # the recipe's cost-balanced split
        layout.stage_extras = cost_balanced_extras(table, model_dims(model), layout, tower_split=options["tower_split"])
    options["step"] = None
    if options["time"]:
        hw = Hardware(gpu=options["gpu"], nvlink_gbps=options["nvlink_gbps"], pp_link_gbps=options["pp_link_gbps"],
                      tp_overlap=options["tp_overlap"])
        real = options["real_tokens_per_sample"]
        options["step"] = plan_step(model, layout, table, hw, tower_split=options["tower_split"],
                                    real_tokens_per_sample=float(real) if real is not None else None,
                                    sample_lengths=_sample_lengths(cfg),
                                    max_image_size=int((cfg.get("tokenizer", {}) or {}).get("max_image_size", None)
                                                       or DEFAULT_MAX_IMAGE_SIZE))
    return (
        plan_memory(model, layout, options["gpu_gib"], options["allocator_margin"], options["reserve_gib"]),
        options,
    )


def main(argv: Optional[List[str]] = None) -> int:
    """CLI entry point; see the module docstring.

    Args:
        argv (Optional[List[str]]): arguments; None for ``sys.argv[1:]``. Default is None.

    Returns:
        int: 0 when the layout fits, 1 when it does not (2 for a config the planner cannot read).
    """
    parser = argparse.ArgumentParser(
        prog="python -m torchtune_mistral3.plan", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="registered config name or YAML path")
    parser.add_argument("overrides", nargs="*", help="key=value overrides (recipe keys and plan.*)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.overrides, key_files=PLAN_KEY_FILES)
        plan, options = plan_config(cfg)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"error: {e}\n")
    step = options["step"]
    if options["json"]:
        print(json.dumps(plan.to_dict() if step is None else {**plan.to_dict(), "step": step.to_dict()}, indent=1))
    else:
        print(format_plan(plan))
        if step is not None:
            print(format_step_plan(step))
            if cfg.get("tensor_parallel_async", False) and not options["tp_overlap"]:
                print("tensor_parallel_async=True: the overlap it buys is not in this plan (never measured here); "
                      "plan.tp_overlap=<share of the TP collectives hidden> gives a what-if")
    return 0 if plan.fits else 1

