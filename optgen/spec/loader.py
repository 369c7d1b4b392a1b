"""Read a spec file: YAML with positions, ``extends:`` merging, pydantic validation, and parsing
of the ``update:`` statements into expression trees."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from pydantic import ValidationError

from optgen.errors import Position, SpecError, did_you_mean
from optgen.spec.blocks import (
    BLOCKS_FOLDER,
    BlockFeature,
    Composition,
    Include,
    block_features,
    declares,
    rename_target,
    substitute,
)
from optgen.spec.expr import Const, Expr, parse_assignment, parse_expression
from optgen.spec.files import MAX_SPEC_BYTES, _display, read_spec_text  # noqa: F401  (re-exported)
from optgen.spec.model import SpecModel
from optgen.spec.yaml_source import SourceMap, dotted, load_yaml


@dataclass
class SAssign:
    """``target = expr`` in the update list."""

    target: str
    expr: Expr
    pos: Position
    field: str
    #: ``target += expr``: an accumulation into an optimizer-wide accumulator
    accumulate: bool = False


@dataclass
class SIf:
    """``{if: cond, then: [...], else: [...]}`` in the update list."""

    cond: Expr
    then: list[SAssign | SIf]
    orelse: list[SAssign | SIf]
    pos: Position
    field: str


@dataclass
class SScope:
    """A use of a block that declares ``features:``: the block's statements (in place, as any use's)
    and the features that rewrite only them, with the roles the block binds among them."""

    block: str
    body: list[SAssign | SIf]
    features: list[BlockFeature]
    #: the block's ``roles:`` (role -> reference, as a spec writes them) and the block's source map
    roles: dict
    smap: SourceMap
    pos: Position | None
    field: str


Statement = SAssign | SIf | SScope


@dataclass
class Spec:
    """A validated spec: the model, its parsed statements, and where everything came from."""

    model: SpecModel
    update: list[Statement]
    source: SourceMap
    path: str
    sha256: str
    #: Parsed ``if:`` conditions of state buffers and constructor checks.
    state_conditions: dict[str, Expr] = field(default_factory=dict)
    checks: list[tuple[Expr, str]] = field(default_factory=list)
    view_condition: Expr | None = None
    facts: dict[str, Expr] = field(default_factory=dict)
    #: the ``finalize:`` statements and the init expressions of globals and accumulators
    finalize: list[Statement] = field(default_factory=list)
    global_inits: dict[str, Expr] = field(default_factory=dict)
    accumulator_inits: dict[str, Expr] = field(default_factory=dict)
    #: ``reductions:``: name -> {field: parsed expression} (of, order, k, q, select, if)
    reduction_exprs: dict[str, dict[str, Expr]] = field(default_factory=dict)

    def position(self, *path: Any) -> Position | None:
        return self.source.at(path)

    @property
    def name(self) -> str:
        return self.model.name


def load_spec(path: str | Path, display_path: str | None = None) -> Spec:
    """Load, merge (``extends:``), validate and parse the spec at ``path``."""
    path = Path(path)
    shown = display_path or _display(path)
    comp = Composition(path.parent / BLOCKS_FOLDER)
    data, smap, digest = _load_merged(path, shown, seen=(), comp=comp)
    model = _validate(data, smap)
    ctx = _Scope(comp, "update", [], (), comp.includes)
    update = _parse_statements(data["update"], ("update",), smap, ctx)
    spec = Spec(model=model, update=update, source=smap, path=shown, sha256=digest)
    if model.finalize:
        spec.finalize = _parse_statements(data["finalize"], ("finalize",), smap, ctx._replace(section="finalize"))

    def decl_expr(text: str, path: tuple, name: str) -> Expr:
        e = parse_expression(text, smap.text_at(path), name)
        return substitute(e, comp.substitutions.get(path[:2], []))

    for section, inits in (("globals", spec.global_inits), ("accumulators", spec.accumulator_inits)):
        for name, decl in getattr(model, section).items():
            text = decl.init if isinstance(decl.init, str) else repr(decl.init)
            inits[name] = decl_expr(text, (section, name, "init"), f"{section}.{name}.init")
    for name, red in model.reductions.items():
        parsed = spec.reduction_exprs[name] = {}
        for key in ("of", "order", "k", "q", "select", "window", "if_"):
            value = getattr(red, key)
            if value is not None:
                yaml_key = "if" if key == "if_" else key
                at = ("reductions", name, yaml_key)
                if isinstance(value, str):
                    parsed[yaml_key] = decl_expr(value, at, f"reductions.{name}.{yaml_key}")
                else:  # a number (inf included, which no expression spells)
                    parsed[yaml_key] = Const(float(value), pos=smap.text_at(at))
    for name, st in model.state.items():
        if st.if_ is not None:
            spec.state_conditions[name] = decl_expr(st.if_, ("state", name, "if"), f"state.{name}.if")
    for name, text in model.facts.items():
        spec.facts[name] = decl_expr(text, ("facts", name), f"facts.{name}")
    if model.matrix_view is not None:
        p = smap.text_at(("matrix_view", "if"))
        spec.view_condition = parse_expression(model.matrix_view.if_, p, "matrix_view.if")
    for i, chk in enumerate(model.checks):
        p = smap.text_at(("checks", i, "check"))
        spec.checks.append((parse_expression(chk.check, p, f"checks[{i}].check"), chk.message))
    spec.sha256 = comp.digest(digest)  # a spec built from blocks hashes them too (the kernel cache's key)
    return spec


#: Bounds on a spec file and its ``extends:`` chain.
MAX_EXTENDS_DEPTH = 32
_SPEC_NAME = re.compile(r"^[a-z][a-z0-9_]{0,99}$")


def _load_merged(path: Path, shown: str, seen: tuple[str, ...],
                 opened_at: tuple[Position | None, str] = (None, ""),
                 comp: Composition | None = None) -> tuple[dict, SourceMap, str]:
    text = read_spec_text(path, shown, *opened_at)
    data, smap = load_yaml(text, shown)
    if not isinstance(data, dict):
        raise SpecError(smap.at(()), "", "a spec must be a mapping of fields")
    digest = hashlib.sha256(text.encode()).hexdigest()
    if comp is None:
        comp = Composition(path.parent / BLOCKS_FOLDER)
    _unfold_published(data, smap)
    includes = comp.read_includes(data, smap)
    parent_name = data.get("extends")
    if parent_name is None:
        comp.merge_declarations(data, smap, includes, comp.substitutions)
        comp.includes.extend(includes)
        return data, smap, digest
    pos = smap.text_at(("extends",))
    if not isinstance(parent_name, str):
        raise SpecError(pos, "extends", "must be the name of another spec")
    if not _SPEC_NAME.match(parent_name):
        raise SpecError(pos, "extends", f"{_short(parent_name)} is not a spec name: extends names a spec of "
                        "the same folder by its name (lower_snake_case, at most 100 characters), not a path")
    if len(seen) >= MAX_EXTENDS_DEPTH:
        raise SpecError(pos, "extends", f"extends chain deeper than {MAX_EXTENDS_DEPTH} specs")
    parent_path = path.parent / f"{parent_name}.yaml"
    if parent_name in seen or parent_path.resolve() == path.resolve():
        raise SpecError(pos, "extends", f"circular extends: {' -> '.join((*seen, parent_name))}")
    if not parent_path.exists():
        others = [p.stem for p in path.parent.glob("*.yaml")]
        raise SpecError(pos, "extends", f"unknown spec '{parent_name}'{did_you_mean(parent_name, others)}")
    if parent_path.resolve().parent != path.parent.resolve():
        raise SpecError(pos, "extends", f"spec '{parent_name}' is a link to a file outside the spec folder")
    pdata, pmap, pdigest = _load_merged(parent_path, _display(parent_path), (*seen, parent_name), (pos, "extends"),
                                        comp)
    merged, mmap = _merge(pdata, pmap, data, smap)
    comp.merge_declarations(merged, mmap, includes, comp.substitutions)
    comp.includes.extend(includes)
    return merged, mmap, hashlib.sha256((pdigest + digest).encode()).hexdigest()


#: What ``published:`` may hold: the published API surface and the test plan, apart from the maths.
PUBLISHED_FIELDS = ("matches", "constructor_order", "hyperparameters", "state_dict")


def _unfold_published(data: dict, smap: SourceMap) -> None:
    """``published:`` holds what a spec publishes rather than computes: ``matches`` (the published
    class and the settings the equivalence tests run), ``constructor_order``, and hyperparameter
    fields of the API surface (arguments accepted but unused or not implemented, torch's messages).
    It unfolds into the top level: its hyperparameter entries add to (or add fields to) the maths'
    ones, and giving a field in both places is an error."""
    pub = data.pop("published", None)
    if pub is None:
        return
    if not isinstance(pub, dict):
        raise SpecError(smap.at(("published",)), "published", "must be a mapping of "
                        + ", ".join(PUBLISHED_FIELDS))

    def move(old: tuple, new: tuple) -> None:
        for table in (smap.positions, smap.text_offsets):
            for p in [p for p in table if p[: len(old)] == old]:
                table[new + p[len(old):]] = table.pop(p)

    for key, value in pub.items():
        if key not in PUBLISHED_FIELDS:
            raise SpecError(smap.at(("published", key, "<key>")), f"published.{key}",
                            f"unknown field '{key}' in published:{did_you_mean(str(key), PUBLISHED_FIELDS)} "
                            "(the maths stay at the top level)")
        if key != "hyperparameters":
            if key in data:
                raise SpecError(smap.at(("published", key, "<key>")), f"published.{key}",
                                f"'{key}' is given twice: at the top level and under published:")
            data[key] = value
            move(("published", key), (key,))
            continue
        own = data.setdefault("hyperparameters", {})
        if not isinstance(value, dict) or not isinstance(own, dict):
            continue  # validation reports it
        for name, entry in value.items():
            if isinstance(entry, dict) and isinstance(own.get(name), dict):
                twice = sorted(set(entry) & set(own[name]))
                if twice:
                    raise SpecError(smap.at(("published", key, name, twice[0], "<key>")),
                                    f"published.hyperparameters.{name}.{twice[0]}",
                                    f"'{twice[0]}' of '{name}' is given twice: in hyperparameters: and under published:")
                own[name] = {**own[name], **entry}
                move(("published", key, name), ("hyperparameters", name, "<published>"))
                for p in [p for p in list(smap.positions) if p[:3] == ("hyperparameters", name, "<published>")]:
                    if len(p) > 3:
                        smap.positions[("hyperparameters", name) + p[3:]] = smap.positions.pop(p)
                        if p in smap.text_offsets:
                            smap.text_offsets[("hyperparameters", name) + p[3:]] = smap.text_offsets.pop(p)
                    else:
                        del smap.positions[p]
                        smap.text_offsets.pop(p, None)
            elif name in own:
                raise SpecError(smap.at(("published", key, name, "<key>")), f"published.hyperparameters.{name}",
                                f"'{name}' is given twice: in hyperparameters: and under published:")
            else:
                own[name] = entry
                move(("published", key, name), ("hyperparameters", name))
    smap.positions.pop(("published",), None)


def _short(text: str, n: int = 40) -> str:
    return repr(text if len(text) <= n else text[:n] + "...")


_ENTRY_MERGED = ("hyperparameters", "state")
_NOT_INHERITED = ("matches", "extends", "constructor_order", "doc", "include")


def _merge(parent: dict, pmap: SourceMap, child: dict, cmap: SourceMap) -> tuple[dict, SourceMap]:
    """Child fields override the parent's; hyperparameters and state merge entry by entry."""
    out = {k: v for k, v in parent.items() if k not in _NOT_INHERITED}
    smap = SourceMap(cmap.file)

    def take(src: SourceMap, prefix: tuple) -> None:
        for p, pos in src.positions.items():
            if p[: len(prefix)] == prefix:
                smap.positions[p] = pos
        for p, off in src.text_offsets.items():
            if p[: len(prefix)] == prefix:
                smap.text_offsets[p] = off

    for key in out:
        take(pmap, (key,))
    smap.positions[()] = cmap.positions[()]
    for key, value in child.items():
        if key in _ENTRY_MERGED and isinstance(value, dict) and isinstance(out.get(key), dict):
            merged = dict(out[key])
            for name, entry in value.items():
                if entry is None:
                    merged.pop(name, None)
                elif isinstance(entry, dict) and isinstance(merged.get(name), dict):
                    merged[name] = {**merged[name], **entry}
                else:
                    merged[name] = entry
                take(cmap, (key, name))
            out[key] = merged
        else:
            for p in [p for p in smap.positions if p[:1] == (key,)]:
                del smap.positions[p]
            out[key] = value
            take(cmap, (key,))
    return out, smap


def _validate(data: dict, smap: SourceMap) -> SpecModel:
    try:
        return SpecModel.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(_model_to_yaml_key(x) for x in err["loc"])
        if err["type"] == "extra_forbidden":
            pos = smap.at(loc[:-1] + (loc[-1], "<key>")) or smap.at(loc)
            allowed = _allowed_keys(loc[:-1])
            raise SpecError(pos, dotted(loc), f"unknown field '{loc[-1]}'{did_you_mean(str(loc[-1]), allowed)}") from None
        if err["type"] == "missing":
            raise SpecError(smap.at(loc[:-1]), dotted(loc), "required field is missing") from None
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] in ("literal_error",):
            msg = f"{msg}, got {err.get('input')!r}"
        # Errors from model validators carry no field: point at the entry.
        raise SpecError(smap.at(loc), dotted(loc), msg) from None


def _model_to_yaml_key(x: Any) -> Any:
    return {"as_": "as", "class_": "class", "if_": "if"}.get(x, x)


def _allowed_keys(loc: tuple) -> list[str]:
    from optgen.spec import model as m

    if not loc:
        return [*(f.alias or n for n, f in m.SpecModel.model_fields.items()), "include", "published"]
    table = {
        (): m.SpecModel,
        ("hyperparameters",): m.HyperparameterSpec,
        ("state",): m.StateSpec,
        ("globals",): m.GlobalSpec,
        ("accumulators",): m.AccumulatorSpec,
        ("reductions",): m.ReductionSpec,
        ("step",): m.StepSpec,
        ("matches",): m.MatchSpec,
        ("matches", "state_dict"): m.PublishedStateDictSpec,
        ("checks",): m.CheckSpec,
    }
    key = tuple(x for x in loc if not isinstance(x, int))
    if key and key[0] in ("hyperparameters", "state", "globals", "accumulators", "reductions"):
        key = key[:1]
    if key[:3] == ("matches", "state_dict", "state") and len(key) == 4:
        return [f.alias or n for n, f in m.PublishedEntrySpec.model_fields.items()]
    cls = table.get(key)
    if cls is None:
        return []
    return [f.alias or n for n, f in cls.model_fields.items()]


class _Scope(NamedTuple):
    """Where statements are parsed: the composition, the section (``update`` or ``finalize``), the
    substitutions in effect (a block's ``with:``, then its users'), the blocks being expanded and
    the includes visible there."""

    comp: Composition | None
    section: str
    mappings: list
    stack: tuple[str, ...]
    includes: list[Include]


def _parse_statements(items: Any, path: tuple, smap: SourceMap, ctx: _Scope | None = None) -> list[Statement]:
    field_name = dotted(path)
    if not isinstance(items, list):
        raise SpecError(smap.at(path), field_name, "must be a list of statements")
    maps = ctx.mappings if ctx is not None else []
    out: list[Statement] = []
    for i, item in enumerate(items):
        here = path + (i,)
        name = dotted(here)
        if isinstance(item, str):
            target, expr, tpos, accumulate = parse_assignment(item, smap.text_at(here), name)
            if maps:
                target, expr = rename_target(target, maps, tpos, name), substitute(expr, maps)
            out.append(SAssign(target, expr, tpos, name, accumulate))
        elif isinstance(item, dict) and "use" in item:
            out.extend(_use(item, here, smap, ctx))
        elif isinstance(item, dict):
            unknown = set(item) - {"if", "then", "else"}
            if unknown:
                bad = sorted(unknown, key=str)[0]
                raise SpecError(smap.at(here + (bad, "<key>")), name,
                                f"unknown field '{bad}' in a conditional{did_you_mean(str(bad), ['if', 'then', 'else'])}")
            if "if" not in item or "then" not in item:
                raise SpecError(smap.at(here), name, "a conditional needs 'if:' and 'then:'")
            cond_text = item["if"]
            if isinstance(cond_text, bool):
                cond_text = str(cond_text)
            cond = substitute(parse_expression(cond_text, smap.text_at(here + ("if",)), f"{name}.if"), maps)
            then = _parse_statements(item["then"], here + ("then",), smap, ctx)
            orelse = _parse_statements(item.get("else", []) or [], here + ("else",), smap, ctx)
            out.append(SIf(cond, then, orelse, smap.at(here), name))
        else:
            raise SpecError(smap.at(here), name, "a statement is 'name = expression', an if: block or a use: of a block")
    return out


def _use(item: dict, here: tuple, smap: SourceMap, ctx: _Scope | None) -> list[Statement]:
    """``{use: block, with: {...}}``: the block's statements of this section, substituted."""
    name = dotted(here)
    unknown = set(item) - {"use", "with"}
    if unknown:
        bad = sorted(unknown, key=str)[0]
        raise SpecError(smap.at(here + (bad, "<key>")), name,
                        f"unknown field '{bad}' in a use of a block{did_you_mean(str(bad), ['use', 'with'])}")
    pos = smap.text_at(here + ("use",))
    if ctx is None or ctx.comp is None:
        raise SpecError(pos, name, "use: expands a block of a spec folder's blocks/: not available here")
    block = ctx.comp.block(item["use"], pos, name, ctx.stack)
    inc = next((x for x in ctx.includes if x.name == block.name), None)
    if inc is None:  # a block may use what its user includes
        inc = next((x for x in ctx.comp.includes if x.name == block.name), None)
    if declares(block) and inc is None:
        raise SpecError(pos, name, f"block '{block.name}' declares names (its hyperparameters, state, ...): "
                        f"list it under include: to use it")
    if "with" in item:
        mapping = ctx.comp.read_with(item["with"], here + ("with",), smap, block)
    else:
        mapping = inc.mapping if inc is not None else {}
    body = block.data.get(ctx.section)
    if not body:
        raise SpecError(pos, name, f"block '{block.name}' has no {ctx.section}: statements")
    inner = _Scope(ctx.comp, ctx.section, [mapping, *ctx.mappings], (*ctx.stack, block.name),
                   block.data.get("_includes", []))
    stmts = _parse_statements(body, (ctx.section,), block.smap, inner)
    features = block_features(block)
    if not features:
        return stmts
    if ctx.section != "update":
        raise SpecError(pos, name, f"block '{block.name}' declares features: they rewrite update: statements, "
                        f"not {ctx.section}:")
    return [SScope(block.name, stmts, features, dict(block.data.get("roles") or {}), block.smap, pos, name)]
