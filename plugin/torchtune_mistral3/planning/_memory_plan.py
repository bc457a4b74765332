"""Per-GPU memory plan of a Mistral 3 fine-tuning layout, before booking the GPUs.

The model is built on the meta device (from a checkpoint's ``config.json`` or a named size), so parameter counts,
trainable flags and tensor-parallel sharding come from the real modules and the real TP plan
(:func:`~torchtune_mistral3.models.mistral3.mistral3_tp_plan`); the pipeline split is the recipe's
(:func:`~torchtune_mistral3.training.resolve_layer_split`). Activations follow a per-token byte count per
decoder layer, checked against peak memory measured on one H200 (``bench/step_speed.py``; see
``docs/performance.md``):

- compiled layer (``compile: True``), no activation checkpointing:
  ``8 h + (4 n_h d + 4 n_kv d + 6 F + 4 n_h) / tp`` bytes per token. Four h-wide bf16 tensors (layer input,
  attention-norm output, mid residual, MLP-norm output) stay whole under TP; queries and the attention output
  (``n_h d`` each), keys and values (``n_kv d`` each, not expanded: SDPA reads the KV heads natively), the gate,
  up and product of the SwiGLU (``F`` each, bf16) and the fp32 log-sum-exp per head are sharded. Measured at
  h=12288, F=28672, n_h=96, n_kv=8: 316,170 B/token/layer against 323,968 predicted (the model before native
  GQA kept the expanded keys and values: 361,197 measured, 369,024 predicted by ``8 n_h d``).
- eager layer: ``EAGER_LAYER_FACTOR`` times the compiled one (measured 406,505 B/token/layer eager, 1.255x).
- activation checkpointing: the layer input only (``2 h``), plus one layer's full activations while it is
  recomputed in backward.
- head (last stage): the eager final norm (``10 h``: fp32 input and normalised copy, bf16 output), bf16 logits
  kept by the chunked loss (``2 V / tp``), and with an eager loss the fp32 log-probabilities (``4 V / tp``).

Peak = parameters + optimizer state + the largest of four phases: (a) forward/backward: gradients held across
micro-batches + activations of the micro-batches in flight + the head and loss tensors at their backward (last
stage); (b) late backward: all gradients but the embedding's + the first layer's full activations (recomputed
under checkpointing) + hidden-state gradients; (c) end of backward: all gradients + the embedding backward
workspace; (d) optimizer step: all gradients + the optimizer's temporaries (a foreach Adam allocates one
state-sized list; a fused or compiled step none). On the H200 slice of the present model
(``bench/results/step_speed_h200_final.json``, 4 layers, 2048 x 2) the predicted peaks are -0.1% (compiled, one
loss chunk) and +2.8% (eager, 8 chunks) off ``torch.cuda.max_memory_allocated`` (``python scripts/doc_figures.py``).

LoRA (a ``*_lora`` builder, ``lora=`` of :func:`build_meta_model`): the counts follow from the modules, as for a
full fine-tune: gradients and optimizer state cover the trainable (adapter) parameters only, and a frozen FP8
base (``fp8_base: True``) holds one byte per weight element (its 0-d scales are not counted). Each FP8 matmul
dequantises its weight for the call: the largest FP8 weight of a layer in the compute dtype is a transient,
beside the FSDP2 all-gather of a layer (FP8 bytes for the FP8 weights). Activations per token are the full
fine-tune's: the adapters' inputs are the tensors the frozen linears would save, and their rank-wide outputs
(``2 r`` bytes per adapted linear and token) are not counted.
"""

import fnmatch
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

GIB = 1024**3
# MedPix-VQA's mean sample length: NeMo AutoModel's Ministral-3 golden values report ~4,600 tokens per step of 8
# samples (issue #14); the default number of samples (hence images) a packed sequence holds.
MEDPIX_MEAN_SAMPLE_TOKENS = 575
_BYTES_NAME = {2: "bf16", 4: "fp32", 1: "8-bit"}

# Eager / compiled bytes per token of one decoder layer, measured on the H200 slice (bench/step_speed.py:
# plugin_eager vs plugin_compile_c1, 4 layers, 4096 tokens, head's share removed; step_speed_h200_final.json).
EAGER_LAYER_FACTOR = 1.255

# Pipeline schedules the activation count models, by ``pipeline_schedule`` name (lower case).
_SCHEDULES = {
    "gpipe": "gpipe",
    "1f1b": "1f1b",
    "interleaved1f1b": "interleaved",
    "interleavedzerobubble": "interleaved",
    "loopedbfs": "gpipe",
    "zbvzerobubble": "1f1b",
}

# Schedules whose backward is split in input and weight parts: torch's PipelineStage accumulates their gradients
# unsharded over the micro-batches also where the recipe reduces every full backward (data parallel 1).
_SPLIT_BACKWARD = {"interleavedzerobubble", "zbvzerobubble", "dualpipev"}
# Schedules torch runs from an action list (_PipelineScheduleRuntime): it adds UNSHARD / RESHARD actions that keep
# the FSDP2 parameters of up to 3 stages of a rank gathered (in the compute dtype) while they are active.
_RUNTIME_SCHEDULES = {"interleaved1f1b", "interleavedzerobubble", "zbvzerobubble", "dualpipev", "loopedbfs"}
_ACTIVE_STAGES = 3


@dataclass(frozen=True)
class ModelDims:
    """Widths the activation count needs (parameter counts come from the modules themselves).

    Args:
        vocab_size (int): vocabulary size V.
        hidden (int): text hidden size h.
        ffn (int): text SwiGLU hidden size F.
        num_heads (int): query heads n_h.
        num_kv_heads (int): key/value heads.
        head_dim (int): head dimension d.
        num_layers (int): decoder layers.
        vision_hidden (int): vision hidden size.
        vision_ffn (int): vision SwiGLU hidden size.
        vision_heads (int): vision heads.
        vision_layers (int): vision layers.
        patch_size (int): patch side in pixels.
        merge (int): spatial merge size.
    """

    vocab_size: int
    hidden: int
    ffn: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    num_layers: int
    vision_hidden: int
    vision_ffn: int
    vision_heads: int
    vision_layers: int
    patch_size: int
    merge: int


@dataclass
class PartParams:
    """Parameter elements of one part of the model, whole and per tensor-parallel rank.

    Args:
        total (int): elements in the unsharded model.
        per_tp_rank (float): elements one TP rank holds.
        trainable_per_tp_rank (float): trainable elements one TP rank holds.
        fp8_per_tp_rank (float): of ``per_tp_rank``, the elements stored in FP8 (one byte; frozen LoRA bases).
        fp8_largest_per_tp_rank (float): the largest single FP8 weight one TP rank holds.
    """

    total: int = 0
    per_tp_rank: float = 0.0
    trainable_per_tp_rank: float = 0.0
    fp8_per_tp_rank: float = 0.0
    fp8_largest_per_tp_rank: float = 0.0

    def bytes_per_tp_rank(self, element_bytes: int, frozen_bytes: Optional[int] = None) -> float:
        """Bytes one TP rank holds: FP8 elements at one byte, the others at ``element_bytes``.

        Args:
            element_bytes (int): bytes of a non-FP8 element (the master or the compute dtype).
            frozen_bytes (Optional[int]): bytes of a frozen non-FP8 element, when it differs (the recipe holds
                frozen parameters in the compute dtype under wider masters). Default is None: ``element_bytes``.

        Returns:
            float: bytes.
        """
        frozen = self.per_tp_rank - self.fp8_per_tp_rank - self.trainable_per_tp_rank
        return (
            self.trainable_per_tp_rank * element_bytes
            + frozen * (element_bytes if frozen_bytes is None else frozen_bytes)
            + self.fp8_per_tp_rank
        )


@dataclass
class Layout:
    """A training layout, in the recipe's terms.

    Args:
        tp (int): ``tensor_parallel_dim``. Default is 1.
        pp (int): ``pipeline_parallel_dim``. Default is 1.
        dp (int): data-parallel degree (FSDP2 shards parameters, gradients and optimizer state over it when > 1).
            Default is 1.
        microbatches (int): ``pipeline_microbatches``; each splits ``batch_size``. Default is 1.
        schedule (str): ``pipeline_schedule`` (GPipe, 1F1B, Interleaved1F1B, InterleavedZeroBubble, LoopedBFS,
            ZBVZeroBubble). Default is "1F1B".
        stages_per_rank (Optional[int]): virtual stages per pipeline rank; None for the schedule's default
            (1 for single-stage schedules, else 2). Default is None.
        layer_split (Optional[Sequence[int]]): ``pipeline_split``; None for the balanced default. Default is None.
        stage_extras (Optional[Dict[str, float]]): ``first_stage_extra`` / ``last_stage_extra`` of the balanced
            split (what stage 0 and the last stage carry besides layers, in layers); None for the family's static
            ``mistral3_pp_stage_extras()``. The planner CLI and the recipe set the cost-balanced ones
            (``planning._step_plan.cost_balanced_extras``). Default is None.
        seq_len (int): tokens per sample (the longest a batch pads to). Default is 2048.
        batch_size (int): ``batch_size`` (samples per data-parallel rank per forward). Default is 1.
        grad_accum (int): ``gradient_accumulation_steps``. Default is 1.
        activation_checkpointing (bool): ``enable_activation_checkpointing``. Default is False.
        compile (bool): ``compile`` (per-layer torch.compile and compiled loss). Default is False.
        dtype_bytes (int): bytes per compute element: activations, and the weights gathered for forward and
            backward (``dtype``; bf16: 2, fp32: 4). Default is 2.
        master_bytes (Optional[int]): bytes per stored parameter and gradient element (``master_dtype``); None
            means ``dtype_bytes``. With fewer compute bytes, FSDP2 casts each layer's weights to the compute dtype
            as it gathers them, also without data parallelism. Default is None.
        optimizer (str): "adam"/"adamw" (2 states), "sgd_momentum" (1) or "sgd" (0). Default is "adam".
        optimizer_fused (bool): fused optimizer step (no temporaries); False means foreach. Default is False.
        optimizer_state_bytes (Optional[int]): bytes per state element; None means the master bytes (torch keeps
            Adam states in the parameter dtype). Default is None.
        num_output_chunks (int): ``CEWithChunkedOutputLoss.num_output_chunks``. Default is 8.
        images_per_sample (int): images per sample. Default is 1.
        image_px (int): side of a square image after Pixtral resizing (a multiple of patch x merge). Default is 532.
        packed (bool): ``dataset.packed``: ``batch_size`` counts packs of exactly ``seq_len`` tokens, each holding
            ``images_per_pack`` images (FlexAttention keeps the same per-token tensors as causal SDPA; where the
            recipe runs SDPA with the dense mask instead, each layer keeps its ``s x s`` mask in bf16 for the
            backward: measured 8 MiB per 2048-token pack and layer on the H200). Default is False.
        images_per_pack (Optional[int]): images in one pack; None means ``images_per_sample`` times the samples a
            pack holds at MedPix's mean of ``MEDPIX_MEAN_SAMPLE_TOKENS`` tokens per sample. Default is None.
        sequence_parallel (bool): ``tensor_parallel_plan.sequence_parallel``: the residual stream between TP
            blocks is sharded on the sequence, so a layer's input and residual (and a stage's output) are kept at
            ``1 / tp``; the gathered norm outputs the matmuls save stay whole. Default is False.
        tower_split (bool): ``tensor_parallel_tower: split``: each TP rank runs the tower and projector on about
            ``1 / tp`` of a micro-batch's patches, so stage 0 holds that share of their activations. Default is
            False (every TP rank encodes every image).
        sharded_layers (Optional[Sequence[str]]): ``custom_sharded_layers``: modules (FQNs of the fused model, e.g.
            ``decoder.output``) given their own FSDP2 unit besides the layers. The rest of the model outside the
            layers is the root unit, which FSDP2 keeps gathered from the first forward to the end of backward.
            Default is None.
    """

    tp: int = 1
    pp: int = 1
    dp: int = 1
    microbatches: int = 1
    schedule: str = "1F1B"
    stages_per_rank: Optional[int] = None
    layer_split: Optional[Sequence[int]] = None
    stage_extras: Optional[Dict[str, float]] = None
    seq_len: int = 2048
    batch_size: int = 1
    grad_accum: int = 1
    activation_checkpointing: bool = False
    compile: bool = False
    dtype_bytes: int = 2
    master_bytes: Optional[int] = None
    optimizer: str = "adam"
    optimizer_fused: bool = False
    optimizer_state_bytes: Optional[int] = None
    num_output_chunks: int = 8
    images_per_sample: int = 1
    image_px: int = 532
    packed: bool = False
    images_per_pack: Optional[int] = None
    sequence_parallel: bool = False
    tower_split: bool = False
    sharded_layers: Optional[Sequence[str]] = None

    @property
    def images_per_sequence(self) -> int:
        """int: images in one sequence of the batch (a sample, or a pack of samples)."""
        if not self.packed:
            return self.images_per_sample
        if self.images_per_pack is not None:
            return self.images_per_pack
        return max(1, self.seq_len // MEDPIX_MEAN_SAMPLE_TOKENS) * self.images_per_sample


@dataclass
class RankMemory:
    """Memory of one pipeline rank (every TP/DP rank of it holds the same), in bytes.

    Args:
        pp_rank (int): pipeline rank.
        stages (List[int]): global stage indices it holds.
        layers (int): decoder layers it holds.
        parameters (float): parameters (trainable and frozen).
        gradients (float): gradients of its trainable parameters.
        optimizer_state (float): optimizer state.
        activations_per_microbatch (float): activations one micro-batch leaves for backward on this rank.
        microbatches_in_flight (int): micro-batches whose activations are held at the worst moment.
        activations (float): ``activations_per_microbatch * microbatches_in_flight`` plus stage-boundary tensors.
        logits_and_loss (float): head and loss tensors of one micro-batch (last stage), plus their backward
            workspace.
        transient (float): the largest short-lived buffer (recompute of a checkpointed layer, vision tower
            forward, FSDP all-gather, embedding backward or optimizer temporaries) at its own phase.
        peak (float): the peak over the step's phases.
        phases (Dict[str, float]): the candidates the peak is the largest of.
        unsharded_accumulation (float): under PP with torch's no-sync accumulation (data parallel > 1 or a split
            backward), the unsharded gradients (master dtype) and parameters (compute dtype) every stage keeps
            between micro-batches; 0 where the recipe reduces every micro-batch (data parallel 1).
        root_gathered (float): without PP, the FSDP2 root unit's parameters (what is outside the layers and
            ``sharded_layers``), which stay gathered in the compute dtype from the first forward to the end of
            backward.
    """

    pp_rank: int
    stages: List[int]
    layers: int
    parameters: float
    gradients: float
    optimizer_state: float
    activations_per_microbatch: float
    microbatches_in_flight: int
    activations: float
    logits_and_loss: float
    transient: float
    peak: float
    phases: Dict[str, float] = field(default_factory=dict)
    unsharded_accumulation: float = 0.0
    root_gathered: float = 0.0


@dataclass
class MemoryPlan:
    """Memory of every pipeline rank of a layout, and whether the worst one fits a GPU.

    Args:
        layout (Layout): the layout planned.
        dims (ModelDims): the model's widths.
        ranks (List[RankMemory]): one entry per pipeline rank.
        gpu_gib (float): GPU memory, GiB.
        allocator_margin (float): fraction added to the peak for the caching allocator's fragmentation.
        reserve_gib (float): GiB set aside for the CUDA context and communication buffers.
    """

    layout: Layout
    dims: ModelDims
    ranks: List[RankMemory]
    gpu_gib: float
    allocator_margin: float
    reserve_gib: float

    @property
    def worst(self) -> RankMemory:
        """RankMemory: the pipeline rank with the highest peak."""
        return max(self.ranks, key=lambda r: r.peak)

    @property
    def needed_gib(self) -> float:
        """float: the worst peak with the allocator margin and the reserve, GiB."""
        return self.worst.peak / GIB * (1 + self.allocator_margin) + self.reserve_gib

    @property
    def fits(self) -> bool:
        """bool: whether :attr:`needed_gib` fits ``gpu_gib``."""
        return self.needed_gib <= self.gpu_gib

    def to_dict(self) -> Dict[str, Any]:
        """Dict[str, Any]: everything, JSON-serialisable (bytes as GiB)."""
        ranks = []
        for r in self.ranks:
            d = asdict(r)
            for k, v in list(d.items()):
                if isinstance(v, float):
                    d[k] = v / GIB
            d["phases"] = {k: v / GIB for k, v in r.phases.items()}
            ranks.append(d)
        layout = asdict(self.layout)
        return {"layout": layout, "dims": asdict(self.dims), "ranks_gib": ranks, "gpu_gib": self.gpu_gib,
                "needed_gib": self.needed_gib, "fits": self.fits}


# --------------------------------------------------------------------------------------------- model


def build_meta_model(
    checkpoint_dir: Optional[str] = None, size: Optional[str] = None, lora: Optional[Dict[str, Any]] = None,
    **flags: Any,
):
    """Build the model on the meta device from ``checkpoint_dir/config.json`` or a named size.

    Args:
        checkpoint_dir (Optional[str]): HF checkpoint directory with config.json. Default is None.
        size (Optional[str]): one of the family's ``NAMED_SIZES``, used when ``checkpoint_dir`` has no config.json.
            Default is None.
        lora (Optional[Dict[str, Any]]): the LoRA builder's arguments (``lora_attn_modules``, ``lora_rank``,
            ``fp8_base``, ``decoder_trainable``, ...; :func:`~torchtune_mistral3.models.mistral3.mistral3_lora`);
            None builds the model without adapters. Default is None.
        **flags (Any): builder overrides (``vision_trainable``, ``max_seq_len``, ...).

    Returns:
        Mistral3FusionModel: the model, parameters on the meta device.

    Raises:
        ValueError: if neither a config.json nor a known size is given.
    """
    import torch

    from torchtune_mistral3 import checkpointing as ckpt
    from torchtune_mistral3.models import mistral3 as family

    suffix, kwargs = ("", flags) if lora is None else ("_lora", {**lora, **flags})
    with torch.device("meta"):
        if checkpoint_dir is not None and (Path(checkpoint_dir) / "config.json").is_file():
            builder = ckpt.mistral3_from_hf_config if lora is None else ckpt.mistral3_lora_from_hf_config
            return builder(checkpoint_dir, **kwargs)
        if size in family.NAMED_SIZES:
            return getattr(family, size + suffix)(**kwargs)
    raise ValueError(
        f"no {Path(str(checkpoint_dir)) / 'config.json'} and no named size ({size!r}): give the checkpoint "
        f"directory, or plan.size= one of {', '.join(family.NAMED_SIZES)}"
    )


# The LoRA builders' own arguments (models/mistral3/_lora_builders.py), as a config's ``model`` node gives them.
LORA_KEYS = ("lora_attn_modules", "apply_lora_to_mlp", "apply_lora_to_output", "lora_rank", "lora_alpha",
             "lora_dropout", "decoder_trainable", "vision_trainable", "projector_trainable", "fp8_base", "fp8_matmul")


def lora_options(model_cfg: Dict[str, Any]) -> Optional[Dict[str, Any]]:
    """The LoRA arguments of a config's ``model`` node, or None when its builder is not a ``*_lora`` one.

    Args:
        model_cfg (Dict[str, Any]): the ``model`` node (``_component_`` and the builder's arguments).

    Returns:
        Optional[Dict[str, Any]]: ``build_meta_model``'s ``lora`` argument.
    """
    if "_lora" not in str(model_cfg.get("_component_", "")).rsplit(".", 1)[-1]:
        return None
    return {k: (list(model_cfg[k]) if k == "lora_attn_modules" else model_cfg[k]) for k in LORA_KEYS if k in model_cfg}


def model_dims(model) -> ModelDims:
    """Read the widths the activation count needs from a built model.

    Args:
        model (Mistral3FusionModel): the model (any device).

    Returns:
        ModelDims: its widths.
    """
    layer = model.decoder.layers[0]
    vision = model.encoders["image"].vision
    vlayer = vision.layers[0]
    return ModelDims(
        vocab_size=model.tok_embeddings.num_embeddings,
        hidden=model.tok_embeddings.embedding_dim,
        ffn=layer.mlp.w1.weight.shape[0],  # nn.Linear, LoRALinear and FP8 bases alike
        num_heads=layer.attn.num_heads,
        num_kv_heads=layer.attn.num_kv_heads,
        head_dim=layer.attn.head_dim,
        num_layers=len(model.decoder.layers),
        vision_hidden=vlayer.attn.embed_dim,
        vision_ffn=vlayer.mlp.w1.weight.shape[0],
        vision_heads=vlayer.attn.num_heads,
        vision_layers=len(vision.layers),
        patch_size=vision.patch_size,
        merge=model.encoders["image"].projector.spatial_merge_size,
    )


def part_of(name: str) -> str:
    """Which part a parameter belongs to: ``layer.N``, ``embeddings``, ``vision``, ``projector``, ``norm``, ``output``.

    Args:
        name (str): parameter FQN of the fused model.

    Returns:
        str: the part.
    """
    if name.startswith("decoder.layers."):
        return "layer." + name.split(".")[2]
    for prefix, part in (("tok_embeddings.", "embeddings"), ("decoder.tok_embeddings.", "embeddings"),
                         ("encoders.image.vision.", "vision"), ("encoders.image.projector.", "projector"),
                         ("decoder.norm.", "norm"), ("decoder.output.", "output")):
        if name.startswith(prefix):
            return part
    return "other"


def count_parts(model, tp: int, tp_plan: Optional[Dict[str, Any]] = None) -> Dict[str, PartParams]:
    """Parameter elements per part, sharded by the modules a TP plan names.

    Args:
        model (Mistral3FusionModel): the model (meta device is fine).
        tp (int): tensor parallel degree.
        tp_plan (Optional[Dict[str, Any]]): FQN glob -> style; None for ``mistral3_tp_plan()``. Default is None.

    Returns:
        Dict[str, PartParams]: per part.
    """
    if tp_plan is None:
        from torchtune_mistral3.models.mistral3._parallelism import mistral3_tp_plan

        tp_plan = mistral3_tp_plan()
    patterns = [p.split(".") for p in tp_plan]
    parts: Dict[str, PartParams] = {}
    for name, p in model.named_parameters():
        module_atoms = name.split(".")[:-1]
        sharded = tp > 1 and any(
            len(pat) == len(module_atoms) and all(fnmatch.fnmatchcase(a, b) for a, b in zip(module_atoms, pat))
            for pat in patterns
        )
        local = p.numel() / tp if sharded else p.numel()
        part = parts.setdefault(part_of(name), PartParams())
        part.total += p.numel()
        part.per_tp_rank += local
        if p.requires_grad:
            part.trainable_per_tp_rank += local
        if p.element_size() == 1:  # a frozen FP8 LoRA base
            part.fp8_per_tp_rank += local
            part.fp8_largest_per_tp_rank = max(part.fp8_largest_per_tp_rank, local)
    return parts


# --------------------------------------------------------------------------------------------- activations


def layer_activation_bytes_per_token(
    dims: ModelDims, tp: int, compiled: bool, sequence_parallel: bool = False
) -> float:
    """Bytes one decoder layer keeps for backward per token (no activation checkpointing), per TP rank.

    Four bf16 hidden-size tensors are whole on every TP rank (the layer input, the two norm outputs the matmuls
    take, the residual after attention); under sequence parallelism the input and the residual are shards.

    Args:
        dims (ModelDims): model widths.
        tp (int): tensor parallel degree.
        compiled (bool): per-layer torch.compile (else eager).
        sequence_parallel (bool): the residual stream sharded on the sequence. Default is False.

    Returns:
        float: bytes per token.
    """
    q = dims.num_heads * dims.head_dim
    kv = dims.num_kv_heads * dims.head_dim
    whole = 4 * dims.hidden + 4 * dims.hidden / (tp if sequence_parallel else 1)
    b = whole + (4 * q + 4 * kv + 6 * dims.ffn + 4 * dims.num_heads) / tp
    return b if compiled else b * EAGER_LAYER_FACTOR


def packed_mask_bytes_per_token(dims: ModelDims, layout: "Layout") -> float:
    """Bytes per token and layer of the dense block-causal mask where the recipe runs SDPA with it (else 0).

    Args:
        dims (ModelDims): model widths (KV heads, for the recipe's kernel choice).
        layout (Layout): the layout (packing, TP degree, packs per micro-batch, sequence length).

    Returns:
        float: ``2 s`` (the ``s x s`` bf16 mask over the pack's ``s`` tokens) or 0.
    """
    from torchtune_mistral3.models.mistral3._attention import packed_attention_prefers_flex

    if not layout.packed:
        return 0.0
    packs = max(1, layout.batch_size // max(layout.microbatches, 1))
    kv = max(1, dims.num_kv_heads // layout.tp)
    return 0.0 if packed_attention_prefers_flex(packs, kv, layout.seq_len) else 2.0 * layout.seq_len


def head_bytes_per_token(dims: ModelDims, tp: int, compiled_loss: bool) -> float:
    """Bytes the final norm, the output head and the chunked loss keep for backward per token (last stage).

    Args:
        dims (ModelDims): model widths.
        tp (int): tensor parallel degree (the head is vocabulary-sharded, the loss vocabulary-parallel).
        compiled_loss (bool): compiled cross-entropy (no fp32 log-probabilities kept).

    Returns:
        float: bytes per token.
    """
    v = dims.vocab_size / tp
    return 10 * dims.hidden + 2 * v + (0 if compiled_loss else 4 * v)


def projector_bytes_per_image_token(dims: ModelDims) -> float:
    """Bytes the (trainable) projector keeps for backward per merged image token.

    Its eager fp32 norm (input and normalised copy), the merged patches, and the inputs of the two linears.

    Args:
        dims (ModelDims): model widths.

    Returns:
        float: bytes per image token.
    """
    m2 = dims.merge**2
    return 4 * dims.hidden + 2 * dims.vision_hidden + 2 * m2 * dims.vision_hidden + 8 * m2 * dims.vision_hidden


def microbatches_in_flight(schedule: str, pp: int, pp_rank: int, microbatches: int, stages_per_rank: int) -> int:
    """Micro-batches (per stage of the rank) whose activations a pipeline rank holds at its worst moment.

    GPipe: all of them. 1F1B: ``pp - pp_rank`` (warm-up forwards plus one). Interleaved 1F1B, counting
    chunk-forwards: ``(v - 1) * pp + 2 * (pp - 1 - pp_rank) + 1``, as torch's schedule warms up, divided by the
    ``v`` stages of the rank (rounded up). Never more than the micro-batches there are.

    Args:
        schedule (str): ``pipeline_schedule``.
        pp (int): pipeline degree.
        pp_rank (int): pipeline rank.
        microbatches (int): micro-batches per batch.
        stages_per_rank (int): stages per rank v.

    Returns:
        int: micro-batches in flight per stage of the rank.

    Raises:
        ValueError: for a schedule not modelled.
    """
    kind = _SCHEDULES.get(schedule.lower())
    if kind is None:
        raise ValueError(f"pipeline_schedule={schedule!r} is not modelled; use one of {sorted(_SCHEDULES)}")
    if pp == 1:
        return 1
    if kind == "gpipe":
        return microbatches
    if kind == "1f1b":
        return min(pp - pp_rank, microbatches)
    chunks = (stages_per_rank - 1) * pp + 2 * (pp - 1 - pp_rank) + 1
    return min(math.ceil(chunks / stages_per_rank), microbatches)


# --------------------------------------------------------------------------------------------- plan


def _stages(layout: Layout, num_layers: int) -> tuple:
    from torchtune_mistral3.models.mistral3._parallelism import mistral3_pp_stage_extras
    from torchtune_mistral3.training._pipeline import (
        default_stages_per_rank,
        get_pipeline_schedule_class,
        resolve_layer_split,
        stage_ids_for_rank,
    )

    if layout.pp == 1:
        return 1, [num_layers], [[0]]
    cls = get_pipeline_schedule_class(layout.schedule)
    v = layout.stages_per_rank or default_stages_per_rank(cls)
    extras = layout.stage_extras or mistral3_pp_stage_extras()
    split = resolve_layer_split(num_layers, layout.pp * v, layout.layer_split, **extras)
    return v, split, [stage_ids_for_rank(cls, r, layout.pp, v) for r in range(layout.pp)]


def stage_part_names(stages: Sequence[int], split: Sequence[int]) -> List[str]:
    """The parts (as :func:`part_of` names them) that pipeline ``stages`` hold, e.g. those of one pipeline rank.

    A stage holds its decoder layers; stage 0 also the embeddings, tower and projector, the last stage the norm
    and the output head.

    Args:
        stages (Sequence[int]): global stage indices.
        split (Sequence[int]): decoder layers of every stage.

    Returns:
        List[str]: the part names, stage by stage.
    """
    names = []
    for s in stages:
        start = sum(split[:s])
        names += [f"layer.{i}" for i in range(start, start + split[s])]
        names += ["embeddings", "vision", "projector"] if s == 0 else []
        names += ["norm", "output"] if s == len(split) - 1 else []
    return names


# the parts outside the decoder and tower layers (each layer is its own FSDP2 unit), which make the root unit
_ROOT_PARTS = ("embeddings", "projector", "norm", "output", "other")


def plan_memory(
    model,
    layout: Layout,
    gpu_gib: float = 80.0,
    allocator_margin: float = 0.10,
    reserve_gib: float = 2.0,
    tp_plan: Optional[Dict[str, Any]] = None,
) -> MemoryPlan:
    """Per-GPU memory of ``model`` trained with ``layout``.

    Args:
        model (Mistral3FusionModel): the model with its trainable flags set (meta device is fine).
        layout (Layout): the layout.
        gpu_gib (float): memory of one GPU, GiB (an H100-80GB reports 79.1 GiB). Default is 80.0.
        allocator_margin (float): fraction added to the peak for the caching allocator (measured on the H200:
            reserved was 5-14% above allocated). Default is 0.10.
        reserve_gib (float): GiB for the CUDA context and NCCL buffers. Default is 2.0.
        tp_plan (Optional[Dict[str, Any]]): TP plan; None for ``mistral3_tp_plan()``. Default is None.

    Returns:
        MemoryPlan: the plan.

    Raises:
        ValueError: if the batch does not split into the micro-batches, or the image does not fit the sequence.
    """
    lo = layout
    dims = model_dims(model)
    if lo.batch_size % lo.microbatches:
        raise ValueError(f"batch_size={lo.batch_size} does not split into pipeline_microbatches={lo.microbatches}")
    mb = lo.batch_size // lo.microbatches
    tokens = mb * lo.seq_len
    side = lo.image_px // (dims.patch_size * dims.merge)
    images = lo.images_per_sequence
    encoded = mb * images  # images this rank's tower encodes per micro-batch
    if lo.tower_split and lo.tp > 1:  # whole images shared over the TP ranks: the busiest gets ceil(n / tp)
        encoded = math.ceil(encoded / lo.tp)
    image_tokens = encoded * side * side
    patches = image_tokens * dims.merge**2
    if side * (side + 1) * images > lo.seq_len:
        what = "a pack" if lo.packed else "a sample"
        raise ValueError(f"{images} image(s) of {lo.image_px} px in {what} need more than seq_len={lo.seq_len}")

    parts = count_parts(model, lo.tp, tp_plan)
    v, split, rank_stages = _stages(lo, dims.num_layers)
    last_stage = len(split) - 1
    shard = lo.dp if lo.dp > 1 else 1
    master_bytes = lo.master_bytes or lo.dtype_bytes
    casts = master_bytes != lo.dtype_bytes  # FSDP2 mixed precision, which runs at dp=1 too
    state_bytes = lo.optimizer_state_bytes or master_bytes
    n_states = {"adam": 2, "adamw": 2, "sgd_momentum": 1, "sgd": 0}[lo.optimizer]
    holds_grads_across = lo.microbatches * lo.grad_accum > 1
    sp = lo.sequence_parallel and lo.tp > 1
    mask = packed_mask_bytes_per_token(dims, lo)
    layer_act = (
        2 * dims.hidden / (lo.tp if sp else 1) if lo.activation_checkpointing
        else layer_activation_bytes_per_token(dims, lo.tp, lo.compile, sp) + mask
    )
    full_layer_act = layer_activation_bytes_per_token(dims, lo.tp, lo.compile, sp) + mask

    ranks = []
    for r, stages in enumerate(rank_stages):
        names = stage_part_names(stages, split)
        held = [parts[n] for n in names if n in parts]
        # frozen parameters have no master: the recipe holds them in the compute dtype
        params = sum(p.bytes_per_tp_rank(master_bytes, lo.dtype_bytes) for p in held) / shard
        trainable = sum(p.trainable_per_tp_rank for p in held) / shard
        grads = trainable * master_bytes
        opt = trainable * state_bytes * n_states
        n_layers = sum(split[s] for s in stages)

        # activations of one micro-batch through all of this rank's stages
        act_mb = n_layers * layer_act * tokens
        first = 0 in stages
        last = last_stage in stages
        if first and parts.get("projector") and parts["projector"].trainable_per_tp_rank:
            act_mb += projector_bytes_per_image_token(dims) * image_tokens
        # the stage output kept for backward (a sequence shard under sequence parallelism)
        boundary = 0.0 if (last and len(stages) == 1) else 2 * dims.hidden * tokens / (lo.tp if sp else 1)
        in_flight = microbatches_in_flight(lo.schedule, lo.pp, r, lo.microbatches, v)
        activations = in_flight * (act_mb + boundary)

        head = 0.0  # what the head and loss add at their backward (last stage), beside the activations
        if last:
            saved = head_bytes_per_token(dims, lo.tp, lo.compile) * tokens
            v_local = dims.vocab_size / lo.tp
            # loss backward: bf16 grad of one chunk of logits (+ fp32 upcast and softmax when eager)
            loss_bwd = tokens / lo.num_output_chunks * v_local * (2 if lo.compile else 10)
            out_grad = parts["output"].trainable_per_tp_rank * master_bytes / shard if "output" in parts else 0.0
            if lo.num_output_chunks == 1:
                # the logits are freed before the head's matmul backward makes its weight gradient
                head = max(saved + loss_bwd, saved - 2 * v_local * tokens + loss_bwd + out_grad)
            else:
                # per chunk: the summed head gradient, the chunk's gradient and their sum (3 copies on the H200)
                head = saved + loss_bwd + (2 if holds_grads_across else 3) * out_grad
        forward_transients = {"none": 0.0}
        if first:
            # frozen tower forward, one layer alive at a time: input, norm, q/k/v/out and the SwiGLU tensors
            forward_transients["vision_forward"] = (
                patches * (8 * dims.vision_hidden + 3 * dims.vision_ffn) * lo.dtype_bytes
            )
        layer_parts = [parts[n] for n in names if n.startswith("layer.") and n in parts]
        # a frozen FP8 base dequantises one weight at a time for its matmul (forward and backward)
        dequantized = max((p.fp8_largest_per_tp_rank for p in layer_parts), default=0.0) * lo.dtype_bytes
        if dequantized:
            forward_transients["fp8_dequantize"] = dequantized
        # modules of custom_sharded_layers are FSDP2 units like the layers (the root unit is the rest)
        own_units = {part_of(f"{m}.") for m in (lo.sharded_layers or ())} & set(names)
        if shard > 1 or casts:
            # this unit's and the prefetched next one's gathered weights, in the compute dtype (FP8 ones as FP8)
            units = layer_parts + [parts[n] for n in own_units if n in parts]
            biggest = max((p.bytes_per_tp_rank(lo.dtype_bytes) for p in units), default=0.0)
            forward_transients["fsdp_all_gather"] = 2 * biggest + dequantized
        fb_transient = max(forward_transients.values())
        embed_grad = parts["embeddings"].trainable_per_tp_rank * master_bytes / shard if first else 0.0
        embed_bwd = 6 * dims.hidden * tokens if first and embed_grad else 0.0
        # late in backward: nearly all gradients exist while the first layer's activations (recomputed, under
        # activation checkpointing) and the hidden-state gradients are still alive
        late = full_layer_act * tokens + 4 * dims.hidden * tokens if n_layers else 0.0
        opt_temp = 0.0 if lo.optimizer_fused or n_states == 0 else trainable * state_bytes
        # FSDP2 under PP with torch's no-sync accumulation (data parallel > 1, or a split backward): every stage
        # keeps its gradients unsharded in the reduce (master) dtype beside the sharded ones, and its parameters
        # unsharded in the compute dtype between micro-batches. With data parallel 1 the recipe reduces and
        # reshards after every full backward instead (ReducingPipelineStage) and keeps neither.
        no_sync = (
            lo.pp > 1 and lo.microbatches > 1 and (shard > 1 or casts)
            and (lo.dp > 1 or lo.schedule.lower() in _SPLIT_BACKWARD)
        )
        unsynced = trainable * shard * master_bytes + sum(p.bytes_per_tp_rank(lo.dtype_bytes) for p in held)
        unsynced = unsynced if no_sync else 0.0
        if not no_sync and lo.pp > 1 and (shard > 1 or casts) and lo.schedule.lower() in _RUNTIME_SCHEDULES:
            per_stage = sorted((sum(parts[n].bytes_per_tp_rank(lo.dtype_bytes)
                                    for n in stage_part_names([s], split) if n in parts) for s in stages),
                               reverse=True)
            unsynced = sum(per_stage[:_ACTIVE_STAGES])
        # FSDP2 leaves the root unit (not resharded after forward: backward needs it at once) gathered through
        # forward and backward. Under PP the stages' unsharded parameters are counted above.
        root = 0.0
        if lo.pp == 1 and (shard > 1 or casts):
            root = sum(parts[n].bytes_per_tp_rank(lo.dtype_bytes) for n in _ROOT_PARTS
                       if n in parts and n not in own_units)
        static = params + opt
        phases = {
            "forward_backward": static + (grads if holds_grads_across else 0.0) + unsynced + root + activations
            + head + fb_transient,
            "late_backward": static + grads - embed_grad + root + late,
            "end_of_backward": static + grads + embed_bwd,
            "optimizer_step": static + grads + opt_temp,
        }
        ranks.append(RankMemory(
            pp_rank=r, stages=list(stages), layers=n_layers, parameters=params, gradients=grads,
            optimizer_state=opt, activations_per_microbatch=act_mb, microbatches_in_flight=in_flight,
            activations=activations, logits_and_loss=head,
            transient=max(fb_transient, late, embed_bwd, opt_temp), peak=max(phases.values()), phases=phases,
            unsharded_accumulation=unsynced, root_gathered=root,
        ))
    return MemoryPlan(lo, dims, ranks, gpu_gib, allocator_margin, reserve_gib)


def format_plan(plan: MemoryPlan) -> str:
    """Human-readable table of a plan (GiB per GPU, one row per pipeline rank).

    Args:
        plan (MemoryPlan): the plan.

    Returns:
        str: the table and the verdict.
    """
    lo = plan.layout
    images = f"packs of {lo.images_per_sequence} image(s)" if lo.packed else f"{lo.images_per_sequence} image(s) each"
    lines = [
        f"layout: TP={lo.tp} PP={lo.pp} DP={lo.dp} ({lo.tp * lo.pp * lo.dp} GPUs), schedule {lo.schedule}, "
        f"{lo.microbatches} micro-batch(es) of {lo.batch_size // lo.microbatches} x {lo.seq_len} tokens "
        f"({images}), "
        f"grad accumulation {lo.grad_accum}, activation checkpointing {'on' if lo.activation_checkpointing else 'off'},"
        f" compile {'on' if lo.compile else 'off'}, optimizer {lo.optimizer}{' (fused)' if lo.optimizer_fused else ''}"
        f", compute {_BYTES_NAME[lo.dtype_bytes]} / master {_BYTES_NAME[lo.master_bytes or lo.dtype_bytes]}"
        f" / optimizer states {_BYTES_NAME[lo.optimizer_state_bytes or lo.master_bytes or lo.dtype_bytes]}",
        f"{'pp rank':>7} {'layers':>6} {'params':>7} {'grads':>7} {'optim':>7} {'act/mb':>7} {'x mb':>4} "
        f"{'act':>7} {'logits':>7} {'transnt':>7} {'peak':>7}   (GiB per GPU)",
    ]
    for r in plan.ranks:
        lines.append(
            f"{r.pp_rank:>7} {r.layers:>6} {r.parameters / GIB:7.2f} {r.gradients / GIB:7.2f} "
            f"{r.optimizer_state / GIB:7.2f} {r.activations_per_microbatch / GIB:7.2f} {r.microbatches_in_flight:>4} "
            f"{r.activations / GIB:7.2f} {r.logits_and_loss / GIB:7.2f} {r.transient / GIB:7.2f} {r.peak / GIB:7.2f}"
        )
    w = plan.worst
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines.append(
        f"worst: pp rank {w.pp_rank}, peak {w.peak / GIB:.2f} GiB; with {plan.allocator_margin:.0%} allocator margin "
        f"and {plan.reserve_gib:.1f} GiB reserve: {plan.needed_gib:.2f} GiB of {plan.gpu_gib:.1f} GiB -> {verdict}"
    )
    return "\n".join(lines)

