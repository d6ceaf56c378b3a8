"""CKKS (TenSEAL) encryption of whole model updates for federated averaging.

Each site encrypts p_i * w_i (its full weights times its share of the round) with the
consortium's symmetric key, packed by he_packing; the server adds the ciphertexts with a
context that holds no secret key; a site decrypts sum_i p_i w_i and divides by the
decrypted sum_i p_i. Contexts are those FLARE's HEBuilder writes to the kits:
``startup/server_context.tenseal`` (relinearization keys only) and
``startup/client_context.tenseal`` (the hospitals' shared secret key).

Payloads are plain dicts (str/int/float/list/dict/bytes), so FLARE serializes them as is.

What a decrypting site accepts (``decrypt_update`` with an ``AggregateClaim``): the server
announces which sites' updates an aggregate sums and their weights; the site refuses a claim
of fewer than its minimum of sites before decrypting, and after decrypting refuses unless the
canary equals the sum of the claimed weights and the contribution tags equal the sum of the
claimed sites' tags. Tags are HMAC-SHA256 values keyed with a hash of the hospitals' secret
key over (job, round, site, weight): the server cannot compute them, so it cannot pass off
one site's ciphertext (alone, added to itself, or with plaintext added) as several sites'.

Speed (DenseNet-121, 7.0M values, 859 ciphertexts of ~122 kB, 2 CPU cores, measured):
encryption and decryption run in a process pool (TenSEAL holds the GIL): ~0.9 s to
encrypt (1.5 s in-process), ~0.6 s to decrypt (0.7 s). The server's sum runs in-process:
moving 5 ciphertexts to a worker costs about what adding them does (1.1 s for 5 sites,
1.3 s with two workers). Pools start from a clean forkserver process (forking a process
that runs gRPC threads is unsafe): ~1 s once, plus the import of the caller's __main__;
one pool per context and worker count, kept for the next round; shutdown_pools() ends them.

One module (~800 lines): what a site encrypts, what the server may add and what a site accepts
to decrypt are one protocol, checked in one place; the process pool for ciphertext work is
private to it.
"""

from __future__ import annotations

import atexit
import hashlib
import hmac
import json
import math
import multiprocessing
import os
import threading
from collections import Counter
from collections.abc import Mapping, Sequence
from concurrent.futures import BrokenExecutor, ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tenseal as ts

from hospital_fl.errors import InputError
from hospital_fl.privacy.he_packing import (
    MAX_TAGGED_SITES,
    TAG_FIELDS,
    WEIGHT_TOLERANCE,
    Layout,
    canary_units,
    dequantize,
    frame_exponents,
    layout_for,
    pack,
    quantize,
    tag_bound,
    unpack,
)
from hospital_fl.privacy.he_params import SECURITY_MAX_BITS, CKKSParams

__all__ = [
    "CKKSParams",
    "FORMAT",
    "Contribution",
    "AggregateClaim",
    "contribution_tags",
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

FORMAT = "hospital_fl.ckks/2"  # /2: contribution tags after the canary
_PAYLOAD_KEYS = ("format", "fingerprint", "params", "layout", "weight", "sites", "chunks")
_KIT_FIX = {
    "server": "the server kit's startup/ folder holds server_context.tenseal when the consortium is "
    "provisioned with he: true; re-provision with he: true",
    "client": "the hospital kit's startup/ folder holds client_context.tenseal when the consortium is "
    "provisioned with he: true; re-provision with he: true",
}
_KIT_USE = "the site must use the consortium's kit (its startup/client_context.tenseal from the same provisioning)"
_FINGERPRINT_TAG = b"hospital_fl.ckks.key/1\x00"
_TAG_KEY_TAG = b"hospital_fl.ckks.tag-key/1\x00"  # a different hash of the key than the public key id
# Fewer chunks than this per worker are handled in-process: measured, a pool only breaks even
# near 60 ciphertexts per worker (1M values over 2 workers).
_MIN_CHUNKS_PER_WORKER = 64
_BATCHES_PER_WORKER = 4


@dataclass(frozen=True)
class Contribution:
    """Whose update a ciphertext is: the job, the round it was trained for, the site's name."""

    job: str
    round: int
    site: str

    def __post_init__(self):
        for name, value in (("job", self.job), ("site", self.site)):
            if not isinstance(value, str) or not value:
                raise InputError(f"contribution {name}", value, "it must be a non-empty string", "pass the FLARE name")
        if not _is_int(self.round) or self.round < 0:
            raise InputError("contribution round", self.round, "it must be an integer >= 0", "pass the task's round")


@dataclass(frozen=True)
class AggregateClaim:
    """What the server announces with an aggregate: the job, the round, and {site: p_i} of
    the sites whose updates it summed (the weights they encrypted with)."""

    job: str
    round: int
    weights: Mapping[str, float]

    def __post_init__(self):
        Contribution(self.job, self.round, "site")  # same rules for job and round
        weights = self.weights
        fix = "the server's controller announces {site: weight} of the sites it summed (EncryptedFedAvg)"
        if not isinstance(weights, Mapping) or not weights:
            raise InputError("announced aggregate sites", weights, "it must be a non-empty {site: weight}", fix)
        for site, w in weights.items():
            if not isinstance(site, str) or not site:
                raise InputError("announced aggregate sites", site, "site names must be non-empty strings", fix)
            if not isinstance(w, (int, float)) or isinstance(w, bool) or not 0 < w <= 1:
                raise InputError(f"announced weight of {site}", w, "it must lie in (0, 1]", fix)
        if len(weights) > MAX_TAGGED_SITES:
            raise InputError(
                "announced aggregate sites",
                len(weights),
                f"an aggregate's contribution tags fit at most {MAX_TAGGED_SITES} sites",
                f"sample at most {MAX_TAGGED_SITES} sites per round",
            )
        object.__setattr__(self, "weights", {str(k): float(v) for k, v in weights.items()})


def contribution_tags(ctx: ts.Context, contribution: Contribution, weight: float, ckks: CKKSParams) -> np.ndarray:
    """The TAG_FIELDS integers (within ±tag_bound) a site's update carries after its canary.

    HMAC-SHA256 under a key derived from the hospitals' secret key, over the job, round,
    site and the site's canary integer (its weight): every hospital can compute every
    site's tags, the server (no secret key) none.
    """
    _require_secret_key(
        ctx,
        "TenSEAL context",
        "contribution tags are keyed with the hospitals' secret key",
        "use client_context.tenseal from the hospital kit's startup/ folder",
    )
    return _tags(_key_digest(ctx, _TAG_KEY_TAG), contribution, weight, ckks)


def _tags(key: bytes, contribution: Contribution, weight: float, ckks: CKKSParams) -> np.ndarray:
    cfg = ckks.packing()
    message = json.dumps(
        [contribution.job, int(contribution.round), contribution.site, canary_units(weight, cfg)]
    ).encode()
    stream = b"".join(
        hmac.new(key, message + bytes([block]), hashlib.sha256).digest() for block in range(-(-TAG_FIELDS * 8 // 32))
    )
    span = 2 * tag_bound(cfg) + 1  # 2**64 mod span is a bias of < 2**-50
    values = [int.from_bytes(stream[8 * i : 8 * i + 8], "big") % span - tag_bound(cfg) for i in range(TAG_FIELDS)]
    return np.asarray(values, dtype=np.int64)


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
    return _key_digest(ctx, _FINGERPRINT_TAG).hex()


def _key_digest(ctx: ts.Context, tag: bytes) -> bytes:
    """sha256(tag, encryption parameters, secret key): domain-separated hashes of one key."""
    raw = ctx.serialize(save_public_key=False, save_secret_key=True, save_galois_keys=False, save_relin_keys=False)
    top = _proto_fields(raw)
    secret = _proto_fields(top.get(3, b"")).get(1, b"")
    parms = top.get(1, b"")
    digest = hashlib.sha256(tag)
    for part in (parms, secret):
        digest.update(len(part).to_bytes(8, "big"))
        digest.update(part)
    return digest.digest()


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
    contribution: Contribution | None = None,
) -> dict:
    """The payload of a site's ``weight`` * ``params``, on frames derived from ``reference``.

    ``weight`` is the site's share of the round (the shares of a round's sites sum to 1);
    ``reference`` is the global model every site received, so all sites share the frames.
    ``workers``: processes for large updates (default: one per CPU core; 1: in-process).
    ``contribution``: whose update this is; its tags let a decrypting site check an
    aggregate's claim (None: zero tags, only for aggregates decrypted without a claim).
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
    tags = None if contribution is None else contribution_tags(ctx, contribution, weight, ckks)
    rows = pack(quantize(params, layout, weight, cfg, tags), cfg)
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
    claim: AggregateClaim | None = None,
    min_sites: int = 1,
) -> tuple[dict[str, np.ndarray], dict]:
    """(sum_i p_i w_i / sum_i p_i per tensor, info) of an aggregated payload.

    ``ckks``, when given, must equal the payload's parameters (the job's configuration).
    Without ``claim`` the decoded sum of weights must match the payload's declared one
    within 1e-3 (for a site's own files). With the server's ``claim`` (what a site does with
    every aggregate it is sent): refused before decryption when the claim names fewer than
    ``min_sites`` sites or disagrees with the payload's declared weight and site count;
    refused after it, nothing returned, unless the canary equals the sum of the claimed
    weights and the tags the sum of the claimed sites' tags (contribution_tags). info holds
    decoded_weight, sites, n_chunks and bytes. ``workers``: processes (default one per CPU
    core; 1: in-process).
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
    if claim is not None:
        _check_claim(claim, payload, min_sites)
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
    ints = unpack(np.stack(rows), layout.total, cfg)
    values, decoded = dequantize(ints, layout, cfg)
    declared = float(payload["weight"])
    if claim is not None:
        _check_contributions(ints, layout, claim, ctx, payload_ckks)
    elif abs(decoded - declared) > WEIGHT_TOLERANCE:
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


def _check_claim(claim: AggregateClaim, payload: Mapping, min_sites: int) -> None:
    """Refusals a site makes before it decrypts anything."""
    if not isinstance(claim, AggregateClaim):
        raise InputError("aggregate claim", type(claim).__name__, "it must be an AggregateClaim", "build one")
    if not _is_int(min_sites) or min_sites < 1:
        raise InputError("min_sites", min_sites, "it must be an integer >= 1", "pass the site's min_aggregate_sites")
    names = sorted(claim.weights)
    if len(names) < min_sites:
        raise InputError(
            "aggregate",
            f"round {claim.round} announced as the sum of {len(names)} site(s) {names}",
            f"this site decrypts only aggregates of at least {min_sites} hospitals: a smaller one would show "
            "it a single hospital's update (or two hospitals', one of which it can subtract)",
            "nothing was decrypted; the server must send the sum of the round's updates, and a round needs "
            f"at least {min_sites} sites whose updates are accepted",
        )
    announced = sum(claim.weights.values())
    if payload["sites"] != len(names) or abs(float(payload["weight"]) - announced) > WEIGHT_TOLERANCE:
        raise InputError(
            "aggregate",
            f"{payload['sites']} site(s) of weight {float(payload['weight']):.6f} in the ciphertext's header",
            f"the server announced {len(names)} site(s) {names} of weight {announced:.6f}",
            "nothing was decrypted; the server must send the aggregate it announced",
        )


def _check_contributions(
    ints: np.ndarray, layout: Layout, claim: AggregateClaim, ctx: ts.Context, ckks: CKKSParams
) -> None:
    """The decrypted canary and tags must be those of exactly the claimed sites."""
    cfg = ckks.packing()
    names = sorted(claim.weights)
    canary = int(ints[layout.canary_index])
    expected = sum(canary_units(w, cfg) for w in claim.weights.values())
    tags = np.asarray(ints[layout.canary_index + 1 : layout.canary_index + 1 + TAG_FIELDS], dtype=np.int64)
    key = _key_digest(ctx, _TAG_KEY_TAG)  # once: hashing the key serializes the context
    tags_expected = sum(
        _tags(key, Contribution(claim.job, claim.round, site), w, ckks) for site, w in claim.weights.items()
    )
    if canary != expected:
        raise InputError(
            "decrypted aggregate",
            f"sum of weights {math.ldexp(canary, -cfg.magnitude_bits):.6f}",
            f"it must equal the sum {math.ldexp(expected, -cfg.magnitude_bits):.6f} of the weights announced "
            f"for {names} in round {claim.round}: the ciphertext is not their sum (one site's update forwarded, "
            "scaled or repeated, an update dropped or added)",
            "the decrypted values were discarded; check the server: it must add each announced site's update once",
        )
    if not np.array_equal(tags, tags_expected):
        raise InputError(
            "decrypted aggregate",
            f"contribution tags of round {claim.round}",
            f"they must be the sum of the tags of {names} (job {claim.job}, round {claim.round}, the announced "
            "weights): the ciphertext does not hold each announced site's update exactly once (a single site's "
            "update forwarded or repeated, an update of another round, or weights other than announced)",
            "the decrypted values were discarded; check the server: it must add each announced site's update once",
        )


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
