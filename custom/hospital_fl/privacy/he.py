"""CKKS (TenSEAL) encryption of whole model updates for federated averaging.

Each site encrypts p_i * w_i (its full weights times its share of the round) with the
consortium's symmetric key, packed by he_packing; the server adds the ciphertexts with a
context that holds no secret key; a site decrypts sum_i p_i w_i and divides by the
decrypted sum_i p_i. Contexts are those FLARE's HEBuilder writes to the kits:
``startup/server_context.tenseal`` (relinearization keys only) and
``startup/client_context.tenseal`` (the hospitals' shared secret key).

Payloads are plain dicts (str/int/float/list/dict/bytes), so FLARE serializes them as is.

Speed (DenseNet-121, 7.0M values, 859 ciphertexts of ~122 kB, 2 CPU cores, measured):
encryption and decryption run in a process pool (TenSEAL holds the GIL): ~0.9 s to
encrypt (1.5 s in-process), ~0.6 s to decrypt (0.7 s). The server's sum runs in-process:
moving 5 ciphertexts to a worker costs about what adding them does (1.1 s for 5 sites,
1.3 s with two workers). Pools start from a clean forkserver process (forking a process
that runs gRPC threads is unsafe): ~1 s once, plus the import of the caller's __main__;
one pool per context and worker count, kept for the next round; shutdown_pools() ends them.
"""

from __future__ import annotations

import atexit
import hashlib
import math
import multiprocessing
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from pathlib import Path

import numpy as np
import tenseal as ts

from hospital_fl.errors import InputError
from hospital_fl.privacy.he_packing import (
    WEIGHT_TOLERANCE,
    Layout,
    dequantize,
    frame_exponents,
    layout_for,
    pack,
    quantize,
    unpack,
)
from hospital_fl.privacy.he_params import SECURITY_MAX_BITS, CKKSParams

__all__ = [
    "CKKSParams",
    "FORMAT",
    "SECURITY_MAX_BITS",
    "make_context",
    "server_context_bytes",
    "client_context_bytes",
    "context_from_bytes",
    "load_context",
    "context_fingerprint",
    "is_encrypted",
    "encrypt_update",
    "add_encrypted",
    "check_payload",
    "decrypt_update",
    "payload_nbytes",
    "shutdown_pools",
]

FORMAT = "hospital_fl.ckks/1"
_PAYLOAD_KEYS = ("format", "fingerprint", "params", "layout", "weight", "sites", "chunks")
_KIT_FIX = {
    "server": "the server kit's startup/ folder holds server_context.tenseal when the consortium is "
    "provisioned with he: true; re-provision with he: true",
    "client": "the hospital kit's startup/ folder holds client_context.tenseal when the consortium is "
    "provisioned with he: true; re-provision with he: true",
}
_KIT_USE = "the site must use the consortium's kit (its startup/client_context.tenseal from the same provisioning)"
_FINGERPRINT_TAG = b"hospital_fl.ckks.key/1\x00"
# Fewer chunks than this per worker are handled in-process: measured, a pool only breaks even
# near 60 ciphertexts per worker (1M values over 2 workers).
_MIN_CHUNKS_PER_WORKER = 64
_BATCHES_PER_WORKER = 4


def make_context(params: CKKSParams) -> ts.Context:
    """A fresh context with the secret key, made as HEBuilder makes one (symmetric)."""
    ctx = ts.context(
        ts.SCHEME_TYPE.CKKS,
        poly_modulus_degree=params.poly_modulus_degree,
        coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
        encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC,
    )
    ctx.generate_relin_keys()
    ctx.global_scale = 2**params.scale_bits
    return ctx


def server_context_bytes(ctx: ts.Context) -> bytes:
    """What HEBuilder writes as server_context.tenseal: no secret key, relinearization keys."""
    return ctx.serialize(save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=True)


def client_context_bytes(ctx: ts.Context) -> bytes:
    """What HEBuilder writes as client_context.tenseal: the hospitals' secret key."""
    _require_secret_key(
        ctx,
        "TenSEAL context",
        "a client context carries the secret key",
        "write it from the context make_context() returned",
    )
    return ctx.serialize(save_public_key=True, save_secret_key=True, save_galois_keys=False, save_relin_keys=True)


def context_from_bytes(data: bytes, *, role: str, name: str = "TenSEAL context") -> ts.Context:
    """A CKKS context for ``role`` ("server" or "client") from serialized bytes.

    The server's context must not hold the secret key (it would read every update); a
    client's must (it encrypts and decrypts).
    """
    _check_role(role)
    try:
        ctx = ts.context_from(bytes(data))
        scheme = _seal_parms(ctx).scheme()
    except (ValueError, RuntimeError, TypeError) as err:
        raise InputError(
            name,
            f"{len(data)} bytes",
            f"it is not a TenSEAL context ({err})",
            _KIT_FIX[role].replace("holds", "must hold"),
        ) from None
    if scheme != ts.SCHEME_TYPE.CKKS.value:
        raise InputError(name, str(scheme), "it must be a CKKS context", "provision the consortium with scheme CKKS")
    if role == "server" and ctx.has_secret_key():
        raise InputError(
            name,
            "a context holding the secret key",
            "the server must never hold the hospitals' secret key: with it the server reads every update",
            "re-provision the consortium with he: true and give the server only its kit's "
            "server_context.tenseal; never copy a hospital's client_context.tenseal to the server",
        )
    if role == "client" and not ctx.has_secret_key():
        raise InputError(
            name,
            "a context without the secret key",
            "a hospital encrypts and decrypts with the consortium's secret key",
            "use client_context.tenseal from this hospital's kit startup/ folder (server_context.tenseal is "
            "the server's)",
        )
    return ctx


def load_context(path: str | os.PathLike, *, role: str) -> ts.Context:
    """The context of a kit file: role "server" (server_context.tenseal, no secret key) or
    "client" (client_context.tenseal, with the hospitals' secret key)."""
    _check_role(role)
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{role} HE context", str(path), "the file does not exist", _KIT_FIX[role])
    try:
        data = path.read_bytes()
    except OSError as err:
        raise InputError(f"{role} HE context", str(path), f"the file cannot be read ({err})", _KIT_FIX[role]) from None
    return context_from_bytes(data, role=role, name=f"{role} HE context {path}")


def context_fingerprint(ctx: ts.Context) -> str:
    """The consortium's key id: sha256 over the encryption parameters and the secret key.

    Every hospital context of one provisioning gives the same id (they share
    client_context.tenseal), another provisioning a different one; a one-way hash of a
    key with thousands of bits of entropy, so it can travel with every payload. The
    server's context cannot compute it: it holds only relinearization keys, which
    HEBuilder draws at random from the secret key (and a client context redraws at every
    load), and RLWE security makes them unlinkable to the key without it. The server
    therefore checks that the payloads of a round agree (add_encrypted) or pins an id it
    was given (``expected_fingerprint``).
    """
    _require_secret_key(
        ctx,
        "TenSEAL context",
        "the key id needs the secret key; the server's context cannot derive it",
        "call it on a hospital's client context, and give the server the id to pin if it must check one",
    )
    raw = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    top = _proto_fields(raw)
    secret = _proto_fields(top.get(3, b"")).get(1, b"")
    parms = top.get(1, b"")
    digest = hashlib.sha256(_FINGERPRINT_TAG)
    for part in (parms, secret):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.hexdigest()


def is_encrypted(obj: object) -> bool:
    """Whether ``obj`` is an encrypted-update payload of this module."""
    return isinstance(obj, Mapping) and obj.get("format") == FORMAT


def payload_nbytes(payload: Mapping) -> int:
    """Bytes of ciphertext a payload carries."""
    return sum(len(c) for c in payload["chunks"])


def encrypt_update(
    params: Mapping[str, np.ndarray],
    reference: Mapping[str, np.ndarray],
    weight: float,
    ctx: ts.Context,
    ckks: CKKSParams,
    workers: int | None = None,
) -> dict:
    """The payload of a site's ``weight`` * ``params``, on frames derived from ``reference``.

    ``weight`` is the site's share of the round (the shares of a round's sites sum to 1);
    ``reference`` is the global model every site received, so all sites share the frames.
    ``workers``: processes for large updates (default: one per CPU core; 1: in-process).
    """
    _require_secret_key(
        ctx,
        "TenSEAL context",
        "encryption is symmetric and needs the hospitals' secret key",
        "use client_context.tenseal from the hospital kit's startup/ folder",
    )
    _check_context_params(ctx, ckks, encrypting=True)
    cfg = ckks.packing()
    layout = layout_for(params, frame_exponents(reference, cfg))
    rows = pack(quantize(params, layout, weight, cfg), cfg)
    key_bytes = _secret_context_bytes(ctx)
    chunks = _run(_encrypt_rows, ctx, key_bytes, rows, _default_workers() if workers is None else workers)
    return {
        "format": FORMAT,
        "fingerprint": context_fingerprint(ctx),
        "params": ckks.to_json(),
        "layout": layout.to_json(),
        "weight": float(weight),
        "sites": 1,
        "chunks": chunks,
    }


def add_encrypted(
    payloads: Sequence[Mapping],
    ctx: ts.Context,
    workers: int | None = None,
    names: Sequence[str] | None = None,
    expected_fingerprint: str | None = None,
) -> dict:
    """The chunk-wise ciphertext sum of ``payloads``, without any secret key.

    ``names`` label the payloads in errors (e.g. site names). Payloads must carry the same
    key id: ``expected_fingerprint`` when given, else the id of ``ctx`` when it holds the
    secret key, else the id most payloads carry (a site with another provisioning's kit is
    named). Weights and site counts add up. ``workers``: processes (default 1, in-process:
    measured faster than a pool at 2 cores, where moving the ciphertexts costs what adding does).
    """
    if not isinstance(payloads, Sequence) or isinstance(payloads, (str, bytes)) or not payloads:
        raise InputError("encrypted updates", type(payloads).__name__, "at least one update is needed", "pass a list")
    if names is not None and len(names) != len(payloads):
        raise InputError(
            "names", len(names), f"there must be one name per update ({len(payloads)})", "pass one per site"
        )
    labels = list(names) if names is not None else [f"#{i}" for i in range(len(payloads))]
    if not isinstance(ctx, ts.Context):
        raise InputError("TenSEAL context", type(ctx).__name__, "it must be a TenSEAL context", "use load_context()")
    for label, payload in zip(labels, payloads):
        check_payload(payload, ctx, name=label)  # plaintext or malformed: refused before the key checks
    total_weight = float(sum(p["weight"] for p in payloads))
    if total_weight > 1 + WEIGHT_TOLERANCE:
        raise InputError(
            "encrypted updates",
            f"weights summing to {total_weight:.6g}",
            "the shares of a round's sites sum to at most 1: an update was sent twice or a share is wrong",
            "each site's weight is its n_i / sum n over the round's sites, and each site is added once",
        )
    if expected_fingerprint is None and ctx.has_secret_key():
        expected_fingerprint = context_fingerprint(ctx)
    if expected_fingerprint is None:
        expected_fingerprint = Counter(p["fingerprint"] for p in payloads).most_common(1)[0][0]
    for label, payload in zip(labels, payloads):
        check_payload(payload, ctx, name=label, first=payloads[0], expected_fingerprint=expected_fingerprint)
    ckks, layout = _check_payload(payloads[0], f"update of {labels[0]}")
    groups = [list(g) for g in zip(*(p["chunks"] for p in payloads))]
    public_bytes = ctx.serialize(
        save_public_key=False, save_secret_key=False, save_galois_keys=False, save_relin_keys=False
    )
    return {
        "format": FORMAT,
        "fingerprint": expected_fingerprint,
        "params": ckks.to_json(),
        "layout": layout.to_json(),
        "weight": total_weight,
        "sites": int(sum(p["sites"] for p in payloads)),
        "chunks": _run(_add_groups, ctx, public_bytes, groups, 1 if workers is None else workers),
    }


def check_payload(
    payload: object,
    ctx: ts.Context,
    *,
    name: str = "update",
    first: Mapping | None = None,
    expected_fingerprint: str | None = None,
) -> None:
    """Screen one update before a server adds it, without touching its ciphertexts.

    Raises InputError for a plaintext update, a malformed payload, CKKS parameters the
    server's context does not have, a key id other than ``expected_fingerprint``, or
    parameters/layout that differ from ``first`` (the round's first accepted update).
    """
    label = f"update of {name}"
    if not is_encrypted(payload):
        raise InputError(
            label,
            type(payload).__name__,
            "a plaintext update in an encrypted round: the server would see it in the clear and could not add it",
            "the site must run the job with homomorphic encryption on (its kit's client_context.tenseal)",
        )
    ckks, layout = _check_payload(payload, label)
    if expected_fingerprint is not None and payload["fingerprint"] != expected_fingerprint:
        raise InputError(
            label,
            f"key id {payload['fingerprint'][:16]}…",
            f"a ciphertext from a different context (another provisioning's key than {expected_fingerprint[:16]}…): "
            "the sum would decrypt to garbage",
            _KIT_USE,
        )
    _check_context_params(ctx, ckks, encrypting=False)
    if first is not None:
        first_ckks, first_layout = _check_payload(first, "the round's first update")
        if ckks != first_ckks:
            raise InputError(
                label, ckks.to_json(), f"its CKKS parameters must be the round's {first_ckks.to_json()}", _KIT_USE
            )
        first_layout.check_same(layout, label)


def decrypt_update(
    payload: Mapping,
    ctx: ts.Context,
    ckks: CKKSParams | None = None,
    workers: int | None = None,
) -> tuple[dict[str, np.ndarray], dict]:
    """(sum_i p_i w_i / sum_i p_i per tensor, info) of an aggregated payload.

    ``ckks``, when given, must equal the payload's parameters (the job's configuration).
    The decoded sum of weights must match the payload's declared one within 1e-3: a server
    that dropped, duplicated or altered updates is caught here. info holds decoded_weight,
    sites, n_chunks and bytes. ``workers``: processes (default one per CPU core; 1: in-process).
    """
    _require_secret_key(
        ctx,
        "TenSEAL context",
        "decryption needs the hospitals' secret key",
        "use client_context.tenseal from the hospital kit's startup/ folder",
    )
    if not is_encrypted(payload):
        raise InputError(
            "encrypted update", type(payload).__name__, f"it must be a {FORMAT} payload", "decrypt what the server sent"
        )
    payload_ckks, layout = _check_payload(payload, "encrypted update")
    if ckks is not None and ckks != payload_ckks:
        raise InputError(
            "encrypted update",
            payload_ckks.to_json(),
            f"its CKKS parameters must be the job's {ckks.to_json()}",
            "run every site with the job's HE settings",
        )
    own = context_fingerprint(ctx)
    if payload["fingerprint"] != own:
        raise InputError(
            "encrypted update",
            f"key id {payload['fingerprint'][:16]}…",
            f"it was encrypted under a different context/key than this site's ({own[:16]}…)",
            _KIT_USE,
        )
    _check_context_params(ctx, payload_ckks, encrypting=False)
    cfg = payload_ckks.packing()
    workers = _default_workers() if workers is None else workers
    rows = _run(_decrypt_blobs, ctx, _secret_context_bytes(ctx), list(payload["chunks"]), workers)
    values, decoded = dequantize(unpack(np.stack(rows), layout.total, cfg), layout, cfg)
    declared = float(payload["weight"])
    if abs(decoded - declared) > WEIGHT_TOLERANCE:
        raise InputError(
            "decrypted update",
            f"sum of weights {decoded:.6f} (declared {declared:.6f})",
            "the decrypted sum of weights must equal the declared one: the ciphertexts were altered, or the "
            "server dropped or duplicated updates, or they come from a different key",
            "re-run the round; if it recurs, check the server and that every site uses the consortium's kits",
        )
    info = {
        "decoded_weight": decoded,
        "sites": int(payload["sites"]),
        "n_chunks": len(payload["chunks"]),
        "bytes": payload_nbytes(payload),
    }
    return values, info


def shutdown_pools() -> None:
    """End the worker processes kept for encryption, addition and decryption."""
    with _POOLS_LOCK:
        pools = list(_POOLS.values())
        _POOLS.clear()
    for pool in pools:
        pool.shutdown(wait=True, cancel_futures=True)


# --- chunk work (in-process or in a pool worker) ------------------------------------------

_WORKER_CTX: ts.Context | None = None
_POOLS: dict[tuple[str, int], ProcessPoolExecutor] = {}
_POOLS_LOCK = threading.Lock()
_MAX_POOLS = 2
# Set once a pool could not start here (a daemon process, an unguarded __main__): in-process since.
_POOLS_UNAVAILABLE = False
atexit.register(shutdown_pools)


def _init_worker(context_bytes: bytes) -> None:
    global _WORKER_CTX
    _WORKER_CTX = ts.context_from(context_bytes, n_threads=1)


def _encrypt_rows(ctx: ts.Context, rows: np.ndarray) -> list[bytes]:
    return [ts.ckks_vector(ctx, row).serialize() for row in rows]


def _add_groups(ctx: ts.Context, groups: list[list[bytes]]) -> list[bytes]:
    out = []
    for group in groups:
        total = ts.ckks_vector_from(ctx, group[0])
        for blob in group[1:]:
            total.add_(ts.ckks_vector_from(ctx, blob))
        out.append(total.serialize())
    return out


def _decrypt_blobs(ctx: ts.Context, blobs: list[bytes]) -> list[np.ndarray]:
    return [np.asarray(ts.ckks_vector_from(ctx, b).decrypt(), dtype=np.float64) for b in blobs]


def _in_worker(fn, items):
    return fn(_WORKER_CTX, items)


def _run(fn, ctx: ts.Context, context_bytes: bytes, items, workers: int) -> list:
    """fn(ctx, items) over all items, split into batches over a process pool when it pays."""
    n = len(items)
    if not _is_int(workers) or workers < 1:
        raise InputError("workers", workers, "it must be an integer >= 1", "leave it unset (one per CPU core)")
    global _POOLS_UNAVAILABLE
    if workers > 1 and n >= _MIN_CHUNKS_PER_WORKER * workers and not _POOLS_UNAVAILABLE:
        size = -(-n // (workers * _BATCHES_PER_WORKER))
        batches = [items[i : i + size] for i in range(0, n, size)]
        try:
            pool = _pool(context_bytes, workers)
            out = []
            for part in pool.map(_in_worker, [fn] * len(batches), batches):
                out.extend(part)
            return out
        except (BrokenExecutor, OSError, AssertionError):
            _POOLS_UNAVAILABLE = True
            _drop_pool(context_bytes, workers)
        except (ValueError, RuntimeError) as err:
            raise _ciphertext_error(fn, err) from None
    try:
        return fn(ctx, items)
    except (ValueError, RuntimeError) as err:
        raise _ciphertext_error(fn, err) from None


def _ciphertext_error(fn, err: Exception) -> Exception:
    if fn is _encrypt_rows:
        return err
    return InputError(
        "ciphertext",
        str(err),
        "it does not load under this context: it is corrupt or from a different context",
        _KIT_USE,
    )


def _pool_key(context_bytes: bytes, workers: int) -> tuple[str, int]:
    return hashlib.sha256(context_bytes).hexdigest(), workers


def _drop_pool(context_bytes: bytes, workers: int) -> None:
    with _POOLS_LOCK:
        pool = _POOLS.pop(_pool_key(context_bytes, workers), None)
    if pool is not None:
        pool.shutdown(wait=False, cancel_futures=True)


def _pool(context_bytes: bytes, workers: int) -> ProcessPoolExecutor:
    key = _pool_key(context_bytes, workers)
    with _POOLS_LOCK:
        pool = _POOLS.get(key)
        if pool is None:
            while len(_POOLS) >= _MAX_POOLS:
                _POOLS.pop(next(iter(_POOLS))).shutdown(wait=False, cancel_futures=True)
            pool = ProcessPoolExecutor(
                max_workers=workers,
                mp_context=multiprocessing.get_context(_START_METHOD),
                initializer=_init_worker,
                initargs=(context_bytes,),
            )
            _POOLS[key] = pool
    return pool


# 'fork' would copy locks held by the caller's other threads (FLARE runs gRPC threads) into the
# workers; they fork from a clean forkserver process instead (started once, measured ~0.5 s
# plus the import of the caller's __main__), and load the context once each.
_START_METHOD = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


# --- checks -------------------------------------------------------------------------------


def _check_payload(payload: Mapping, label: str) -> tuple[CKKSParams, Layout]:
    if set(payload) != set(_PAYLOAD_KEYS):
        raise InputError(label, sorted(payload), f"an encrypted update has exactly the keys {_PAYLOAD_KEYS}", _KIT_USE)
    ckks = CKKSParams.from_json(payload["params"])
    layout = Layout.from_json(payload["layout"])
    chunks, weight, sites = payload["chunks"], payload["weight"], payload["sites"]
    if not isinstance(payload["fingerprint"], str):
        raise InputError(label, type(payload["fingerprint"]).__name__, "its fingerprint must be a hex string", _KIT_USE)
    if not isinstance(weight, (int, float)) or isinstance(weight, bool) or not 0 < weight <= 1 + WEIGHT_TOLERANCE:
        raise InputError(label, weight, "its declared weight must lie in (0, 1]", "send the site's share of the round")
    if not _is_int(sites) or sites < 1:
        raise InputError(label, sites, "its site count must be an integer >= 1", "use encrypt_update()")
    expected = math.ceil(layout.total / ckks.packing().values_per_chunk)
    if not isinstance(chunks, (list, tuple)) or not all(isinstance(c, (bytes, bytearray)) for c in chunks):
        raise InputError(label, type(chunks).__name__, "its chunks must be a list of bytes", "use encrypt_update()")
    if len(chunks) != expected:
        raise InputError(
            label,
            f"{len(chunks)} chunks",
            f"its layout needs {expected} ciphertexts",
            "send the whole update unaltered",
        )
    return ckks, layout


def _check_context_params(ctx: ts.Context, ckks: CKKSParams, *, encrypting: bool) -> None:
    parms = _seal_parms(ctx)
    degree = int(parms.poly_modulus_degree())
    primes = tuple(int(q.bit_count()) for q in parms.coeff_modulus())
    scale = ctx.global_scale if encrypting else 2.0**ckks.scale_bits
    if (degree, primes, scale) != (ckks.poly_modulus_degree, ckks.coeff_mod_bit_sizes, 2.0**ckks.scale_bits):
        raise InputError(
            "TenSEAL context",
            f"degree {degree}, primes {list(primes)}, scale 2**{math.log2(scale):g}",
            f"the job's CKKS parameters are degree {ckks.poly_modulus_degree}, primes "
            f"{list(ckks.coeff_mod_bit_sizes)}, scale 2**{ckks.scale_bits}",
            f"provision the kits with HEBuilder args {ckks.builder_args()}, or set the job's CKKS parameters to the kits'",
        )


def _seal_parms(ctx: ts.Context):
    import tenseal.sealapi  # noqa: F401  (registers SEAL's Modulus type for coeff_modulus())

    return ctx.seal_context().data.key_context_data().parms()


def _secret_context_bytes(ctx: ts.Context) -> bytes:
    """The secret key and parameters only: what a worker needs to encrypt and decrypt."""
    return ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)


def _require_secret_key(ctx: object, name: str, rule: str, fix: str | None = None) -> None:
    if not isinstance(ctx, ts.Context):
        raise InputError(name, type(ctx).__name__, "it must be a TenSEAL context", "use load_context()")
    if not ctx.has_secret_key():
        raise InputError(name, "a context without the secret key", rule, fix or _KIT_USE)


def _check_role(role: str) -> None:
    if role not in _KIT_FIX:
        raise InputError("role", role, "it must be server or client", "pass role='server' or role='client'")


def _proto_fields(data: bytes) -> dict[int, bytes]:
    """The length-delimited fields of a protobuf message (last wins), by field number."""
    fields, i = {}, 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        elif wire == 2:
            length, i = _varint(data, i)
            fields[number] = data[i : i + length]
            i += length
        else:
            raise InputError("TenSEAL context", f"wire type {wire}", "it is not a TenSEAL context", "re-provision")
    return fields


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i += 1
        if byte < 0x80:
            return value, i
        shift += 7


def _is_int(x: object) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)
