"""Regenerate the figures the docs quote from code and shipped results, so they cannot drift.

    python scripts/doc_figures.py            # from the code and bench/results (seconds)
    python scripts/doc_figures.py --demo     # also runs the demo commands the docs quote (minutes on a CPU)

prints each figure with the doc that quotes it; ``tests/test_docs.py`` checks the docs against these functions.
"""

import argparse
import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, Sequence

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results"
GIB = 2**30


def training_state_sizes() -> Dict[str, float]:
    """``docs/cluster.md``: the 128B model's parameters (B), its BF16 export (GB), one training state (TB).

    A training state holds fp32 master weights and Adam's two fp32 moments, 12 bytes per parameter; the
    ``output_dir`` needs two states and the export.
    """
    from torchtune_mistral3.planning._memory_plan import build_meta_model

    n = sum(p.numel() for p in build_meta_model(None, size="mistral3p5_128b").parameters())
    state = 12 * n / 1e12
    export = 2 * n / 1e9
    return {"params_b": n / 1e9, "export_gb": export, "state_tb": state, "output_dir_tb": 2 * state + export / 1e3}


def memory_check_rows() -> List[str]:
    """``docs/performance.md``: the planner's peak against the H200's, for every run of the present model.

    These are the runs ``tests/planning/test_memory_plan.py::test_prediction_within_10_percent_of_h200_peak``
    asserts.
    """
    sys.path.insert(0, str(REPO / "bench"))
    from _slice import slice_hf_config
    from torchtune_mistral3.planning._memory_plan import Layout, build_meta_model, plan_memory

    rows = []
    for path in sorted(RESULTS.glob("step_speed_h200*.json")):
        run = json.loads(path.read_text())
        if run.get("model_revision") != "native-gqa":
            continue
        with tempfile.TemporaryDirectory() as d:
            (Path(d) / "config.json").write_text(json.dumps(slice_hf_config(run["layers"])))
            model = build_meta_model(d, max_seq_len=4096)
        for case in run["cases"]:
            for name, r in case["variants"].items():
                if not name.startswith("plugin") or "peak_allocated_gib" not in r:
                    continue
                switches = name.split("_")[1:]
                lo = Layout(seq_len=case["seq_len"], batch_size=case["batch_size"], compile="compile" in switches,
                            activation_checkpointing="ac" in switches, optimizer="adamw", optimizer_fused=True,
                            num_output_chunks=1 if "c1" in switches else 8, image_px=run["image_px"])
                (rank,) = plan_memory(model, lo).ranks
                predicted, measured = rank.peak / GIB, r["peak_allocated_gib"]
                rows.append(f"| `{path.name}` | {run['layers']} layers, {case['seq_len']} x {case['batch_size']} | "
                            f"`{name}` | {predicted:.2f} | {measured:.2f} | {100 * (predicted / measured - 1):+.1f}% |")
    return rows


def lora_scaled_mm_speedup() -> float:
    """The LoRA configs' comment: ``fp8_matmul: scaled_mm`` against ``dequantize``, median step time on the H200."""
    rows = {r["variant"]: r["median_step_s"] for r in json.loads((RESULTS / "lora_h200.json").read_text())["rows"]}
    return rows["fp8_dequantize"] / rows["fp8_scaled_mm"]


# docs/parallelism.md: the demo's first 3 steps, one process
DEMO_STEPS = ["dtype=fp32", "shuffle=False", "max_steps_per_epoch=3", "batch_size=2"]


def tune_run(*args: str) -> subprocess.CompletedProcess:
    """``tune run ARGS`` with this interpreter, failing loudly."""
    proc = subprocess.run([sys.executable, "-m", "torchtune._cli.tune", "run", *args], capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"tune run {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc


def logged_steps(output_dir: Path) -> Dict[int, Dict[str, float]]:
    """Every ``Step N | key:value ...`` line of a run's DiskLogger file, by step."""
    (log,) = (Path(output_dir) / "logs").glob("*.txt")
    return {int(m[1]): {k: float(v) for k, v in re.findall(r"(\w+):([-+0-9.eE]+)", m[2])}
            for m in re.finditer(r"Step (\d+) \| (.*)", log.read_text())}


def demo_losses_line(output_dir: Path) -> str:
    """``docs/parallelism.md``'s sentence of the demo's 3 steps (``tune run ... DEMO_STEPS``)."""
    steps = logged_steps(output_dir)
    losses = " / ".join(f"{steps[s]['loss']:.6f}" for s in sorted(steps))
    norms = " / ".join(f"{steps[s]['grad_norm']:.5f}" for s in sorted(steps))
    return f"logged {losses}, with grad norms {norms}"


def demo_eval_lines(eval_dir: Path, stdout: str) -> List[str]:
    """``docs/evaluation.md``'s validation loss sentence and table of the demo's evaluation."""
    results = json.loads((Path(eval_dir) / "medpix_eval.json").read_text())
    loss = (f"a validation loss of {results['val_loss']:.4f} (perplexity {results['perplexity']:.0f}) over "
            f"{results['label_tokens']} answer tokens")
    table = [line for line in stdout.splitlines() if re.match(r"^\s*(group|overall|[A-Z]{2,}) +(n|\d+) ", line)]
    return [loss, *table]


def run_demo(out: Path) -> Sequence[str]:
    """Run the demo commands the docs quote into ``out``; return the lines to quote."""
    tune_run("full_finetune_distributed", "--config", "mistral3p5_medpix_demo", f"output_dir={out / 'three'}",
             *DEMO_STEPS)
    tune_run("full_finetune_distributed", "--config", "mistral3p5_medpix_demo", f"output_dir={out / 'demo'}")
    proc = tune_run("medpix_eval", "--config", "mistral3p5_medpix_demo_eval",
                    f"checkpoint_dir={out / 'demo' / 'epoch_0'}", f"output_dir={out / 'eval'}")
    return [demo_losses_line(out / "three"), *demo_eval_lines(out / "eval", proc.stdout)]


def main() -> None:
    """Print every figure with the doc that quotes it."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", action="store_true", help="also run the demo commands (minutes)")
    args = parser.parse_args()
    sizes = training_state_sizes()
    print("docs/cluster.md: {params_b:.2f} B parameters, export {export_gb:.0f} GB, state {state_tb:.2f} TB, "
          "output_dir {output_dir_tb:.2f} TB".format(**sizes))
    print("docs/performance.md, check against the H200:")
    print("\n".join(memory_check_rows()))
    print(f"configs/*lora*.yaml: scaled_mm {lora_scaled_mm_speedup():.2f}x faster than dequantize")
    if args.demo:
        with tempfile.TemporaryDirectory() as d:
            print("docs/parallelism.md, docs/evaluation.md (the demo):")
            print("\n".join(run_demo(Path(d))))


if __name__ == "__main__":
    main()
