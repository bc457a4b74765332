"""The Slurm printer refuses what ``tune run`` would refuse on the nodes, before a script is written."""

from torchtune_mistral3.slurm._script import main


def _print(capsys, *args):
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_misspelt_override_is_refused_before_the_script_is_written(capsys):
    code, out, err = _print(capsys, "--config", "mistral3p5_medpix", "--nodes", "8", "tensor_paralel_dim=4")
    assert code == 2 and out == ""
    assert "tensor_paralel_dim (did you mean tensor_parallel_dim?)" in err
    code, out, err = _print(capsys, "--config", "mistral3p5_medpix", "--nodes", "8", "gradient_accumulation_steps=0")
    assert code == 2 and out == "" and "gradient_accumulation_steps=0" in err
    # the planner's own keys are not recipe keys: tune run would refuse them on the nodes
    code, out, err = _print(capsys, "--config", "mistral3p5_medpix", "--nodes", "8", "plan.world_size=64")
    assert code == 2 and "plan.world_size" in err


def test_valid_overrides_are_written_into_the_script(capsys):
    code, out, err = _print(capsys, "--config", "mistral3p5_medpix", "--nodes", "8", "optimizer.lr=1e-5",
                            "dataset.packed=True")
    assert code == 0, err
    assert "CONFIG_OVERRIDES=(optimizer.lr=1e-5 dataset.packed=True)" in out
