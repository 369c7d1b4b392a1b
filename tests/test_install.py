"""A plain install works: the wheel carries the templates, so an installed optgen (not an editable
checkout) builds a spec into a package importable under its own name, and renders the kernels of
a non-default branch path at run time."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("wheel")
    import importlib.util

    # with setuptools at hand (a Python 3.11 venv has it) no build environment is installed
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", *isolation, "-q",
                        "-w", str(work), str(ROOT)], capture_output=True, text=True, timeout=300)
    if r.returncode != 0:
        pytest.fail(f"pip wheel failed: {r.stderr[-2000:]}")
    (wheel,) = work.glob("optgen-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "optgen/templates/optimizer.py.j2" in names and "optgen/templates/triton_kernels.py.j2" in names
    target = work / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return target


def test_wheel_builds_imports_and_renders_paths(installed: Path, tmp_path: Path) -> None:
    (tmp_path / "adam.yaml").write_text((ROOT / "specs" / "adam.yaml").read_text())  # adamw extends it
    shutil.copytree(ROOT / "specs" / "blocks", tmp_path / "blocks")  # adam includes blocks
    spec = tmp_path / "my_adamw.yaml"
    spec.write_text((ROOT / "specs" / "adamw.yaml").read_text().replace("name: adamw", "name: my_adamw")
                    .replace("class: AdamW", "class: MyAdamW"))
    env = {**os.environ, "PYTHONPATH": str(installed), "TRITON_INTERPRET": "1",
           "OPTGEN_CACHE_DIR": str(tmp_path / "cache")}
    code = textwrap.dedent(f"""
        import sys
        import optgen
        assert optgen.__file__.startswith({str(installed)!r}), optgen.__file__
        from optgen.cli import app
        sys.argv = ["optgen", "build", {str(spec)!r}, "--out", "mypkg"]
        try:
            app()
        except SystemExit as exc:
            assert not exc.code, exc.code
        import torch
        from mypkg import MyAdamW  # the package imports under its own name
        p = torch.nn.Parameter(torch.randn(5, 3))
        # amsgrad + maximize: a branch path the generated module does not carry, rendered now
        opt = MyAdamW([p], amsgrad=True, maximize=True, backend="triton")
        ref_p = torch.nn.Parameter(p.detach().clone())
        ref = torch.optim.AdamW([ref_p], amsgrad=True, maximize=True)
        for _ in range(3):
            g = torch.randn(5, 3)
            p.grad, ref_p.grad = g.clone(), g.clone()
            opt.step()
            ref.step()
        assert (p - ref_p).abs().max() < 1e-6, (p - ref_p).abs().max()
        print("ok")
    """)
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert list((tmp_path / "cache").glob("my_adamw_triton_*.py"))  # the path's kernels, rendered from the wheel
