"""A picture of a run: training and validation loss, and the learning rate, against step, as a PNG.

Reads the run's metric log, the text files torchtune's ``DiskLogger`` writes under ``<output_dir>/logs``
(``Step N | loss:... lr:... val_loss:...``; a resumed run adds a file, later lines win)::

    pip install 'torchtune-mistral3[plot]'
    python -m torchtune_mistral3.plot /tmp/torchtune/mistral3p5_medpix_demo        # -> .../loss_curve.png
    python -m torchtune_mistral3.plot <output_dir> --out run.png
"""

import argparse
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple, Union

_LINE = re.compile(r"^Step (\d+) \| (.*)$")
_PAIR = re.compile(r"(\S+?):(\S+)")
DEFAULT_PNG = "loss_curve.png"


def read_metric_log(output_dir: Union[str, Path]) -> Dict[str, List[Tuple[int, float]]]:
    """Every metric of the run's DiskLogger files, as (step, value) pairs sorted by step.

    Args:
        output_dir (Union[str, Path]): the run's ``output_dir`` (or its ``logs`` folder).

    Returns:
        Dict[str, List[Tuple[int, float]]]: metric name -> points.

    Raises:
        FileNotFoundError: if there is no DiskLogger ``*.txt`` file, naming where it looked and the config key.
    """
    root = Path(output_dir)
    logs = root if root.name == "logs" else root / "logs"
    files = sorted(logs.glob("*.txt"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise FileNotFoundError(
            f"no metric log (*.txt) in {logs}: the run must log with metric_logger._component_="
            "torchtune.training.metric_logging.DiskLogger and metric_logger.log_dir=${output_dir}/logs"
        )
    by_step: Dict[str, Dict[int, float]] = {}
    for path in files:
        for line in path.read_text().splitlines():
            match = _LINE.match(line.strip())
            if match is None:
                continue
            step = int(match[1])
            for key, value in _PAIR.findall(match[2]):
                try:
                    by_step.setdefault(key, {})[step] = float(value)
                except ValueError:
                    continue
    return {k: sorted(v.items()) for k, v in by_step.items()}


def plot_run(output_dir: Union[str, Path], out: Optional[Union[str, Path]] = None) -> Path:
    """Draw loss (training, and validation where logged) and learning rate against step.

    Args:
        output_dir (Union[str, Path]): the run's ``output_dir``.
        out (Optional[Union[str, Path]]): the PNG to write. Default is ``<output_dir>/loss_curve.png``.

    Returns:
        Path: the PNG written.

    Raises:
        ValueError: if the log has no ``loss``.
        ImportError: if matplotlib is missing (``pip install 'torchtune-mistral3[plot]'``).
    """
    metrics = read_metric_log(output_dir)
    if "loss" not in metrics:
        raise ValueError(f"the metric log of {output_dir} has no 'loss' (keys: {sorted(metrics)})")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise ImportError("plotting needs matplotlib: pip install 'torchtune-mistral3[plot]'") from e

    rows = 2 if "lr" in metrics else 1
    fig, axes = plt.subplots(rows, 1, figsize=(7, 3.2 * rows), sharex=True, squeeze=False)
    ax = axes[0][0]
    steps, values = zip(*metrics["loss"])
    ax.plot(steps, values, label="train loss", color="tab:blue")
    if "val_loss" in metrics:
        steps, values = zip(*metrics["val_loss"])
        ax.plot(steps, values, "o-", label="validation loss", color="tab:orange")
    ax.set_ylabel("loss (token mean)")
    ax.set_title(str(Path(output_dir).resolve().name))
    ax.grid(alpha=0.3)
    ax.legend()
    if rows == 2:
        ax = axes[1][0]
        steps, values = zip(*metrics["lr"])
        ax.plot(steps, values, color="tab:green")
        ax.set_ylabel("learning rate")
        ax.grid(alpha=0.3)
    axes[-1][0].set_xlabel("step")
    fig.tight_layout()
    target = Path(out) if out is not None else Path(output_dir) / DEFAULT_PNG
    fig.savefig(target, dpi=100)
    plt.close(fig)
    return target


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Command line: ``python -m torchtune_mistral3.plot <output_dir> [--out PNG]``.

    Args:
        argv (Optional[Sequence[str]]): arguments; None reads ``sys.argv``. Default is None.

    Returns:
        int: 0 on success, 1 with a message on stderr otherwise.
    """
    parser = argparse.ArgumentParser(prog="python -m torchtune_mistral3.plot", description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="the run's output_dir (holds logs/*.txt)")
    parser.add_argument("--out", default=None, help=f"PNG to write (default <output_dir>/{DEFAULT_PNG})")
    args = parser.parse_args(argv)
    try:
        path = plot_run(args.output_dir, args.out)
    except (FileNotFoundError, ValueError, ImportError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
