"""Rehearse a config's launch: pick the ranks to play, play them, check the reads, compare with the planner."""

import logging
import multiprocessing
import tempfile
import traceback
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from torchtune_mistral3.rehearse._config import CHANGES, rehearsal_config
from torchtune_mistral3.rehearse._fake import StageMetaMailbox
from torchtune_mistral3.rehearse._role import RoleReport, play_rank, rehearsal_recipe_class
from torchtune_mistral3.training._parallel_dims import ParallelDims, WorldSizeError

GIB = 1024**3


class RehearsalError(RuntimeError):
    """The rehearsed launch would fail; the message names the rank (and key, file) where it fails."""


@dataclass
class Rehearsal:
    """The outcome of a rehearsal.

    Attributes:
        config_name (str): the config rehearsed.
        world_size (int): ranks of the job.
        layout (Dict[str, int]): pp, dp and tp degrees.
        reports (List[RoleReport]): one per rank played.
        planned_peak (Dict[int, float]): the memory planner's peak per pipeline rank, bytes.
        planner_options (Dict[str, float]): gpu_gib, allocator margin and reserve the fit is judged with.
        not_rehearsed (List[str]): what the rehearsal changed or could not run, with why.
    """

    config_name: str
    world_size: int
    layout: Dict[str, int]
    reports: List[RoleReport] = field(default_factory=list)
    planned_peak: Dict[int, float] = field(default_factory=dict)
    planner_options: Dict[str, float] = field(default_factory=dict)
    not_rehearsed: List[str] = field(default_factory=list)

    def needed_gib(self, report: RoleReport) -> float:
        """float: the rank's measured peak with the planner's allocator margin and reserve, GiB."""
        o = self.planner_options
        return report.peak_bytes / GIB * (1 + o.get("allocator_margin", 0.1)) + o.get("reserve_gib", 2.0)

    @property
    def fits(self) -> bool:
        """bool: whether every played rank's measured peak (with margin and reserve) fits the GPU."""
        return all(self.needed_gib(r) <= self.planner_options.get("gpu_gib", 80.0) for r in self.reports)


def representative_ranks(pp: int, dp: int, tp: int) -> List[int]:
    """One rank per pipeline rank: coordinate (pp, dp 0, tp 0), in pipeline order.

    Within a pipeline rank, every TP rank holds a same-shaped shard of the same modules (the TP plan divides
    heads and widths evenly or fails) and runs the same collectives; data-parallel ranks differ only in which
    rows they load, and FSDP2 pads shards to equal sizes. TP rank 0 also encodes the largest share of a
    micro-batch's images under ``tensor_parallel_tower=split`` (``ceil(n / tp)``), the busiest of the group.
    Rank 0 of each pipeline rank is also the one that writes that stage's checkpoint files.

    Args:
        pp (int): pipeline degree.
        dp (int): data-parallel degree.
        tp (int): tensor-parallel degree.

    Returns:
        List[int]: global ranks (the mesh is ``("pp", "dp", "tp")``, row-major).
    """
    return [p * dp * tp for p in range(pp)]


def _recipe_name(cfg: DictConfig, recipe: Optional[str]) -> str:
    return recipe or ("lora_finetune_distributed" if "lora" in str(cfg.model.get("_component_", ""))
                      else "full_finetune_distributed")


def _play_in_child(text: str, name: str, rank: int, world_size: int, forward_meta: Any, setup_only: bool):
    """Play one rank in this (fresh) process; return its report, the pipeline metadata it sent, or the error."""
    logging.getLogger("torchtune").setLevel(logging.WARNING)
    cfg = OmegaConf.create(text)
    recipe_cls, stock = _recipe_classes(name)
    mailbox = StageMetaMailbox()
    mailbox.forward = forward_meta
    try:
        report = play_rank(recipe_cls, stock, cfg, rank, world_size, mailbox, setup_only=setup_only)
    except Exception as e:  # the parent names the rank; the traceback goes to this process's stderr
        traceback.print_exc()
        return None, mailbox.forward, f"{type(e).__name__}: {e}"
    return report, mailbox.forward, None


def _recipe_classes(name: str):
    from torchtune_mistral3.finetune import Mistral3FullFinetuneRecipe, Mistral3LoRAFinetuneRecipe
    from torchtune_mistral3.training import load_stock_recipe

    base = Mistral3LoRAFinetuneRecipe if name.startswith("lora") else Mistral3FullFinetuneRecipe
    return rehearsal_recipe_class(base), load_stock_recipe("full_finetune_distributed")


def check_reads_cover_checkpoint(cfg: DictConfig, reports: Sequence[RoleReport]) -> None:
    """Raise unless the ranks played read, together, every weight of the checkpoint.

    Call it when one rank per pipeline rank was played: each weight belongs to one stage, and the TP rank 0 of
    that stage reads a block of it.

    Args:
        cfg (DictConfig): the rehearsal config.
        reports (Sequence[RoleReport]): the ranks played.

    Raises:
        RehearsalError: naming the unread keys and their files.
    """
    from torchtune_mistral3.checkpointing import HFCheckpointReader

    reader = HFCheckpointReader(cfg.checkpointer.checkpoint_dir,
                                ignore_unexpected_keys=cfg.checkpointer.get("ignore_unexpected_keys", None) or ())
    read = {r.key for rep in reports for r in rep.reads}
    unread = [k for k in reader.keys() if k not in read]
    if unread:
        shown = ", ".join(f"'{reader.info(k).hf_key}' ({reader.info(k).path.name})" for k in unread[:8])
        raise RehearsalError(
            f"no rank reads {len(unread)} weights of '{reader.checkpoint_dir}': {shown}"
            f"{' ...' if len(unread) > 8 else ''}. A pipeline stage split or a model that leaves layers out would "
            "train without them."
        )


def planner_peaks(cfg: DictConfig, world_size: int) -> tuple:
    """The memory planner's peak per pipeline rank (bytes) for the rehearsed config, and its fit options."""
    from omegaconf import OmegaConf

    from torchtune_mistral3.planning import plan_config

    plan_cfg = OmegaConf.merge(cfg, OmegaConf.create({"plan": {"world_size": world_size, "time": False}}))
    plan, options = plan_config(plan_cfg)
    return {r.pp_rank: r.peak for r in plan.ranks}, options


def rehearse(
    cfg: DictConfig,
    config_name: str,
    world_size: Optional[int] = None,
    ranks: Optional[Sequence[int]] = None,
    recipe: Optional[str] = None,
    workdir: Optional[str] = None,
    setup_only: bool = False,
) -> Rehearsal:
    """Rehearse ``cfg``'s launch at ``world_size`` ranks (see the package docstring).

    Args:
        cfg (DictConfig): the config with the user's overrides (``rehearse.*`` and ``plan.*`` keys allowed).
        config_name (str): its name, for the report.
        world_size (Optional[int]): ranks of the job. Default is None: TP x PP (data parallel 1).
        ranks (Optional[Sequence[int]]): ranks to play. Default is None: :func:`representative_ranks`.
        recipe (Optional[str]): ``full_finetune_distributed`` or ``lora_finetune_distributed``. Default is None:
            the LoRA recipe for a LoRA model builder.
        workdir (Optional[str]): where the synthetic rows and logs go. Default is None: a temporary directory.
        setup_only (bool): play ``setup`` only: the pre-flight of a checkpoint (every rank's reads planned and
            checked against the headers, no key left unread, tokenizer against config.json). Default is False.

    Returns:
        Rehearsal: the per-rank reports, the planner's figures and what was not rehearsed.

    Raises:
        RehearsalError: where the launch would fail (the message names the rank).
    """
    try:
        dims = ParallelDims.from_config(cfg, world_size or None)
    except WorldSizeError as e:
        raise RehearsalError(f"world size {e.world_size} is not a multiple of tensor_parallel_dim x "
                             f"pipeline_parallel_dim = {e.tp} x {e.pp}") from None
    world_size, pp, dp, tp = dims.world_size, dims.pp, dims.dp, dims.tp
    result = Rehearsal(config_name, world_size, {"pp": pp, "dp": dp, "tp": tp})
    if setup_only:
        result.not_rehearsed.append("setup only (pre-flight): no step, no save plan")
    if cfg.get("compile", False):
        result.not_rehearsed.append("compile=True: blocks ran eagerly (see docs/cluster.md)")
    result.not_rehearsed += [f"{what}: {why}" for what, why in CHANGES]
    recipe_name = _recipe_name(cfg, recipe)
    played = list(ranks) if ranks is not None else representative_ranks(pp, dp, tp)
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        rcfg = rehearsal_config(cfg, Path(tmp), world_size)
        text = OmegaConf.to_yaml(rcfg)
        forward_meta = None
        context = multiprocessing.get_context("spawn")
        for rank in sorted(played, key=lambda r: (r // (dp * tp), r)):  # pipeline order, see StageMetaMailbox
            # one fresh process per rank: torch's process-group and mesh registries start empty, as on a node
            with ProcessPoolExecutor(1, mp_context=context) as pool:
                report, forward_meta, error = pool.submit(
                    _play_in_child, text, recipe_name, rank, world_size, forward_meta, setup_only
                ).result()
            if error is not None:
                coord = f"pp {rank // (dp * tp)}, dp {rank // tp % dp}, tp {rank % tp}"
                raise RehearsalError(f"rank {rank} ({coord}) of {world_size} fails: {error}")
            result.reports.append(report)
        if {r.coordinate.get("pp", 0) for r in result.reports} == set(range(pp)):  # every stage was played
            check_reads_cover_checkpoint(rcfg, result.reports)
        planner_cfg = rcfg.copy()
        result.planned_peak, options = planner_peaks(planner_cfg, world_size)
    result.planner_options = {k: options[k] for k in ("gpu_gib", "allocator_margin", "reserve_gib")}
    return result
