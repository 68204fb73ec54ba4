"""Drives Ferry with the official Triton HTTP client, unchanged and with its
defaults (binary tensor data for inputs and outputs).

    python triton_client.py HOST:PORT HOLDOUT.jsonl EXPECTED_ACCURACY ADMIN_TOKEN

Exits non-zero (with the reason) on the first thing that is not as expected.
"""

import json
import sys

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

url, holdout, expected_accuracy = sys.argv[1], sys.argv[2], float(sys.argv[3])
admin = {"authorization": f"Bearer {sys.argv[4]}"}
client = httpclient.InferenceServerClient(url=url)

assert client.is_server_live(), "server live"
assert client.is_server_ready(), "server ready"
assert client.is_model_ready("cancer"), "model ready"
meta = client.get_server_metadata()
assert "binary_tensor_data" in meta["extensions"], meta
model = client.get_model_metadata("cancer")
assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 30]}], model

rows = [json.loads(line) for line in open(holdout)]
x = np.array([r["inputs"][0]["data"] for r in rows], dtype=np.float32)
y = np.array([r["label"] for r in rows])

# Defaults: binary input, all outputs binary.
inp = httpclient.InferInput("input", list(x.shape), "FP32")
inp.set_data_from_numpy(x)
result = client.infer("cancer", [inp])
labels = result.as_numpy("label")
probs = result.as_numpy("probabilities")
assert labels.shape == (len(rows),), labels.shape
assert probs.shape == (len(rows), 2), probs.shape
accuracy = float((labels == y).mean())
assert abs(accuracy - expected_accuracy) < 1e-3, (accuracy, expected_accuracy)
assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
response = result.get_response()
assert response["model_version"] == "1", response

# JSON input and output, a request id, a chosen output, an explicit version.
inp = httpclient.InferInput("input", [2, 30], "FP32")
inp.set_data_from_numpy(x[:2], binary_data=False)
out = httpclient.InferRequestedOutput("probabilities", binary_data=False)
result = client.infer("cancer", [inp], outputs=[out], request_id="triton-1", model_version="1")
assert result.get_response()["id"] == "triton-1"
assert np.allclose(result.as_numpy("probabilities"), probs[:2])
assert result.as_numpy("label") is None

# Errors surface with Ferry's message.
try:
    client.infer("absent", [inp])
    raise AssertionError("an unknown model must fail")
except InferenceServerException as e:
    assert "absent" in e.message(), e.message()

index = client.get_model_repository_index()
assert {"name": "cancer", "version": "1", "state": "READY", "reason": ""} in index, index
# The repository extension's unload-then-load round trip (admin token).
try:
    client.unload_model("cancer")
    raise AssertionError("unload must need the admin token")
except InferenceServerException as e:
    assert "token" in e.message(), e.message()
client.unload_model("cancer", headers=admin)
assert not client.is_model_ready("cancer"), "not ready after unload"
try:
    client.infer("cancer", [inp])
    raise AssertionError("an unloaded model must not answer")
except InferenceServerException as e:
    assert "unloaded" in e.message(), e.message()
index = client.get_model_repository_index()
entry = next(e for e in index if e["name"] == "cancer" and e["version"] == "1")
assert entry["state"] == "UNAVAILABLE", index
client.load_model("cancer", headers=admin)
assert client.is_model_ready("cancer"), "ready after load"
result = client.infer("cancer", [inp])
assert np.allclose(result.as_numpy("probabilities"), probs[:2])
index = client.get_model_repository_index()
assert {"name": "cancer", "version": "1", "state": "READY", "reason": ""} in index, index

print(f"tritonclient OK: {len(rows)} rows, accuracy {accuracy:.4f}")
