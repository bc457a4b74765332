"""The rehearsal's report: per rank played, stages, parameters, collectives, memory against the planner, reads, save."""

import json
from typing import Any, Dict, List

from torchtune_mistral3.rehearse._role import RoleReport

GIB = 1024**3


def _gib(n: float) -> str:
    return f"{n / GIB:.2f} GiB"


def _collectives(report: RoleReport, phase: str) -> List[str]:
    p = report.phases.get(phase)
    if p is None or not p.collectives:
        return ["      none"]
    rows = sorted(p.collectives.items(), key=lambda kv: -kv[1].bytes)
    return [f"      {k:<28} {c.calls:>6} calls {_gib(c.bytes):>12}" for k, c in rows]


def save_file_names(reports: List[RoleReport], all_stages: bool = True) -> Dict[int, List[str]]:
    """Global shard names per writing rank, numbered as rank 0 numbers them (stage order).

    Args:
        reports (List[RoleReport]): ranks played, one writer per stage among them.
        all_stages (bool): whether every pipeline rank was played; if not, the global numbering is unknown and
            files are named ``stage <s> file <i> of <n>``. Default is True.

    Returns:
        Dict[int, List[str]]: rank -> the files it would write.
    """
    from torchtune_mistral3.checkpointing._writer import shard_name

    writers = sorted((r for r in reports if r.save is not None and r.save.writer), key=lambda r: r.save.stage)
    names = {r.rank: r.save.names for r in writers if r.save.names is not None}
    writers = [r for r in writers if r.save.names is None]
    if not all_stages:
        for r in writers:
            n = len(r.save.files)
            names[r.rank] = [f"stage {r.save.stage} file {i + 1} of {n}" for i in range(n)]
        return names
    total = sum(len(r.save.files) for r in writers)
    first = 0
    for r in writers:
        names[r.rank] = [shard_name(first + i, total) for i in range(len(r.save.files))]
        first += len(r.save.files)
    return names


def _all_stages(result: Any) -> bool:
    return {r.coordinate.get("pp", 0) for r in result.reports} == set(range(result.layout["pp"]))


def format_rehearsal(result: Any) -> str:
    """Human-readable report of a :class:`~torchtune_mistral3.rehearse._rehearse.Rehearsal`.

    Args:
        result (Any): the rehearsal.

    Returns:
        str: the report.
    """
    lay = result.layout
    o = result.planner_options
    lines = [
        f"Rehearsal of {result.config_name}: {result.world_size} ranks = pp {lay['pp']} x dp {lay['dp']} x tp "
        f"{lay['tp']}; {len(result.reports)} rank(s) played (fake tensors, fake process group)",
    ]
    files = save_file_names(result.reports, _all_stages(result))
    for r in result.reports:
        pp = r.coordinate.get("pp", 0)
        planned = result.planned_peak.get(pp)
        gap = f"{(r.train_peak_bytes - planned) / planned:+.1%}" if planned else "n/a"
        lines += [
            "",
            f"rank {r.rank} (pp {pp}, dp {r.coordinate.get('dp', 0)}, tp {r.coordinate.get('tp', 0)}): stages "
            f"{r.stages}, decoder layers " + ", ".join(f"[{a}, {b})" for a, b in r.layers),
            f"  parameters: {r.param_count:,} of the model's (global shapes), {r.local_numel:,} held "
            f"({_gib(r.local_bytes)}), {r.trainable_local_numel:,} trainable",
        ]
        lines += [f"    {n:>4} x {k}" for k, n in r.placements.items()]
        if r.schedule:
            lines += ["  pipeline: " + r.schedule[0]] + [f"    {x}" for x in r.schedule[1:]]
        for phase in ("setup", "step", "save"):
            p = r.phases.get(phase)
            if p is not None:
                lines.append(f"  {phase}: peak {_gib(p.peak_bytes)}, {p.seconds:.0f} s; live near the peak, by the op "
                             "that made it: " + ", ".join(f"{k} {_gib(v)}" for k, v in list(p.at_peak.items())[:6]))
                lines.append("    collectives:")
                lines += _collectives(r, phase)
        gpu = o.get("gpu_gib", 80.0)
        verdict = "" if result.needed_gib(r) <= gpu else "  DOES NOT FIT"
        lines.append(
            f"  peak memory of setup and step {_gib(r.train_peak_bytes)} against the planner's "
            f"{_gib(planned) if planned else 'n/a'} ({gap}); with the save {_gib(r.peak_bytes)}, and the planner's "
            f"margin {o.get('allocator_margin', 0.1):.0%} and reserve {o.get('reserve_gib', 2.0):g} GiB: "
            f"{result.needed_gib(r):.1f} of {gpu:g} GiB{verdict}"
        )
        read_bytes = sum(x.nbytes for x in r.reads)
        lines.append(f"  checkpoint: {len(r.reads)} blocks from {len({x.file for x in r.reads})} files, "
                     f"{_gib(read_bytes)} (planned, not read)")
        if r.save is not None:
            what = (f"writes {files.get(r.rank, [])}" if r.save.writer else
                    f"writes nothing (stage {r.save.stage}'s files are written by its dp 0 / tp 0 rank)")
            lines.append(f"  save: stage {r.save.stage}, {len(r.save.files)} file(s), {_gib(r.save.nbytes)}; {what}")
        lines.append(f"  step: {r.step_metrics.get('samples', '?')} samples, {r.step_metrics.get('input_tokens', '?')}"
                     f" tokens; {r.values_read} values read back from fake tensors (they read as 1)")
    lines += ["", "Not rehearsed / changed for the rehearsal:"] + [f"  - {x}" for x in result.not_rehearsed]
    lines.append(f"Fits {o.get('gpu_gib', 80.0):g} GiB: {'yes' if result.fits else 'NO'}")
    return "\n".join(lines)


def rehearsal_to_json(result: Any) -> str:
    """JSON of a rehearsal (numbers in bytes).

    Args:
        result (Any): the rehearsal.

    Returns:
        str: the JSON text.
    """
    files = save_file_names(result.reports, _all_stages(result))
    ranks = []
    for r in result.reports:
        ranks.append({
            "rank": r.rank, "coordinate": r.coordinate, "stages": r.stages, "layers": r.layers,
            "param_count": r.param_count, "local_numel": r.local_numel, "local_bytes": r.local_bytes,
            "placements": r.placements, "peak_bytes": r.peak_bytes, "train_peak_bytes": r.train_peak_bytes,
            "planned_peak_bytes": result.planned_peak.get(r.coordinate.get("pp", 0)),
            "phases": {k: {"peak_bytes": p.peak_bytes, "seconds": p.seconds, "at_peak": p.at_peak,
                           "collectives": {c: {"calls": v.calls, "bytes": v.bytes} for c, v in p.collectives.items()}}
                       for k, p in r.phases.items()},
            "reads": len(r.reads), "read_bytes": sum(x.nbytes for x in r.reads),
            "save_files": files.get(r.rank, []), "values_read": r.values_read, "schedule": r.schedule,
        })
    return json.dumps({"config": result.config_name, "world_size": result.world_size, "layout": result.layout,
                       "fits": result.fits, "planner": result.planner_options, "ranks": ranks,
                       "not_rehearsed": result.not_rehearsed}, indent=1)
