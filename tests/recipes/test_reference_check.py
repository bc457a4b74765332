"""reference_check: its default tolerance follows the run's dtype, and a missing extra is named at once."""

import json
import subprocess
import sys

import pytest
from torchtune_mistral3 import reference_check


def test_missing_transformers_names_the_reference_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed: find_spec gives None
    with pytest.raises(ImportError, match=r"needs transformers \(not installed\).*pip install '\.\[reference\]'"):
        reference_check.main(["--config", "mistral3p5_medpix_demo", f"output_dir={tmp_path}"])


def test_bf16_run_passes_under_the_default_tolerance(tune, tmp_path):
    overrides = [f"output_dir={tmp_path / 'run'}", "dtype=bf16", "batch_size=2", "shuffle=False",
                 "max_steps_per_epoch=1", "run_val_every_n_steps=null"]
    tune("run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo", *overrides)
    proc = subprocess.run(
        [sys.executable, "-m", "torchtune_mistral3.reference_check", "--config", "mistral3p5_medpix_demo", *overrides],
        capture_output=True, text=True, timeout=600,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    print(result)
    assert proc.returncode == 0 and result["match"], result
    assert result["dtype"] == "bf16" and result["tolerance"] == 1e-3 and result["label_tokens"] > 0
