"""Stock FLARE homomorphic encryption on a model state, timed step by step.

The same calls a stock FLARE HE job makes, in one process: a context from FLARE's
HEBuilder with its default CKKS parameters, HEModelEncryptor.encryption (one CKKS vector
per layer, weighted by the site's sample count), FLARE's nested-dict serialization, the
server's WeightedAggregationHelper (what HEInTimeAccumulateWeightedAggregator adds with),
and HEModelDecryptor.decryption. Used by ``hospital-fl bench he`` as the anchor.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator

import numpy as np
import tenseal as ts
from nvflare.apis.fl_context import FLContext
from nvflare.app_common.aggregators.weighted_aggregation_helper import WeightedAggregationHelper
from nvflare.app_opt.he.homomorphic_encrypt import deserialize_nested_dict, serialize_nested_dict
from nvflare.app_opt.he.model_decryptor import HEModelDecryptor
from nvflare.app_opt.he.model_encryptor import HEModelEncryptor
from nvflare.lighter.impl.he import HEBuilder

__all__ = ["stock_he_costs"]


@contextlib.contextmanager
def _native_stdout_silenced() -> Iterator[None]:
    """TenSEAL prints a warning to the process's stdout for every layer larger than one
    ciphertext; keep the benchmark's JSON on stdout clean."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def _nbytes(serialized: dict) -> int:
    return sum(len(v) if isinstance(v, bytes) else np.asarray(v).nbytes for v in serialized.values())


def stock_he_costs(state: dict[str, np.ndarray], site_updates: list[dict[str, np.ndarray]], counts: list[int]) -> dict:
    """Seconds and bytes of stock FLARE HE for one round of ``site_updates`` (full weights).

    Returns encrypt seconds per site, serialized bytes per site, server aggregation
    seconds (deserialize, weighted sum, serialize), decrypt seconds at one site, and the
    largest error of the decrypted mean against the plaintext weighted mean.
    """
    builder = HEBuilder()  # FLARE's defaults: N=8192, [60, 40, 40], scale 2**40
    builder.initialize(None, None)
    client_bytes = builder.get_serialized_context(is_client=True)
    server_ctx = ts.context_from(builder.get_serialized_context(is_client=False))
    fl_ctx = FLContext()
    encrypt_s, sent = [], []
    for update, n in zip(site_updates, counts):
        encryptor = HEModelEncryptor()
        encryptor.tenseal_context = ts.context_from(client_bytes)
        encryptor.encrypt_layers, encryptor.n_iter, encryptor.aggregation_weight = [True], n, 1.0
        params = {k: np.asarray(v, dtype=np.float64).copy() for k, v in update.items()}
        tick = time.perf_counter()
        with _native_stdout_silenced():
            encrypted, layers = encryptor.encryption(params, fl_ctx)
        serialized = serialize_nested_dict(encrypted)
        encrypt_s.append(time.perf_counter() - tick)
        sent.append(serialized)
    tick = time.perf_counter()
    helper = WeightedAggregationHelper(weigh_by_local_iter=False)  # as HEInTimeAccumulateWeightedAggregator
    for i, serialized in enumerate(sent):
        received = dict(serialized)
        deserialize_nested_dict(received, context=server_ctx)
        helper.add(received, 1.0, f"site-{i + 1}", 0)  # weights were applied at the sites
    summed = serialize_nested_dict(helper.get_result())
    aggregate_s = time.perf_counter() - tick
    decryptor = HEModelDecryptor()
    decryptor.tenseal_context = ts.context_from(client_bytes)
    tick = time.perf_counter()
    decrypted = decryptor.decryption(dict(summed), layers, fl_ctx)
    decrypt_s = time.perf_counter() - tick
    total = float(sum(counts))
    expected = {k: sum(n * np.asarray(u[k], np.float64) for u, n in zip(site_updates, counts)) for k in state}
    error = max(
        float(np.max(np.abs(np.asarray(decrypted[k]) * len(counts) / total - expected[k].ravel() / total)))
        for k in state
    )
    return {
        "encrypt_seconds_per_site": float(np.mean(encrypt_s)),
        "bytes_per_site": int(np.mean([_nbytes(s) for s in sent])),
        "aggregate_seconds": aggregate_s,
        "downlink_bytes": _nbytes(summed),
        "decrypt_seconds": decrypt_s,
        "max_abs_error": error,
    }
