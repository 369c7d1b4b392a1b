"""``optgen test SPEC``: the equivalence test a spec's author gets for free.

Every available backend (reference, torch, compiled where inductor finds a C++ compiler, triton on
CUDA or through Triton's interpreter when ``TRITON_INTERPRET=1``) trains the built-in small models
for N steps under a ``LambdaLR`` from the same seed, and the final parameters are compared with the
reference backend's and, where ``matches:`` names a published class that imports, with the
published optimizer's. A difference is the largest ``|a - b| / max(|a|, |b|, 1)`` over every
parameter element; one above the tolerance fails.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from optgen.authoring.load import build_class, ours_factory, published_class, published_factory
from optgen.authoring.models import MODELS, make_model, max_diffs, train

#: The default tolerance on the relative difference (|a - b| / max(|a|, |b|, 1)).
TOLERANCE = 1e-5
BACKENDS = ("reference", "torch", "compiled", "triton")


def available_backends() -> dict[str, str]:
    """Backend -> device for the backends this machine can run (``optgen test`` runs them all)."""
    out = {"reference": "cpu", "torch": "cpu"}
    from optgen.runtime.compiled import cxx_available

    if cxx_available():
        out["compiled"] = "cpu"
    try:
        import triton  # noqa: F401
    except ImportError:
        return out
    if torch.cuda.is_available():
        out["triton"] = "cuda"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        out["triton"] = "cpu"
    return out


@dataclass
class Row:
    backend: str
    #: model -> (abs, rel) against the reference / the published class; a string is an error
    vs_reference: dict[str, Any] = field(default_factory=dict)
    vs_published: dict[str, Any] = field(default_factory=dict)
    losses: dict[str, list[float]] = field(default_factory=dict)


@dataclass
class Report:
    spec: str
    class_name: str
    steps: int
    tolerance: float
    models: list[str]
    rows: list[Row]
    published: str | None  # the class compared against, or None
    published_note: str = ""  # why no published comparison
    notes: list[str] = field(default_factory=list)

    def failures(self) -> list[str]:
        out = []
        for r in self.rows:
            for what, cells in (("reference", r.vs_reference), (self.published or "published", r.vs_published)):
                for model, cell in cells.items():
                    if isinstance(cell, str):
                        out.append(f"{r.backend} on {model}: {cell}")
                    elif not cell[1] <= self.tolerance:
                        out.append(f"{r.backend} on {model}: differs from {what} by {cell[1]:.3e} (tolerance "
                                   f"{self.tolerance:.0e})")
        return out

    def as_json(self) -> dict[str, Any]:
        return {
            "spec": self.spec, "class": self.class_name, "steps": self.steps, "tolerance": self.tolerance,
            "published": self.published, "published_note": self.published_note,
            "rows": [{"backend": r.backend, "vs_reference": r.vs_reference, "vs_published": r.vs_published,
                      "losses": r.losses} for r in self.rows],
        }


def run_tests(spec_path: str | Path, steps: int = 20, backends: list[str] | None = None,
              models: list[str] | None = None, tolerance: float = TOLERANCE,
              setting: dict[str, Any] | None = None, published: bool = True) -> Report:
    """Train every backend (and the published class) and compare; nothing is printed."""
    built, cls = build_class(spec_path)
    setting = setting or {}
    models = models or list(MODELS)
    found = available_backends()
    notes = []
    if backends is None:
        chosen = list(found)
        if "triton" not in found:
            notes.append("triton: skipped (no CUDA GPU; set TRITON_INTERPRET=1 to run its kernels in Triton's interpreter)")
        if "compiled" not in found:
            notes.append("compiled: skipped (inductor finds no C++ compiler)")
    else:
        unknown = [b for b in backends if b not in BACKENDS]
        if unknown:
            raise ValueError(f"unknown backend {unknown[0]!r}; backends: {', '.join(BACKENDS)}")
        missing = [b for b in backends if b not in found]
        if missing:
            raise ValueError(f"backend {missing[0]!r} is not available here")
        chosen = ["reference"] + [b for b in backends if b != "reference"]
    dtype = torch.float32
    m = built.spec.model.matches
    pub_cls, pub_note, pub_name = None, "", None
    if m is None:
        pub_note = "the spec has no matches: (no published class to compare against)"
    elif published:
        pub_cls, pub_note = published_class(m.package, m.class_)
        pub_name = m.class_ if pub_cls is not None else None
        if pub_cls is None:
            pub_note = f"{m.class_} ({m.package}) not compared: {pub_note}"
    rows: dict[str, Row] = {b: Row(b) for b in chosen}
    pub_row = Row(f"published {m.class_}") if pub_cls is not None else None
    for model in models:
        results: dict[str, Any] = {}
        for b in chosen:
            try:
                results[b] = train(make_model(model, dtype, device=found[b]),
                                   ours_factory(cls, built, setting, b, dtype), steps, dtype)
                rows[b].losses[model] = results[b][1]
            except Exception as exc:  # a backend failing is a result of the test, not a crash
                results[b] = f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        expected = None
        if pub_cls is not None:
            try:
                expected = train(make_model(model, dtype), published_factory(pub_cls, m, setting, dtype), steps, dtype)
                pub_row.losses[model] = expected[1]
            except Exception as exc:
                pub_row.vs_reference[model] = f"error: {type(exc).__name__}: {exc}"
        ref = results.get("reference")
        for b in chosen:
            got = results[b]
            if isinstance(got, str):
                rows[b].vs_reference[model] = got
                if expected is not None:
                    rows[b].vs_published[model] = got
                continue
            if not isinstance(ref, str):
                rows[b].vs_reference[model] = max_diffs(got[0], ref[0])
            if expected is not None:
                rows[b].vs_published[model] = max_diffs(got[0], expected[0])
        if expected is not None and not isinstance(ref, str):
            pub_row.vs_reference[model] = max_diffs(expected[0], ref[0])
    out = list(rows.values()) + ([pub_row] if pub_row is not None else [])
    return Report(str(spec_path), built.program.class_name, steps, tolerance, models, out, pub_name, pub_note, notes)


def _cell(cell: Any) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, str):
        return cell
    return "0 (bit-identical)" if cell[0] == 0 else f"{cell[1]:.2e}"


def format_report(report: Report) -> str:
    """The table of max differences, one row per backend, one column per model and comparison."""
    head = [f"{report.class_name} ({report.spec}): {report.steps} steps under LambdaLR, float32, default "
            f"hyperparameters; max relative difference of the final parameters "
            f"(|a - b| / max(|a|, |b|, 1)), tolerance {report.tolerance:.0e}"]
    cols = [f"{m} vs reference" for m in report.models]
    if report.published:
        cols += [f"{m} vs {report.published.rpartition('.')[2]}" for m in report.models]
    table = [["backend", *cols, "result"]]
    for r in report.rows:
        cells = [_cell(r.vs_reference.get(m)) for m in report.models]
        if report.published:
            cells += [_cell(r.vs_published.get(m)) if not r.backend.startswith("published") else "-"
                      for m in report.models]
        bad = any(isinstance(c, str) or not c[1] <= report.tolerance
                  for c in [*r.vs_reference.values(), *r.vs_published.values()])
        table.append([r.backend, *cells, "DIFFERS" if bad else "ok"])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = head + [""]
    for i, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    if report.published_note:
        lines.append(f"\n{report.published_note}")
    lines += report.notes
    fails = report.failures()
    lines.append("")
    lines.append(f"FAILED: {len(fails)} difference(s) beyond tolerance" if fails else "passed: every backend "
                 f"within {report.tolerance:.0e}" + (" of the reference and the published class" if report.published else
                                                       " of the reference"))
    return "\n".join(lines)
