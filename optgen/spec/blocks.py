"""Blocks: partial specs that specs compose (``include:`` and ``use:``).

A block is a YAML file ``blocks/<name>.yaml`` in the spec folder. It may declare
``hyperparameters``, ``state``, ``globals``, ``accumulators`` and ``facts``, hold ``update`` and
``finalize`` statements, include other blocks, and name its ``params``: the names a user of the
block may replace (``with:``).

* ``include: [name, {block: name, with: {param: expression}, first: true}]`` (a spec's or a block's) merges the
  block's declarations into the includer's (and its ``matches:``, mapping by mapping, the
  includer's values winning: a published API's state-dict layout shared by several specs). Merge rules: the includer's own entries come first, in
  their order, then each included block's other entries, in include order. An own entry with the
  name of an included one refines it field by field (the rule of ``extends:``): the includer's
  fields win (an empty own entry, ``name: {}``, only places an included one in the includer's
  order, which is the order of the IR's state, globals and accumulators); ``first: true`` puts a
  block's other entries before the includer's own (a shared base that each includer extends:
  the base's state first, then the includer's). Two included blocks that declare the same name differently are an error naming both
  places; declaring it identically is allowed (one entry). ``with:`` rewrites the block's
  expressions (state conditions, inits, facts) and is inherited by the block's ``use:``.
* ``- use: name`` or ``- {use: name, with: {param: expression}}`` in a statement list stands for
  the block's ``update:`` statements (inside ``update:``) or its ``finalize:`` statements (inside
  ``finalize:``), in place. A block that declares anything must be included to be used (by the
  block or the spec that uses it; a use inherits that include's ``with:`` unless it has one). Each
  ``with:`` entry replaces every use of the parameter by the expression (as a tree, so no
  parentheses are needed); a parameter that the block assigns must be given a plain name.
  Other names in a block are the includer's names (``grad``, ``param``, ``lr``, ...): where a block
  uses a block, its own ``with:`` applies to what the inner block brings in.

* ``features:`` (a block's) lists features applied to the block's ``update:`` statements only,
  wherever a spec uses the block, each as ``{feature: name, names: {its hyperparameter: the
  block's}}`` (Muon's auxiliary AdamW: ``use_atan2`` read as ``adam_use_atan2``); ``roles:`` (a
  block's) binds the roles those features rewrite among the block's statements, as a spec's
  ``roles:`` does among its own (docs/block_features.md).

Everything keeps its place: an error in a block's text names the block's file, line and column.
"""

from __future__ import annotations

import dataclasses
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from optgen.errors import Position, SpecError, did_you_mean
from optgen.spec import expr as E
from optgen.spec.yaml_source import SourceMap, dotted, load_yaml

BLOCKS_FOLDER = "blocks"
DECLARATIONS = ("hyperparameters", "state", "globals", "accumulators", "reductions", "facts")
BLOCK_FIELDS = ("block", "doc", "params", "include", "matches", *DECLARATIONS, "update", "finalize", "features",
                "roles")
INCLUDE_FIELDS = ("block", "with", "first")
MAX_BLOCK_DEPTH = 16
_NAME = re.compile(r"^[a-z][a-z0-9_]{0,99}$")

#: A substitution: parameter name -> expression. Applied in order (innermost block's first).
Mapping = dict[str, E.Expr]


@dataclass
class Block:
    name: str
    data: dict
    smap: SourceMap
    digest: str
    params: dict[str, str]


@dataclass
class BlockFeature:
    """One entry of a block's ``features:``: a feature applied to the block's statements only, its
    hyperparameters read under the names ``names`` maps them to (the feature's name -> the block's)."""

    name: str
    names: dict[str, str]
    pos: Position | None
    field: str


def block_features(block: Block) -> list[BlockFeature]:
    """The block's ``features:`` entries, checked for their form (the names are checked when the
    features are applied, against the program's hyperparameters)."""
    items = block.data.get("features") or []
    smap = block.smap
    if not isinstance(items, list):
        raise SpecError(smap.at(("features",)), "features", "a block's features: is a list of "
                        "{feature: name, names: {hyperparameter: block's name}}")
    out: list[BlockFeature] = []
    for i, item in enumerate(items):
        here = ("features", i)
        if not isinstance(item, dict) or not isinstance(item.get("feature"), str):
            raise SpecError(smap.at(here), dotted(here), "an entry of a block's features: is "
                            "{feature: name, names: {hyperparameter: block's name}}")
        unknown = [k for k in item if k not in ("feature", "names")]
        if unknown:
            raise SpecError(smap.at((*here, unknown[0], "<key>")), dotted(here),
                            f"unknown field '{unknown[0]}' in a block's feature{did_you_mean(str(unknown[0]), ['feature', 'names'])}")
        names = item.get("names") or {}
        if not isinstance(names, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in names.items()):
            raise SpecError(smap.at((*here, "names")), dotted((*here, "names")),
                            "names: maps each of the feature's hyperparameters to the block's name for it")
        out.append(BlockFeature(item["feature"], dict(names), smap.text_at((*here, "feature")), dotted(here)))
    return out


@dataclass
class Include:
    """One included block and the ``with:`` it was included with."""

    name: str
    mapping: Mapping
    pos: Position | None
    #: ``first: true``: the block's entries come before the includer's own (a shared base that
    #: the includer extends keeps its order)
    first: bool = False


@dataclass
class Composition:
    """What composing a spec needs: the block folder, the blocks read, and what was included."""

    folder: Path
    blocks: dict[str, Block] = field(default_factory=dict)
    #: the includes of the spec (its own and, through ``extends:``, its parents'), outermost first
    includes: list[Include] = field(default_factory=list)
    #: (section, name) -> the substitutions of a declaration that came from a block
    substitutions: dict[tuple[str, str], list[Mapping]] = field(default_factory=dict)

    def block(self, name: Any, pos: Position | None, field_name: str, stack: tuple[str, ...] = ()) -> Block:
        if not isinstance(name, str) or not _NAME.match(name):
            raise SpecError(pos, field_name, f"{name!r} is not a block name (lower_snake_case, the stem of a "
                            f"file in {BLOCKS_FOLDER}/)")
        if name in stack:
            raise SpecError(pos, field_name, f"circular blocks: {' -> '.join((*stack, name))}")
        if len(stack) >= MAX_BLOCK_DEPTH:
            raise SpecError(pos, field_name, f"blocks nested deeper than {MAX_BLOCK_DEPTH}")
        if name in self.blocks:
            return self.blocks[name]
        from optgen.spec.files import _display, read_spec_text

        path = self.folder / f"{name}.yaml"
        if not path.is_file():
            others = [p.stem for p in self.folder.glob("*.yaml")] if self.folder.is_dir() else []
            raise SpecError(pos, field_name, f"unknown block '{name}' (no {BLOCKS_FOLDER}/{name}.yaml)"
                            f"{did_you_mean(name, others)}")
        shown = _display(path)
        text = read_spec_text(path, shown, pos, field_name)
        data, smap = load_yaml(text, shown)
        if not isinstance(data, dict):
            raise SpecError(smap.at(()), "", "a block must be a mapping of fields")
        for key in data:
            if key not in BLOCK_FIELDS:
                raise SpecError(smap.at((key, "<key>")), str(key),
                                f"unknown field '{key}' in a block{did_you_mean(str(key), BLOCK_FIELDS)}")
        if data.get("block") != name:
            raise SpecError(smap.text_at(("block",)) or smap.at(()), "block",
                            f"a block file names itself: 'block: {name}'")
        params = data.get("params") or {}
        if not isinstance(params, dict) or not all(isinstance(v, str) for v in params.values()):
            raise SpecError(smap.at(("params",)), "params", "params is a mapping: name -> what it stands for")
        for section in DECLARATIONS:
            if not isinstance(data.get(section, {}), dict):
                raise SpecError(smap.at((section,)), section, "must be a mapping of names")
        digest = hashlib.sha256(text.encode()).hexdigest()
        block = Block(name, data, smap, digest, dict(params))
        self.blocks[name] = block
        # the block's own includes, resolved into its declarations
        includes = self.read_includes(data, smap, (*stack, name))
        block.data["_subst"] = {}
        self.merge_declarations(data, smap, includes, block.data["_subst"])
        block.data["_includes"] = includes
        return block

    def digest(self, own: str) -> str:
        if not self.blocks:
            return own
        parts = [own] + [f"{n}:{b.digest}" for n, b in sorted(self.blocks.items())]
        return hashlib.sha256("\n".join(parts).encode()).hexdigest()

    # -- include: ------------------------------------------------------------------------------

    def read_includes(self, data: dict, smap: SourceMap, stack: tuple[str, ...] = ()) -> list[Include]:
        items = data.pop("include", None)
        if items is None:
            return []
        if not isinstance(items, list):
            raise SpecError(smap.at(("include",)), "include", "must be a list of block names")
        out: list[Include] = []
        for i, item in enumerate(items):
            here = ("include", i)
            if isinstance(item, dict):
                unknown = [k for k in item if k not in INCLUDE_FIELDS]
                if unknown:
                    raise SpecError(smap.at((*here, unknown[0], "<key>")), dotted(here),
                                    f"unknown field '{unknown[0]}' in an include{did_you_mean(str(unknown[0]), INCLUDE_FIELDS)}")
                if not isinstance(item.get("first", False), bool):
                    raise SpecError(smap.at((*here, "first")), dotted((*here, "first")),
                                    "first: is true or false (true: the block's entries come before the includer's own)")
                if "block" not in item:
                    raise SpecError(smap.at(here), dotted(here), "an include entry needs 'block:'")
                name, npath = item["block"], (*here, "block")
            else:
                name, npath = item, here
            pos = smap.text_at(npath)
            if any(inc.name == name for inc in out):
                raise SpecError(pos, dotted(here), f"block '{name}' is included twice")
            block = self.block(name, pos, dotted(here), stack)
            mapping = self.read_with(item.get("with") if isinstance(item, dict) else None, (*here, "with"), smap,
                                     block)
            out.append(Include(name, mapping, pos, isinstance(item, dict) and item.get("first", False)))
        return out

    def read_with(self, raw: Any, path: tuple, smap: SourceMap, block: Block) -> Mapping:
        """The parsed ``with:`` of a use of ``block``: expressions in the includer's names."""
        if raw is None:
            return {}
        if not isinstance(raw, dict):
            raise SpecError(smap.at(path), dotted(path), "with: is a mapping: parameter -> expression")
        mapping: Mapping = {}
        for key, value in raw.items():
            kpath = (*path, key)
            if key not in block.params:
                raise SpecError(smap.at((*kpath, "<key>")), dotted(kpath),
                                f"block '{block.name}' has no parameter '{key}'"
                                f"{did_you_mean(str(key), block.params) or ' (its params: ' + ', '.join(block.params) + ')'}")
            text = value if isinstance(value, str) else repr(value)
            mapping[key] = E.parse_expression(text, smap.text_at(kpath), dotted(kpath))
        return mapping

    def merge_declarations(self, data: dict, smap: SourceMap, includes: list[Include],
                           subst: dict[tuple[str, str], list[Mapping]]) -> None:
        """Merge the included blocks' declarations into ``data`` (see the module's rules); record in
        ``subst`` the substitutions of the entries that came from blocks."""
        for section in DECLARATIONS:
            own = data.get(section) or {}
            if not isinstance(own, dict):
                continue  # validation reports it
            taken: dict[str, tuple[Any, str]] = {}  # name -> (entry, block)
            merged = dict(own)
            front: list[str] = []  # entries of ``first: true`` blocks that the includer does not declare
            for inc in includes:
                block = self.blocks[inc.name]
                for name, entry in (block.data.get(section) or {}).items():
                    bpos = block.smap.at((section, name))
                    if name in taken:
                        first_entry, first = taken[name]
                        if first_entry != entry:
                            fpos = self.blocks[first].smap.at((section, name))
                            raise SpecError(bpos, f"{section}.{name}",
                                            f"'{name}' is declared by block '{first}' ({fpos}) and differently by "
                                            f"block '{inc.name}'")
                        continue
                    taken[name] = (entry, inc.name)
                    inner = block.data.get("_subst", {}).get((section, name), [])
                    chain = [*inner, inc.mapping]
                    if name in own:
                        if isinstance(entry, dict) and isinstance(own[name], dict):
                            merged[name] = {**entry, **own[name]}
                            _take(smap, block.smap, (section, name), keep_existing=True)
                            if any(chain):
                                subst[(section, name)] = chain
                        continue
                    merged[name] = entry
                    if inc.first:
                        front.append(name)
                    _take(smap, block.smap, (section, name), keep_existing=False)
                    if any(chain):
                        subst[(section, name)] = chain
            if front:
                merged = {**{n: merged[n] for n in front}, **merged}
            if merged or section in data:
                data[section] = merged
        # matches: (the published class and its test plan): merged deeply, the includer's values win
        found = [self.blocks[inc.name] for inc in includes if isinstance(self.blocks[inc.name].data.get("matches"), dict)]
        if found:
            merged_matches: dict = {}
            for block in found:
                merged_matches = _deep_merge(merged_matches, block.data["matches"])
                _take(smap, block.smap, ("matches",), keep_existing=True)
            own = data.get("matches")
            data["matches"] = _deep_merge(merged_matches, own) if isinstance(own, dict) else merged_matches


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _take(dst: SourceMap, src: SourceMap, prefix: tuple, keep_existing: bool) -> None:
    for p, pos in src.positions.items():
        if p[: len(prefix)] == prefix and not (keep_existing and p in dst.positions):
            dst.positions[p] = pos
            if p in src.text_offsets:
                dst.text_offsets[p] = src.text_offsets[p]
            else:
                dst.text_offsets.pop(p, None)


def declares(block: Block) -> bool:
    return any(block.data.get(s) for s in DECLARATIONS)


def substitute(e: E.Expr, mappings: list[Mapping]) -> E.Expr:
    """``e`` with each mapping applied in turn (a parameter's every use replaced by its expression)."""
    for m in mappings:
        if m:
            e = _subst(e, m)
    return e


def _subst(e: E.Expr, m: Mapping) -> E.Expr:
    if isinstance(e, E.Name):
        return m.get(e.id, e)
    changes = {}
    for f in dataclasses.fields(e):
        if f.name == "pos":
            continue
        v = getattr(e, f.name)
        if isinstance(v, E.Expr):
            changes[f.name] = _subst(v, m)
        elif isinstance(v, tuple) and v and isinstance(v[0], E.Expr):
            changes[f.name] = tuple(_subst(x, m) for x in v)
    if not changes:
        return e
    return dataclasses.replace(e, **changes)


def rename_target(target: str, mappings: list[Mapping], pos: Position | None, field_name: str) -> str:
    for m in mappings:
        if target in m:
            new = m[target]
            if not isinstance(new, E.Name):
                raise SpecError(new.pos or pos, field_name, f"'{target}' is assigned by the block: with: must map it "
                                "to a plain name")
            target = new.id
    return target
