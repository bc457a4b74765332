r"""Rehearse a multi-GPU launch on one CPU machine, before booking the GPUs.

    python -m torchtune_mistral3.rehearse --config mistral3p5_medpix --world-size 64 \
        checkpoint_dir=/data/Mistral-Medium-3.5-128B

For the ranks of the config's layout (by default one per pipeline rank, see :func:`representative_ranks`),
each in a fresh process, the recipe ``tune run`` would run executes its own ``__init__`` and ``setup`` (mesh,
TP plan with sequence parallelism and the tower split, pipeline stages, FSDP2, optimizer, the checkpoint
loader's per-rank reads), one full optimizer step (every micro-batch through the real pipeline schedule, the
loss, clipping, the optimizer) and the save's plan, on fake tensors of the real shapes and torch's fake
process group. No checkpoint data is read: only the safetensors headers, the index, config.json and the
tokenizer. Per rank it reports stages and layers, parameters held, the collectives of each phase, and peak
memory against the memory planner.
"""

from torchtune_mistral3.rehearse._fixture import MM35_HF_CONFIG, write_header_only_checkpoint
from torchtune_mistral3.rehearse._rehearse import Rehearsal, RehearsalError, rehearse, representative_ranks
from torchtune_mistral3.rehearse._report import format_rehearsal, rehearsal_to_json

__all__ = [
    "MM35_HF_CONFIG",
    "Rehearsal",
    "RehearsalError",
    "format_rehearsal",
    "rehearsal_to_json",
    "rehearse",
    "representative_ranks",
    "write_header_only_checkpoint",
]
