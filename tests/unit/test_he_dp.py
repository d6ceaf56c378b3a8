"""DP and HE together: a DP site's noised update is what gets encrypted, and the ledger's
accounting is the same as without HE (encryption is post-processing)."""

from __future__ import annotations

import numpy as np
import pytest
from hospital_fl.bench.federated_loop import run_federated_in_process
from hospital_fl.data.federated import load_federated
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.jobspec import JobSpec
from hospital_fl.models.cxr import ModelConfig
from hospital_fl.privacy.config import DPConfig
from hospital_fl.privacy.he_params import CKKSParams
from hospital_fl.training.config import TrainConfig


def test_dp_noise_before_encryption_keeps_the_accounting():
    data = load_federated(SplitConfig(num_sites=2))
    dp = DPConfig("sample", 8.0)
    train = TrainConfig(torch_threads=1)
    plain = run_federated_in_process(data, ModelConfig(), train, 1, dp)
    encrypted = run_federated_in_process(data, ModelConfig(), train, 1, dp, he=CKKSParams())

    assert encrypted.privacy == plain.privacy  # same calibrated noise, same epsilon per site
    assert "he" in encrypted.rounds[-1]
    # The noise is drawn from the OS at every release, so the two runs (same seed) differ;
    # HE's exactness on a given set of updates is tested in test_he.py.
    assert any(
        not np.allclose(a.numpy(), b.numpy())
        for a, b in zip(plain.model.state_dict().values(), encrypted.model.state_dict().values())
    )


def test_he_job_spec_accepts_sample_dp_and_refuses_what_the_server_would_have_to_read():
    assert JobSpec(he=CKKSParams(), privacy=DPConfig("sample", 8.0)).he is not None
    for kwargs, name in [
        (dict(privacy=DPConfig("client-central", 8.0)), "privacy.mechanism"),
        (dict(algorithm="scaffold"), "algorithm"),
        (dict(algorithm="fedopt"), "algorithm"),
    ]:
        with pytest.raises(InputError) as err:
            JobSpec(he=CKKSParams(), **kwargs)
        assert err.value.name == name and err.value.fix
