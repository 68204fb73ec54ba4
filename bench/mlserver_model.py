"""Trains the same scikit-learn pipeline as examples/models/cancer-v1.onnx
(same data split, same hyper-parameters) and writes it for MLServer's
scikit-learn runtime:

    python bench/mlserver_model.py DIR

DIR/cancer/model.joblib and DIR/cancer/model-settings.json.
"""

import json
import pathlib
import sys

import joblib
import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

out = pathlib.Path(sys.argv[1]) / "cancer"
out.mkdir(parents=True, exist_ok=True)
data = load_breast_cancer()
x = data.data.astype(np.float32)
x_train, _, y_train, _ = train_test_split(x, data.target, test_size=0.3, random_state=7, stratify=data.target)
model = make_pipeline(StandardScaler(), LogisticRegression(C=0.002, max_iter=1000)).fit(x_train, y_train)
joblib.dump(model, out / "model.joblib")
(out / "model-settings.json").write_text(
    json.dumps(
        {
            "name": "cancer",
            "implementation": "mlserver_sklearn.SKLearnModel",
            "parameters": {"uri": "./model.joblib", "version": "1"},
        }
    )
)
