import os

import pytest

# Keep torch from oversubscribing the CI machine's cores when FLARE runs several sites.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def federated_data():
    from hospital_fl.data.federated import load_federated

    return load_federated()
