"""Build Ferry's example models and the labelled hold-out set.

Run from the repository root (needs scikit-learn, skl2onnx, onnx, numpy):

    python3 -m venv .venv && .venv/bin/pip install -r examples/requirements.txt
    .venv/bin/python examples/make_models.py

Everything is trained on scikit-learn's bundled breast-cancer data set (569 rows,
30 features, classes 0 = malignant, 1 = benign), so nothing is downloaded. The
outputs are committed; tests never need Python to make them.

All four models share one signature, so any of them can be rolled out over another:
  input          FP32 [-1, 30]
  label          INT64 [-1]        predicted class
  probabilities  FP32 [-1, 2]      class probabilities

  cancer-v1    StandardScaler + heavily regularised logistic regression (the
               "current" model)
  cancer-v2    StandardScaler + gradient boosting: the better model
  cancer-bad   StandardScaler + logistic regression trained on shuffled labels:
               same signature, disagrees with v1 on many rows
  cancer-slow  cancer-v1 plus a side computation (a 1024x1024 matrix product
               that depends on the input and adds exactly 0 to the probabilities):
               the same answers as v1, at least 20 ms per single-row inference
  cancer-holdout.jsonl  the 30% hold-out split, one V2 request body per line
               plus its "label"

Test fixtures (tests/data/), also committed:
  cancer-zipmap.onnx   logistic regression exported *with* ZipMap (outputs a
               sequence of maps): registration must refuse it with the fix
  all-types.onnx       one Identity per V2 datatype Ferry serves (inputs
               in_<TYPE> [-1, 2] -> outputs out_<TYPE>): round-trips every datatype
"""

import json
import os
import pathlib
import sys
import time

# skl2onnx iterates over sets of strings: fix the hash seed so the files come
# out byte-identical on every run (their digests are their identity in Ferry).
if os.environ.get("PYTHONHASHSEED") != "0":
    os.environ["PYTHONHASHSEED"] = "0"
    os.execv(sys.executable, [sys.executable, *sys.argv])

import numpy as np
import onnx
from onnx import TensorProto, helper
from skl2onnx import convert_sklearn
from skl2onnx.common.data_types import FloatTensorType
from sklearn.datasets import load_breast_cancer
from sklearn.ensemble import GradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

OUT = pathlib.Path(__file__).resolve().parent / "models"
TEST_DATA = pathlib.Path(__file__).resolve().parent.parent / "tests" / "data"
ALL_TYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "UINT16": TensorProto.UINT16,
    "UINT32": TensorProto.UINT32,
    "UINT64": TensorProto.UINT64,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
}
SEED = 7
SLOW_SIZE = 1024


def to_onnx(model, n_features, zipmap=False):
    proto = convert_sklearn(
        model,
        initial_types=[("input", FloatTensorType([None, n_features]))],
        options={id(model): {"zipmap": zipmap}},
        target_opset={"": 17, "ai.onnx.ml": 3},
    )
    proto.graph.name = "ferry_example"  # skl2onnx picks a random name: keep files reproducible
    return proto


def add_slow_branch(model_proto):
    """Adds s = 0 * sum(ones(N,N) * mean(input) @ ones(N,N)) to the probabilities.

    The product depends on the input, so ONNX Runtime cannot fold it away at load
    time; it costs about 2*N^3 floating-point operations per call.
    """
    graph = model_proto.graph
    old_out = [o for o in graph.output if o.name == "probabilities"][0]
    # Rename the producer's output so the final Add can produce "probabilities".
    for node in graph.node:
        for i, name in enumerate(node.output):
            if name == "probabilities":
                node.output[i] = "probabilities_fast"
    n = SLOW_SIZE
    graph.initializer.extend(
        [
            helper.make_tensor("slow_shape", TensorProto.INT64, [2], [n, n]),
            helper.make_tensor("slow_zero", TensorProto.FLOAT, [], [0.0]),
        ]
    )
    graph.node.extend(
        [
            helper.make_node("ReduceMean", ["input"], ["slow_mean"], keepdims=0),
            helper.make_node(
                "ConstantOfShape",
                ["slow_shape"],
                ["slow_ones"],
                value=helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0]),
            ),
            helper.make_node("Mul", ["slow_ones", "slow_mean"], ["slow_a"]),
            helper.make_node("MatMul", ["slow_a", "slow_ones"], ["slow_b"]),
            helper.make_node("MatMul", ["slow_b", "slow_ones"], ["slow_c"]),
            helper.make_node("ReduceSum", ["slow_c"], ["slow_sum"], keepdims=0),
            helper.make_node("Mul", ["slow_sum", "slow_zero"], ["slow_nothing"]),
            helper.make_node("Add", ["probabilities_fast", "slow_nothing"], ["probabilities"]),
        ]
    )
    assert old_out.name == "probabilities"
    onnx.checker.check_model(model_proto)
    return model_proto


def all_types_model():
    inputs, outputs, nodes = [], [], []
    for name, ty in ALL_TYPES.items():
        inputs.append(helper.make_tensor_value_info(f"in_{name}", ty, ["batch", 2]))
        outputs.append(helper.make_tensor_value_info(f"out_{name}", ty, ["batch", 2]))
        nodes.append(helper.make_node("Identity", [f"in_{name}"], [f"out_{name}"]))
    graph = helper.make_graph(nodes, "all_types", inputs, outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def single_row_ms(path, x):
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    row = x[:1]
    sess.run(None, {"input": row})
    times = []
    for _ in range(20):
        t = time.perf_counter()
        sess.run(None, {"input": row})
        times.append((time.perf_counter() - t) * 1000)
    return sorted(times)[len(times) // 2]


def main():
    data = load_breast_cancer()
    x = data.data.astype(np.float32)
    y = data.target
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=SEED, stratify=y
    )
    OUT.mkdir(parents=True, exist_ok=True)

    v1 = make_pipeline(StandardScaler(), LogisticRegression(C=0.002, max_iter=1000))
    v2 = make_pipeline(StandardScaler(), GradientBoostingClassifier(random_state=SEED))
    bad = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    rng = np.random.default_rng(SEED)
    v1.fit(x_train, y_train)
    v2.fit(x_train, y_train)
    bad.fit(x_train, rng.permutation(y_train))

    models = {"cancer-v1": v1, "cancer-v2": v2, "cancer-bad": bad}
    report = {}
    for name, model in models.items():
        proto = to_onnx(model, x.shape[1])
        (OUT / f"{name}.onnx").write_bytes(proto.SerializeToString())
        report[name] = {
            "holdout_accuracy": round(float((model.predict(x_test) == y_test).mean()), 4),
            "agreement_with_v1": round(float((model.predict(x_test) == v1.predict(x_test)).mean()), 4),
        }
    slow = add_slow_branch(to_onnx(v1, x.shape[1]))
    (OUT / "cancer-slow.onnx").write_bytes(slow.SerializeToString())
    report["cancer-slow"] = dict(report["cancer-v1"])

    TEST_DATA.mkdir(parents=True, exist_ok=True)
    zipmap = to_onnx(v1, x.shape[1], zipmap=True)
    (TEST_DATA / "cancer-zipmap.onnx").write_bytes(zipmap.SerializeToString())
    (TEST_DATA / "all-types.onnx").write_bytes(all_types_model().SerializeToString())

    with open(OUT / "cancer-holdout.jsonl", "w") as f:
        for row, label in zip(x_test, y_test):
            body = {
                "inputs": [
                    {"name": "input", "shape": [1, 30], "datatype": "FP32", "data": [float(v) for v in row]}
                ],
                "label": int(label),
            }
            f.write(json.dumps(body) + "\n")

    for name in ["cancer-v1", "cancer-v2", "cancer-bad", "cancer-slow"]:
        report[name]["single_row_ms_onnxruntime_1_thread"] = round(single_row_ms(OUT / f"{name}.onnx", x_test), 3)
        report[name]["bytes"] = (OUT / f"{name}.onnx").stat().st_size
    report["holdout_rows"] = len(y_test)
    (OUT / "models.json").write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
