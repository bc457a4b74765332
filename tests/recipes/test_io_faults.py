"""Bad checkpoints, configs, tokenizers, training states and disks through the real `tune run` (CPU, gloo).

Every run uses the demo config (see tests/recipes/test_full_finetune_distributed.py) with overrides; each case
stops at setup with a message naming the file or key, or, for a damaged training state, resumes from the
previous one.
"""

import json
import re

import pytest

pytestmark = pytest.mark.integration

DEMO = ("full_finetune_distributed", "--config", "mistral3p5_medpix_demo")
TWO_PROCESSES = ("run", "--nproc_per_node", "2", *DEMO)


def _losses(output_dir):
    (log,) = (output_dir / "logs").glob("*.txt")
    return {int(m[1]): float(m[2]) for m in re.finditer(r"Step (\d+) \| .*?loss:([-+0-9.eE]+)", log.read_text())}


def test_damaged_newest_training_state_on_one_rank_resumes_every_rank_from_the_previous(tune, tmp_path):
    common = [
        "dtype=fp32",
        "run_val_every_n_steps=null",
        "max_steps_per_epoch=2",
        "save_every_n_steps=1",
        "batch_size=1",
    ]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    tune(*TWO_PROCESSES, f"output_dir={straight}", *common)
    states = straight / "training_state"
    assert sorted(p.name for p in states.iterdir()) == ["step_1", "step_2"]
    import shutil

    shutil.copytree(states, resumed / "training_state")
    # only rank 1's file of the newest state is cut short: rank 0 alone could read step_2
    damaged = resumed / "training_state" / "step_2" / "rank_00001.pt"
    damaged.write_bytes(damaged.read_bytes()[:4096])
    proc = tune(*TWO_PROCESSES, f"output_dir={resumed}", *common, "resume_from_checkpoint=True")
    out = proc.stdout + proc.stderr
    assert f"Skipping training state {damaged.parent}: {damaged} cannot be read" in out
    assert "its disk or a copy damaged it" in out
    assert f"Resumed from {resumed / 'training_state' / 'step_1'}: step 1" in out
    a, b = _losses(straight), _losses(resumed)
    assert sorted(b) == [2] and a[2] == b[2]


def _demo_checkpoint(path, **text_config):
    import copy

    from torchtune_mistral3.checkpointing import DEMO_HF_CONFIG, write_demo_checkpoint

    write_demo_checkpoint(str(path))
    cfg = copy.deepcopy(DEMO_HF_CONFIG)
    cfg["text_config"].update(text_config)
    (path / "config.json").write_text(json.dumps(cfg))
    return path


def test_config_with_fewer_layers_than_the_weights_stops_at_load_unless_ignored(tune, tmp_path):
    ckpt = _demo_checkpoint(tmp_path / "ckpt", num_hidden_layers=1)
    run = [*DEMO, f"checkpoint_dir={ckpt}", "prepare_checkpoint=null", "run_val_every_n_steps=null"]
    proc = tune("run", *run, f"output_dir={tmp_path / 'a'}", check=False)
    assert proc.returncode == 1
    assert f"ValueError: checkpoint '{ckpt}' holds 9 weights that no parameter of the model reads" in proc.stderr
    assert "model.language_model.layers.1.self_attn.q_proj.weight" in proc.stderr
    assert "Step 1 |" not in proc.stdout + proc.stderr

    out = tmp_path / "b"
    ignore = r"checkpointer.ignore_unexpected_keys=[model\.language_model\.layers\.1\.]"
    tune("run", *run, f"output_dir={out}", ignore, "max_steps_per_epoch=1")
    saved = json.loads((out / "epoch_0" / "model.safetensors.index.json").read_text())["weight_map"]
    assert not any(k.startswith("model.language_model.layers.1.") for k in saved)
    assert any(k.startswith("model.language_model.layers.0.") for k in saved)


def test_tekken_larger_than_the_embedding_stops_at_setup(tune, tmp_path):
    ckpt = _demo_checkpoint(tmp_path / "ckpt")
    tekken = ckpt / "tekken.json"
    data = json.loads(tekken.read_text())
    data["config"]["default_vocab_size"] = 131072 + 128
    tekken.write_text(json.dumps(data))
    proc = tune("run", *DEMO, f"checkpoint_dir={ckpt}", "prepare_checkpoint=null", f"output_dir={tmp_path / 'out'}",
                check=False)
    assert proc.returncode == 1
    assert f"Tokenizer file {tekken} has a vocabulary of 131200 ids but the model's token embedding has 131072 rows" \
        in proc.stderr
    assert "Step 1 |" not in proc.stdout + proc.stderr


def test_pipeline_padding_beyond_the_position_table_stops_at_setup(tune, tmp_path):
    proc = tune(*TWO_PROCESSES, f"output_dir={tmp_path}", "pipeline_parallel_dim=2", "pipeline_microbatches=2",
                "tokenizer.max_seq_len=4096", "run_val_every_n_steps=null", check=False)
    assert proc.returncode == 1
    assert ("pipeline_parallel_dim > 1 pads every batch to tokenizer.max_seq_len=4096, but the model's position "
            "table holds max_seq_len=2048 (max_position_embeddings") in proc.stderr
    assert "Step 1 |" not in proc.stdout + proc.stderr


def test_failed_training_state_write_names_the_file(tmp_path):
    import os
    import resource
    import subprocess
    import sys

    limit = 100 * 2**20  # the demo's HF checkpoint (43 MB) fits, its training state (200 MB) does not

    def limit_file_size():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torchtune._cli.tune", "run", *DEMO, f"output_dir={out}", "max_steps_per_epoch=1",
         "save_every_n_steps=1", "run_val_every_n_steps=null"],
        capture_output=True, text=True, timeout=900, preexec_fn=limit_file_size,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.returncode == 1
    partial = out / "training_state" / ".step_1.partial" / "rank_00000.pt"
    assert f"OSError: Writing the training state of step 1 failed (is the disk full?): {partial}: RuntimeError" \
        in proc.stderr
    assert "no earlier training state exists" in proc.stderr
    assert list((out / "training_state").iterdir()) == []  # the partial directory is gone
    assert (out / "epoch_0" / "config.json").is_file()  # the HF checkpoint written before it is complete


def test_unwritable_output_dir_fails_once_naming_it(tune, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = tune("run", *DEMO, f"output_dir={blocker / 'run'}", check=False)
    assert proc.returncode == 1
    assert f"NotADirectoryError: Cannot write logs to {blocker / 'run' / 'logs'} (Not a directory)" in proc.stderr
    assert "AttributeError" not in proc.stderr
