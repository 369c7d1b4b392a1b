"""The triton backend's launch plan: what :mod:`optgen.backends.triton_codegen` tells
:mod:`optgen.runtime.triton_runner` about a program's kernels, as typed records.

A generated ``<name>_triton.py`` keeps it as the plain-data literal ``PLAN`` (:meth:`TritonPlan.to_data`:
only literals reach generated code, and the literal's form is unchanged by these types); the runner
reads it back with :meth:`TritonPlan.from_data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

#: a branch path's key: the decided conditions, ((name, outcome), ...)
PathKey = tuple[tuple[str, bool], ...]


@dataclass(frozen=True)
class CallPlan:
    """A whole-matrix call stage (Newton-Schulz): the op, the workspace columns it reads and
    writes, and its host arguments (("var", name) or ("const", value))."""

    op: str
    input: str
    output: str
    args: tuple[tuple[str, Any], ...]

    def to_data(self) -> dict:
        return {"op": self.op, "input": self.input, "output": self.output, "args": [list(a) for a in self.args]}

    @classmethod
    def from_data(cls, d: dict) -> CallPlan:
        return cls(d["op"], d["input"], d["output"], tuple((k, v) for k, v in d["args"]))


@dataclass(frozen=True)
class PathLaunch:
    """One branch path: its launches in order and the table the kernels read."""

    #: (kernel name, kind): kind "prologue" | "flat" | "rows" | ... | "vec" | "call" (name: "callK")
    launches: tuple[tuple[str, str], ...] = ()
    #: the per-tensor table's columns ("param", "state:exp_avg", "ws:_t0", "numel", ...)
    columns: tuple[str, ...] = ()
    #: workspace temporaries (name, kind name, accumulated across tensors)
    temps: tuple[tuple[str, str, bool], ...] = ()
    #: host values each tensor's row hands the kernels, by slot
    hv: tuple[str, ...] = ()
    #: states the path creates when absent
    creates: tuple[str, ...] = ()
    #: the device states the path reads or writes (the runner refuses a missing one)
    states: tuple[str, ...] = ()
    calls: tuple[CallPlan, ...] = ()
    #: the scale block a codec of the path tiles by (0: none)
    block: int = 0
    #: (accumulator, workspace temporary) summed over the tensors of the step
    accumulates: tuple[tuple[str, str], ...] = ()
    #: why the backend cannot run this path (None: it can)
    unsupported: str | None = None

    def column(self, name: str) -> int:
        return self.columns.index(name)

    def to_data(self) -> dict:
        if self.unsupported is not None:
            return {"unsupported": self.unsupported}
        d: dict[str, Any] = {"launches": list(self.launches)}
        if self.calls:
            d["calls"] = [c.to_data() for c in self.calls]
        d |= {"columns": list(self.columns), "temps": list(self.temps), "hv": list(self.hv),
              "creates": list(self.creates)}
        if self.block:
            d["block"] = self.block
        d["states"] = list(self.states)
        if self.accumulates:
            d["accumulates"] = list(self.accumulates)
        return d

    @classmethod
    def from_data(cls, d: dict) -> PathLaunch:
        if "unsupported" in d:
            return cls(unsupported=d["unsupported"])
        return cls(
            launches=tuple((n, k) for n, k in d["launches"]),
            columns=tuple(d["columns"]),
            temps=tuple((n, k, bool(a)) for n, k, a in d["temps"]),
            hv=tuple(d["hv"]),
            creates=tuple(d["creates"]),
            states=tuple(d.get("states", ())),
            calls=tuple(CallPlan.from_data(c) for c in d.get("calls", ())),
            block=d.get("block", 0),
            accumulates=tuple((a, t) for a, t in d.get("accumulates", ())),
        )


@dataclass
class TritonPlan:
    """Everything the runner needs besides the kernels: the host values and hyperparameter slots
    shared by every path, and each rendered branch path."""

    #: host values that change every step (computed per step, never part of a table's snapshot)
    dynamic: tuple[str, ...]
    #: (hyperparameter, index) of each slot of the per-group hyperparameter vector
    hyper_slots: tuple[tuple[str, int | None], ...]
    #: runtime inputs (``input`` leaves) in table order
    inputs: tuple[str, ...]
    #: hyperparameters a group's tables depend on by value
    static_hypers: tuple[str, ...]
    paths: dict[PathKey, PathLaunch] = field(default_factory=dict)
    #: hoisted conditions of hyperparameters (and of globals) whose outcomes select a path
    group_conditions: tuple[str, ...] = ()
    #: None where the program has no globals
    global_conditions: tuple[str, ...] | None = None
    #: the codecs whose triton source the module includes
    codecs: tuple[str, ...] = ()

    def to_data(self) -> dict:
        d: dict[str, Any] = {"dynamic": list(self.dynamic), "hyper_slots": [list(s) for s in self.hyper_slots],
                             "inputs": list(self.inputs), "static_hypers": list(self.static_hypers)}
        if self.group_conditions:
            d["group_conditions"] = list(self.group_conditions)
        if self.global_conditions is not None:
            d["global_conditions"] = list(self.global_conditions)
        d["paths"] = {k: p.to_data() for k, p in self.paths.items()}
        if self.codecs:
            d["codecs"] = list(self.codecs)
        return d

    @classmethod
    def from_data(cls, d: dict) -> TritonPlan:
        return cls(
            dynamic=tuple(d["dynamic"]),
            hyper_slots=tuple((n, i) for n, i in d["hyper_slots"]),
            inputs=tuple(d.get("inputs") or ()),
            static_hypers=tuple(d["static_hypers"]),
            paths={k: PathLaunch.from_data(p) for k, p in d["paths"].items()},
            group_conditions=tuple(d.get("group_conditions") or ()),
            global_conditions=tuple(d["global_conditions"]) if "global_conditions" in d else None,
            codecs=tuple(d.get("codecs") or ()),
        )
