"""Drives Ferry's gRPC service with the official Triton gRPC client
(`tritonclient.grpc`), unchanged, and with the generated stub it ships for
what the client does not expose (typed contents, response metadata).

    python triton_grpc_client.py HOST:PORT HOLDOUT.jsonl EXPECTED_ACCURACY ADMIN_TOKEN

Exits non-zero (with the reason) on the first thing that is not as expected.
"""

import json
import sys

import grpc
import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

url, holdout, expected_accuracy = sys.argv[1], sys.argv[2], float(sys.argv[3])
admin = {"authorization": f"Bearer {sys.argv[4]}"}
client = grpcclient.InferenceServerClient(url=url)


def refused(call, code, words):
    """The call fails with gRPC status `code` and a message holding `words`."""
    try:
        call()
    except InferenceServerException as e:
        assert e.status() == f"StatusCode.{code}", (e.status(), e.message())
        for w in words:
            assert w in e.message(), (w, e.message())
        return e.message()
    raise AssertionError(f"expected {code} with {words}")


assert client.is_server_live(), "server live"
assert client.is_server_ready(), "server ready"
assert client.is_model_ready("cancer"), "model ready"
assert client.is_model_ready("cancer", "1"), "version ready"
meta = client.get_server_metadata(as_json=True)
assert meta["name"] == "ferry" and "model_repository" in meta["extensions"], meta
model = client.get_model_metadata("cancer", as_json=True)
assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": ["-1", "30"]}], model
assert model["versions"] == ["1"], model

rows = [json.loads(line) for line in open(holdout)]
x = np.array([r["inputs"][0]["data"] for r in rows], dtype=np.float32)
y = np.array([r["label"] for r in rows])

# The client's default: raw input contents, the whole hold-out set as one batch.
inp = grpcclient.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer("cancer", [inp])
labels = result.as_numpy("label")
probs = result.as_numpy("probabilities")
assert labels.shape == (len(rows),), labels.shape
assert probs.shape == (len(rows), 2), probs.shape
accuracy = float((labels == y).mean())
assert abs(accuracy - expected_accuracy) < 1e-3, (accuracy, expected_accuracy)
assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
response = result.get_response(as_json=True)
assert response["model_version"] == "1", response
assert response["id"], "Ferry gives every answer an id"

# A request id, one chosen output, an explicit version.
two = grpcclient.InferInput("input", [2, 30], "FP32")
two.set_data_from_numpy(x[:2])
out = grpcclient.InferRequestedOutput("probabilities")
result = client.infer("cancer", [two], outputs=[out], request_id="grpc-1", model_version="1")
assert result.get_response().id == "grpc-1"
assert np.allclose(result.as_numpy("probabilities"), probs[:2])
assert result.as_numpy("label") is None

# Typed contents (fp32_contents) through the generated stub, and the
# response metadata: the version that answered and the request id.
channel = grpc.insecure_channel(url)
stub = service_pb2_grpc.GRPCInferenceServiceStub(channel)
request = service_pb2.ModelInferRequest(model_name="cancer", id="typed-1")
tensor = request.inputs.add(name="input", datatype="FP32", shape=[3, 30])
tensor.contents.fp32_contents.extend(x[:3].flatten().tolist())
answer, call = stub.ModelInfer.with_call(request)
metadata = dict(call.initial_metadata())
assert metadata.get("x-ferry-version") == "1", metadata
assert metadata.get("x-ferry-request-id") == "typed-1", metadata
names = [o.name for o in answer.outputs]
p = np.frombuffer(answer.raw_output_contents[names.index("probabilities")], dtype=np.float32)
assert np.allclose(p.reshape(3, 2), probs[:3], atol=1e-6), p

# Wrong shape, datatype, name and element count: INVALID_ARGUMENT, named.
bad = grpcclient.InferInput("input", [2, 29], "FP32")
bad.set_data_from_numpy(x[:2, :29])
refused(lambda: client.infer("cancer", [bad]), "INVALID_ARGUMENT", ["input", "[2, 29]", "[-1, 30]"])
bad = grpcclient.InferInput("input", [2, 30], "FP64")
bad.set_data_from_numpy(x[:2].astype(np.float64))
refused(lambda: client.infer("cancer", [bad]), "INVALID_ARGUMENT", ["must be FP32, not FP64"])
bad = grpcclient.InferInput("features", [2, 30], "FP32")
bad.set_data_from_numpy(x[:2])
refused(lambda: client.infer("cancer", [bad]), "INVALID_ARGUMENT", ['unknown input "features"'])
request = service_pb2.ModelInferRequest(model_name="cancer")
tensor = request.inputs.add(name="input", datatype="FP32", shape=[2, 30])
tensor.contents.fp32_contents.extend([1.0] * 59)
try:
    stub.ModelInfer(request)
    raise AssertionError("59 elements for [2, 30] must fail")
except grpc.RpcError as e:
    assert e.code() == grpc.StatusCode.INVALID_ARGUMENT, e
    assert "needs 60 elements but 59 were given" in e.details(), e.details()
refused(lambda: client.infer("absent", [two]), "NOT_FOUND", ['model "absent" is not served'])
refused(lambda: client.infer("cancer", [two], model_version="9"), "NOT_FOUND", ['version "9"'])

index = client.get_model_repository_index(as_json=True)["models"]
assert {"name": "cancer", "version": "1", "state": "READY"} in index, index
# The repository extension's unload-then-load round trip (admin token).
refused(lambda: client.unload_model("cancer"), "UNAUTHENTICATED", ["admin token"])
refused(lambda: client.unload_model("cancer", headers={"authorization": "Bearer wrong"}), "UNAUTHENTICATED", ["wrong"])
client.unload_model("cancer", headers=admin)
assert not client.is_model_ready("cancer"), "not ready after unload"
refused(lambda: client.infer("cancer", [two]), "UNAVAILABLE", ["unloaded"])
index = client.get_model_repository_index(as_json=True)["models"]
entry = next(e for e in index if e["name"] == "cancer" and e["version"] == "1")
assert entry["state"] == "UNAVAILABLE", index
refused(lambda: client.load_model("cancer"), "UNAUTHENTICATED", ["admin token"])
client.load_model("cancer", headers=admin)
assert client.is_model_ready("cancer"), "ready after load"
result = client.infer("cancer", [two])
assert np.allclose(result.as_numpy("probabilities"), probs[:2])

print(f"tritonclient.grpc OK: {len(rows)} rows, accuracy {accuracy:.4f}")
