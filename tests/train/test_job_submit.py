"""`ray job submit` of a short distributed training to a local head started by the test.

The head (``tests/train/ray_head.py``) binds 127.0.0.1 only, lives in its own temp dir
and ports, and is stopped by PID; other Ray clusters on the machine are left alone.
"""

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT
from tests.model.fixtures import tiny_dataset
from tests.train.ray_head import RAY, start_head, stop_head

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture
def local_head():
    head = start_head(ROOT, num_cpus=4)
    try:
        yield head
    finally:
        stop_head(head.temp_dir, head.gcs_address)


def test_ray_job_submit_trains(local_head, tmp_path):
    env, address = local_head.env, local_head.dashboard_url
    data = tiny_dataset(tmp_path / "tiny")
    out = tmp_path / "run"
    entrypoint = [
        sys.executable, "-m", "cobra_scale.cli", "train", "--data", str(data), "--ids", str(data / "ids"), "--out", str(out),
        "launcher=ray", "epochs=1", "batch_size=32", "warmup_steps=2", "init_embeddings=false", "model.d_model=32", "model.encoder_dim=32",
        "model.decoder_heads=2", "model.encoder_heads=2", "model.text_tokens=12", "inference.beams=8",
        "distributed.workers=2", "distributed.cpus_per_worker=1",
    ]
    runtime_env = {"env_vars": {k: env[k] for k in ("TORCH_EXTENSIONS_DIR", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE") if k in env}}
    submit = subprocess.run(
        [RAY, "job", "submit", "--address", address, "--submission-id", "cobra-test-train",
         "--runtime-env-json", json.dumps(runtime_env), "--", *entrypoint],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=900,
    )
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    status = subprocess.run([RAY, "job", "status", "--address", address, "cobra-test-train"], env=env, capture_output=True, text=True, timeout=60)
    text = re.sub(r"\x1b\[[0-9;]*m", "", status.stdout + status.stderr)  # ray colours its CLI output
    assert re.search(r"job 'cobra-test-train' succeeded", text, re.IGNORECASE), text[-2000:]
    assert "joining Ray cluster" in submit.stdout + submit.stderr  # the job's driver joined the head, no private Ray
    summary = json.loads((out / "final" / "state.json").read_text())
    assert summary["epoch"] == 1 and summary["step"] == 4
    assert (out / "best" / "model.safetensors").is_file()
