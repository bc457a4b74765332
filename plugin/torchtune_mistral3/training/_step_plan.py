"""Step time of a Mistral 3 fine-tuning layout, from a GPU-measured cost table and the schedule's own action order.

Per pipeline rank and micro-batch, the compute time of each stage is summed from a cost table that
``bench/step_costs.py`` measures at full width on one H200 (``step_costs_h200.json`` beside this file; until that
run exists, ``step_costs_h200_provisional.json``, derived from the step-speed runs by :func:`derive_provisional_table`,
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
next stage's B/I, W after I). Zero-bubble I/W actions split a stage's backward by ``W_SHARE``. The step is
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

TABLE_FILE = Path(__file__).with_name("step_costs_h200.json")
PROVISIONAL_FILE = Path(__file__).with_name("step_costs_h200_provisional.json")

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
        data (Dict[str, Any]): the JSON the bench writes (or :func:`derive_provisional_table` derives).
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
                return cls(json.loads(p.read_text()), source=str(p))
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
        if len({(f[1], f[2]) for f in feats}) < 3:  # too few shapes for three terms: proportional to tokens
            feats = [[f[1]] for f in feats]
            x = [t]
        else:
            x = [1.0, t, t * seq]
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
            k = float(self.data.get("eager_factor", 1.0))
            return f * k, b * k
        direct = self._layer_at(tp, batch, seq, ac, compiled)
        if direct is not None:
            return direct
        base = self._layer_at(1, batch, seq, ac, compiled) or self._layer_at(1, batch, seq, ac, True)
        if base is None:
            raise ValueError(f"cost table has no decoder-layer entries at TP1 with ac={ac}")
        shards = sorted(int(k) for k in self.data["layer"] if int(k) > 1 and self._layer_entries(int(k), ac, True))
        loss = 1.0
        if shards and tp > 1:
            k = shards[-1]
            fk, bk = self._layer_at(k, batch, seq, ac, True)
            f1, b1 = self._layer_at(1, batch, seq, ac, True)
            loss = ((fk + bk) * k / (f1 + b1)) ** (math.log(tp) / math.log(k))
        return base[0] / tp * loss, base[1] / tp * loss

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
        coef = _lstsq(feats, [r["forward_s"] for r in rows])
        return float(np.dot(coef, [1.0, sum(patches), sum(p * p for p in patches)]))

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
    """

    batch: int
    seq: int
    patches: Tuple[int, ...] = ()
    image_tokens: int = 0

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
    """

    gpu: str = "h100"
    nvlink_gbps: float = NVLINK_ALLREDUCE_GBPS
    pp_link_gbps: float = PP_LINK_GBPS

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
    hw: Hardware = H200,
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
            patches, then the features are gathered); False: every TP rank encodes every image. Default is False.
        hidden (Optional[int]): text hidden size for the collectives' bytes; None for the table's. Default is None.
        hw (Hardware): the GPU and links. Default is the H200 with the default links.

    Returns:
        StageTime: the stage's times.
    """
    h = hidden or table.dims["hidden"]
    c = hw.compute_scale()
    parts: Dict[str, float] = {}
    f_l, b_l = table.layer(tp, mb.batch, mb.seq, ac, compiled)
    _, b_plain = table.layer(tp, mb.batch, mb.seq, False, compiled)
    act_bytes = mb.tokens * h * 2
    ar = hw.all_reduce_s(act_bytes, tp)
    fwd = layers * (f_l * c + 2 * ar)
    bwd = layers * (b_l * c + (4 if ac else 2) * ar)
    wgt = layers * W_SHARE * b_plain * c
    parts["layers"] = layers * (f_l + b_l) * c
    parts["tp_comm"] = layers * (4 + (2 if ac else 0)) * ar
    if first:
        ef, eb = table.embeddings(mb.tokens)
        patches = list(mb.patches)
        if tower_split and tp > 1:  # each rank encodes about 1/tp of the patches (its share of the images)
            tower = table.tower(patches) / tp + hw.all_gather_s(sum(patches) * table.dims["vision_hidden"] * 2, tp)
        else:
            tower = table.tower(patches)
        pf, pb = table.projector(mb.image_tokens)
        fwd += (ef + tower + pf) * c + ar  # the vocabulary-parallel embedding's all-reduce
        bwd += (eb + pb) * c
        wgt += (eb + W_SHARE * pb) * c
        parts.update(embeddings=(ef + eb) * c, tower=tower * c, projector=(pf + pb) * c)
        parts["tp_comm"] += ar
    if last:
        hf, hb = table.head(tp, mb.tokens)
        fwd += hf * c
        bwd += hb * c + ar  # the column-wise head's input gradient
        wgt += W_SHARE * hb * c
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
    st = stage_time(table, layers=record["layers"], first=first, last=False, mb=mb, ac=record["ac"])
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

    from ._parallel_dims import (
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
