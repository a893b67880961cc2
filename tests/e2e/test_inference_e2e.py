"""A checkpoint downloaded from the real API is enough for inference on its own.

lenet/bn on digits trains through the embedded stack (uvicorn + worker); ``predict`` on the
validation images as the data reader gives them, before normalization, gets exactly the
job's reported number of correct predictions, here and in a fresh interpreter that has only
the downloaded file and the raw images (the data set and ``build_data`` unreachable there).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from tests.harness import Stack, wait_for

SPEC: dict[str, Any] = {
    "name": "lenet-bn-digits-inference",
    "model": {"arch": "lenet", "norm": "bn", "num_classes": 10},
    "data": {"dataset": "digits", "batch_size": 64, "val_fraction": 0.2},
    "optim": {"name": "sgd", "lr": 0.05},
    "resources": {"device": "cpu"},
    "epochs": 1,
}

# Runs in a fresh interpreter: scikit-learn (the digits) and build_data are unreachable, so
# the only source of the normalization is the file's header.
FRESH = textwrap.dedent(
    """
    import json, sys
    sys.modules["sklearn"] = None
    import numpy as np
    import normcore
    import normcore.data.loader as loader

    def refuse(*args, **kwargs):
        raise AssertionError("build_data called during inference")

    loader.build_data = loader._build_data = refuse
    model = normcore.load_model(sys.argv[1])
    images = np.load(sys.argv[2])
    labels = np.load(sys.argv[3])
    prediction = model.predict(images)
    correct = int((prediction.labels.numpy() == labels).sum())
    print(json.dumps({"correct": correct, "mean": model.predict.input.mean}))
    """
)


def test_downloaded_checkpoint_predicts_the_reported_accuracy(
    sqlite_stack: Stack, tmp_path: Path
) -> None:
    import normcore
    from normcore.data import build_data
    from normcore.spec import JobSpec

    with sqlite_stack.client() as client:
        r = client.post("/jobs", json=SPEC)
        assert r.status_code == 201, r.text
        job_id = r.json()["id"]
        wait_for(
            lambda: (
                client.get(f"/jobs/{job_id}").json()["status"]
                in ("succeeded", "failed", "cancelled")
            ),
            timeout=180,
            what="lenet job",
        )
        assert client.get(f"/jobs/{job_id}").json()["status"] == "succeeded"
        rows = client.get(f"/jobs/{job_id}/metrics", params={"limit": 1000}).json()["items"]
        last = client.get(f"/jobs/{job_id}/checkpoints").json()[-1]
        download = client.get(f"/jobs/{job_id}/checkpoints/{last['name']}")
        assert download.status_code == 200
    path = tmp_path / "download" / "model.safetensors"
    path.parent.mkdir()
    path.write_bytes(download.content)
    val_rows = [row for row in rows if "val_accuracy" in row["values"]]
    reported = val_rows[-1]["values"]["val_accuracy"]

    # the validation images as the data reader gives them: the same split, not normalized
    spec = JobSpec.model_validate(SPEC)
    data = spec.data
    raw = build_data(data.model_copy(update={"normalize": False}), seed=spec.seed)
    expected_correct = round(reported * raw.num_val)
    assert expected_correct / raw.num_val == reported

    model = normcore.load_model(path)
    prediction = model.predict(raw.val_x)
    assert int((prediction.labels == raw.val_y).sum()) == expected_correct

    images, labels = tmp_path / "val_x.npy", tmp_path / "val_y.npy"
    np.save(images, raw.val_x.numpy())
    np.save(labels, raw.val_y.numpy())
    fresh = subprocess.run(
        [sys.executable, "-c", FRESH, str(path), str(images), str(labels)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path / "download",
    )
    assert fresh.returncode == 0, fresh.stderr
    answer = json.loads(fresh.stdout.strip().splitlines()[-1])
    assert answer["correct"] == expected_correct
    assert answer["mean"][0] == build_data(data, seed=spec.seed).mean[0]
