"""A small ONNX graph builder on top of ``onnx.helper`` with explicit opset and IR version.

OPSET / IR_VERSION are chosen for the oldest onnxruntime the artifacts support
(1.16.3, the newest manylinux2014 aarch64 wheel): onnx >= 1.17 would otherwise
write an IR version that runtime rejects.
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from actcomp_edge.core.methods import NCHWC_DOMAIN

OPSET = 17
IR_VERSION = 8
ACTCOMP_DOMAIN = "ai.actcomp"  # decomposition nodes in the overview graph (not executed)
DTYPES = {np.dtype(np.float32): TensorProto.FLOAT, np.dtype(np.int64): TensorProto.INT64,
          np.dtype(np.int32): TensorProto.INT32, np.dtype(np.bool_): TensorProto.BOOL,
          np.dtype(np.uint8): TensorProto.UINT8}


class Graph:
    """Collects nodes, inputs, outputs and initializers; ``model()`` makes the ModelProto."""

    def __init__(self, name: str, nchwc: bool = False):
        """nchwc: builders may use NCHWC_DOMAIN's kernels (``Graph.uses_nchwc`` says if they did)."""
        self.name = name
        self.nchwc = nchwc
        self.nodes, self.inputs, self.outputs, self.initializers = [], [], [], []
        self.value_info = []  # shapes of intermediate tensors (where inference cannot see)
        self._initializer_names = set()
        self._counter = 0

    def fresh(self, hint: str) -> str:
        self._counter += 1
        return f"{hint}#{self._counter}"

    def op(self, op_type: str, inputs, name: str, outputs=None, domain: str = "", **attrs) -> str:
        """Add a node; returns its (first) output name. ``name`` names the node; outputs
        default to one fresh tensor named after it."""
        outputs = [o or self.fresh(name) for o in outputs] if outputs else [self.fresh(name)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outputs, name=self.fresh(name),
                                           domain=domain, **attrs))
        return outputs[0]

    def const(self, name: str, value) -> str:
        """An initializer (deduplicated by name)."""
        if name not in self._initializer_names:
            array = np.asarray(value)
            if array.dtype == np.float64:
                array = array.astype(np.float32)
            self.initializers.append(numpy_helper.from_array(array, name))
            self._initializer_names.add(name)
        return name

    def ints(self, values) -> str:
        values = [int(v) for v in values]
        return self.const("const/i64/" + "_".join(map(str, values)), np.array(values, np.int64))

    def scalar(self, value: float, rank: int = 0) -> str:
        """A float32 constant; with ``rank``, of that many dims of 1 (to broadcast against a
        tensor of that rank: see training_graph.emit_update)."""
        name = f"const/f32/{value!r}" + (f"/rank{rank}" if rank else "")
        return self.const(name, np.full([1] * rank, value, np.float32))

    def input(self, name: str, dtype, shape) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, DTYPES[np.dtype(dtype)], shape))
        return name

    def output(self, name: str, dtype, shape) -> str:
        self.outputs.append(helper.make_tensor_value_info(name, DTYPES[np.dtype(dtype)], shape))
        return name

    @property
    def uses_nchwc(self) -> bool:
        return any(n.domain == NCHWC_DOMAIN for n in self.nodes)

    def model(self, doc: str = "", check: bool = True) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  self.initializers, doc_string=doc, value_info=self.value_info)
        opsets = [helper.make_opsetid("", OPSET)]
        if any(n.domain == ACTCOMP_DOMAIN for n in self.nodes):
            opsets.append(helper.make_opsetid(ACTCOMP_DOMAIN, 1))
        if self.uses_nchwc:
            opsets.append(helper.make_opsetid(NCHWC_DOMAIN, 1))
        model = helper.make_model(graph, opset_imports=opsets, producer_name="actcomp-edge",
                                  ir_version=IR_VERSION)
        if check:
            onnx.checker.check_model(model, full_check=True)
        return model
