"""What the cluster tests share: the demo run they all make, and reading its logged losses."""

import re
import socket
from pathlib import Path
from typing import Dict

# the demo config, 6 steps of one sample per rank on 2 ranks; every launch below must give the same losses
DEMO = ["--config", "mistral3p5_medpix_demo"]
OVERRIDES = ["batch_size=1", "max_steps_per_epoch=6", "run_val_every_n_steps=null"]
STEPS = list(range(1, 7))


def logged_losses(output_dir: Path) -> Dict[int, float]:
    """Step -> loss from every DiskLogger file of a run (a resumed run adds one); a step logged twice must agree."""
    losses: Dict[int, float] = {}
    for log in sorted((output_dir / "logs").glob("log_*.txt")):
        for m in re.finditer(r"Step (\d+) \| .*?loss:([-+0-9.eE]+)", log.read_text()):
            step, loss = int(m[1]), float(m[2])
            assert losses.setdefault(step, loss) == loss, (log, step)
    return losses


def losses_per_log(output_dir: Path) -> list:
    """Step -> loss of each DiskLogger file, oldest first (one file per attempt)."""
    out = []
    for log in sorted((output_dir / "logs").glob("log_*.txt"), key=lambda p: p.stat().st_mtime):
        out.append(
            {int(m[1]): float(m[2]) for m in re.finditer(r"Step (\d+) \| .*?loss:([-+0-9.eE]+)", log.read_text())}
        )
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
