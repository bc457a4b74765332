"""`tune run` builds the validation set only when validation runs, and names it (`dataset_val`) when it is bad."""

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from torchtune_mistral3.datasets import MEDPIX_SAMPLE_DIR

pytestmark = pytest.mark.integration


@pytest.fixture
def bad_validation_file(tmp_path):
    """The sample's validation rows with an empty answer in row 3."""
    table = pq.read_table(MEDPIX_SAMPLE_DIR / "validation.parquet")
    answers = table.column("answer").to_pylist()
    answers[3] = " "
    index = table.schema.get_field_index("answer")
    path = tmp_path / "validation.parquet"
    pq.write_table(table.set_column(index, table.schema.field(index), pa.array(answers)), path)
    return path


def _run(tune, out, data_files, *overrides):
    return tune(
        "run", "full_finetune_distributed", "--config", "mistral3p5_medpix_demo", f"output_dir={out}",
        "max_steps_per_epoch=1", "batch_size=1", "dataset_val=torchtune_mistral3.datasets.medpix_dataset",
        "dataset_val.source=parquet", f"dataset_val.data_files={data_files}", "dataset_val.split_by_case=False",
        "dataset_val.split=train",
        *overrides, check=False,
    )


def test_a_bad_validation_set_is_named_and_not_built_when_validation_is_off(tune, tmp_path, bad_validation_file):
    proc = _run(tune, tmp_path / "on", bad_validation_file, "run_val_every_n_steps=1")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert "ValueError: dataset_val: parquet split 'train' row 3: column 'answer' is empty" in last, last
    # validation off: the same file is never read, the run trains and saves
    proc = _run(tune, tmp_path / "off", bad_validation_file, "run_val_every_n_steps=null")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "off" / "epoch_0" / "config.json").is_file()
    assert "row 3" not in proc.stderr
