"""Hoisting: every host-scalar subexpression of a device statement, and every condition, becomes a
named host temporary (``_k<n>`` / ``_c<n>``) computed just before the statement that uses it.

After this pass a device statement refers to host values only through ``var`` nodes, so backends
compute all host scalars in one host pass per parameter and hand them to the device code.
"""

from __future__ import annotations

from dataclasses import replace

from optgen.ir.nodes import Assign, If, Kind, Node, Program, Stmt, walk_nodes
from optgen.ir.ops import Op

_PURE_LEAVES = {"const", "hyper", "meta", "has", "param_attr"}


def _pure(node: Node) -> bool:
    """A condition on hyperparameters and parameter facts only: the same value all step long."""
    return all(n.op in _PURE_LEAVES or n.args for n in walk_nodes(node))


def hoist(program: Program) -> Program:
    counter = {"k": 0, "c": 0}
    # Conditions on hyperparameters and parameter facts are computed once, at the top, and an
    # identical condition reuses the same name: a flag that several features switch on is one
    # decision, so backends that specialise per branch path see one condition, not one per use.
    pure: dict[Node, str] = {}
    head: list[Stmt] = []

    def fresh(prefix: str) -> str:
        n = counter[prefix]
        counter[prefix] += 1
        return f"_{prefix}{n}"

    # A host state is a 0-d tensor in the state, not a host temporary: a device expression reads
    # it through a temporary (``_k<n> = state``), the host values every backend hands its device code.
    host_states = {d.name for d in program.state if d.kind == Kind.HOST}

    def rewrite(node: Node, out: list[Stmt]) -> Node:
        if node.is_host:
            if node.op == Op.CONST or (node.op == Op.VAR and node.attr not in host_states):
                return node
            name = fresh("k")
            out.append(Assign(name, node, role="temp"))
            return Node("var", kind=Kind.HOST, attr=name, boolean=node.boolean)
        return replace(node, args=tuple(rewrite(a, out) for a in node.args))

    def block(stmts: list[Stmt]) -> list[Stmt]:
        out: list[Stmt] = []
        for s in stmts:
            if isinstance(s, If):
                cond = s.cond
                if cond.op != Op.VAR and _pure(cond):
                    if cond not in pure:
                        pure[cond] = fresh("c")
                        head.append(Assign(pure[cond], cond, s.pos, role="temp"))
                    cond = Node("var", kind=Kind.HOST, attr=pure[cond], boolean=True)
                elif cond.op != Op.VAR:
                    name = fresh("c")
                    out.append(Assign(name, cond, s.pos, role="temp"))
                    cond = Node("var", kind=Kind.HOST, attr=name, boolean=True)
                out.append(If(cond, block(s.then), block(s.orelse), s.pos))
            elif s.value.is_host:
                out.append(s)
            else:
                value = rewrite(s.value, out)
                out.append(Assign(s.target, value, s.pos, s.role))
        return out

    body = block(program.body)
    return program.copy(body=head + body)
