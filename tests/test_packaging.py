"""The package as users get it: a wheel installed into a fresh venv (no editable install, no repository on the
path) finds its data (importlib.resources), decides with CARD and runs the ``splitlora`` command; ``model/`` imports
without torch and reads no file at import."""
from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest

from splitlora.paths import REPO_ROOT


@pytest.fixture(scope="module")
def wheel_venv(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"  # built from a copy, so the checkout gets no build/ or egg-info folders
    shutil.copytree(REPO_ROOT, src, symlinks=True, ignore=shutil.ignore_patterns(
        ".git", ".venv", "build", "*.egg-info", "__pycache__", ".pytest_cache", "figures", "notebooks", "benchmarks",
        "tests"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(src), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp / "dist")], check=True, cwd=tmp)
    wheel = next((tmp / "dist").glob("splitlora-*.whl"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index", "-q",
                    str(wheel)], check=True, cwd=tmp)
    site = Path(subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    # the dependencies (numpy, scipy, pandas, ...) from this environment, as a plain path entry: its .pth files
    # (the editable install of splitlora among them) are not processed from there
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return venv, site


def test_wheel_ships_data_and_decides(wheel_venv, tmp_path):
    venv, site = wheel_venv
    code = textwrap.dedent("""
        import splitlora as sl
        from splitlora.paths import DATA_DIR
        assert splitlora_file.startswith(site), (splitlora_file, site)
        assert (DATA_DIR / "hardware.yaml").is_file() and not DATA_DIR.is_symlink(), DATA_DIR
        sc = sl.Scenario()
        P, M = sc.device_arrays()
        R = sl.load_channel().rates_bps()[[1] * len(P)]
        d = sl.card(sc.cost_model(), P, R, R, M, sc.w, discrete_clocks=True)
        print([int(c) for c in d.cut_layer], bool((d.frequency_hz > 0).any()), len(sl.load_gsm8k("gsm8k", limit=3)))
    """).replace("splitlora_file", "sl.__file__").replace("site", repr(str(site)))
    out = subprocess.run([str(venv / "bin" / "python"), "-I", "-c", code], capture_output=True, text=True,
                         cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    cuts, clock_ok, n = out.stdout.rsplit("]", 1)[0] + "]", *out.stdout.rsplit("]", 1)[1].split()
    assert cuts.startswith("[") and clock_ok == "True" and n == "3", out.stdout


def test_wheel_cli_env(wheel_venv, tmp_path):
    venv, _ = wheel_venv
    out = subprocess.run([str(venv / "bin" / "splitlora"), "env"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "splitlora    0.1.0" in out.stdout and "gpu backend" in out.stdout


def test_model_imports_without_torch_and_reads_no_file():
    """``splitlora.model`` (and ``import splitlora``) must work where torch cannot be imported, and read no file."""
    code = textwrap.dedent("""
        import builtins, io, sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("torch", "transformers", "peft"):
                    raise ImportError("blocked: " + name)
        sys.meta_path.insert(0, Block())
        opened = []
        real_open = io.open
        def spy(file, *a, **k):
            opened.append(str(file))
            return real_open(file, *a, **k)
        builtins.open = io.open = spy
        import splitlora.model.card, splitlora.model.baselines, splitlora.model.scenario, splitlora.model.system
        import splitlora
        data = [f for f in opened if f.endswith((".yaml", ".json", ".jsonl"))]
        assert not data, data
        builtins.open = io.open = real_open
        sc = splitlora.Scenario()
        print(int(sc.cost_model().n_cuts))
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["32"]
