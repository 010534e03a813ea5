"""Capture a model as a torch.fx graph with ``torch.export``.

The exported program is what the coupling analysis walks: every parameter appears as a placeholder
that ``graph_signature`` maps back to its FQN, and ``nn_module_stack`` metadata names the module each
node came from. We export without decompositions so ``aten.linear``, ``layer_norm`` and
``scaled_dot_product_attention`` survive as single nodes.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import CaptureError


@dataclass
class Captured:
    ep: torch.export.ExportedProgram
    placeholder_to_param: dict[str, str]  # placeholder node name -> parameter/buffer FQN
    param_shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]  # FQN -> canonical FQN (tied weights share one canonical name)
    seconds: float = 0.0
    user_inputs: list[str] = field(default_factory=list)

    @property
    def graph(self) -> torch.fx.Graph:
        return self.ep.graph


def node_module(node: torch.fx.Node) -> str:
    """FQN of the innermost module a node was traced in ('' at top level)."""
    stack = node.meta.get("nn_module_stack") or {}
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    return _clean_fqn(path)


def _clean_fqn(path: str) -> str:
    # non-strict export gives plain dotted paths; strict export gives "L['self'].a.b" forms
    path = path.replace("L['self'].", "").replace("L['self']", "")
    for a, b in (("[", "."), ("]", ""), ("'", "")):
        path = path.replace(a, b)
    return path.strip(".")


def capture(model: nn.Module, example_kwargs: dict, forward_kwargs: dict | None = None) -> Captured:
    """Export ``model(**example_kwargs, **forward_kwargs)`` with ``torch.export`` (non-strict)."""
    kwargs = dict(example_kwargs)
    kwargs.update(forward_kwargs or {})
    start = time.perf_counter()
    try:
        with torch.no_grad():
            ep = torch.export.export(model, (), kwargs, strict=False)
    except Exception as exc:  # torch.export raises many types; the user needs one line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CaptureError(f"torch.export could not capture {type(model).__name__}: {first[:300]}") from exc
    seconds = time.perf_counter() - start
    sig = ep.graph_signature
    placeholder_to_param = dict(sig.inputs_to_parameters)
    placeholder_to_param.update(sig.inputs_to_buffers)
    placeholder_to_param.update(getattr(sig, "inputs_to_lifted_tensor_constants", {}) or {})
    shapes = {}
    for node in ep.graph.nodes:
        if node.op == "placeholder" and node.name in placeholder_to_param:
            val = node.meta.get("val")
            if val is not None:
                shapes[placeholder_to_param[node.name]] = tuple(int(s) for s in val.shape)
    aliases = _tied_aliases(model)
    return Captured(ep, placeholder_to_param, shapes, aliases, seconds, list(sig.user_inputs))


def _tied_aliases(model: nn.Module) -> dict[str, str]:
    canonical: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in list(model.named_parameters(remove_duplicate=False)) + list(
            model.named_buffers(remove_duplicate=False)):
        key = id(p)
        canonical.setdefault(key, name)
        aliases[name] = canonical[key]
    return aliases


def linear_nodes(captured: Captured) -> list[tuple[torch.fx.Node, str, str]]:
    """(node, module FQN, weight FQN) for every linear-like node whose weight is a parameter."""
    out = []
    for node in captured.graph.nodes:
        if node.op != "call_function":
            continue
        name = str(node.target)
        if name in ("aten.linear.default", "aten.addmm.default", "aten.mm.default", "aten.matmul.default"):
            w = node.args[0] if name == "aten.addmm.default" else node.args[1]
            w = node.args[2] if name == "aten.addmm.default" else w
            if isinstance(w, torch.fx.Node) and w.name in captured.placeholder_to_param:
                out.append((node, node_module(node), captured.placeholder_to_param[w.name]))
    return out


_PASS_THROUGH = {"view", "reshape", "_unsafe_view", "contiguous", "clone", "to", "_to_copy", "alias", "slice",
                 "select", "squeeze", "unsqueeze", "transpose", "permute", "float", "detach", "dropout",
                 # element-wise activations between a head and the output (BERT's pooler: dense -> tanh)
                 "tanh", "sigmoid", "gelu", "relu", "silu", "softmax", "_softmax", "log_softmax"}


def output_linears(captured: Captured) -> set[str]:
    """Names of linear nodes whose result reaches a graph output through shape-only ops (LM heads)."""
    heads: set[str] = set()
    out_node = next(n for n in captured.graph.nodes if n.op == "output")
    stack = _flatten_nodes(out_node.args)
    seen = set()
    while stack:
        node = stack.pop()
        if node.name in seen or node.op != "call_function":
            continue
        seen.add(node.name)
        name = str(node.target)
        op = name.split(".")[1] if name.startswith("aten.") else name
        if op in ("linear", "addmm", "mm", "matmul"):
            heads.add(node.name)
        elif op in _PASS_THROUGH and node.args and isinstance(node.args[0], torch.fx.Node):
            stack.append(node.args[0])
    return heads


def _flatten_nodes(x) -> list:
    if isinstance(x, torch.fx.Node):
        return [x]
    if isinstance(x, (list, tuple)):
        return [n for y in x for n in _flatten_nodes(y)]
    if isinstance(x, dict):
        return [n for y in x.values() for n in _flatten_nodes(y)]
    return []
