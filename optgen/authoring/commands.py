"""What the CLI's author commands print: ``optgen cli`` parses options and dispatches here."""

from __future__ import annotations

import json
from pathlib import Path

from optgen.errors import SpecError


def show_cost(path: Path, bandwidth: float | None = None, bench_json: Path | None = None) -> list[str]:
    """The cost-model lines of ``optgen show``: bandwidth from ``--bandwidth``, else the bench
    results' own copy measurement, else BENCHMARKS.md's; measured times from ``--bench-json`` or
    ``benchmarks/results/*_bench_<name>.json``."""
    from optgen.authoring.cost import bench_times, benchmarks_bandwidth, cost_model, format_cost
    from optgen.render import compile_spec

    built = compile_spec(path)
    cm = cost_model(built)
    if bench_json is None:
        found = sorted(Path("benchmarks/results").glob(f"*_bench_{built.module}.json"))
        bench_json = found[-1] if found else None
    bench = bench_times(bench_json) if bench_json is not None else None
    source = "--bandwidth"
    if bandwidth is None and bench and bench.get("bandwidth"):
        bandwidth, source = bench["bandwidth"], f"measured by optgen bench in {bench_json}"
    if bandwidth is None:
        got = benchmarks_bandwidth()
        if got is not None:
            bandwidth, source = got[0], f"measured copy in {got[1]}"
    return format_cost(cm, bandwidth, source, bench)


def run_test(spec: Path, steps: int, backends: list[str] | None, models: list[str] | None, tolerance: float,
             setting: str | None, json_out: Path | None) -> tuple[str, bool]:
    """``optgen test``: (the printed report, passed)."""
    from optgen.authoring.test_runner import format_report, run_tests
    from optgen.files import write_atomic

    values = json.loads(setting) if setting else None
    if values is not None and not isinstance(values, dict):
        raise ValueError("--setting must be a JSON object of hyperparameters")
    report = run_tests(spec, steps=steps, backends=backends, models=models, tolerance=tolerance, setting=values)
    if json_out is not None:
        write_atomic(json_out, json.dumps(report.as_json(), indent=1))
    return format_report(report), not report.failures()


def run_doc(specs: list[Path], out: Path, results: list[Path], recompute: bool, plots: bool, echo) -> list[Path]:
    from optgen.authoring.doc import write_site

    given: dict[str, dict] = {}
    for r in results:
        data = json.loads(r.read_text(encoding="utf-8"))
        for one in data if isinstance(data, list) else [data]:
            given[Path(one["spec"]).stem] = one
    return write_site(specs, out, given, recompute, plots, echo)


__all__ = ["SpecError", "run_doc", "run_test", "show_cost"]
