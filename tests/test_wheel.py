"""The package works once installed: build the wheel, install it into a fresh virtual environment (offline, reusing
the dependencies already installed here), and from a temporary directory load the default DLM and generate."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO), "--no-deps", "--no-build-isolation",
                    "--no-index", "-q", "-w", str(out)], check=True, cwd=out)
    (path,) = out.glob("dlm_studio-*.whl")
    return path


def test_wheel_holds_the_package_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for needed in ("dlm/assets/smollm2-135m-dlm/adapter_model.safetensors",
                   "dlm/assets/smollm2-135m-dlm/dlm_config.json",
                   "dlm/assets/smollm2-135m-dlm/draft/adapter_model.safetensors", "dlm/examples/analogies.txt",
                   "dlm/examples/infill/01-fisherman.txt",
                   "train/configs/tiny-cpu.yaml", "train/accelerate/cpu-2proc.yaml", "train/data/tiny_corpus.txt",
                   "dlm/csrc/small_rows.cpp"):
        assert needed in names, needed
    entry = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    scripts = zipfile.ZipFile(wheel).read(entry).decode()
    for script in ("dlm = dlm.cli:main", "dlm-studio = app.launch:main", "dlm-train", "dlm-eval", "dlm-bench"):
        assert script in scripts


def test_installed_wheel_loads_the_default_model_from_anywhere(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    py = venv / "bin" / "python"
    pip = [str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-index", str(wheel)]
    subprocess.run(pip, check=True)
    # reuse the dependencies installed here (torch, transformers, ...) without their editable copy of this project
    site = Path(subprocess.check_output([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
    env["HF_HUB_OFFLINE"] = "1"
    env["DLM_CPU_KERNEL"] = "on"   # the small-row kernel builds from the installed source where it applies
    code = ("import dlm, pathlib; assert 'site-packages' in dlm.__file__, dlm.__file__; "
            "from dlm import cpu_kernel; "
            "m = dlm.load('smollm2-135m-dlm', device='cpu'); "
            "assert cpu_kernel.installed(m.base) > 0 or not cpu_kernel.cpu_supports(), cpu_kernel.status(); "
            "g = m.generate('Once upon a time', max_new_tokens=4, steps=2); "
            "assert len(g.token_ids) >= 1 and g.nfe >= 1; print('OK', repr(g.text))")
    done = subprocess.run([str(py), "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0 and "OK" in done.stdout, done.stderr[-3000:]
    cli = subprocess.run([str(venv / "bin" / "dlm"), "models", "--json"], cwd=work, env=env, capture_output=True,
                         text=True, timeout=300)
    assert cli.returncode == 0 and '"smollm2-135m-dlm"' in cli.stdout, cli.stderr[-2000:]
    train_help = subprocess.run([str(venv / "bin" / "dlm-train"), "pretrain", "--config", "tiny-cpu",
                                 "--print-config"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert train_help.returncode == 0, train_help.stderr[-2000:]
    import yaml
    (source,) = yaml.safe_load(train_help.stdout)["data"]["sources"]
    assert source.endswith("tiny_corpus.txt") and Path(source).is_file() and "site-packages" in source
