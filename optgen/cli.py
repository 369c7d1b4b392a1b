"""The ``optgen`` command line: build, check, list, show, bench, and for authors new, test, doc."""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from optgen.errors import SpecError

app = typer.Typer(add_completion=False, no_args_is_help=True, help="optgen: an optimizer compiler for PyTorch.")

SPECS = Path("specs")
OUT = Path("generated")


def _shown(text: object) -> str:
    """Spec text for the terminal: control characters (escape sequences, CR) as their escapes."""
    from optgen.pysource import comment_text

    return str(comment_text(str(text)))


def _fail(exc: SpecError) -> None:
    typer.echo(_shown(exc), err=True)
    raise typer.Exit(2)


def _spec_paths(specs: list[Path], all_: bool, spec_dir: Path) -> list[Path]:
    if all_:
        found = sorted(spec_dir.glob("*.yaml"))
        if not found:
            typer.echo(f"no specs found in {spec_dir}/", err=True)
            raise typer.Exit(2)
        return found
    if not specs:
        typer.echo("name at least one spec, or pass --all", err=True)
        raise typer.Exit(2)
    return specs


@app.command()
def build(
    specs: list[Path] = typer.Argument(None, help="spec files to build"),
    all_: bool = typer.Option(False, "--all", help="build every spec in specs/"),
    check: bool = typer.Option(False, "--check", help="write nothing; exit 1 if generated/ is stale"),
    out: Path = typer.Option(OUT, "--out", help="output package directory"),
    spec_dir: Path = typer.Option(SPECS, "--specs", help="directory of specs for --all"),
) -> None:
    """Validate, lower and render specs into ``generated/<name>.py`` (written atomically)."""
    from optgen.files import write_atomic
    from optgen.render import compile_spec, init_for, render_init

    paths = _spec_paths(specs or [], all_, spec_dir)
    built = _compile_all(paths, compile_spec)
    outputs = {out / name: text for b in built for name, text in b.files().items()}
    classes = {b.module: b.program.class_name for b in built}
    if all_:
        outputs[out / "__init__.py"] = render_init(classes)
    else:
        outputs[out / "__init__.py"] = init_for(out, classes) if out.exists() else render_init(classes)
    if check:
        stale = [str(p) for p, text in outputs.items() if not p.exists() or p.read_text(encoding="utf-8") != text]
        if all_ and out.exists():
            expected = {p.name for p in outputs}
            stale += [str(f) for f in sorted(out.glob("*.py")) if f.name not in expected]
        if stale:
            typer.echo("stale generated files (run `optgen build --all`):", err=True)
            for s in stale:
                typer.echo(f"  {s}", err=True)
            raise typer.Exit(1)
        typer.echo(f"generated/ is up to date ({len(outputs)} files)")
        return
    try:
        out.mkdir(parents=True, exist_ok=True)
        if not out.is_dir():
            raise NotADirectoryError(f"{out} is not a directory")
        for p, text in outputs.items():
            if not p.exists() or p.read_text(encoding="utf-8") != text:
                write_atomic(p, text)
    except OSError as exc:
        typer.echo(f"optgen build: cannot write to {out}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    for b in built:
        typer.echo(f"built {out / (b.module + '.py')} ({b.program.class_name})")


@app.command()
def check(specs: list[Path] = typer.Argument(..., help="spec files to validate")) -> None:
    """Validate specs; errors are printed as ``file:line:column: field: message``."""
    from optgen.render import compile_spec
    from optgen.smoke import smoke_step

    bad = 0
    names: dict[str, str] = {}
    for p in specs:
        try:
            built = compile_spec(p)  # the same load, lowering, planning and rendering as `build`
            _claim_module(names, built)
            smoke_step(built, built.spec)
            for pos, message in _backend_restrictions(built):
                typer.echo(_shown(f"{pos}: triton backend: {message}" if pos else f"{p}: triton backend: {message}"),
                           err=True)
            typer.echo(f"{p}: ok")
        except SpecError as exc:
            typer.echo(_shown(exc), err=True)
            bad += 1
    if bad:
        raise typer.Exit(2)


def _backend_restrictions(built) -> list:
    """What a backend refuses in this spec (the triton backend's step-time refusals, found at
    build time), each at its spec line; the spec stays valid for the other backends."""
    from optgen.backends.triton_plan import restrictions

    return restrictions(built.program)  # built.program is the hoisted program


def _claim_module(names: dict[str, str], built) -> None:
    """One module per spec name in one build: a second spec of the same name is an error."""
    first = names.setdefault(built.module, built.spec.path)
    if first != built.spec.path:
        raise SpecError(built.spec.position("name"), "name",
                        f"'{built.module}' is also the name of {first}: two specs would write generated/{built.module}.py")


def _compile_all(paths: list[Path], compile_spec) -> list:
    built, names = [], {}
    for p in paths:
        try:
            b = compile_spec(p)
            _claim_module(names, b)
        except SpecError as exc:
            _fail(exc)
        built.append(b)
    return built


@app.command("list")
def list_(spec_dir: Path = typer.Option(SPECS, "--specs")) -> None:
    """List the specs: name, class, and the published code each reproduces."""
    from optgen.spec.loader import load_spec

    rows: list[tuple[str, str, str]] = []
    for p in sorted(spec_dir.glob("*.yaml")):
        try:
            s = load_spec(p)
        except SpecError as exc:
            rows.append((p.stem, "(invalid)", _shown(exc)))
            continue
        m = s.model.matches
        rows.append((s.name, s.model.class_, _shown(f"{m.package} {m.class_}") if m else "-"))
    w0 = max((len(r[0]) for r in rows), default=0)
    w1 = max((len(r[1]) for r in rows), default=0)
    for name, cls, match in rows:
        typer.echo(f"{name:{w0}}  {cls:{w1}}  {match}")


@app.command()
def show(name: str | None = typer.Argument(None, help="a spec name or file"),
         spec_dir: Path = typer.Option(SPECS, "--specs"),
         functions: bool = typer.Option(False, "--functions", help="list the expression language's functions"),
         bandwidth: float | None = typer.Option(None, "--bandwidth", help="copy bandwidth in GB/s for the roofline "
                                                "(default: the measured one of the bench results or BENCHMARKS.md)"),
         bench_json: Path | None = typer.Option(None, "--bench-json", help="`optgen bench --json` results to show "
                                                "measured step times from"),
         cost: bool = typer.Option(True, "--cost/--no-cost", help="print the cost model")) -> None:
    """Show one spec: hyperparameters, state, the step as equations, its phases, and what it matches
    (``--functions``: the function library: name, arguments, host/device, what it computes)."""
    if functions:
        from optgen.ir.library import functions_table

        typer.echo("\n".join(functions_table()))
        return
    if name is None:
        typer.echo("optgen show: name a spec, or pass --functions", err=True)
        raise typer.Exit(2)
    from optgen.ir.pretty import set_aliases, stmts_text
    from optgen.pipeline import lower
    from optgen.spec.loader import load_spec

    path = Path(name)
    if not path.exists():
        path = spec_dir / f"{name}.yaml"
    try:
        spec = load_spec(path)
        program = lower(spec)
    except SpecError as exc:
        _fail(exc)
    m = spec.model
    set_aliases(program.hypers)
    typer.echo(f"{m.class_}  ({_shown(spec.path)})")
    if m.doc:
        typer.echo("\n".join("  " + _shown(line) for line in m.doc.strip().splitlines()))
    if m.matches:
        typer.echo(f"\nmatches: {_shown(m.matches.class_)} from {_shown(m.matches.package)}")
    typer.echo("\nhyperparameters:")
    from optgen.spec.values import range_text

    for n, h in program.hypers:
        alias = f" as ({', '.join(h.as_)})" if h.as_ else ""
        fixed = "" if h.constructor else "  [fixed]"
        typer.echo(f"  {n} = {h.default!r}{alias}  {range_text(h)}{fixed}  {_shown(h.doc)}".rstrip())
    typer.echo("\nstate:")
    if program.step_store == "tensor":
        typer.echo("  step: per-tensor counter (0-d tensor, incremented before the update)")
    from optgen.ir.pretty import expr_text

    for d in program.state:
        cond = f"  if {expr_text(d.cond)}" if d.cond is not None else ""
        init = d.init if not isinstance(d.init, tuple) else d.init[1]
        typer.echo(f"  {d.name}: {d.kind.label}, init {init}, dtype {d.dtype}{cond}")
    if program.globals or program.accumulators:
        typer.echo("\noptimizer-wide:")
        for g in program.globals:
            typer.echo(f"  {g.name}: global (in every param group), init {expr_text(g.init)}")
        for a in program.accumulators:
            typer.echo(f"  {a.name}: accumulator (summed over the parameters each step), init {expr_text(a.init)}")
    typer.echo("\nstep:")
    for line in stmts_text(program.body, "  "):
        typer.echo(line)
    if program.finalize:
        typer.echo("\nafter the last parameter (finalize):")
        for line in stmts_text(program.finalize, "  "):
            typer.echo(line)
    if cost:
        from optgen.authoring.commands import show_cost

        try:
            typer.echo("\n" + "\n".join(show_cost(path, bandwidth, bench_json)))
        except SpecError as exc:
            _fail(exc)


@app.command()
def new(
    name: str = typer.Argument(..., help="the new spec's name (lower_snake_case)"),
    base: str = typer.Option(..., "--from", help="the base spec (a name in --specs, or a .yaml file)"),
    with_: str = typer.Option("", "--with", help="features to add, comma-separated"),
    out: Path | None = typer.Option(None, "--out", help="where to write (default: SPECS/NAME.yaml)"),
    force: bool = typer.Option(False, "--force", help="replace an existing file"),
    spec_dir: Path = typer.Option(SPECS, "--specs"),
) -> None:
    """Write a spec extending BASE with features; it is checked (built and stepped) before it is written."""
    from optgen.authoring.new import NewError, new_spec

    features = [f.strip() for f in with_.split(",") if f.strip()]
    try:
        target = new_spec(name, base, features, out, spec_dir, force)
    except NewError as exc:
        typer.echo(f"optgen new: {_shown(exc)}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {target} (checks: build it with `optgen build {target}`)")


@app.command("test")
def test_(
    spec: Path = typer.Argument(..., help="spec file (or name in --specs)"),
    steps: int = typer.Option(20, "--steps", min=1, help="training steps per model"),
    backends: str | None = typer.Option(None, "--backends", help="comma-separated (default: every available one)"),
    models: str | None = typer.Option(None, "--models", help="comma-separated built-in models (mlp, transformer)"),
    tolerance: float | None = typer.Option(None, "--tol", help="max relative difference allowed (default 1e-5)"),
    setting: str | None = typer.Option(None, "--setting", help="hyperparameters as a JSON object"),
    json_out: Path | None = typer.Option(None, "--json", help="write the results as JSON (for optgen doc)"),
    spec_dir: Path = typer.Option(SPECS, "--specs"),
) -> None:
    """Every available backend against the reference and the published class, on small models; exit 1
    when one differs beyond the tolerance."""
    from optgen.authoring.commands import run_test
    from optgen.authoring.test_runner import TOLERANCE

    if not spec.exists() and (spec_dir / f"{spec}.yaml").exists():
        spec = spec_dir / f"{spec}.yaml"

    def split(v: str | None) -> list[str] | None:
        return [x.strip() for x in v.split(",") if x.strip()] if v else None

    try:
        text, ok = run_test(spec, steps, split(backends), split(models), TOLERANCE if tolerance is None else tolerance,
                            setting, json_out)
    except SpecError as exc:
        _fail(exc)
    except (ValueError, KeyError) as exc:
        typer.echo(f"optgen test: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(text)
    if not ok:
        raise typer.Exit(1)


@app.command()
def doc(
    specs: list[Path] = typer.Argument(None, help="specs to document (default: every spec in --specs)"),
    out: Path = typer.Option(Path("site_docs"), "--out", help="site folder: mkdocs.yml and docs/"),
    results: list[Path] = typer.Option([], "--results", help="`optgen test --json` files to show"),
    test: bool = typer.Option(False, "--test", help="run `optgen test` (torch backend) for specs without results"),
    plots: bool = typer.Option(True, "--plots/--no-plots", help="loss-curve PNGs (needs matplotlib)"),
    spec_dir: Path = typer.Option(SPECS, "--specs"),
) -> None:
    """Write a documentation site (mkdocs layout), one page per spec."""
    from optgen.authoring.commands import run_doc

    paths = specs or sorted(spec_dir.glob("*.yaml"))
    try:
        written = run_doc(paths, out, results, test, plots, lambda m: typer.echo(_shown(m), err=True))
    except OSError as exc:
        typer.echo(f"optgen doc: cannot write to {out}: {exc.strerror or exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"wrote {len(written)} files under {out}/ (render: mkdocs build -f {out / 'mkdocs.yml'})")


@app.command()
def bench(
    spec: Path = typer.Argument(..., help="spec to benchmark (its triton backend)"),
    baseline: Path = typer.Option(SPECS / "adamw.yaml", "--baseline", help="spec whose kernels are the ratio base"),
    plot: Path | None = typer.Option(None, "--plot", help="write a PNG of step time against parameter count"),
    json_out: Path | None = typer.Option(None, "--json", help="write the raw results as JSON"),
) -> None:
    """Step time, peak memory and bandwidth vs torch.optim.AdamW, as ratios from one run (needs a GPU)."""
    from optgen.bench import run

    try:
        run(str(spec), str(baseline), str(plot) if plot else None, str(json_out) if json_out else None)
    except SpecError as exc:
        _fail(exc)


def main() -> None:  # pragma: no cover
    try:
        app()
    except SpecError as exc:
        print(exc, file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":  # pragma: no cover
    main()
