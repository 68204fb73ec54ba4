"""Builds the hostile models the end-to-end tests and the fuzz seeds use.

Each is a few hundred bytes at most and attacks the server through what a
model may declare, not through its size:

  external-data.onnx         an initializer whose data is "in" ./secret.bin
  external-data-subdir.onnx  the same "in" nested/secret.bin
  huge-input.onnx            input declared FP32 [100000, 100000] (40 GB of zeros)
  long-loop.onnx             a Loop that runs for 2^63-1 iterations
  input-loop.onnx            a Loop that runs as many times as the input "n" says
                             (0 for the warm-up's zeros: it loads, then a request spins)

Run: python3 -m venv /tmp/onnxvenv && /tmp/onnxvenv/bin/pip install onnx numpy
     /tmp/onnxvenv/bin/python tests/data/hostile/make.py
The outputs are committed; tests never need Python.
"""

import os

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from onnx.external_data_helper import set_external_data

HERE = os.path.dirname(os.path.abspath(__file__))
OPSET = [helper.make_opsetid("", 17)]


def save(model, name):
    # No onnx.checker: it would go looking for the external files.
    path = os.path.join(HERE, name)
    onnx.save_model(model, path, save_as_external_data=False)
    print(f"{name}: {os.path.getsize(path)} bytes")


def external(tensor, location):
    """Moves a tensor's data "out" to `location` without writing the file."""
    set_external_data(tensor, location=location, offset=0, length=len(tensor.raw_data))
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    return tensor


def external_initializer(name, location):
    # 16 bytes of UINT8, more than the 8 elements ONNX Runtime's constant
    # sharing inspects (which would fail on external data): this one is
    # read from `location` at session creation and added to the input.
    w = external(numpy_helper.from_array(np.zeros(16, np.uint8), "w"), location)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])],
        name,
        [helper.make_tensor_value_info("x", TensorProto.UINT8, [16])],
        [helper.make_tensor_value_info("y", TensorProto.UINT8, [16])],
        initializer=[w],
    )
    save(helper.make_model(graph, opset_imports=OPSET), f"{name}.onnx")


def huge_input():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "h",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [100000, 100000])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [100000, 100000])],
    )
    save(helper.make_model(graph, opset_imports=OPSET, producer_name=""), "huge-input.onnx")


def long_loop():
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [helper.make_node("Loop", ["trips", "cond", "x"], ["y"], body=body)],
        "long-loop",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[
            numpy_helper.from_array(np.array(np.iinfo(np.int64).max, np.int64), "trips"),
            numpy_helper.from_array(np.array(True), "cond"),
        ],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    onnx.checker.check_model(model)
    save(model, "long-loop.onnx")


def input_loop():
    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, [1]),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1]),
        ],
        initializer=[numpy_helper.from_array(np.ones(1, np.float32), "one")],
    )
    graph = helper.make_graph(
        [
            helper.make_node("Squeeze", ["n", "axes"], ["trips"]),
            helper.make_node("Loop", ["trips", "cond", "start"], ["y"], body=body),
        ],
        "input-loop",
        [helper.make_tensor_value_info("n", TensorProto.INT64, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
        initializer=[
            numpy_helper.from_array(np.array([0], np.int64), "axes"),
            numpy_helper.from_array(np.array(True), "cond"),
            numpy_helper.from_array(np.zeros(1, np.float32), "start"),
        ],
    )
    model = helper.make_model(graph, opset_imports=OPSET)
    onnx.checker.check_model(model)
    save(model, "input-loop.onnx")


if __name__ == "__main__":
    external_initializer("external-data", "secret.bin")
    external_initializer("external-data-subdir", "nested/secret.bin")
    huge_input()
    long_loop()
    input_loop()
