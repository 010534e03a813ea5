"""Converting an fp32 ONNX graph to fp16: the fallback when exporting a half-precision copy fails.

Every float tensor becomes fp16; float graph inputs stay fp32 behind a Cast (clients keep sending fp32
images), outputs are fp16.
"""
from __future__ import annotations

import numpy as np

def convert_to_fp16(model_proto, keep_float_inputs: bool = True, keep_float_outputs: bool = False):
    """Convert every float32 tensor of an ONNX graph to float16, in place, and return the model.

    Initializers, Constant / ConstantOfShape values, ``Cast(to=FLOAT)`` targets, value_info, and graph
    inputs / outputs are all rewritten. With ``keep_float_inputs`` a float32 graph input stays float32 and
    is cast to fp16 right after entering the graph; likewise ``keep_float_outputs`` appends a Cast back to
    float32. Subgraphs (If / Loop / Scan bodies) are converted too. Unlike a ``.half()`` export this
    computes reductions (norm variances, softmax) in fp16 too, hence only a fallback.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16

    def conv_tensor(t: TensorProto) -> TensorProto:
        if t.data_type != FLOAT:
            return t
        arr = numpy_helper.to_array(t)
        # clamp finite values to fp16's range (finfo(float32).min masks would otherwise become -inf)
        arr = np.where(np.isfinite(arr), np.clip(arr, -65504.0, 65504.0), arr).astype(np.float16)
        new = numpy_helper.from_array(arr, t.name)
        t.CopyFrom(new)
        return t

    def conv_type(tp) -> None:
        if tp.HasField("tensor_type") and tp.tensor_type.elem_type == FLOAT:
            tp.tensor_type.elem_type = HALF
        elif tp.HasField("sequence_type"):
            conv_type(tp.sequence_type.elem_type)
        elif tp.HasField("optional_type"):
            conv_type(tp.optional_type.elem_type)

    def conv_graph(graph, top: bool) -> None:
        for init in graph.initializer:
            conv_tensor(init)
        for node in graph.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    conv_tensor(a.t)
                elif a.type == onnx.AttributeProto.TENSORS:
                    for t in a.tensors:
                        conv_tensor(t)
                elif a.type == onnx.AttributeProto.GRAPH:
                    conv_graph(a.g, False)
                elif a.type == onnx.AttributeProto.GRAPHS:
                    for g in a.graphs:
                        conv_graph(g, False)
                elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == FLOAT:
                    a.i = HALF  # Cast(to=FLOAT), EyeLike/Random*(dtype=FLOAT)
        for vi in graph.value_info:
            conv_type(vi.type)
        if not top:
            for vi in list(graph.input) + list(graph.output):
                conv_type(vi.type)
            return
        new_nodes = []
        for vi in graph.input:
            if vi.type.tensor_type.elem_type != FLOAT:
                continue
            if keep_float_inputs:
                inner = f"{vi.name}__fp16"
                for node in graph.node:
                    for i, name in enumerate(node.input):
                        if name == vi.name:
                            node.input[i] = inner
                new_nodes.append(helper.make_node("Cast", [vi.name], [inner], to=HALF, name=f"{vi.name}__cast_fp16"))
            else:
                conv_type(vi.type)
        for node in reversed(new_nodes):
            graph.node.insert(0, node)
        for vi in graph.output:
            if vi.type.tensor_type.elem_type != FLOAT:
                continue
            if keep_float_outputs:
                inner = f"{vi.name}__fp16"
                for node in graph.node:
                    for i, name in enumerate(node.output):
                        if name == vi.name:
                            node.output[i] = inner
                    for i, name in enumerate(node.input):
                        if name == vi.name:
                            node.input[i] = inner
                graph.node.append(helper.make_node("Cast", [inner], [vi.name], to=FLOAT, name=f"{vi.name}__cast_fp32"))
            else:
                conv_type(vi.type)

    conv_graph(model_proto.graph, True)
    for func in model_proto.functions:
        for node in func.node:
            for a in node.attribute:
                if a.type == onnx.AttributeProto.TENSOR:
                    conv_tensor(a.t)
                elif a.name in ("to", "dtype") and a.type == onnx.AttributeProto.INT and a.i == FLOAT:
                    a.i = HALF
    return model_proto
