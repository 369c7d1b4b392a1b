"""The author commands: ``optgen new``, ``optgen test``, ``optgen doc`` and the cost model of
``optgen show`` (issue 15, item 8)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from optgen.cli import app

ROOT = Path(__file__).resolve().parent.parent
SPECS = ROOT / "specs"
runner = CliRunner()


def _specs_copy(tmp_path: Path) -> Path:
    folder = tmp_path / "specs"
    shutil.copytree(SPECS, folder)
    return folder


def test_new_writes_a_spec_that_builds_and_steps(tmp_path: Path) -> None:
    from optgen.authoring.load import build_class

    specs = _specs_copy(tmp_path)
    r = runner.invoke(app, ["new", "my_adamw_grams", "--from", "adamw_adv", "--with", "grams", "--specs", str(specs)])
    assert r.exit_code == 0, r.output
    path = specs / "my_adamw_grams.yaml"
    text = path.read_text()
    assert "extends: adamw_adv" in text and "- grams" in text
    built, cls = build_class(path)
    assert built.program.class_name == "MyAdamwGrams" and "grams" in built.program.features
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = cls([p], backend="torch", grams_moment=True)
    before = p.detach().clone()
    p.grad = torch.randn(4, 3)
    opt.step()
    assert not torch.equal(before, p.detach())
    out = tmp_path / "gen"
    assert runner.invoke(app, ["build", str(path), "--out", str(out)]).exit_code == 0
    assert (out / "my_adamw_grams.py").exists()


def test_new_outside_the_spec_folder_writes_the_base_out(tmp_path: Path) -> None:
    from optgen.authoring.load import build_class

    target = tmp_path / "elsewhere" / "my_adam.yaml"
    target.parent.mkdir()
    r = runner.invoke(app, ["new", "my_adam", "--from", "adam", "--out", str(target), "--specs", str(SPECS)])
    assert r.exit_code == 0, r.output
    assert "\nextends:" not in target.read_text()
    assert runner.invoke(app, ["check", str(target)]).exit_code == 0
    assert build_class(target)[0].program.class_name == "MyAdam"


def test_new_errors(tmp_path: Path) -> None:
    specs = _specs_copy(tmp_path)
    cases = [
        (["new", "my_x", "--from", "adamww"], "unknown base spec 'adamww'", "adamw"),
        (["new", "my_x", "--from", "adamw_adv", "--with", "gram"], "unknown feature 'gram'", "nearest: grams"),
        (["new", "My-X", "--from", "adamw"], "invalid NAME", "lower_snake_case"),
        (["new", "adam", "--from", "adamw"], "exists: not overwritten", "--force"),
    ]
    for args, first, second in cases:
        r = runner.invoke(app, [*args, "--specs", str(specs)])
        assert r.exit_code == 2, r.output
        assert first in r.output and second in r.output, r.output
    assert (specs / "adam.yaml").read_text() == (SPECS / "adam.yaml").read_text()
    target = tmp_path / "keep.yaml"
    target.write_text("old")
    r = runner.invoke(app, ["new", "keep", "--from", "adam", "--out", str(target), "--specs", str(specs), "--force"])
    assert r.exit_code == 0, r.output
    assert target.read_text() != "old"
    # a combination that does not check is refused and nothing is written
    r = runner.invoke(app, ["new", "lion_c", "--from", "lion_adv", "--with", "cautious", "--specs", str(specs)])
    if r.exit_code != 0:
        assert "does not check (nothing written)" in r.output and not (specs / "lion_c.yaml").exists()
    assert not list(specs.glob(".optgen-new-*"))


def test_optgen_test_prints_the_table_and_passes(tmp_path: Path) -> None:
    for spec, published in (("adamw", "torch.optim.AdamW"), ("adams", "adams.Adams_ZeRO")):
        r = runner.invoke(app, ["test", str(SPECS / f"{spec}.yaml"), "--backends", "torch", "--models", "mlp",
                                "--steps", "8", "--json", str(tmp_path / f"{spec}.json")])
        assert r.exit_code == 0, r.output
        lines = r.output.splitlines()
        assert any(line.startswith("torch ") and "0 (bit-identical)" in line and line.endswith("ok") for line in lines)
        assert any(line.startswith(f"published {published}") for line in lines), r.output
        assert "passed: every backend within 1e-05 of the reference and the published class" in r.output
    # beyond the tolerance: exit code 1
    r = runner.invoke(app, ["test", str(SPECS / "adamw.yaml"), "--backends", "torch", "--models", "mlp", "--steps", "2",
                            "--tol", "-1"])
    assert r.exit_code == 1 and "FAILED" in r.output and "DIFFERS" in r.output


def test_optgen_test_transformer_and_a_spec_without_matches(tmp_path: Path) -> None:
    from optgen.authoring.test_runner import format_report, run_tests

    report = run_tests(SPECS / "muon_adv.yaml", steps=4, backends=["torch"], models=["transformer"])
    assert not report.failures(), format_report(report)
    r = runner.invoke(app, ["test", str(SPECS / "adagrad.yaml"), "--backends", "torch", "--models", "mlp", "--steps", "3"])
    assert r.exit_code == 0, r.output


def test_doc_writes_a_mkdocs_site(tmp_path: Path) -> None:
    results = tmp_path / "adamw.json"
    r = runner.invoke(app, ["test", str(SPECS / "adamw.yaml"), "--backends", "torch", "--models", "mlp", "--steps", "3",
                            "--json", str(results)])
    assert r.exit_code == 0, r.output
    out = tmp_path / "site"
    r = runner.invoke(app, ["doc", str(SPECS / "adamw.yaml"), str(SPECS / "lion_adv.yaml"), "--out", str(out),
                            "--results", str(results), "--no-plots"])
    assert r.exit_code == 0, r.output
    mk = (out / "mkdocs.yml").read_text()
    assert "docs_dir: docs" in mk and "specs/adamw.md" in mk and "specs/lion_adv.md" in mk
    page = (out / "docs" / "specs" / "adamw.md").read_text()
    for expected in ("# AdamW", "exp_avg = lerp(exp_avg, grad, 1 - beta1)", "| `lr` | `0.001` | &gt;= 0.0 |",
                     "**8 bytes per parameter**", "`torch.optim.AdamW` from `torch==2.13.0`",
                     "| torch | 0 (bit-identical) | 0 (bit-identical) |", "| `amsgrad` |"):
        assert expected in page, expected
    assert "[adamw](specs/adamw.md)" in (out / "docs" / "index.md").read_text()
    from optgen.authoring.doc import have_matplotlib

    r = runner.invoke(app, ["doc", str(SPECS / "adam.yaml"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    if have_matplotlib():
        assert (out / "docs" / "img" / "adam_loss.png").stat().st_size > 0
    else:
        assert "matplotlib is not installed: loss-curve plots skipped" in r.output


def test_doc_site_builds_with_mkdocs_and_plots_a_class_that_refuses_vectors(tmp_path: Path) -> None:
    """torch.optim.Muon refuses the MLP's biases: both classes are handed its matrices
    (``matches.parameters: matrices``), so the page gets its plot; the site builds with mkdocs."""
    pytest.importorskip("matplotlib")
    pytest.importorskip("mkdocs")
    import subprocess
    import sys

    out = tmp_path / "site"
    r = runner.invoke(app, ["doc", str(SPECS / "muon.yaml"), "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "plot without" not in r.output, r.output
    png = out / "docs" / "img" / "muon_loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "img/muon_loss.png" in (out / "docs" / "specs" / "muon.md").read_text()
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(out / "mkdocs.yml"),
                            "-d", str(tmp_path / "html")], capture_output=True, text=True, timeout=120)
    assert built.returncode == 0, built.stderr
    html = (tmp_path / "html" / "specs" / "muon" / "index.html").read_text()
    assert "Muon" in html and "muon_loss.png" in html


def test_show_prints_the_cost_model_of_adamw() -> None:
    r = runner.invoke(app, ["show", str(SPECS / "adamw.yaml"), "--bandwidth", "1000"])
    assert r.exit_code == 0, r.output
    # by hand, fp32 AdamW on the fused path: param read + write 8, grad read 4, exp_avg and
    # exp_avg_sq read + write 16: 28 bytes per parameter per step; state 2 x 4 = 8 bytes
    assert "state: 8 bytes per parameter" in r.output
    line = next(x for x in r.output.splitlines() if x.strip().startswith("matrix 1024x1024: "))
    assert "28 bytes moved per parameter per step (read 16: param 4, grad 4, exp_avg 4, exp_avg_sq 4; " \
           "write 12: param 4, exp_avg 4, exp_avg_sq 4); 1 element pass(es), 2 kernel launches" in line
    # roofline: 28 B x 2^28 / 1000 GB/s = 7.516 ms
    assert "roofline at 1000 GB/s copy bandwidth (--bandwidth)" in r.output
    assert "2^28 parameters: 7.516 ms per step" in r.output


def test_show_beside_measured_bench_times() -> None:
    r = runner.invoke(app, ["show", str(SPECS / "adams.yaml"), "--bench-json",
                            str(ROOT / "benchmarks" / "results" / "h100_bench_adams.json")])
    assert r.exit_code == 0, r.output
    assert "measured by optgen bench on NVIDIA H100" in r.output
    assert "one 2^28 fp32 tensor: 2.519 ms per step" in r.output
    # Adams' matrices take three element passes (W^T u, W v, the update): two more reads of param
    assert "matrix 1024x1024: 36 bytes moved per parameter per step" in r.output
