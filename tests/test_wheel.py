"""The wheel is the product: build it, install it into a fresh virtual environment and use it from a folder
that holds its own `data.py` and `models/` package (names that collided with the suite before 0.2)."""
from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


def _run(cmd: list[str], cwd: Path, env: dict, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{' '.join(cmd)} -> {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(out), str(REPO)],
         cwd=out, env=dict(os.environ))
    (path,) = out.glob("fisherbench-*.whl")
    return path


def test_the_wheel_ships_one_namespace_and_its_configs(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"fisherbench"}, top
    assert "fisherbench/configs/train.yaml" in names
    assert "fisherbench/configs/optimizer/adafisher.yaml" in names and "fisherbench/configs/sweep/quick.yaml" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "fisherbench = fisherbench.__main__:main" in text


def test_wheel_install_works_from_a_folder_with_colliding_names(wheel, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bindir = venv / "bin"
    py = bindir / "python"
    site = Path(subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                        text=True).strip())
    # reuse this interpreter's installed dependencies (torch & co.) without their .pth hooks: a plain path entry
    # is appended after the venv's own site-packages, so the wheel's fisherbench is the one imported
    deps = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site / "_fisherbench_test_deps.pth").write_text("\n".join(sorted(deps)) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"
    _run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--quiet", str(wheel)]
         if _pip_has_python_option() else [py, "-m", "pip", "install", "--no-deps", "--quiet", str(wheel)],
         cwd=tmp_path, env=env)

    work = tmp_path / "project"
    (work / "models").mkdir(parents=True)
    (work / "models" / "__init__.py").write_text("MINE = True\n")
    (work / "data.py").write_text("MINE = True\n")

    where = _run([py, "-c", "import fisherbench, data, models; print(fisherbench.__file__, data.MINE, models.MINE)"],
                 cwd=work, env=env).stdout
    assert str(site) in where and "True True" in where, where

    fb = str(bindir / "fisherbench")
    train = _run([fb, "train", "threads=1", "budget=steps", "budget.steps=5", "results_dir=runs"], cwd=work, env=env)
    assert "completed" in train.stdout, train.stdout
    listing = _run([py, "-m", "fisherbench", "sweep", "--list"], cwd=work, env=env).stdout
    assert "quick" in listing and "table2_cifar10" in listing
    _run([fb, "report", "--store", "runs", "--group-by", "optimizer.name"], cwd=work, env=env)
    assert list((work / "reports" / "tables").glob("store.*")), "the report was not written under ./reports"
    ls = _run([fb, "results", "ls", "--store", "runs"], cwd=work, env=env).stdout
    assert "small_cnn" in ls and "completed" in ls


def _pip_has_python_option() -> bool:
    out = subprocess.run([sys.executable, "-m", "pip", "--version"], capture_output=True, text=True).stdout
    major = int(out.split()[1].split(".")[0]) if out.startswith("pip ") else 0
    return major >= 22
