"""`pip install .` (a real wheel, not editable) adds the plugin to `tune`; `pip uninstall` leaves torchtune stock.

The test builds the wheel and installs it with pip into a fresh virtual environment that borrows this
environment's packages (torch, torchtune, ...) through a path file, so nothing is downloaded.
"""

import site
import subprocess
import sys
import venv

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.integration


def _run(cmd, **kw):
    proc = subprocess.run(list(map(str, cmd)), capture_output=True, text=True, timeout=600, **kw)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", out, REPO])
    (whl,) = out.glob("torchtune_mistral3-*.whl")
    return whl


@pytest.fixture
def fresh_env(tmp_path):
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    py = env_dir / "bin" / "python"
    env_site = _run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).strip()
    # Borrow torch/torchtune/... from this environment, but not this environment's start-up hook:
    # a path line in a .pth file does not process that directory's own .pth files.
    (tmp_path / "venv" / env_site.split(str(env_dir) + "/")[1] / "borrowed.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n"
    )
    return py, env_site


def _tune_ls(py):
    return _run([py, "-m", "torchtune._cli.tune", "ls"])


def test_wheel_install_registers_and_uninstall_restores_stock(wheel, fresh_env, tmp_path):
    py, env_site = fresh_env
    stock = _tune_ls(py)
    assert "mistral3p5_medpix" not in stock

    pip = [sys.executable, "-m", "pip", "--python", py]
    # --ignore-installed: this environment (visible through borrowed.pth) may hold the plugin already
    _run([*pip, "install", "--no-deps", "--no-index", "--ignore-installed", wheel])
    files = sorted(p.name for p in __import__("pathlib").Path(env_site).iterdir())
    assert "torchtune_mistral3.pth" in files and "torchtune_mistral3" in files
    installed = _tune_ls(py)
    assert "mistral3p5_medpix_demo" in installed and "ministral3_8b_medpix" in installed
    # configs and the recipe ship inside the wheel (not read from this source checkout)
    located = _run([py, "-c", "import torchtune_mistral3._registry as r; print(r.CONFIGS_DIR, r.RECIPES_DIR)"])
    assert located.split() == [f"{env_site}/torchtune_mistral3/configs", f"{env_site}/torchtune_mistral3/recipes"]
    dest = tmp_path / "cp.yaml"
    _run([py, "-m", "torchtune._cli.tune", "cp", "mistral3p5_medpix", dest])
    assert "pipeline_parallel_dim: 8" in dest.read_text()
    assert "tensor_parallel_dim: 8" in _run([py, "-m", "torchtune._cli.tune", "cat", "mistral3p5_medpix"])

    _run([*pip, "uninstall", "-y", "torchtune-mistral3"])
    assert _tune_ls(py) == stock
