"""``optgen doc [--out DIR]``: a documentation site, one page per spec, laid out for mkdocs.

``DIR/mkdocs.yml`` and ``DIR/docs/`` (``index.md``, ``specs/<name>.md``, ``img/<name>_loss.png``)
are plain Markdown written without mkdocs; ``mkdocs build -f DIR/mkdocs.yml`` renders them
(``pip install optgen[docs]``). Each page: the step as equations (the spec's statements, lowered),
the hyperparameters with defaults and ranges, the state and its bytes per parameter, the features
and the flags they add, what the spec matches and the measured difference (from ``optgen test``
results given as JSON, or recomputed), and a loss curve of the spec against its published class
on the built-in MLP (matplotlib, where installed).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from optgen.errors import SpecError
from optgen.files import write_atomic

PLOT_STEPS = 60


def _md(text: object) -> str:
    """Spec text in Markdown prose: no raw HTML, no table breaks."""
    return str(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def _code(text: object) -> str:
    return "`" + str(text).replace("`", "'").replace("|", "\\|") + "`"


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def loss_plot(spec_path: Path, png: Path, steps: int = PLOT_STEPS) -> str:
    """Train the spec (torch backend) and its published class on the MLP; write the curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from optgen.authoring.load import build_class, ours_factory, published_class, published_factory
    from optgen.authoring.models import make_model, train

    built, cls = build_class(spec_path)
    curves = {f"{built.program.class_name} (optgen, torch backend)":
              train(make_model("mlp"), ours_factory(cls, built, {}, "torch", torch.float32), steps)[1]}
    note = ""
    m = built.spec.model.matches
    if m is not None:
        pub, why = published_class(m.package, m.class_)
        if pub is not None:
            curves[f"{m.class_} ({m.package})"] = train(make_model("mlp"), published_factory(pub, m, {}, torch.float32),
                                                        steps)[1]
        else:
            note = why
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for i, (label, losses) in enumerate(curves.items()):
        ax.plot(range(1, steps + 1), losses, label=label, linestyle="-" if i == 0 else "--")
    ax.set_xlabel("step (LambdaLR)")
    ax.set_ylabel("MLP loss")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=100)
    plt.close(fig)
    return note


def spec_page(spec_path: Path, results: dict[str, Any] | None, plot: str | None) -> tuple[str, str, str]:
    """(name, class, Markdown) of one spec's page."""
    import torch

    from optgen.authoring.cost import cost_model
    from optgen.features.registry import available
    from optgen.ir.pretty import expr_text, set_aliases, stmts_text
    from optgen.render import compile_spec
    from optgen.spec.loader import load_spec
    from optgen.spec.values import range_text

    built = compile_spec(spec_path)
    spec = load_spec(spec_path)
    from optgen.pipeline import lower

    lowered = lower(spec)
    set_aliases(lowered.hypers)
    m = spec.model
    out = [f"# {_md(m.class_)}", "", f"Spec: `{spec_path.name}` (`{_md(spec.name)}`)"
           + (f", extends `{_md(m.extends)}`" if m.extends else "") + ".", ""]
    if m.doc:
        out += [_md(m.doc.strip()), ""]
    out += ["## Step", "", "Per parameter, in order (the spec's statements as optgen lowers them):", "", "```text"]
    out += stmts_text(lowered.body)
    if lowered.finalize:
        out += ["", "# after the last parameter of a step (finalize):", *stmts_text(lowered.finalize)]
    out += ["```", "", "## Hyperparameters", "", "| name | default | range | description |", "|---|---|---|---|"]
    for n, h in lowered.hypers:
        alias = f" (as {', '.join(h.as_)})" if h.as_ else ""
        fixed = " [fixed]" if not h.constructor else ""
        out.append(f"| {_code(n)}{_md(alias)} | {_code(repr(h.default))} | {_md(range_text(h)) or '-'} | "
                   f"{_md(h.doc or '')}{fixed} |")
    out += ["", "## State", ""]
    try:
        cm = cost_model(built, torch.float32)
        per = ", ".join(f"{pc.shape}: {pc.state_bytes:g}" for pc in cm.paths)
        out += [f"**{cm.state_bytes:g} bytes per parameter** (fp32 parameters, defaults; {per}).", ""]
        moved = [f"{pc.shape}: {pc.total:g} bytes per parameter per step, {pc.launches} kernel launches"
                 for pc in cm.paths if not pc.unsupported]
        if moved:
            out += ["Memory traffic on the triton backend (`optgen show` prints the cost model): "
                    + "; ".join(moved) + ".", ""]
    except Exception as exc:  # the cost model needs a step; the page is still written
        out += [f"(state bytes not measured: {_md(type(exc).__name__)}: {_md(exc)})", ""]
    out += ["| state | kind | init | dtype |", "|---|---|---|---|"]
    for d in lowered.state:
        cond = f" if {expr_text(d.cond)}" if d.cond is not None else ""
        init = d.init if not isinstance(d.init, tuple) else d.init[1]
        out.append(f"| {_code(d.name)} | {d.kind.label}{_md(cond)} | {_code(init)} | {_code(d.dtype)} |")
    out += ["", "## Features", ""]
    registry = available()
    if m.features:
        out += ["| feature | what it does | flags it adds |", "|---|---|---|"]
        for f in m.features:
            feat = registry.get(f)
            doc = feat.doc.strip().splitlines()[0] if feat is not None and feat.doc else ""
            flags = ", ".join(f"{_code(k)} = {_code(repr(v.default))}" for k, v in (feat.hyperparameters.items()
                                                                             if feat else []))
            out.append(f"| {_code(f)} | {_md(doc)} | {flags or '-'} |")
    else:
        out.append("None.")
    out += ["", "## Matches", ""]
    if m.matches is None:
        out.append("No published class (no `matches:`).")
    else:
        out.append(f"`{_md(m.matches.class_)}` from `{_md(m.matches.package)}`; the test suite compares "
                   f"{len(m.matches.settings)} setting(s).")
        if m.matches.notes:
            out += ["", _md(m.matches.notes.strip())]
    if results:
        out += ["", f"Measured by `optgen test` ({results['steps']} steps under LambdaLR, float32, defaults; "
                "max relative difference of the final parameters):", ""]
        models = sorted({k for r in results["rows"] for k in r["vs_reference"]})
        pub = results.get("published")
        cols = [f"{mo} vs reference" for mo in models] + ([f"{mo} vs published" for mo in models] if pub else [])
        out += ["| backend | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
        for r in results["rows"]:
            cells = [_cell(r["vs_reference"].get(mo)) for mo in models]
            if pub:
                cells += [_cell(r["vs_published"].get(mo)) for mo in models]
            out.append(f"| {_md(r['backend'])} | " + " | ".join(cells) + " |")
        if results.get("published_note"):
            out += ["", _md(results["published_note"])]
    if plot:
        out += ["", "## Loss curve", "", f"![loss curve of {_md(m.class_)}](../img/{plot})"]
    return spec.name, m.class_, "\n".join(out) + "\n"


def _cell(cell: Any) -> str:
    if cell is None:
        return "-"
    if isinstance(cell, str):
        return _md(cell)
    return "0 (bit-identical)" if cell[0] == 0 else f"{cell[1]:.2e}"


def write_site(specs: list[Path], out: Path, results: dict[str, dict] | None = None, recompute: bool = False,
               plots: bool = True, echo=print) -> list[Path]:
    """Write ``out/mkdocs.yml`` and ``out/docs/``; returns the files written."""
    results = dict(results or {})
    do_plots = plots and have_matplotlib()
    if plots and not do_plots:
        echo("optgen doc: matplotlib is not installed: loss-curve plots skipped (pip install 'optgen[docs]')")
    pages: list[tuple[str, str, str]] = []
    written: list[Path] = []
    for sub in ("docs/specs", "docs/img"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for p in specs:
        try:
            name = p.stem
            res = results.get(name)
            if res is None and recompute:
                from optgen.authoring.test_runner import run_tests

                res = run_tests(p, backends=["torch"]).as_json()
            png = None
            if do_plots:
                png = f"{name}_loss.png"
                try:
                    note = loss_plot(p, out / "docs" / "img" / png)
                    written.append(out / "docs" / "img" / png)
                except Exception as exc:  # a class failing on the MLP: the page says so, the site goes on
                    note, png = f"no plot: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}", None
                if note:
                    echo(f"optgen doc: {name}: plot without the published class ({note})")
            name, cls, text = spec_page(p, res, png)
        except SpecError as exc:
            echo(f"optgen doc: {p}: skipped: {exc}")
            continue
        pages.append((name, cls, text))
        target = out / "docs" / "specs" / f"{name}.md"
        write_atomic(target, text)
        written.append(target)
    index = ["# optgen optimizers", "", "One page per spec: its step, hyperparameters, state, features, and "
             "what it matches.", "", "| spec | class |", "|---|---|"]
    index += [f"| [{_md(n)}](specs/{n}.md) | {_md(c)} |" for n, c, _ in pages]
    write_atomic(out / "docs" / "index.md", "\n".join(index) + "\n")
    nav = ["site_name: optgen optimizers", "docs_dir: docs", "nav:", "  - Home: index.md", "  - Optimizers:"]
    nav += [f"      - {json.dumps(c)}: specs/{n}.md" for n, c, _ in pages]
    write_atomic(out / "mkdocs.yml", "\n".join(nav) + "\n")
    return [out / "mkdocs.yml", out / "docs" / "index.md", *written]
