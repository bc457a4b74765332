"""Step time of a Mistral 3 fine-tuning layout, from a GPU-measured cost table and the schedule's own action order.

Per pipeline rank and micro-batch, the compute time of each stage is summed from a cost table that
``bench/step_costs.py`` measures at full width on one H200 (``step_costs_h200.json`` beside this file; until that
run exists, ``step_costs_h200_provisional.json``, derived from the step-speed runs by ``bench/cost_tables.py``,
with its assumptions written into it):

- stage 0: token embeddings (forward + backward), the frozen Pixtral tower's forward per image (``c0 + c1 p + c2 p^2``
  in the image's patches p, fitted to the table), the projector (forward + backward, linear in image tokens);
- every stage: its decoder layers' forward and backward (with the recomputation when activation checkpointing is
  on), fitted as ``a + b T + c T S`` in the micro-batch's tokens T and sequence length S;
- the last stage: final norm + head + compiled cross-entropy (linear in T);
- tensor-parallel collectives, not overlapped (torchtune's TP plan has no async TP): per decoder layer two
  all-reduces of the ``[T, h]`` bf16 hidden state forward and two backward (two more with recomputation), one
  for the vocabulary-parallel embedding forward, one for the column-wise head's input gradient, and the gather of
  the tower's features when the tower is split over the TP group; an all-reduce of B bytes takes
  ``2 (tp - 1) / tp * B / NVLINK_ALLREDUCE_GBPS`` (bus bandwidth) plus ``COLLECTIVE_LATENCY_S``;
- pipeline sends: each micro-batch's ``[b, s, h]`` bf16 activation (and its gradient back) between stages on
  different ranks, over ``PP_LINK_GBPS``, on the path from one action to the next;
- the optimizer step once per step: trained parameters of the rank x seconds per parameter (by master dtype).

The pipeline part is replayed from the torch schedule's own per-rank action order (``pipeline_order`` of a
schedule built over stand-in stages): each rank runs its actions in order, an action starts when the rank is free
and its inputs have arrived (F after the previous stage's F of the micro-batch, B/I after this stage's F and the
next stage's B/I, W after I). Zero-bubble I/W actions split an eager stage's backward by ``W_SHARE``; a
compiled layer's backward is one node, so its I action does all of it (W nothing). The step is
``gradient_accumulation_steps`` replays plus the slowest rank's optimizer step.

H200 -> H100 (same dense bf16 peak, 989 TFLOP/s; HBM 4.8 vs 3.35 TB/s): the optimizer step (memory bound) is
scaled by the bandwidth ratio, and the rest by ``1 + MEMORY_BOUND_SHARE * (ratio - 1)``.
"""

import json
import math
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._memory_plan import Layout, ModelDims, _stages, count_parts, model_dims, stage_part_names
from ._padding_model import expected_longest, medpix_sample_lengths, padding_mode

TABLE_FILE = Path(__file__).with_name("step_costs_h200.json")
PROVISIONAL_FILE = Path(__file__).with_name("step_costs_h200_provisional.json")
# Block-causal attention of packs over the causal attention the layer entries measured, derived from the recorded
# ``bench/packing.py --attention-only`` runs by ``bench/cost_tables.py``; merged into every loaded table.
PACKED_ATTENTION_FILE = Path(__file__).with_name("packed_attention_h200.json")
# Forward share of an attention's forward + backward (flash-style backward ~2.5x the forward's work).
ATTENTION_FORWARD_SHARE = 2.0 / 7.0

# NCCL all-reduce bus bandwidth inside one 8-GPU NVLink-4 node (H100 SXM: 900 GB/s bidirectional per GPU; NVIDIA's
# nccl-tests reach ~360-480 GB/s busbw at large messages without NVLS): the lower end, as a planning figure.
NVLINK_ALLREDUCE_GBPS = 360.0
# One 400 Gb/s NDR InfiniBand NIC per GPU (DGX H100), ~90% of line rate: pipeline sends between nodes.
PP_LINK_GBPS = 45.0
COLLECTIVE_LATENCY_S = 20e-6
PEAK_TFLOPS = {"h100": 989.0, "h200": 989.0}
HBM_TBPS = {"h100": 3.35, "h200": 4.8}
# Share of a compiled decoder layer's kernel time that is memory bound (not matmul) on the H200: 31 of 299 ms
# (elementwise 19 + attention 12) in the 4-layer profile, docs/performance.md section 5.
MEMORY_BOUND_SHARE = 0.10
# Weight-gradient share of a backward (zero-bubble W actions): a linear's input and weight gradients are equal GEMMs.
W_SHARE = 0.5


# --------------------------------------------------------------------------------------------- the table


def _lstsq(rows: Sequence[Sequence[float]], ys: Sequence[float]) -> np.ndarray:
    a = np.asarray(rows, dtype=float)
    coef, *_ = np.linalg.lstsq(a, np.asarray(ys, dtype=float), rcond=None)
    return coef


def _linear(xs: Sequence[float], ys: Sequence[float]) -> Callable[[float], float]:
    """``y = a + b x`` through the points (``y = b x`` from one point)."""
    if len(set(xs)) < 2:
        b = sum(ys) / sum(xs)
        return lambda x: b * x
    a, b = _lstsq([[1.0, x] for x in xs], ys)
    return lambda x: float(a + b * x)


class CostTable:
    """The measured costs (seconds on the table's GPU) the planner adds up; see ``bench/step_costs.py``.

    Args:
        data (Dict[str, Any]): the JSON the bench writes (or ``bench/cost_tables.py`` derives).
        source (str): where it came from, for the printout. Default is "".

    Raises:
        ValueError: if a section the planner needs is empty.
    """

    def __init__(self, data: Dict[str, Any], source: str = ""):
        self.data, self.source = data, source
        self.provisional = bool(data.get("provisional", False))
        self.dims = data["dims"]
        for key in ("layer", "tower", "projector", "embeddings", "head", "optimizer"):
            if not data.get(key):
                raise ValueError(f"cost table {source or '(given)'} has no {key!r} entries; re-run bench/step_costs.py")

    @classmethod
    def load(cls, path: Optional[str] = None) -> "CostTable":
        """The table at ``path``, else the shipped measured one, else the shipped provisional one.

        Args:
            path (Optional[str]): a table JSON. Default is None.

        Returns:
            CostTable: the table.

        Raises:
            FileNotFoundError: if ``path`` is given and missing, or no table ships.
        """
        candidates = [Path(path)] if path else [TABLE_FILE, PROVISIONAL_FILE]
        for p in candidates:
            if p.is_file():
                data = json.loads(p.read_text())
                if "packed_attention" not in data and PACKED_ATTENTION_FILE.is_file():
                    data["packed_attention"] = json.loads(PACKED_ATTENTION_FILE.read_text())["packed_attention"]
                return cls(data, source=str(p))
        raise FileNotFoundError(f"no cost table at {', '.join(map(str, candidates))}: run bench/step_costs.py")

    # each lookup: an exact measured shape first, else the fit over the measured ones

    def _layer_entries(self, tp: int, ac: bool, compiled: bool) -> List[Dict]:
        return [r for r in self.data["layer"].get(str(tp), []) if r["ac"] == ac and r.get("compiled", True) == compiled]

    def _layer_at(self, tp: int, batch: int, seq: int, ac: bool, compiled: bool) -> Optional[Tuple[float, float]]:
        rows = self._layer_entries(tp, ac, compiled)
        if not rows:
            return None
        for r in rows:
            if (r["batch"], r["seq"]) == (batch, seq):
                return r["forward_s"], r["backward_s"]
        t = batch * seq
        feats = [[1.0, r["batch"] * r["seq"], r["batch"] * r["seq"] * r["seq"]] for r in rows]
        x = [1.0, t, t * seq]
        distinct = len({(f[1], f[2]) for f in feats})
        if distinct < 3:  # too few shapes for three terms: no constant (two shapes), or tokens alone (one)
            keep = slice(1, 3) if distinct == 2 else slice(1, 2)
            feats, x = [f[keep] for f in feats], x[keep]
        out = []
        for key in ("forward_s", "backward_s"):
            coef = _lstsq(feats, [r[key] for r in rows])
            out.append(float(np.dot(coef, x)))
        return out[0], out[1]

    def layer(self, tp: int, batch: int, seq: int, ac: bool, compiled: bool = True) -> Tuple[float, float]:
        """Forward and backward seconds of one decoder layer on one TP rank.

        A TP degree not in the table scales the TP1 time by ``1 / tp`` and the measured shard's efficiency loss
        geometrically (``(t_k k / t_1) ** (log tp / log k)`` for the measured shard degree k). Eager layers
        (``compiled=False``) use the eager entries, or the compiled ones times the table's ``eager_factor``.

        Args:
            tp (int): tensor parallel degree.
            batch (int): samples per micro-batch.
            seq (int): sequence length.
            ac (bool): activation checkpointing (the backward includes the recomputed forward).
            compiled (bool): per-layer torch.compile. Default is True.

        Returns:
            Tuple[float, float]: forward, backward seconds.

        Raises:
            ValueError: if the table has no TP1 entries for this ``ac``.
        """
        if not compiled and not self._layer_entries(1, ac, False):
            f, b = self.layer(tp, batch, seq, ac, compiled=True)
            k = float(self.data.get("eager_factor", EAGER_TIME_FACTOR))
            return f * k, b * k
        direct = self._layer_at(tp, batch, seq, ac, compiled)
        if direct is not None:
            return direct
        base = self._layer_at(1, batch, seq, ac, compiled)
        if base is None:
            raise ValueError(f"cost table has no decoder-layer entries at TP1 with ac={ac}, compiled={compiled}")

        def shard_degrees(c: bool) -> List[int]:
            return sorted(int(k) for k in self.data["layer"] if int(k) > 1 and self._layer_entries(int(k), ac, c))

        # the shard's efficiency loss from the same kind of layer, else from the compiled one
        kind = compiled if shard_degrees(compiled) else True
        shards = shard_degrees(kind)
        loss = 1.0
        if not shards and tp > 1:  # a provisional table's assumed efficiency of a TP8 shard
            loss = (1.0 / float(self.data.get("tp8_shard_efficiency", 1.0))) ** (math.log(tp) / math.log(8))
        if shards and tp > 1:
            k = shards[-1]
            fk, bk = self._layer_at(k, batch, seq, ac, kind)
            f1, b1 = self._layer_at(1, batch, seq, ac, kind)
            loss = ((fk + bk) * k / (f1 + b1)) ** (math.log(tp) / math.log(k))
        return base[0] / tp * loss, base[1] / tp * loss

    def packed_attention(self, tp: int, packs: int, kv_heads: int, seq: int) -> Tuple[float, float]:
        """Extra forward and backward seconds per decoder layer of block-causal attention on ``packs`` packs.

        Over the causal attention of as many whole sequences, which the layer entries include.

        The kernel is the one the recipe picks (:func:`packed_attention_prefers_flex`: FlexAttention, or SDPA with
        the dense mask when flex's backward has too few programs). Per-pack seconds are interpolated over the
        measured packs per micro-batch (held at the ends) at the measured TP degree nearest ``tp`` in log scale,
        scaled by ``measured degree / tp`` (heads per rank); split forward / backward by
        ``ATTENTION_FORWARD_SHARE``. Zero without the table's ``packed_attention`` section.

        Args:
            tp (int): tensor parallel degree.
            packs (int): packs in the micro-batch.
            kv_heads (int): KV heads per TP rank (for the kernel choice).
            seq (int): tokens per pack.

        Returns:
            Tuple[float, float]: forward, backward seconds (may be negative where packing saves attention work).
        """
        from torchtune_mistral3.models.mistral3._attention import packed_attention_prefers_flex

        section = {int(k): v for k, v in self.data.get("packed_attention", {}).items() if v}
        if not section or packs <= 0:
            return 0.0, 0.0
        k = tp if tp in section else min(section, key=lambda d: abs(math.log(d) - math.log(tp)))
        rows = sorted(section[k], key=lambda r: r["packs"])
        kernel = "flex_s_per_pack" if packed_attention_prefers_flex(packs, kv_heads, seq) else "dense_s_per_pack"
        xs = [r["packs"] for r in rows]
        per_pack = float(np.interp(packs, xs, [r[kernel] for r in rows]))
        causal = float(np.interp(packs, xs, [r["causal_s_per_sequence"] for r in rows]))
        extra = (per_pack - causal) * packs * k / tp
        return extra * ATTENTION_FORWARD_SHARE, extra * (1.0 - ATTENTION_FORWARD_SHARE)

    def tower(self, patches: Sequence[int]) -> float:
        """Forward seconds of the frozen tower on images of ``patches`` patches each (one call, block attention).

        Args:
            patches (Sequence[int]): patches of each image.

        Returns:
            float: seconds; 0 without images.
        """
        if not patches:
            return 0.0
        rows = self.data["tower"]
        feats = [[1.0, sum(_patches(r)), sum(p * p for p in _patches(r))] for r in rows]
        x = [1.0, sum(patches), sum(p * p for p in patches)]
        if len(rows) < 3:  # two measurements: no constant term
            feats, x = [f[1:] for f in feats], x[1:]
        coef = _lstsq(feats, [r["forward_s"] for r in rows])
        return float(np.dot(coef, x))

    def projector(self, image_tokens: int) -> Tuple[float, float]:
        """Forward and backward seconds of the projector on ``image_tokens`` merged tokens.

        Args:
            image_tokens (int): merged image tokens of the micro-batch.

        Returns:
            Tuple[float, float]: forward, backward seconds.
        """
        if not image_tokens:
            return 0.0, 0.0
        rows = self.data["projector"]
        xs = [r["image_tokens"] for r in rows]
        return (_linear(xs, [r["forward_s"] for r in rows])(image_tokens),
                _linear(xs, [r["backward_s"] for r in rows])(image_tokens))

    def embeddings(self, tokens: int) -> Tuple[float, float]:
        """Forward and backward seconds of the token embedding (dense gradient) on ``tokens`` tokens.

        Args:
            tokens (int): tokens of the micro-batch.

        Returns:
            Tuple[float, float]: forward, backward seconds.
        """
        rows = self.data["embeddings"]
        xs = [r["batch"] * r["seq"] for r in rows]
        return _linear(xs, [r["forward_s"] for r in rows])(tokens), _linear(xs, [r["backward_s"] for r in rows])(tokens)

    def head(self, tp: int, tokens: int) -> Tuple[float, float]:
        """Forward and backward seconds of final norm + head + loss on one TP rank (nearest measured shard).

        Args:
            tp (int): tensor parallel degree.
            tokens (int): tokens of the micro-batch.

        Returns:
            Tuple[float, float]: forward, backward seconds.
        """
        heads = {int(k): v for k, v in self.data["head"].items() if v}
        k = tp if tp in heads else min(heads, key=lambda d: abs(math.log(d) - math.log(tp)))
        rows = heads[k]
        xs = [r["batch"] * r["seq"] for r in rows]
        scale = k / tp  # vocabulary columns per rank relative to the measured shard
        return (_linear(xs, [r["forward_s"] for r in rows])(tokens) * scale,
                _linear(xs, [r["backward_s"] for r in rows])(tokens) * scale)

    def optimizer(self, numel: float, master_bytes: int, fused: bool) -> float:
        """Seconds of one AdamW step over ``numel`` parameters (``a + b n`` fitted per dtype and kind).

        Args:
            numel (float): trained parameters on the rank.
            master_bytes (int): bytes per parameter (4: fp32, 2: bf16).
            fused (bool): fused step (else foreach).

        Returns:
            float: seconds.
        """
        if numel <= 0:
            return 0.0
        dtype = "float32" if master_bytes == 4 else "bfloat16"
        rows = [r for r in self.data["optimizer"] if r["dtype"] == dtype and r["fused"] == fused]
        rows = rows or [r for r in self.data["optimizer"] if r["dtype"] == dtype] or self.data["optimizer"]
        return max(0.0, _linear([r["params"] for r in rows], [r["step_s"] for r in rows])(numel))


def _patches(row: Dict) -> List[int]:
    if "patches_per_image" in row:
        return list(row["patches_per_image"])
    p = 14
    return [(px // p) ** 2 for px in row["image_px"]]


# --------------------------------------------------------------------------------------------- stages


@dataclass(frozen=True)
class MicroBatch:
    """The shape of one pipeline micro-batch.

    Args:
        batch (int): samples.
        seq (int): sequence length (padded).
        patches (Tuple[int, ...]): patches of each image. Default is ().
        image_tokens (int): merged image tokens in all. Default is 0.
        packed (bool): the samples are packs (block-causal attention). Default is False.
    """

    batch: int
    seq: int
    patches: Tuple[int, ...] = ()
    image_tokens: int = 0
    packed: bool = False

    @property
    def tokens(self) -> int:
        """int: ``batch * seq``."""
        return self.batch * self.seq


@dataclass(frozen=True)
class Hardware:
    """Where the plan runs, and what its links do.

    Args:
        gpu (str): "h100" or "h200". Default is "h100".
        nvlink_gbps (float): TP all-reduce bus bandwidth, GB/s. Default is ``NVLINK_ALLREDUCE_GBPS``.
        pp_link_gbps (float): pipeline send bandwidth per GPU, GB/s. Default is ``PP_LINK_GBPS``.
        tp_overlap (float): share of the decoder layers' TP collective time hidden behind their matmuls (what
            sequence parallelism + async TP would buy; an assumption, nothing here measures it). Default is 0.
    """

    gpu: str = "h100"
    nvlink_gbps: float = NVLINK_ALLREDUCE_GBPS
    pp_link_gbps: float = PP_LINK_GBPS
    tp_overlap: float = 0.0

    def compute_scale(self) -> float:
        """float: the table's (H200) compute seconds to this GPU's."""
        return 1.0 + MEMORY_BOUND_SHARE * (HBM_TBPS["h200"] / HBM_TBPS[self.gpu] - 1.0)

    def memory_scale(self) -> float:
        """float: the table's (H200) memory-bound seconds to this GPU's."""
        return HBM_TBPS["h200"] / HBM_TBPS[self.gpu]

    def all_reduce_s(self, nbytes: float, tp: int) -> float:
        """float: one ring all-reduce of ``nbytes`` over ``tp`` ranks."""
        return 0.0 if tp == 1 else 2 * (tp - 1) / tp * nbytes / (self.nvlink_gbps * 1e9) + COLLECTIVE_LATENCY_S

    def all_gather_s(self, nbytes: float, tp: int) -> float:
        """float: one all-gather whose result is ``nbytes``."""
        return 0.0 if tp == 1 else (tp - 1) / tp * nbytes / (self.nvlink_gbps * 1e9) + COLLECTIVE_LATENCY_S


H200 = Hardware(gpu="h200")


@dataclass
class StageTime:
    """Forward and backward seconds of one stage for one micro-batch, by part.

    Args:
        forward (float): seconds.
        backward (float): seconds (with recomputation under activation checkpointing).
        weight_backward (float): the weight-gradient part of ``backward`` (zero-bubble W actions).
        parts (Dict[str, float]): forward + backward seconds by part.
    """

    forward: float
    backward: float
    weight_backward: float
    parts: Dict[str, float] = field(default_factory=dict)


def stage_time(
    table: CostTable,
    *,
    layers: int,
    first: bool,
    last: bool,
    mb: MicroBatch,
    tp: int = 1,
    ac: bool = False,
    compiled: bool = True,
    tower_split: bool = False,
    hidden: Optional[int] = None,
    kv_heads: Optional[int] = None,
    hw: Hardware = H200,
    scale: Optional[Dict[str, float]] = None,
) -> StageTime:
    """Compute and TP-collective seconds of one stage on one micro-batch.

    Args:
        table (CostTable): measured costs.
        layers (int): decoder layers of the stage.
        first (bool): stage 0 (embeddings, tower, projector).
        last (bool): last stage (norm, head, loss).
        mb (MicroBatch): the micro-batch.
        tp (int): tensor parallel degree. Default is 1.
        ac (bool): activation checkpointing. Default is False.
        compiled (bool): per-layer compile. Default is True.
        tower_split (bool): the tower's images shared over the TP group (each rank encodes ``1 / tp`` of the
            patches through tower and projector, then the projected features are all-gathered); False: every TP
            rank encodes every image. Default is False.
        hidden (Optional[int]): text hidden size for the collectives' bytes; None for the table's. Default is None.
        kv_heads (Optional[int]): the decoder's KV heads (packed attention's kernel choice); None for the table's.
            Default is None.
        hw (Hardware): the GPU and links. Default is the H200 with the default links.
        scale (Optional[Dict[str, float]]): :func:`part_scales` for a model the table did not measure; None for
            the table's own model. Default is None.

    Returns:
        StageTime: the stage's times.
    """
    h = hidden or table.dims["hidden"]
    k = {"layer": 1.0, "tower": 1.0, "projector": 1.0, "head": 1.0, **(scale or {})}
    c = hw.compute_scale()
    parts: Dict[str, float] = {}
    f_l, b_l = (x * k["layer"] for x in table.layer(tp, mb.batch, mb.seq, ac, compiled))
    b_plain = table.layer(tp, mb.batch, mb.seq, False, compiled)[1] * k["layer"]
    if mb.packed:  # block-causal attention instead of the causal attention the layer entries measured
        kv = max(1, (kv_heads or table.dims["num_kv_heads"]) // tp)
        pf, pb = table.packed_attention(tp, mb.batch, kv, mb.seq)
        f_l, b_l = f_l + pf, b_l + pb + (pf if ac else 0.0)
        b_plain += pb
    act_bytes = mb.tokens * h * 2
    ar = hw.all_reduce_s(act_bytes, tp)
    ar_layer = ar * (1.0 - hw.tp_overlap)  # exposed share of a layer's collectives
    fwd = layers * (f_l * c + 2 * ar_layer)
    bwd = layers * (b_l * c + (4 if ac else 2) * ar_layer)
    # a compiled layer's backward is one AOTAutograd node: input and weight gradients come out together, so a
    # zero-bubble schedule's I action does all of it and W nothing (assumed, not measured)
    w_share = 0.0 if compiled else W_SHARE
    wgt = layers * w_share * b_plain * c
    parts["layers"] = layers * (f_l + b_l) * c
    parts["tp_comm"] = layers * (4 + (2 if ac else 0)) * ar_layer
    if first:
        ef, eb = (x * k["head"] for x in table.embeddings(mb.tokens))
        patches = list(mb.patches)
        tower = table.tower(patches) * k["tower"]
        pf, pb = (x * k["projector"] for x in table.projector(mb.image_tokens))
        if tower_split and tp > 1:
            # each rank encodes about 1/tp of the patches (its share of the images) through tower and projector,
            # then the projected features (bf16, text width) are all-gathered
            tower = tower / tp + hw.all_gather_s(mb.image_tokens * h * 2, tp) / c
            pf, pb = pf / tp, pb / tp
        fwd += (ef + tower + pf) * c + ar  # the vocabulary-parallel embedding's all-reduce
        bwd += (eb + pb) * c
        wgt += (eb + W_SHARE * pb) * c  # the embedding and projector stay eager
        parts.update(embeddings=(ef + eb) * c, tower=tower * c, projector=(pf + pb) * c)
        parts["tp_comm"] += ar
    if last:
        hf, hb = (x * k["head"] for x in table.head(tp, mb.tokens))
        fwd += hf * c
        bwd += hb * c + ar  # the column-wise head's input gradient
        wgt += W_SHARE * hb * c  # the head and loss stay eager (only the loss's CE is compiled)
        parts["head"] = (hf + hb) * c
        parts["tp_comm"] += ar
    return StageTime(fwd, bwd, wgt, parts)


def predict_slice(table: CostTable, kind: str, record: Dict) -> float:
    """What the planner predicts for a measured whole-stage slice of ``bench/step_costs.py`` (on its GPU, TP1).

    Args:
        table (CostTable): the cost table.
        kind (str): "slice_first" (stage 0: embeddings, tower, projector, layers) or "slice_middle" (layers).
        record (Dict): the slice's record (``layers``, ``batch``, ``seq``, ``ac``, and for stage 0 ``image_px``,
            ``image_tokens``).

    Returns:
        float: forward + backward seconds of one micro-batch.
    """
    first = kind == "slice_first"
    patches = tuple(_patches(record)) if first else ()
    mb = MicroBatch(record["batch"], record["seq"], patches, record.get("image_tokens", 0) if first else 0)
    st = stage_time(table, layers=record["layers"], first=first, last=False, mb=mb, ac=record["ac"],
                    compiled=bool(table.data.get("compiled", True)))
    return st.forward + st.backward


# --------------------------------------------------------------------------------------------- schedule replay


def _single_stage_order(cls: type, pp: int, microbatches: int) -> Dict:
    """The action order ``_step_microbatches`` of a single-stage torch schedule runs, per rank.

    GPipe: every forward, then every backward. 1F1B: ``min(m, pp - rank)`` warm-up forwards, then one backward and
    one forward at a time, then the remaining backwards (``Schedule1F1B._step_microbatches``; its informational
    ``pipeline_order`` skips micro-batch 0 on the last rank in torch 2.13, so it is not used).
    """
    from torch.distributed.pipelining.schedules import ScheduleGPipe, _Action, _ComputationType

    fwd, bwd = _ComputationType.FORWARD, _ComputationType.FULL_BACKWARD
    order = {}
    for r in range(pp):
        if issubclass(cls, ScheduleGPipe):
            order[r] = [_Action(r, fwd, i) for i in range(microbatches)] + [
                _Action(r, bwd, i) for i in range(microbatches)]
            continue
        warmup = min(microbatches, pp - r)
        acts = [_Action(r, fwd, i) for i in range(warmup)]
        f = warmup
        for b in range(microbatches):
            acts.append(_Action(r, bwd, b))
            if f < microbatches:
                acts.append(_Action(r, fwd, f))
                f += 1
        order[r] = acts
    return order


def schedule_order(schedule: str, pp: int, microbatches: int, stages_per_rank: Optional[int] = None) -> Dict:
    """The per-rank action order a torch pipeline schedule runs.

    Multi-stage schedules (interleaved, zero-bubble, V) run their ``pipeline_order``, read from the schedule class
    built over parameter-free stand-in stages; single-stage ones (GPipe, 1F1B) run ``_step_microbatches``, whose
    order :func:`_single_stage_order` writes out.

    Args:
        schedule (str): ``pipeline_schedule``.
        pp (int): pipeline ranks.
        microbatches (int): micro-batches per step.
        stages_per_rank (Optional[int]): virtual stages per rank; None for the schedule's default. Default is None.

    Returns:
        Dict: ``{rank: [torch _Action or None, ...]}``.

    Raises:
        ValueError: if the schedule rejects the layout or exposes no action order.
    """
    from torch import nn
    from torch.distributed.pipelining.schedules import PipelineScheduleSingle

    from torchtune_mistral3.training._parallel_dims import (
        default_stages_per_rank,
        get_pipeline_schedule_class,
        stage_ids_for_rank,
        validate_pipeline_schedule,
    )

    cls = get_pipeline_schedule_class(schedule)
    v = stages_per_rank or default_stages_per_rank(cls)
    validate_pipeline_schedule(cls, microbatches, pp, v)
    if issubclass(cls, PipelineScheduleSingle):
        return _single_stage_order(cls, pp, microbatches)
    n = pp * v
    stages = [types.SimpleNamespace(num_stages=n, group_size=pp, group_rank=0, stage_index=s, is_first=s == 0,
                                    is_last=s == n - 1, submod=nn.Module())
              for s in stage_ids_for_rank(cls, 0, pp, v)]
    sched = cls(stages, n_microbatches=microbatches, loss_fn=lambda *a, **k: None)
    order = getattr(sched, "pipeline_order", None)
    if not order:
        raise ValueError(f"{cls.__name__} in this torch exposes no pipeline_order to replay")
    return order


@dataclass
class Replay:
    """The outcome of replaying a schedule.

    Args:
        makespan (float): seconds from the first action to the last.
        busy (Dict[int, float]): compute seconds of each rank.
        finish (Dict[int, float]): when each rank's last action ends.
    """

    makespan: float
    busy: Dict[int, float]
    finish: Dict[int, float]


def replay_schedule(order: Dict, duration: Callable[[int, str], float], send_s: float = 0.0) -> Replay:
    """Run each rank's actions in order, each as soon as the rank is free and its inputs have arrived.

    Dependencies: ``F`` of stage s needs ``F`` of stage s-1 (same micro-batch); ``B``/``I`` of stage s need its
    ``F`` and the ``B``/``I`` of stage s+1; ``W`` needs its ``I``. An input from a stage on another rank arrives
    ``send_s`` after it is made. Composite (overlapped F+B) actions run their parts one after the other; other
    actions (gradient reduction, unshard) take no time.

    Args:
        order (Dict): ``{rank: [action or None]}`` (torch ``_Action`` s: ``stage_index``, ``computation_type``,
            ``microbatch_index``, ``sub_actions``).
        duration (Callable[[int, str], float]): seconds of action kind "F" / "B" / "I" / "W" of a stage.
        send_s (float): seconds to send an activation or gradient to another rank. Default is 0.0.

    Returns:
        Replay: makespan and per-rank busy time.

    Raises:
        ValueError: if the order deadlocks.
    """
    rank_of = {}
    for rank, actions in order.items():
        for a in actions:
            for leaf in _leaves(a) if a is not None else ():
                rank_of[leaf.stage_index] = rank
    last_stage = max(rank_of)
    done: Dict[Tuple[int, str, int], float] = {}
    queues = {r: [a for a in acts if a is not None] for r, acts in order.items()}
    pos = {r: 0 for r in order}
    free = {r: 0.0 for r in order}
    busy = {r: 0.0 for r in order}

    def ready(leaf, rank, made) -> Optional[float]:
        kind, s, i = leaf.computation_type.value, leaf.stage_index, leaf.microbatch_index
        deps = []
        if kind == "F" and s > 0:
            deps.append((s - 1, ("F",)))
        elif kind in ("B", "I"):
            deps.append((s, ("F",)))
            if s < last_stage:
                deps.append((s + 1, ("B", "I")))
        elif kind == "W":
            deps.append((s, ("I",)))
        t = 0.0
        for ds, kinds in deps:
            known = {**done, **made}
            hit = next((known[(ds, k, i)] for k in kinds if (ds, k, i) in known), None)
            if hit is None:
                return None
            t = max(t, hit + (send_s if rank_of[ds] != rank else 0.0))
        return t

    remaining = sum(len(q) for q in queues.values())
    while remaining:
        progressed = False
        for r, q in queues.items():
            while pos[r] < len(q):
                action = q[pos[r]]
                start, spent, made = free[r], 0.0, {}
                for leaf in _leaves(action):
                    kind = leaf.computation_type.value
                    if kind not in ("F", "B", "I", "W"):
                        continue
                    t = ready(leaf, r, made)
                    if t is None:
                        break
                    d = duration(leaf.stage_index, kind)
                    start = max(start, t) + d
                    spent += d
                    made[(leaf.stage_index, kind, leaf.microbatch_index)] = start
                else:
                    t = 0.0
                if t is None:
                    break
                done.update(made)
                busy[r] += spent
                free[r] = start
                pos[r] += 1
                remaining -= 1
                progressed = True
        if not progressed:
            stuck = {r: str(q[pos[r]]) for r, q in queues.items() if pos[r] < len(q)}
            raise ValueError(f"schedule replay deadlocked at {stuck}")
    return Replay(max(free.values()), busy, dict(free))


def _leaves(action) -> List:
    if getattr(action, "sub_actions", None):
        return [leaf for sub in action.sub_actions for leaf in _leaves(sub)]
    return [action]


# --------------------------------------------------------------------------------------------- the layout

# Text tokens of a MedPix sample besides its image: question, answer and chat template (NeMo AutoModel's MedPix CI
# logs ~100 answer tokens per sample; questions run 10-40): the planner's default for real (unpadded) tokens.
TEXT_TOKENS_PER_SAMPLE = 150
# A compile-off layer against a compiled one when the table has no eager entries: the 4-layer slice's eager step
# over its compiled one-chunk step (410.7 / 359.3 ms, bench/results/step_speed_h200_final.json).
EAGER_TIME_FACTOR = 1.143
GPUS_PER_NODE = 8
# Without a measured length distribution, the padded (longest-in-batch) layouts are planned over this many samples
# of the MedPix model (planning/_padding_model.py) at the configs' tokenizer.max_image_size.
MODEL_SAMPLES = 4096
DEFAULT_MAX_IMAGE_SIZE = 1024


def _layer_matmul(dims: Dict[str, int]) -> float:
    q, kv = dims["num_heads"] * dims["head_dim"], dims["num_kv_heads"] * dims["head_dim"]
    return 2 * dims["hidden"] * q + 2 * dims["hidden"] * kv + 3 * dims["hidden"] * dims["ffn"]


def part_scales(table: CostTable, dims: ModelDims) -> Dict[str, float]:
    """Matmul-work ratio of the model's parts to the table's (1 for the model the table measured).

    Args:
        table (CostTable): the table.
        dims (ModelDims): the model's widths.

    Returns:
        Dict[str, float]: ``layer``, ``tower``, ``projector``, ``head`` (also the embedding) factors.
    """
    d = {"hidden": dims.hidden, "ffn": dims.ffn, "num_heads": dims.num_heads, "num_kv_heads": dims.num_kv_heads,
         "head_dim": dims.head_dim}
    t = table.dims
    tower = dims.vision_layers * dims.vision_hidden * (4 * dims.vision_hidden + 3 * dims.vision_ffn)
    t_ffn = t.get("vision_ffn", 8192)
    t_tower = t["vision_layers"] * t["vision_hidden"] * (4 * t["vision_hidden"] + 3 * t_ffn)
    return {"layer": _layer_matmul(d) / _layer_matmul(t), "tower": tower / t_tower,
            "projector": dims.vision_hidden * dims.hidden / (t["vision_hidden"] * t["hidden"]),
            "head": dims.vocab_size * dims.hidden / (t["vocab"] * t["hidden"])}


def microbatch_of(layout: Layout, dims: ModelDims) -> MicroBatch:
    """The layout's micro-batch: ``batch_size / microbatches`` samples of ``images_per_sample`` square images.

    Args:
        layout (Layout): the layout.
        dims (ModelDims): model widths (patch and merge sizes).

    Returns:
        MicroBatch: its shape.

    Raises:
        ValueError: if the batch does not split into the micro-batches.
    """
    if layout.batch_size % layout.microbatches:
        raise ValueError(f"batch_size={layout.batch_size} does not split into "
                         f"pipeline_microbatches={layout.microbatches}")
    b = layout.batch_size // layout.microbatches
    n = b * layout.images_per_sequence  # a pack's images when packed
    side = layout.image_px // dims.patch_size
    return MicroBatch(b, layout.seq_len, (side * side,) * n, n * (side // dims.merge) ** 2, packed=layout.packed)


def cost_balanced_extras(
    table: CostTable, dims: ModelDims, layout: Layout, hw: Hardware = H200, tower_split: bool = False
) -> Dict[str, float]:
    """What stage 0 and the last stage carry besides decoder layers, in decoder layers of this layout's cost.

    Stage 0: embeddings, tower and projector (with their collectives); the last stage: norm, head and loss;
    both as (forward + backward) / one decoder layer's (forward + backward), for the layout's micro-batch.

    Args:
        table (CostTable): measured costs.
        dims (ModelDims): model widths.
        layout (Layout): the layout (TP, micro-batch, activation checkpointing, compile).
        hw (Hardware): GPU and links. Default is the H200.
        tower_split (bool): see :func:`stage_time`. Default is False.

    Returns:
        Dict[str, float]: ``{"first_stage_extra", "last_stage_extra"}`` for ``balanced_layer_split``.
    """
    mb = microbatch_of(layout, dims)
    kw = dict(mb=mb, tp=layout.tp, ac=layout.activation_checkpointing, compiled=layout.compile,
              tower_split=tower_split, hidden=dims.hidden, kv_heads=dims.num_kv_heads, hw=hw,
              scale=part_scales(table, dims))
    one = stage_time(table, layers=1, first=False, last=False, **kw)
    first = stage_time(table, layers=0, first=True, last=False, **kw)
    last = stage_time(table, layers=0, first=False, last=True, **kw)
    per_layer = one.forward + one.backward
    return {"first_stage_extra": (first.forward + first.backward) / per_layer,
            "last_stage_extra": (last.forward + last.backward) / per_layer}


@dataclass
class RankTime:
    """Time of one pipeline rank over a step.

    Args:
        pp_rank (int): pipeline rank.
        stages (List[int]): global stages it holds.
        layers (int): decoder layers it holds.
        forward_s (float): forward seconds of one micro-batch through all its stages.
        backward_s (float): backward seconds of one micro-batch through all its stages.
        optimizer_s (float): its optimizer step.
        busy_s (float): compute and collective seconds in the step.
        busy_fraction (float): ``busy_s / step_s``.
        parts (Dict[str, float]): seconds per part over the step.
    """

    pp_rank: int
    stages: List[int]
    layers: int
    forward_s: float
    backward_s: float
    optimizer_s: float
    busy_s: float
    busy_fraction: float
    parts: Dict[str, float] = field(default_factory=dict)


@dataclass
class StepPlan:
    """Predicted step time of a layout.

    Args:
        layout (Layout): the layout.
        hardware (Hardware): GPU and links.
        table_source (str): the cost table's file.
        provisional (bool): whether that table is the provisional one.
        layer_split (List[int]): decoder layers per stage.
        ranks (List[RankTime]): per pipeline rank.
        pipeline_s (float): one pass of the schedule (all micro-batches of one batch).
        step_s (float): optimizer step: ``grad_accum`` passes + the slowest optimizer step + data-parallel reduction.
        samples (int): samples per step (all data-parallel ranks).
        tokens (int): computed tokens per step (padded).
        real_tokens (float): real tokens per step.
        model_flops (float): model FLOPs per step of the computed tokens.
        tower_split (bool): whether the tower's images are shared over the TP group.
        stage_s (List[float]): forward + backward seconds of one micro-batch through each stage. Default is [].
        padding (str): how the recipe pads this layout's batches: ``longest``, ``max_seq_len`` or ``packs``
            (:func:`~torchtune_mistral3.planning._padding_model.padding_mode`). Default is "max_seq_len".
        padded_seq_len (float): the expected computed length of a sequence (``longest``: the expected longest of
            the batch's samples; else ``seq_len``). Default is 0 (``seq_len``).
    """

    layout: Layout
    hardware: Hardware
    table_source: str
    provisional: bool
    layer_split: List[int]
    ranks: List[RankTime]
    pipeline_s: float
    step_s: float
    samples: int
    tokens: int
    real_tokens: float
    model_flops: float
    tower_split: bool
    stage_s: List[float] = field(default_factory=list)
    padding: str = "max_seq_len"
    padded_seq_len: float = 0.0

    @property
    def world(self) -> int:
        """int: GPUs."""
        return self.layout.tp * self.layout.pp * self.layout.dp

    @property
    def real_tokens_per_s_per_gpu(self) -> float:
        """float: real (unpadded) tokens per second per GPU."""
        return self.real_tokens / self.step_s / self.world

    @property
    def mfu(self) -> float:
        """float: model FLOPs of the computed tokens over the GPUs' dense bf16 peak."""
        return self.model_flops / self.step_s / self.world / (PEAK_TFLOPS[self.hardware.gpu] * 1e12)

    @property
    def real_mfu(self) -> float:
        """float: :attr:`mfu` counting only the real tokens' share of the FLOPs."""
        return self.mfu * self.real_tokens / self.tokens

    def to_dict(self) -> Dict[str, Any]:
        """Dict[str, Any]: everything, JSON-serialisable."""
        from dataclasses import asdict

        return {"layout": asdict(self.layout), "hardware": asdict(self.hardware), "table": self.table_source,
                "provisional_table": self.provisional, "layer_split": self.layer_split, "tower_split": self.tower_split,
                "ranks": [asdict(r) for r in self.ranks], "stage_s": self.stage_s,
                "pipeline_s": self.pipeline_s, "step_s": self.step_s,
                "samples": self.samples, "tokens": self.tokens, "real_tokens": self.real_tokens,
                "padding": self.padding, "padded_seq_len": self.padded_seq_len or self.layout.seq_len,
                "real_tokens_per_s_per_gpu": self.real_tokens_per_s_per_gpu, "mfu": self.mfu,
                "real_mfu": self.real_mfu}


def model_flops_per_step(
    dims: ModelDims, layout: Layout, mb: MicroBatch, samples: int, trains_projector: bool
) -> float:
    """Model FLOPs of one step, as ``bench/_slice.py: step_flops`` counts them, for the whole model.

    Text ``6 (L P_layer + P_head) T + 12 L S (n_h d) T`` (non-causal attention, as NVIDIA's and torchtitan's MFU
    formulas count it), the frozen tower's forward ``2 P_vision p + 4 p^2 d_v L_v`` per image, the projector
    ``6 P_proj t`` when trained.

    Args:
        dims (ModelDims): model widths.
        layout (Layout): the layout.
        mb (MicroBatch): its micro-batch.
        samples (int): samples per step.
        trains_projector (bool): whether the projector is trained.

    Returns:
        float: FLOPs.
    """
    d = {"hidden": dims.hidden, "ffn": dims.ffn, "num_heads": dims.num_heads, "num_kv_heads": dims.num_kv_heads,
         "head_dim": dims.head_dim}
    t = samples * layout.seq_len
    text = 6 * (dims.num_layers * _layer_matmul(d) + dims.vocab_size * dims.hidden) * t
    attn = 12 * dims.num_layers * layout.seq_len * dims.num_heads * dims.head_dim * t
    per_sample = mb.batch
    dv = dims.vision_hidden
    p_vision = dims.vision_layers * (4 * dv * dv + 3 * dv * dims.vision_ffn)
    tower = sum(2 * p_vision * p + 4 * p * p * dv * dims.vision_layers for p in mb.patches) * samples / per_sample
    m2 = dims.merge**2
    p_proj = m2 * dv * dv + dv * dims.hidden + dims.hidden * dims.hidden
    proj = 6 * p_proj * mb.image_tokens * samples / per_sample if trains_projector else 0.0
    return float(text + attn + tower + proj)


def plan_step(
    model,
    layout: Layout,
    table: CostTable,
    hw: Hardware = Hardware(),
    tower_split: bool = False,
    real_tokens_per_sample: Optional[float] = None,
    sample_lengths: Optional[Sequence[int]] = None,
    max_image_size: int = DEFAULT_MAX_IMAGE_SIZE,
) -> StepPlan:
    """Predict the step time of ``model`` trained with ``layout``.

    Sequences are as long as the recipe makes them (:func:`~torchtune_mistral3.planning._padding_model.padding_mode`):
    ``tokenizer.max_seq_len`` (``layout.seq_len``) under pipeline parallelism, compiled TP and packing; elsewhere the
    expected longest of the ``batch_size`` samples of a batch (``batch_size x dp`` under data parallelism, where
    every layer waits for the slowest replica), drawn from ``sample_lengths``.

    Args:
        model (Mistral3FusionModel): the model with its trainable flags (meta device is fine).
        layout (Layout): the layout; its ``stage_extras`` (or the cost-balanced ones) set the default split.
        table (CostTable): measured costs.
        hw (Hardware): GPU and links. Default is an H100 with the default links.
        tower_split (bool): the tower's images shared over the TP group. Default is False.
        real_tokens_per_sample (Optional[float]): real tokens of a sample; None for the image's layout positions
            plus ``TEXT_TOKENS_PER_SAMPLE`` (capped at the sequence), or the mean of ``sample_lengths`` when given.
            Default is None.
        sample_lengths (Optional[Sequence[int]]): token lengths of the data's samples (e.g. written by
            ``bench/e2e.py``); None for ``MODEL_SAMPLES`` samples of the MedPix model where the padding depends on
            them (elsewhere the real tokens keep their default). Default is None.
        max_image_size (int): ``tokenizer.max_image_size`` of the MedPix model's samples. Default is 1024.

    Returns:
        StepPlan: the prediction.
    """
    padding = padding_mode(packed=layout.packed, pp=layout.pp, tp=layout.tp, compile=layout.compile)
    padded_seq_len = float(layout.seq_len)
    if padding == "longest":
        lengths = sample_lengths
        if lengths is None:
            lengths = medpix_sample_lengths(MODEL_SAMPLES, max_image_size)
        if real_tokens_per_sample is None:  # truncated at max_seq_len
            real_tokens_per_sample = float(np.mean(np.minimum(lengths, layout.seq_len)))
        padded_seq_len = expected_longest(lengths, layout.batch_size * max(layout.dp, 1), layout.seq_len)
        layout = Layout(**{**layout.__dict__, "seq_len": max(1, round(padded_seq_len))})
    elif sample_lengths is not None and real_tokens_per_sample is None:
        real_tokens_per_sample = float(np.mean(np.minimum(sample_lengths, layout.seq_len)))
    lo = layout
    dims = model_dims(model)
    if lo.pp > 1 and lo.layer_split is None and lo.stage_extras is None:
        lo = Layout(**{**lo.__dict__, "stage_extras": cost_balanced_extras(table, dims, lo, hw, tower_split)})
    mb = microbatch_of(lo, dims)
    v, split, rank_stages = _stages(lo, dims.num_layers)
    scale = part_scales(table, dims)
    kw = dict(mb=mb, tp=lo.tp, ac=lo.activation_checkpointing, compiled=lo.compile, tower_split=tower_split,
              hidden=dims.hidden, kv_heads=dims.num_kv_heads, hw=hw, scale=scale)
    times = [stage_time(table, layers=n, first=s == 0, last=s == len(split) - 1, **kw) for s, n in enumerate(split)]

    act_bytes = mb.tokens * dims.hidden * 2
    same_node = lo.tp * lo.pp * lo.dp <= GPUS_PER_NODE
    link = hw.nvlink_gbps if same_node else hw.pp_link_gbps
    send_s = act_bytes / (link * 1e9) + COLLECTIVE_LATENCY_S
    if lo.pp > 1:
        order = schedule_order(lo.schedule, lo.pp, lo.microbatches, v)

        def duration(stage: int, kind: str) -> float:
            st = times[stage]
            return {"F": st.forward, "B": st.backward, "I": st.backward - st.weight_backward,
                    "W": st.weight_backward}[kind]

        rep = replay_schedule(order, duration, send_s)
        pipeline_s, busy = rep.makespan, rep.busy
    else:
        pipeline_s = lo.microbatches * (times[0].forward + times[0].backward)
        busy = {0: pipeline_s}

    parts = count_parts(model, lo.tp)
    master = lo.master_bytes or lo.dtype_bytes
    shard = max(lo.dp, 1)
    opt = []
    for stages in rank_stages:
        trained = sum(parts[n].trainable_per_tp_rank for n in stage_part_names(stages, split) if n in parts) / shard
        sec = table.optimizer(trained, master, lo.optimizer_fused) * hw.memory_scale()
        if lo.dp > 1:  # reduce-scatter of the gradients over data parallel, not overlapped with the backward
            # the DP group (ranks tp apart) stays inside one node while tp x dp fits one, else it crosses nodes
            dp_link = hw.nvlink_gbps if lo.tp * lo.dp <= GPUS_PER_NODE else hw.pp_link_gbps
            sec += (lo.dp - 1) / lo.dp * trained * shard * master / (dp_link * 1e9)
        if tower_split and 0 in stages:  # the encoder's gradient shares summed over TP, once per step
            encoder = sum(parts[n].trainable_per_tp_rank for n in ("vision", "projector") if n in parts) / shard
            sec += hw.all_reduce_s(encoder * master, lo.tp) if encoder else 0.0
        opt.append(sec)
    step_s = lo.grad_accum * pipeline_s + max(opt)

    ranks = []
    for r, stages in enumerate(rank_stages):
        f = sum(times[s].forward for s in stages)
        b = sum(times[s].backward for s in stages)
        rank_busy = lo.grad_accum * busy[r] + opt[r]
        rank_parts: Dict[str, float] = {}
        for s in stages:
            for k, x in times[s].parts.items():
                rank_parts[k] = rank_parts.get(k, 0.0) + x * lo.microbatches * lo.grad_accum
        rank_parts["optimizer"] = opt[r]
        ranks.append(RankTime(r, list(stages), sum(split[s] for s in stages), f, b, opt[r], rank_busy,
                              rank_busy / step_s, rank_parts))

    samples = lo.batch_size * lo.grad_accum * lo.dp
    if real_tokens_per_sample is None:
        side = lo.image_px // (dims.patch_size * dims.merge)
        layout_positions = side * (side + 1) * lo.images_per_sample
        real_tokens_per_sample = min(lo.seq_len, layout_positions + TEXT_TOKENS_PER_SAMPLE)
    real_per_sequence = float(real_tokens_per_sample)
    if lo.packed:  # a pack holds images_per_sequence / images_per_sample samples, up to seq_len real tokens
        real_per_sequence = min(lo.seq_len, lo.images_per_sequence / lo.images_per_sample * real_per_sequence)
    trains_projector = bool(parts.get("projector") and parts["projector"].trainable_per_tp_rank)
    return StepPlan(
        layout=lo, hardware=hw, table_source=table.source, provisional=table.provisional, layer_split=list(split),
        ranks=ranks, pipeline_s=pipeline_s, step_s=step_s, samples=samples, tokens=round(samples * padded_seq_len),
        real_tokens=samples * real_per_sequence,
        model_flops=model_flops_per_step(dims, lo, mb, samples, trains_projector), tower_split=tower_split,
        stage_s=[t.forward + t.backward for t in times], padding=padding, padded_seq_len=padded_seq_len,
    )


def format_step_plan(plan: StepPlan) -> str:
    """Human-readable step-time table (one row per pipeline rank) and the totals.

    Args:
        plan (StepPlan): the plan.

    Returns:
        str: the text.
    """
    lo, hw = plan.layout, plan.hardware
    tag = "PROVISIONAL table (no step_costs_h200.json yet)" if plan.provisional else "measured table"
    lines = [
        f"step time on {plan.world} x {hw.gpu.upper()} ({tag}: {Path(plan.table_source).name}; "
        f"TP all-reduce {hw.nvlink_gbps:.0f} GB/s, pipeline link {hw.pp_link_gbps:.0f} GB/s"
        + (f", ASSUMED {hw.tp_overlap:.0%} of the layers' TP collectives hidden" if hw.tp_overlap else "") + ")",
        f"split {plan.layer_split} layers per stage; schedule {lo.schedule}, {lo.microbatches} micro-batch(es) x "
        f"{lo.grad_accum} accumulation; tower {'split over TP' if plan.tower_split else 'on every TP rank'}",
        f"{'rank':>6} {'stages':>8} {'layers':>6} {'F ms/mb':>8} {'B ms/mb':>8} {'optim ms':>8} {'busy':>6}",
    ]
    for r in plan.ranks:
        lines.append(f"  pp{r.pp_rank:<3} {','.join(map(str, r.stages)):>8} {r.layers:>6} {r.forward_s * 1e3:8.1f} "
                     f"{r.backward_s * 1e3:8.1f} {r.optimizer_s * 1e3:8.1f} {r.busy_fraction:6.1%}")
    lines.append(
        f"step {plan.step_s:.3f} s ({lo.grad_accum} x {plan.pipeline_s * 1e3:.1f} ms pipeline + optimizer); "
        f"{plan.samples} {'packs' if plan.layout.packed else 'samples'}, {plan.tokens} tokens computed, "
        f"{plan.real_tokens:.0f} real; "
        f"real tokens/s per GPU {plan.real_tokens_per_s_per_gpu:.0f}; MFU {plan.mfu:.1%} "
        f"(real tokens only: {plan.real_mfu:.1%})"
    )
    if plan.padding == "longest":
        lines.append(f"padding: to the longest sample of each batch, expected {plan.padded_seq_len:.0f} tokens "
                     "(planning/_padding_model.py; plan.sample_lengths gives the data's own lengths)")
    return "\n".join(lines)


def cost_balanced_stage_extras(
    model, *, tp: int, batch_size: int, microbatches: int, seq_len: int, activation_checkpointing: bool,
    compile: bool, tower_split: bool, packed: bool = False,
) -> Dict[str, float]:
    """The recipe's default pipeline split: :func:`cost_balanced_extras` from the shipped table on the H200.

    The micro-batch is ``batch_size / microbatches`` sequences of ``seq_len`` tokens with the planner's default
    images; the planner CLI cuts the same stages for the same config, and ``pipeline_split`` overrides both.

    Args:
        model (Mistral3FusionModel): the model (meta device is fine).
        tp (int): ``tensor_parallel_dim``.
        batch_size (int): ``batch_size``.
        microbatches (int): pipeline micro-batches per batch.
        seq_len (int): ``tokenizer.max_seq_len`` (pipeline batches are padded to it).
        activation_checkpointing (bool): ``enable_activation_checkpointing``.
        compile (bool): ``compile``.
        tower_split (bool): the tower's images shared over the TP group (``tensor_parallel_tower: split``).
        packed (bool): ``dataset.packed`` (``batch_size`` counts packs). Default is False.

    Returns:
        Dict[str, float]: ``first_stage_extra`` / ``last_stage_extra`` for ``build_pipeline``.

    Raises:
        ValueError: if ``batch_size`` does not split into ``microbatches``.
    """
    layout = Layout(tp=tp, batch_size=batch_size, microbatches=microbatches, seq_len=seq_len,
                    activation_checkpointing=activation_checkpointing, compile=compile, packed=packed)
    return cost_balanced_extras(CostTable.load(None), model_dims(model), layout, tower_split=tower_split)
