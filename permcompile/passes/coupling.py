"""Coupling analysis: which tensor axes must be permuted together.

Why: reordering the input channels of one linear layer changes the function unless the same reorder is
applied to whatever writes those channels (the producer's rows, a norm's weight, the residual stream...).
This pass finds those sets (*coupling groups*) from the exported graph alone, not from module names, so
architectures we have never seen work too.

How: every tensor in the graph that carries permutable channels gets a *tag*: the channel space it
belongs to and an integer tensor of the same shape saying which element of that space each entry
carries. Shape operations (view, transpose, expand, slice, cat, ...) are executed on the tag tensor
itself, so head splits, GQA expansions and fused-projection splits need no special cases. Element-wise
operations merge spaces (the residual ``add``; SwiGLU's ``mul``); reductions over the channels
(RMSNorm's ``mean``) drop the tag; attention keeps value channels inside their head (a *block*
constraint). Parameters are tracked the same way, so biases, norm weights, layer scales and position
embeddings become *passengers*. Whatever the pass does not understand *pins* the elements it touches:
they stay in place (safe), and the report says why.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from dataclasses import dataclass

import torch
from torch import fx

from ..capture import Captured, node_module
from .groups import Group, Member, Pin


@dataclass
class _Tag:
    """A tensor carrying channels of ``space``; ``idx`` has the tensor's shape."""

    space: int
    idx: torch.Tensor


class _ParamView:
    """A tensor derived from one parameter by shape/element-wise ops; ``pidx`` = flat param element.

    A parameter read as is (``plain``) keeps only its shape: the index tensor (one int64 per weight,
    1 GB for a 135M model) is built only if a shape op actually needs it.
    """

    def __init__(self, param: str, pidx: torch.Tensor | None = None, shape: tuple[int, ...] | None = None):
        self.param = param
        self._pidx = pidx
        self._shape = tuple(pidx.shape) if pidx is not None else tuple(shape or ())

    @property
    def plain(self) -> bool:
        return self._pidx is None

    @property
    def pidx(self) -> torch.Tensor:
        if self._pidx is None:
            numel = 1
            for d in self._shape:
                numel *= int(d)
            self._pidx = torch.arange(numel).reshape(self._shape)
        return self._pidx

    def __repr__(self) -> str:
        return f"_ParamView({self.param!r}, shape={self._shape}, plain={self.plain})"


# --- op tables ---------------------------------------------------------------------------------
_IDENTITY = {
    "clone", "contiguous", "alias", "detach", "lift_fresh_copy", "to", "_to_copy", "type_as",
    "dropout", "feature_dropout", "alpha_dropout", "_assert_tensor_metadata_noop",
}
_SHAPE = {
    "view", "reshape", "_unsafe_view", "transpose", "permute", "t", "unsqueeze", "squeeze", "expand",
    "flatten", "slice", "select", "split", "split_with_sizes", "chunk", "unbind", "repeat",
    "unflatten", "movedim", "narrow", "expand_as", "view_as", "reshape_as", "swapaxes",
}
_UNARY = {
    "neg", "silu", "gelu", "relu", "relu6", "tanh", "sigmoid", "exp", "log", "abs", "sqrt", "rsqrt",
    "pow", "erf", "sin", "cos", "square", "reciprocal", "clamp", "clamp_min", "clamp_max", "hardtanh",
    "leaky_relu", "elu", "selu", "celu", "softplus", "mish", "hardswish", "hardsigmoid", "silu_",
    "gelu_", "relu_", "log_sigmoid", "logit", "sign", "floor", "ceil", "round", "fill", "zeros_like",
    "ones_like", "full_like", "empty_like", "quick_gelu",
}
_BINARY = {"add", "sub", "mul", "div", "rsub", "maximum", "minimum", "true_divide", "mul_", "add_"}
_REDUCE = {"mean", "sum", "amax", "amin", "var", "std", "norm", "logsumexp", "prod", "max", "min",
           "var_mean", "linalg_vector_norm"}
_SOFTMAX = {"softmax", "_softmax", "log_softmax", "_log_softmax"}
# resampling/pooling over the spatial dims (2, 3, ...) of an NC... tensor: each channel is processed alone,
# so dim 1 keeps its channels (ViT/DINOv2 position-embedding interpolation, CNN pooling)
_SPATIAL = {
    "upsample_bicubic2d", "upsample_bilinear2d", "upsample_nearest2d", "upsample_nearest1d",
    "upsample_linear1d", "upsample_nearest3d", "upsample_trilinear3d", "_upsample_bicubic2d_aa",
    "_upsample_bilinear2d_aa", "_upsample_nearest_exact1d", "_upsample_nearest_exact2d",
    "_upsample_nearest_exact3d", "avg_pool1d", "avg_pool2d", "avg_pool3d", "adaptive_avg_pool1d",
    "adaptive_avg_pool2d", "adaptive_avg_pool3d", "_adaptive_avg_pool2d", "_adaptive_avg_pool3d",
}
_NO_OUTPUT = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size",
              "_assert_async", "sym_size", "sym_numel"}


def _opname(target) -> str:
    if target is operator.getitem:
        return "getitem"
    text = str(target)
    if text.startswith("aten."):
        return text.split(".")[1]
    return getattr(target, "__name__", text)


def _flatten(x):
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    else:
        yield x


class _Analysis:
    def __init__(self, captured: Captured):
        self.c = captured
        self.env: dict[str, object] = {}
        self.sizes: list[int] = []
        self.parent: list[int] = []
        self.rel: list[torch.Tensor | None] = []  # element map into parent coordinates
        self.flags: list[set[str]] = []
        self.members: list[tuple[int, torch.Tensor, str, int, str, str]] = []  # space, idx, param, axis, role, module
        self.pins: list[tuple[int, torch.Tensor, Pin]] = []
        self.blocks: list[tuple[int, torch.Tensor, torch.Tensor]] = []  # space, elements, labels
        self.siblings: dict[str, list[str]] = defaultdict(list)
        self.sibling_space: dict[str, int] = {}
        self.frozen: dict[str, str] = {}  # param FQN -> why it may not move
        self.param_uses: dict[str, int] = defaultdict(int)
        self.understood_uses: dict[str, int] = defaultdict(int)

    # --- union-find over spaces with element maps -----------------------------------------------
    def new_space(self, size: int, flag: str) -> int:
        self.sizes.append(size)
        self.parent.append(len(self.parent))
        self.rel.append(None)
        self.flags.append({flag})
        return len(self.sizes) - 1

    def find(self, s: int) -> tuple[int, torch.Tensor]:
        """Root space of ``s`` and where each of ``s``'s elements sits in the root's coordinates."""
        m = torch.arange(self.sizes[s])
        while self.parent[s] != s:
            m = self.rel[s][m]
            s = self.parent[s]
        return s, m

    def root_idx(self, tag: _Tag) -> tuple[int, torch.Tensor]:
        root, m = self.find(tag.space)
        return root, m[tag.idx]

    def merge(self, a: _Tag, b: _Tag, node: fx.Node, shape) -> _Tag | None:
        ra, ia = self.root_idx(a)
        rb, ib = self.root_idx(b)
        ia = torch.broadcast_to(ia, shape)
        ib = torch.broadcast_to(ib, shape)
        if ra == rb:
            if torch.equal(ia, ib):
                return _Tag(ra, ia)
            self.pin_tag(_Tag(ra, torch.cat([ia.flatten(), ib.flatten()])), node,
                         "operands carry the same channels in different orders")
            return None
        if self.sizes[ra] == self.sizes[rb]:
            f = torch.full((self.sizes[rb],), -1, dtype=torch.long)
            f[ib.flatten()] = ia.flatten()
            if bool((f >= 0).all()) and torch.equal(f[ib], ia) and torch.equal(
                    f.sort().values, torch.arange(self.sizes[ra])):
                self.parent[rb] = ra
                self.rel[rb] = f
                self.flags[ra] |= self.flags[rb]
                return _Tag(ra, ia)
        self.pin_tag(a, node, "element-wise op combines channel spaces that do not line up")
        self.pin_tag(b, node, "element-wise op combines channel spaces that do not line up")
        return None

    # --- constraints -----------------------------------------------------------------------------
    def pin_tag(self, tag: _Tag, node: fx.Node, reason: str) -> None:
        elements = torch.unique(tag.idx.flatten())
        self.pins.append((tag.space, elements,
                          Pin(node.name, _opname(node.target) if node.op == "call_function" else node.op,
                              reason, node_module(node), int(elements.numel()))))

    def pin_all(self, values, node: fx.Node, reason: str) -> None:
        for v in _flatten(values):
            if isinstance(v, _Tag):
                self.pin_tag(v, node, reason)
            elif isinstance(v, _ParamView):
                self.frozen.setdefault(v.param, f"{reason} ({_opname(node.target)} at {node.name})")

    def add_member(self, tag_space: int, idx: torch.Tensor, param: str, axis: int, role: str, node) -> None:
        self.members.append((tag_space, idx.clone(), param, axis, role, node_module(node)))
        self.understood_uses[param] += 1

    def add_passenger(self, pv: _ParamView, tag: _Tag, node: fx.Node, shape) -> bool:
        """Make ``pv``'s parameter ride along ``tag``'s space; False (and pin) when it cannot."""
        pidx = torch.broadcast_to(pv.pidx, shape).flatten()
        idx = torch.broadcast_to(tag.idx, shape).flatten()
        pshape = self.c.param_shapes.get(pv.param)
        if pshape is None:
            return False
        strides = torch.tensor([int(torch.tensor(pshape[i + 1:]).prod()) if i + 1 < len(pshape) else 1
                                for i in range(len(pshape))])
        # does the element vary at all? (a scalar gate broadcast over channels needs nothing)
        if bool((idx == idx[0]).all()) and idx.numel() > 0 and len(torch.unique(idx)) == 1:
            self.understood_uses[pv.param] += 1
            return True
        for axis, size in enumerate(pshape):
            coord = (pidx // strides[axis]) % size
            table = torch.full((size,), -1, dtype=torch.long)
            table[coord] = idx
            if bool((table >= 0).all()) and torch.equal(table[coord], idx):
                # every other coordinate must see the same element for a given coord: checked above;
                # and no element may come from two different coords of other axes inconsistently
                self.add_member(tag.space, table, pv.param, axis, "passenger", node)
                return True
        self.frozen.setdefault(pv.param, f"used with channels in a way the pass cannot follow at {node.name}")
        self.pin_tag(tag, node, f"parameter {pv.param} cannot follow these channels")
        return False

    def add_blocks(self, tag: _Tag, batch_ndim: int) -> None:
        """Elements may only move among elements seen at exactly the same batch coordinates."""
        root, idx = self.root_idx(tag)
        flat = idx.reshape(-1, idx.shape[-1]) if batch_ndim > 0 else idx.reshape(1, -1)
        n = self.sizes[root]
        presence = torch.zeros(n, flat.shape[0], dtype=torch.bool)
        rows = torch.arange(flat.shape[0]).unsqueeze(1).expand_as(flat)
        presence[flat.flatten(), rows.flatten()] = True
        elements = torch.unique(flat.flatten())
        _, labels = torch.unique(presence[elements], dim=0, return_inverse=True)
        self.blocks.append((root, elements, labels))

    # --- the walk ------------------------------------------------------------------------------
    def run(self) -> None:
        for node in self.c.graph.nodes:
            if node.op == "placeholder":
                if node.name in self.c.placeholder_to_param:
                    fqn = self.c.placeholder_to_param[node.name]
                    self.env[node.name] = _ParamView(fqn, shape=self.c.param_shapes.get(fqn, ()))
                    self.param_uses[fqn] += len(node.users)
                else:
                    self.env[node.name] = None
            elif node.op == "call_function":
                try:
                    self.env[node.name] = self.visit(node)
                except Exception as exc:  # an op we mis-modelled must never yield a wrong model
                    self.pin_all(self._inputs(node), node, f"analysis failed: {type(exc).__name__}: {exc}")
                    self.env[node.name] = None
            elif node.op == "output":
                self.pin_all(self._inputs(node), node, "graph output")
            else:
                self.pin_all(self._inputs(node), node, f"unsupported node kind {node.op}")
                self.env[node.name] = None

    def _inputs(self, node: fx.Node) -> list:
        vals = []
        for a in _flatten(list(node.args) + list(node.kwargs.values())):
            if isinstance(a, fx.Node):
                vals.append(self.env.get(a.name))
        return vals

    def val(self, a):
        if isinstance(a, fx.Node):
            return self.env.get(a.name)
        if isinstance(a, (list, tuple)):
            return [self.val(x) for x in a]
        return None

    @staticmethod
    def shape(node) -> tuple[int, ...] | None:
        v = node.meta.get("val") if isinstance(node, fx.Node) else None
        if isinstance(v, torch.Tensor):
            return tuple(int(s) for s in v.shape)
        return None

    def visit(self, node: fx.Node):
        op = _opname(node.target)
        args = node.args
        vals = [self.val(a) for a in args]
        kw_vals = {k: self.val(v) for k, v in node.kwargs.items()}
        involved = [v for v in _flatten(vals + list(kw_vals.values())) if v is not None]
        out_shape = self.shape(node)

        if op in _NO_OUTPUT:
            return None
        if op == "getitem":
            seq = vals[0]
            return seq[args[1]] if isinstance(seq, (list, tuple)) else None
        if not involved:
            return None  # nothing tracked flows through this node
        if op == "embedding":
            return self.embedding(node, vals)
        if op in ("linear", "addmm", "mm", "matmul", "bmm"):
            return self.matmul_like(node, op, vals, out_shape)
        if op == "scaled_dot_product_attention":
            return self.sdpa(node, vals, kw_vals, out_shape)
        if op in ("layer_norm", "rms_norm"):
            return self.norm(node, vals, out_shape)
        if op == "conv2d" or op == "convolution" or op == "conv1d":
            return self.conv(node, vals, out_shape)
        if op in _IDENTITY or (op in _UNARY and len([v for v in vals[1:] if v is not None]) == 0):
            return vals[0] if op not in ("zeros_like", "ones_like", "full_like", "empty_like", "fill") else None
        if op in _SHAPE or op == "cat" or op == "stack":
            return self.shape_op(node, op, vals, out_shape)
        if op in _BINARY:
            return self.binary(node, vals, out_shape)
        if op in _REDUCE:
            return self.reduce(node, op, vals, out_shape)
        if op in _SOFTMAX:
            return vals[0] if isinstance(vals[0], _Tag) else self._drop(node, vals)
        if op in _SPATIAL:
            return self.spatial(node, op, vals, out_shape)
        self.pin_all(involved, node, f"operation {op} is not understood")
        return None

    def _drop(self, node, vals):
        self.pin_all([v for v in _flatten(vals) if isinstance(v, _Tag)], node,
                     f"operation {_opname(node.target)} is not understood")
        return None

    # --- handlers -------------------------------------------------------------------------------
    def _is_plain_param(self, v) -> bool:
        if not isinstance(v, _ParamView):
            return False
        shape = self.c.param_shapes.get(v.param)
        if v.plain:
            return shape is not None and v._shape == tuple(shape)
        return shape is not None and tuple(v.pidx.shape) == shape and torch.equal(
            v.pidx.flatten(), torch.arange(v.pidx.numel()))

    def embedding(self, node, vals):
        w, ids = vals[0], vals[1]
        if not self._is_plain_param(w) or isinstance(ids, _Tag):
            self.pin_all(vals, node, "embedding with a computed table")
            return None
        size = self.c.param_shapes[w.param][1]
        s = self.new_space(size, "embedding")
        self.add_member(s, torch.arange(size), w.param, 1, "passenger", node)
        return _Tag(s, torch.broadcast_to(torch.arange(size), self.shape(node)))

    def _consume(self, x: _Tag | None, node, param: str, axis: int, k: int) -> None:
        if not isinstance(x, _Tag):
            if x is not None:
                self.pin_all([x], node, "linear input derived from a parameter")
            return
        rows = x.idx.reshape(-1, x.idx.shape[-1])
        if not bool((rows == rows[:1]).all()):
            self.pin_tag(x, node, "linear input channels differ between rows")
            return
        self.add_member(x.space, rows[0], param, axis, "consumer", node)
        src = node.args[0] if _opname(node.target) != "addmm" else node.args[1]
        self.siblings[src.name].append(node_module(node))
        self.sibling_space[src.name] = x.space

    def matmul_like(self, node, op, vals, out_shape):
        if op == "addmm":
            bias, x, w = vals[0], vals[1], vals[2]
        elif op == "linear":
            x, w = vals[0], vals[1]
            bias = vals[2] if len(vals) > 2 else None
        else:
            x, w = vals[0], vals[1]
            bias = None
        if self._is_plain_param(w) and len(self.c.param_shapes[w.param]) == 2 and not isinstance(bias, _Tag):
            pshape = self.c.param_shapes[w.param]
            k_axis, n_axis = (1, 0) if op == "linear" else (0, 1)
            self._consume(x, node, w.param, k_axis, pshape[k_axis])
            s = self.new_space(pshape[n_axis], "linear")
            self.add_member(s, torch.arange(pshape[n_axis]), w.param, n_axis, "producer", node)
            if isinstance(bias, _ParamView):
                if self._is_plain_param(bias) and len(self.c.param_shapes[bias.param]) == 1:
                    self.add_member(s, torch.arange(pshape[n_axis]), bias.param, 0, "producer", node)
                else:
                    self.frozen.setdefault(bias.param, "bias with an unexpected shape")
                    return None
            return _Tag(s, torch.broadcast_to(torch.arange(pshape[n_axis]), out_shape))
        # activation @ activation (attention probabilities @ values, q @ k^T)
        if op in ("matmul", "bmm") and out_shape is not None:
            a, b = x, w
            if isinstance(a, _Tag) and isinstance(b, _Tag):
                self.pin_all([a, b], node, "product of two channel-carrying tensors")
                return None
            if b is None and isinstance(a, _Tag):
                self.pin_tag(a, node, "channels contracted by a matmul")
                return None
            if isinstance(b, _Tag) and a is None:
                idx = b.idx
                if idx.dim() >= 2 and bool((idx == idx[..., :1, :]).all()):
                    row = idx[..., :1, :]
                    out = torch.broadcast_to(row, out_shape)
                    tag = _Tag(b.space, out.clone())
                    self.add_blocks(_Tag(b.space, row.squeeze(-2)), row.dim() - 2)
                    self.flags[self.find(b.space)[0]].add("attention")
                    return tag
                self.pin_tag(b, node, "matmul mixes channels along the contracted axis")
                return None
        self.pin_all(vals, node, f"{op} with non-parameter weight")
        return None

    def sdpa(self, node, vals, kw_vals, out_shape):
        q, k, v = vals[0], vals[1], vals[2]
        extra = vals[3:] + list(kw_vals.values())
        self.pin_all([t for t in (q, k) if t is not None], node, "query/key channels are contracted by attention")
        self.pin_all([t for t in extra if t is not None], node, "attention mask carries channels")
        if not isinstance(v, _Tag):
            if v is not None:
                self.pin_all([v], node, "attention values derived from a parameter")
            return None
        idx = v.idx
        if not bool((idx == idx[..., :1, :]).all()):
            self.pin_tag(v, node, "value channels vary along the sequence")
            return None
        row = idx[..., :1, :]
        self.add_blocks(_Tag(v.space, row.squeeze(-2)), row.dim() - 2)
        self.flags[self.find(v.space)[0]].add("attention")
        return _Tag(v.space, torch.broadcast_to(row, out_shape).clone())

    def norm(self, node, vals, out_shape):
        x = vals[0]
        weight = vals[2] if len(vals) > 2 else None
        bias = vals[3] if len(vals) > 3 and _opname(node.target) == "layer_norm" else None
        if not isinstance(x, _Tag):
            if x is not None:
                self.pin_all([x], node, "norm of a parameter")
            return None
        for p in (weight, bias):
            if isinstance(p, _ParamView):
                if not self.add_passenger(p, x, node, out_shape):
                    return None
            elif isinstance(p, _Tag):
                self.pin_all([x, p], node, "norm weight carries channels")
                return None
        self.flags[self.find(x.space)[0]].add("norm")
        return x

    def conv(self, node, vals, out_shape):
        x, w = vals[0], vals[1]
        bias = vals[2] if len(vals) > 2 else None
        if x is not None or not self._is_plain_param(w):
            self.pin_all(vals, node, "convolution over permuted channels")
            return None
        c_out = self.c.param_shapes[w.param][0]
        s = self.new_space(c_out, "embedding")
        self.add_member(s, torch.arange(c_out), w.param, 0, "producer", node)
        if isinstance(bias, _ParamView) and self._is_plain_param(bias):
            self.add_member(s, torch.arange(c_out), bias.param, 0, "producer", node)
        shape = [1] * len(out_shape)
        shape[1] = c_out
        return _Tag(s, torch.broadcast_to(torch.arange(c_out).reshape(shape), out_shape).clone())

    def shape_op(self, node, op, vals, out_shape):
        target = node.target
        if op in ("cat", "stack"):
            parts = vals[0]
            dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
            tags = [p for p in parts if isinstance(p, _Tag)]
            if not tags:
                pvs = [p for p in parts if isinstance(p, _ParamView)]
                if len(pvs) == 1 and all(p is None or p is pvs[0] for p in parts) and len(parts) == 1:
                    return pvs[0]
                if pvs and len(pvs) == len(parts) and len({p.param for p in pvs}) == 1:
                    # pieces of one parameter put back together (DINOv2: class position + resampled grid)
                    return _ParamView(pvs[0].param, target([p.pidx for p in pvs], *node.args[1:],
                                                           **node.kwargs).clone())
                self.pin_all(parts, node, f"{op} of parameters")
                return None
            roots = {self.find(t.space)[0] for t in tags}
            if len(roots) != 1 or any(p is None for p in parts):
                self.pin_all(parts, node, f"{op} mixes channel spaces")
                return None
            root = roots.pop()
            ref = self.root_idx(tags[0])[1]
            new_parts = []
            for p, a in zip(parts, node.args[0]):
                if isinstance(p, _Tag):
                    new_parts.append(self.root_idx(p)[1])
                else:  # a parameter concatenated along a non-channel axis (class token)
                    d = dim % ref.dim()
                    if not bool((ref == ref.narrow(d, 0, 1)).all()):
                        self.pin_all(parts, node, f"{op} of a parameter along the channel axis")
                        return None
                    shape = self.shape(a)
                    idx = torch.broadcast_to(ref.narrow(d, 0, 1), shape).clone()
                    if not self.add_passenger(p, _Tag(root, idx), node, shape):
                        return None
                    new_parts.append(idx)
            return _Tag(root, target(new_parts, *node.args[1:], **node.kwargs).clone())
        x = vals[0]
        if isinstance(x, _Tag):
            t = x.idx
        elif isinstance(x, _ParamView):
            t = x.pidx
        else:
            self.pin_all(vals, node, f"{op} with a channel-carrying argument")
            return None
        if any(v is not None for v in _flatten(vals[1:])):
            self.pin_all(vals, node, f"{op} with a channel-carrying argument")
            return None
        if op == "view":
            res = torch.ops.aten.reshape.default(t, *node.args[1:])
        elif op == "expand_as" or op == "view_as" or op == "reshape_as":
            res = torch.ops.aten.reshape.default(torch.broadcast_to(t, out_shape) if op == "expand_as" else t,
                                                 list(out_shape))
        else:
            res = target(t, *node.args[1:], **node.kwargs)
        if isinstance(res, (list, tuple)):
            return [_Tag(x.space, r.clone()) if isinstance(x, _Tag) else _ParamView(x.param, r.clone())
                    for r in res]
        res = res.clone()
        return _Tag(x.space, res) if isinstance(x, _Tag) else _ParamView(x.param, res)

    def binary(self, node, vals, out_shape):
        a = vals[0]
        b = vals[1] if len(vals) > 1 else None
        arg_b = node.args[1] if len(node.args) > 1 else None
        if out_shape is None:
            self.pin_all(vals, node, "element-wise op with unknown shape")
            return None
        if isinstance(a, _Tag) and isinstance(b, _Tag):
            return self.merge(a, b, node, out_shape)
        tag, other, other_arg = (a, b, arg_b) if isinstance(a, _Tag) else (b, a, node.args[0])
        if isinstance(tag, _Tag):
            if isinstance(other, _ParamView):
                if not self.add_passenger(other, tag, node, out_shape):
                    return None
                return _Tag(tag.space, torch.broadcast_to(tag.idx, out_shape).clone())
            if other is None:
                oshape = self.shape(other_arg) if isinstance(other_arg, fx.Node) else ()
                if oshape:  # a tensor we do not track: it must not vary along the channels
                    full = torch.broadcast_to(tag.idx, out_shape)
                    pad = (1,) * (len(out_shape) - len(oshape)) + tuple(oshape)
                    for d in range(len(out_shape)):
                        if pad[d] != 1 and not bool((full == full.narrow(d, 0, 1)).all()):
                            self.pin_tag(tag, node, "combined with a tensor that varies along the channels")
                            return None
                return _Tag(tag.space, torch.broadcast_to(tag.idx, out_shape).clone())
        # parameter (op) scalar keeps element-wise correspondence, e.g. Gemma's (1 + weight)
        if isinstance(a, _ParamView) and b is None and not isinstance(arg_b, fx.Node):
            return a
        if isinstance(b, _ParamView) and a is None and not isinstance(node.args[0], fx.Node):
            return b
        if isinstance(a, _ParamView) and isinstance(b, _ParamView) and a.param == b.param and torch.equal(
                torch.broadcast_to(a.pidx, out_shape), torch.broadcast_to(b.pidx, out_shape)):
            return a
        self.pin_all(vals, node, "element-wise op on parameters")
        return None

    def spatial(self, node, op, vals, out_shape):
        """Resample/pool dims 2.. of an [N, C, ...] tensor: the result carries, at every spatial position,
        the channels dim 1 carried. Traced as if read at the first spatial position: a parameter (the
        position embedding) can then only ride along by its channel axis, never by an axis this op mixes."""
        x = vals[0]
        in_shape = self.shape(node.args[0])
        if (not isinstance(x, (_Tag, _ParamView)) or any(v is not None for v in _flatten(vals[1:]))
                or in_shape is None or out_shape is None or len(in_shape) != len(out_shape)
                or len(in_shape) < 3 or in_shape[:2] != out_shape[:2]):
            self.pin_all(vals, node, f"{op} on channels the pass cannot follow")
            return None
        t = x.idx if isinstance(x, _Tag) else x.pidx
        t = torch.broadcast_to(t, in_shape)
        if isinstance(x, _Tag):
            for d in range(2, len(in_shape)):
                if not bool((t == t.narrow(d, 0, 1)).all()):
                    self.pin_tag(x, node, f"{op} mixes positions that carry different channels")
                    return None
        first = t[(slice(None), slice(None)) + (slice(0, 1),) * (len(in_shape) - 2)]
        res = torch.broadcast_to(first, out_shape).clone()
        return _Tag(x.space, res) if isinstance(x, _Tag) else _ParamView(x.param, res)

    def reduce(self, node, op, vals, out_shape):
        x = vals[0]
        if not isinstance(x, _Tag):
            self.pin_all(vals, node, f"{op} of a parameter")
            return None
        nd = x.idx.dim()
        dims = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        if op in ("max", "min") and not isinstance(dims, (int, list, tuple)):
            dims = None
        if dims is None or dims == []:
            dims = list(range(nd))
        dims = [d % nd for d in ([dims] if isinstance(dims, int) else dims)]
        varying = [d for d in range(nd) if not bool((x.idx == x.idx.narrow(d, 0, 1)).all())]
        if set(varying) <= set(dims):
            return None  # permutation-invariant reduction (RMSNorm's mean of squares)
        if set(varying) & set(dims):
            self.pin_tag(x, node, f"{op} over part of the channels")
            return None
        if op in ("max", "min", "var_mean"):
            self.pin_tag(x, node, f"{op} returns several outputs")
            return None
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        res = x.idx
        for d in sorted(dims, reverse=True):
            res = res.narrow(d, 0, 1)
            if not keep:
                res = res.squeeze(d)
        return _Tag(x.space, torch.broadcast_to(res, out_shape).clone())

    # --- results --------------------------------------------------------------------------------
    def groups(self) -> list[Group]:
        by_root: dict[int, list] = defaultdict(list)
        for space, idx, param, axis, role, module in self.members:
            root, m = self.find(space)
            by_root[root].append(Member(param, axis, role, tuple(m[idx].tolist()), module))
        pins_by_root: dict[int, list] = defaultdict(list)
        for space, elements, pin in self.pins:
            root, m = self.find(space)
            pins_by_root[root].append((m[elements], pin))
        blocks_by_root: dict[int, list] = defaultdict(list)
        for space, elements, labels in self.blocks:
            root, m = self.find(space)
            blocks_by_root[root].append((m[elements], labels))
        sib_by_root: dict[int, list] = defaultdict(list)
        for src, mods in self.siblings.items():
            root, _ = self.find(self.sibling_space[src])
            sib_by_root[root].append(sorted(set(mods)))

        # a parameter axis claimed by two spaces, or used in a way we did not follow, cannot move
        canon = lambda p: self.c.aliases.get(p, p)  # noqa: E731
        owners: dict[tuple[str, int], set[int]] = defaultdict(set)
        for root, mems in by_root.items():
            for mem in mems:
                owners[(canon(mem.param), mem.axis)].add(root)
        groups = []
        residual_count = 0
        for root in sorted(by_root):
            mems = by_root[root]
            consumers = [m for m in mems if m.role == "consumer"]
            if not consumers:
                continue
            n = self.sizes[root]
            fixed = torch.zeros(n, dtype=torch.bool)
            pins = []
            for elements, pin in pins_by_root.get(root, []):
                fixed[elements] = True
                pins.append(pin)
            for mem in mems:
                p = canon(mem.param)
                if len(owners[(p, mem.axis)]) > 1:
                    fixed[:] = True
                    pins.append(Pin(mem.param, "param", f"axis {mem.axis} shared by several channel spaces",
                                    mem.module, n))
                if p in self.frozen or mem.param in self.frozen:
                    why = self.frozen.get(p) or self.frozen.get(mem.param)
                    fixed[:] = True
                    pins.append(Pin(mem.param, "param", f"parameter also {why}", mem.module, n))
            # dedupe identical members (tied weights, repeated visits); conflicting ones pin
            seen: dict[tuple[str, int], Member] = {}
            unique = []
            for mem in mems:
                key = (canon(mem.param), mem.axis)
                if key in seen:
                    if seen[key].index != mem.index:
                        fixed[:] = True
                        pins.append(Pin(mem.param, "param", "tied parameter carries channels in two orders",
                                        mem.module, n))
                    if seen[key].role == "consumer" or mem.role != "consumer":
                        if mem.role == "consumer" and mem.param != seen[key].param:
                            unique.append(mem)  # keep tied consumers visible (lm_head)
                        continue
                seen[key] = mem
                unique.append(mem)
            labels = self._labels(n, blocks_by_root.get(root, []), unique)
            flags = self.flags[root]
            if "embedding" in flags:
                kind = "residual"
            elif "attention" in flags:
                kind = "attention"
            elif len(consumers) >= 1 and "linear" in flags:
                attention = any(".attn" in c.module or "attention" in c.module for c in consumers)
                kind = "other" if attention else "mlp"
            else:
                kind = "other"
            if kind == "residual":
                name = "residual" if residual_count == 0 else f"residual.{residual_count}"
                residual_count += 1
            else:
                name = f"{consumers[0].module}:in"
            groups.append(Group(
                name=name, size=n, members=unique,
                fixed=torch.nonzero(fixed).flatten().tolist(),
                blocks=labels, pins=_dedupe_pins(pins),
                siblings=sorted(sib_by_root.get(root, [])), kind=kind))
        names = defaultdict(int)
        for g in groups:  # unique names
            names[g.name] += 1
            if names[g.name] > 1:
                g.name = f"{g.name}#{names[g.name]}"
        return groups

    @staticmethod
    def _labels(n: int, constraints, members: list[Member]) -> list[int] | None:
        columns = []
        for elements, labels in constraints:
            col = torch.full((n,), -1, dtype=torch.long)
            col[elements] = labels
            columns.append(col)
        for mem in members:  # an element may only swap with one a member carries equally often
            counts = torch.bincount(torch.tensor(mem.index, dtype=torch.long), minlength=n)
            if not bool((counts == counts[0]).all()):
                columns.append(counts)
        if not columns:
            return None
        table = torch.stack(columns, dim=1)
        _, labels = torch.unique(table, dim=0, return_inverse=True)
        if int(labels.max()) == 0:
            return None
        return labels.tolist()


def _dedupe_pins(pins: list[Pin]) -> list[Pin]:
    seen, out = set(), []
    for p in pins:
        key = (p.node, p.reason)
        if key not in seen:
            seen.add(key)
            out.append(p)
    return out


def analyze(captured: Captured) -> list[Group]:
    """Coupling groups of a captured model: every channel space read by at least one linear layer."""
    analysis = _Analysis(captured)
    analysis.run()
    return analysis.groups()
