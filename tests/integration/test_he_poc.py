"""An HE job on a real FLARE POC system: kits with TenSEAL contexts from FLARE's HEBuilder,
server and 2 client processes on loopback, the server adding ciphertexts it cannot read."""

from __future__ import annotations

import json
import socket

import numpy as np
import pytest
import torch
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.he import CIPHERTEXT_MODEL_FILE, FINAL_METRICS_FILE, load_payload
from hospital_fl.flare.runners.poc import run_in_poc
from hospital_fl.flare.runners.simulator import run_in_simulator
from hospital_fl.jobspec import JobSpec
from hospital_fl.models.cxr import CXRClassifier
from hospital_fl.privacy import he
from hospital_fl.privacy.he_params import CKKSParams
from hospital_fl.training.config import TrainConfig

pytestmark = pytest.mark.integration

TINY_HE = JobSpec(
    name="cxr_fedavg_he",
    num_rounds=2,
    split=SplitConfig(num_sites=2),
    train=TrainConfig(torch_threads=1),
    he=CKKSParams(),
)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_he_job_in_poc_server_sums_ciphertext_it_cannot_read(tmp_path):
    run = run_in_poc(TINY_HE, tmp_path, timeout_s=300, port=_free_port())
    kits = tmp_path / "poc"

    # The server's kit context has no secret key; the hospitals' have it.
    server_ctx = next(kits.rglob("server/startup/server_context.tenseal"))
    client_ctx = next(kits.rglob("site-1/startup/client_context.tenseal"))
    assert not he.load_context(server_ctx, role="server").has_secret_key()
    site_key = he.load_context(client_ctx, role="client")
    assert site_key.has_secret_key()

    # Every update the server received was ciphertext, and it summed both sites each round.
    assert [entry["round"] for entry in run.history] == [0, 1]
    for entry in run.history:
        assert sorted(s["site"] for s in entry["sites"]) == ["site-1", "site-2"]
        assert all(s["accepted"] and s["encrypted"] for s in entry["sites"])
        assert entry["aggregation"]["sites"] == 2
        assert entry["aggregation"]["weight"] == pytest.approx(1.0)

    # What the server stores is ciphertext: no plaintext model file, the .ckks decrypts only
    # with a hospital's key, and none of the model's float32 bytes appear in it.
    assert run.global_model_path.name == CIPHERTEXT_MODEL_FILE
    assert not list(run.result_dir.rglob("FL_global_model.pt"))
    payload = load_payload(run.global_model_path)
    assert he.is_encrypted(payload) and payload["sites"] == 2
    weights, info = he.decrypt_update(payload, site_key)
    model = CXRClassifier(TINY_HE.model.arch, TINY_HE.model.task, TINY_HE.model.image_size)
    model.load_state_dict({k: torch.as_tensor(v) for k, v in weights.items()})
    raw = run.global_model_path.read_bytes()
    largest = max(weights, key=lambda k: weights[k].size)
    assert np.asarray(weights[largest], np.float32)[:4].tobytes() not in raw

    # The sites decrypted the final model and scored it on their own test portions.
    final = json.loads(next(run.result_dir.rglob(FINAL_METRICS_FILE)).read_text())
    assert sorted(final) == ["site-1", "site-2"]
    assert all(0.0 <= m["test_auc"] <= 1.0 for m in final.values())


def test_simulator_refuses_he_with_the_reason(tmp_path):
    with pytest.raises(InputError, match="no startup kits") as err:
        run_in_simulator(TINY_HE, tmp_path)
    assert "--poc" in err.value.fix
