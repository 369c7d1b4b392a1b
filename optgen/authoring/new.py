"""``optgen new NAME --from BASE --with FEATURE,...``: a new spec extending a base with features.

The spec is ``extends: BASE`` plus the base's features and the new ones when it is written into
the base's folder; written elsewhere (``--out``) it is the base's merged fields written out in full
(``extends:`` names a spec of the same folder only). It is compiled and stepped (what ``optgen
check`` does) before it is written, atomically; an existing file is kept unless ``force``.
"""

from __future__ import annotations

import difflib
import os
import re
import tempfile
from pathlib import Path

import yaml

from optgen.errors import SpecError
from optgen.files import write_atomic

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


class NewError(Exception):
    """A request ``optgen new`` refuses (one line for the terminal)."""


def _nearest(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, sorted(set(candidates)), n=3, cutoff=0.5)
    return f" (nearest: {', '.join(close)})" if close else ""


def class_name(name: str) -> str:
    return "".join(part[:1].upper() + part[1:] for part in name.split("_") if part) or "Optimizer"


def _placed(have: list[str], new: list[str]) -> list[str]:
    """``have`` with each of ``new`` inserted before the first listed feature that must come after
    it (its ``before:``, or the other's ``after:``), else appended: the order the resolver checks."""
    from optgen.features.registry import available

    registry = available()
    out = list(have)
    for f in new:
        if f in out:
            continue
        at = len(out)
        for j, g in enumerate(out):
            fg, ff = registry.get(g), registry.get(f)
            if (fg is not None and f in fg.after) or (ff is not None and g in ff.before):
                at = j
                break
        out.insert(at, f)
    return out


def spec_text(name: str, base_path: Path, features: list[str], out: Path) -> str:
    from optgen.spec.blocks import BLOCKS_FOLDER, Composition
    from optgen.spec.expr import unparse
    from optgen.spec.loader import _load_merged

    comp = Composition(base_path.parent / BLOCKS_FOLDER)
    data, _, _ = _load_merged(base_path, str(base_path), seen=(), comp=comp)
    have = list(data.get("features") or [])
    merged = _placed(have, features)
    header = (f"# written by `optgen new {name} --from {base_path.stem}"
              + (f" --with {','.join(features)}`" if features else "`") + "\n")
    doc = f"{class_name(name)}: {base_path.stem}" + (f" with {', '.join(features)}" if features else "") + "."
    if out.parent.resolve() == base_path.parent.resolve():
        body = {"name": name, "class": class_name(name), "extends": base_path.stem, "doc": doc}
        if features:
            body["features"] = merged
        return header + yaml.safe_dump(body, sort_keys=False, width=100)
    full = {"name": name, "class": class_name(name), "doc": doc}
    full.update({k: v for k, v in data.items() if k not in ("name", "class", "doc", "extends", "matches", "constructor_order")})
    if comp.includes:  # the blocks stay blocks: their declarations (written out above) refine to themselves
        full["include"] = [{"block": i.name, "with": {k: unparse(v) for k, v in i.mapping.items()}} if i.mapping
                           else i.name for i in comp.includes]
    if merged:
        full["features"] = merged
    return header + f"# the fields of {base_path} (with its parents) written out: extends names specs of one folder\n" \
        + yaml.safe_dump(full, sort_keys=False, width=100)


def new_spec(name: str, base: str, features: list[str], out: Path | None, spec_dir: Path,
             force: bool = False) -> Path:
    """Write the new spec; return its path. Raises NewError or SpecError."""
    from optgen.features.registry import available

    if not _NAME.match(name) or name.endswith(("_triton", "_ir")) or len(name) > 100:
        raise NewError(f"invalid NAME {name!r}: a spec name is lower_snake_case (a-z, 0-9, _), starts with a "
                       "letter, at most 100 characters, and does not end in '_triton' or '_ir'")
    import keyword

    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        raise NewError(f"invalid NAME {name!r}: a Python keyword cannot name a module")
    base_path = Path(base) if base.endswith(".yaml") else spec_dir / f"{base}.yaml"
    if not base_path.is_file():
        names = [p.stem for p in (base_path.parent if base.endswith(".yaml") else spec_dir).glob("*.yaml")]
        raise NewError(f"unknown base spec {base!r} in {base_path.parent}/{_nearest(base_path.stem, names)}")
    registry = available()
    for f in features:
        if f not in registry:
            raise NewError(f"unknown feature {f!r}{_nearest(f, registry)}; features: {', '.join(sorted(registry))}")
    if len(set(features)) != len(features):
        raise NewError("a feature is listed twice in --with")
    target = out if out is not None else spec_dir / f"{name}.yaml"
    if target.exists() and not force:
        raise NewError(f"{target} exists: not overwritten (pass --force to replace it)")
    if target.exists() and not target.is_file():
        raise NewError(f"{target} is not a file")
    text = spec_text(name, base_path, features, target)
    # a spec written out elsewhere still includes and uses the base's blocks: copy them beside it
    blocks, there = base_path.parent / "blocks", target.parent / "blocks"
    copied = blocks.is_dir() and not there.exists() and target.parent.resolve() != base_path.parent.resolve()
    if copied:
        import shutil

        shutil.copytree(blocks, there)
    try:
        _check_text(text, target)
    except BaseException:
        if copied:
            shutil.rmtree(there, ignore_errors=True)
        raise
    write_atomic(target, text)
    return target


def _check_text(text: str, target: Path) -> None:
    """Compile and step the text as ``optgen check`` would, from a temporary file beside the target
    (so ``extends:`` finds the base); errors name the temporary file as the target."""
    from optgen.render import compile_spec
    from optgen.smoke import smoke_step

    folder = target.parent if target.parent != Path("") else Path(".")
    if not folder.is_dir():
        raise NewError(f"{folder} is not a directory")
    fd, tmp = tempfile.mkstemp(prefix=".optgen-new-", suffix=".yaml", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        try:
            built = compile_spec(tmp)
            smoke_step(built, built.spec)
        except SpecError as exc:
            raise NewError(f"the new spec does not check (nothing written): {str(exc).replace(Path(tmp).name, target.name)}") \
                from None
    finally:
        os.unlink(tmp)
