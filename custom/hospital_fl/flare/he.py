"""Homomorphic encryption in a FLARE job: the server aggregates updates it cannot read.

Each hospital's kit carries FLARE's ``client_context.tenseal`` (CKKS, with the secret key
the hospitals share) and the server's kit ``server_context.tenseal`` (no secret key), both
made by FLARE's HEBuilder at provisioning and signed with the kit. A round reads:

1. before round 1 ``EncryptedFedAvg`` asks each site for its sample count (the ``sample_count``
   task; a DP site declines, and the round weights become equal) and announces every
   site's aggregation weight p_i = n_i / sum n with each round's model;
2. ``DecryptGlobalModel`` (client input filter) decrypts the global model; only the
   controller's initial model, marked as such, may arrive in plaintext;
3. the executor trains as in any job; ``EncryptUpdate`` (client output filter) turns the
   update into full weights, multiplies them by p_i and encrypts the whole state
   (hospital_fl.privacy.he: fixed-point packing, several values per CKKS slot);
4. ``EncryptedSumAggregator`` adds the ciphertexts with the server context and refuses
   anything else (a plaintext update, another consortium's ciphertext, a different
   layout), naming the site, while the round goes on with the others;
5. the sum is the next global model, still encrypted: the server writes it to
   ``FL_global_model.ckks`` and sends it on; after the last round the sites decrypt and
   score it on their own test data (the ``validate`` task) and keep it.

Metrics the sites report (AUC, loss) and sample counts travel in plaintext, as in FLARE's
own HE jobs. SimEnv runs have no kits and so no contexts: HE jobs run in POC or production.
"""

from __future__ import annotations

import json
import os
import struct
import threading
import time
from collections import Counter

import numpy as np
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.dxo_filter import DXOFilter
from nvflare.apis.event_type import EventType
from nvflare.apis.fl_context import FLContext
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.app_common.aggregators.model_aggregator import ModelAggregator
from nvflare.app_common.app_constant import AlgorithmConstants, AppConstants
from nvflare.app_common.workflows.model_controller import ModelController
from nvflare.fuel.sec.security_content_service import LoadResult, SecurityContentService
from nvflare.fuel.utils.log_utils import get_obj_logger
from nvflare.lighter.constants import ProvFileName

from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import HISTORY_FILE
from hospital_fl.flare.controllers import _RoundPolicy
from hospital_fl.privacy import he

__all__ = [
    "DecryptGlobalModel",
    "EncryptUpdate",
    "EncryptedSumAggregator",
    "EncryptedFedAvg",
    "SAMPLE_COUNT_TASK",
    "VALIDATE_TASK",
    "WEIGHTS_KEY",
    "PLAINTEXT_INITIAL_KEY",
    "CIPHERTEXT_MODEL_FILE",
    "FINAL_METRICS_FILE",
    "save_payload",
    "load_payload",
    "load_kit_context",
]

SAMPLE_COUNT_TASK = "sample_count"
VALIDATE_TASK = AppConstants.TASK_VALIDATION
WEIGHTS_KEY = "hospital_fl_he_weights"  # {site: p_i} announced with each round's model
PLAINTEXT_INITIAL_KEY = "hospital_fl_he_initial"  # the controller's initial model, the only plaintext one
CIPHERTEXT_MODEL_FILE = "FL_global_model.ckks"
FINAL_METRICS_FILE = "final_site_metrics.json"
_FILE_MAGIC = b"HFLCKKS1"


# ------------------------------------------------------------------ contexts from the kit


def load_kit_context(role: str, fl_ctx: FLContext):
    """The TenSEAL context in this participant's startup kit, signature checked in secure mode.

    Raises:
        InputError: the kit holds no context (not provisioned with he: true), its signature
            does not verify, or it is the wrong kind (a server context with a secret key,
            a client context without one).
    """
    name = ProvFileName.SERVER_CONTEXT_TENSEAL if role == "server" else ProvFileName.CLIENT_CONTEXT_TENSEAL
    data, result = SecurityContentService.load_content(name)
    secure = fl_ctx.get_prop("secure_mode", True) if fl_ctx else True
    bad = {LoadResult.INVALID_CONTENT, LoadResult.NO_SUCH_CONTENT}
    if secure:
        bad |= {LoadResult.INVALID_SIGNATURE, LoadResult.NOT_SIGNED}
    if data is None or result in bad:
        raise InputError(
            f"{role} kit's startup/{name}",
            str(result),
            "an HE job needs the TenSEAL context FLARE's HEBuilder puts into every kit, with a valid signature",
            "provision the consortium with `he: true` in site_configs/consortium.yaml (hospital-fl provision) "
            "and start this participant from its new kit",
        )
    return he.context_from_bytes(data, role=role, name=f"startup/{name}")


# ------------------------------------------------------------------ ciphertext files


def save_payload(payload: dict, path: str | os.PathLike) -> None:
    """Write an encrypted model (header as JSON, then the ciphertexts) atomically."""
    header = {k: v for k, v in payload.items() if k != "chunks"}
    header["chunk_sizes"] = [len(c) for c in payload["chunks"]]
    head = json.dumps(header).encode()
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.write(_FILE_MAGIC + struct.pack("<Q", len(head)) + head)
        for chunk in payload["chunks"]:
            f.write(chunk)
    os.replace(tmp, path)


def load_payload(path: str | os.PathLike) -> dict:
    """Read a file written by ``save_payload``."""
    with open(path, "rb") as f:
        if f.read(len(_FILE_MAGIC)) != _FILE_MAGIC:
            raise InputError(
                "encrypted model file",
                str(path),
                f"it must start with {_FILE_MAGIC!r} (written by an HE job's server)",
                f"pass the {CIPHERTEXT_MODEL_FILE} of an HE job's result",
            )
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
        chunks = [f.read(n) for n in header.pop("chunk_sizes")]
    return {**header, "chunks": chunks}


# ------------------------------------------------------------------ client filters

# What the input filter learnt from this round's task, for the output filter of the same
# job process: the global weights (the fixed-point frames and the base of a difference)
# and this site's announced weight.
_ROUND_STATE: dict[str, dict] = {}
_STATE_LOCK = threading.Lock()
_SITE_CONTEXTS: dict[str, object] = {}


def _site_context(fl_ctx: FLContext):
    job = fl_ctx.get_job_id() or "job"
    with _STATE_LOCK:
        if job not in _SITE_CONTEXTS:
            _SITE_CONTEXTS[job] = load_kit_context("client", fl_ctx)
        return _SITE_CONTEXTS[job]


class DecryptGlobalModel(DXOFilter):
    """Client input filter: decrypts the global model the server sends.

    Plaintext is accepted only for the controller's initial model (marked by the
    controller, round 0); any other plaintext model is refused, never used silently.
    """

    def __init__(self):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        meta = dict(dxo.meta or {})
        site = fl_ctx.get_identity_name()
        if he.is_encrypted(dxo.data):
            weights, info = he.decrypt_update(dxo.data, _site_context(fl_ctx))
            self.log_info(
                fl_ctx,
                f"decrypted the global model: {info['n_chunks']} ciphertexts, {info['sites']} sites summed, "
                f"weight {info['decoded_weight']:.4f}",
            )
        elif meta.get(PLAINTEXT_INITIAL_KEY):
            weights = dict(dxo.data)
        else:
            raise InputError(
                "global model",
                "plaintext",
                "in an HE job every model after the initial one arrives encrypted",
                "the server's job must be the HE job as exported (EncryptedFedAvg); refusing to train on it",
            )
        announced = meta.get(WEIGHTS_KEY) or {}
        with _STATE_LOCK:
            _ROUND_STATE[fl_ctx.get_job_id() or "job"] = {
                "reference": {k: np.asarray(v) for k, v in weights.items()},
                "weight": announced.get(site),
            }
        meta.pop(PLAINTEXT_INITIAL_KEY, None)
        return DXO(DataKind.WEIGHTS, data=weights, meta=meta)


class EncryptUpdate(DXOFilter):
    """Client output filter: the site's full weights times its weight p_i, encrypted whole.

    A difference (what the executor sends) is added to the global weights first; DP noise
    the executor added stays in (noise before encryption). The announced p_i comes from
    the task this result answers.

    Args:
        ckks: CKKSParams fields; must match the contexts the kits were provisioned with.
        workers: processes that encrypt (0: every core).
    """

    _always_serialize_args = ("ckks",)

    def __init__(self, ckks: dict | None = None, workers: int = 0):
        kinds = [DataKind.WEIGHTS, DataKind.WEIGHT_DIFF]
        super().__init__(supported_data_kinds=kinds, data_kinds_to_filter=kinds)
        self.ckks, self.workers = ckks, workers
        self.params = he.CKKSParams.from_json(ckks or {})  # validates at job start

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        if he.is_encrypted(dxo.data):
            return None
        with _STATE_LOCK:
            state = _ROUND_STATE.get(fl_ctx.get_job_id() or "job")
        if state is None:
            raise RuntimeError("no global model was received in this job before its update; nothing to encrypt")
        reference, weight = state["reference"], state["weight"]
        if weight is None:
            raise InputError(
                "aggregation weight",
                None,
                f"the server announced no weight for {fl_ctx.get_identity_name()} in this round",
                "run the HE job as exported (EncryptedFedAvg announces each site's weight)",
            )
        update = {k: np.asarray(v) for k, v in dxo.data.items()}
        if dxo.data_kind == DataKind.WEIGHT_DIFF:
            update = {k: (reference[k] + v).astype(v.dtype) for k, v in update.items()}
        tick = time.perf_counter()
        payload = he.encrypt_update(
            update, reference, float(weight), _site_context(fl_ctx), self.params, workers=self.workers or None
        )
        self.log_info(
            fl_ctx,
            f"encrypted {sum(v.size for v in update.values())} values into {len(payload['chunks'])} ciphertexts "
            f"({he.payload_nbytes(payload)} bytes) in {time.perf_counter() - tick:.2f}s",
        )
        meta = dict(dxo.meta or {})
        meta["hospital_fl_he_seconds"] = time.perf_counter() - tick
        return DXO(DataKind.WEIGHTS, data=payload, meta=meta)


# ------------------------------------------------------------------ server


class EncryptedSumAggregator(ModelAggregator):
    """Adds the round's encrypted updates with the server context (no secret key).

    Refused with the reason in round_history.json, the round going on with the rest: a
    plaintext update, a ciphertext from another context, a layout or parameters that
    differ from the round's first update.
    """

    def __init__(self, workers: int = 0):
        super().__init__()
        self.workers = workers
        self.logger = get_obj_logger(self)
        self.history: list[dict] = []
        self.context = None
        self.key_id: str | None = None  # the hospitals' key id (hospital_fl.privacy.he.context_fingerprint)
        self._round = 0
        self.reset_stats()

    def handle_event(self, event_type: str, fl_ctx: FLContext) -> None:
        super().handle_event(event_type, fl_ctx)
        if event_type == EventType.START_RUN:
            self.context = load_kit_context("server", fl_ctx)
        elif event_type == EventType.END_RUN:
            run_dir = fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id())
            with open(os.path.join(run_dir, HISTORY_FILE), "w") as f:
                json.dump(self.history, f, indent=1, default=float)

    def reset_stats(self) -> None:
        self._accepted: list[dict] = []
        self._names: list[str] = []
        self._sites: list[dict] = []

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = meta.get("client_name", "unknown")
        self._round = model.current_round if model.current_round is not None else self._round
        payload = model.params
        entry = {
            "site": site,
            "accepted": True,
            "reason": None,
            "n_samples": meta.get("n_samples"),
            "train_seconds": meta.get("train_seconds"),
            "encrypt_seconds": meta.get("hospital_fl_he_seconds"),
            "metrics": model.metrics or {},
            "privacy": meta.get("privacy"),
            "encrypted": he.is_encrypted(payload),
            "payload_bytes": he.payload_nbytes(payload) if he.is_encrypted(payload) else None,
        }
        self._sites.append(entry)
        try:
            he.check_payload(
                payload,
                self.context,
                name=site,
                first=self._accepted[0] if self._accepted else None,
                expected_fingerprint=self.key_id,
            )
        except InputError as err:
            self._reject(entry, str(err))
            return
        self._accepted.append(payload)
        self._names.append(site)

    def _reject(self, entry: dict, reason: str) -> None:
        entry["accepted"], entry["reason"] = False, reason
        self.logger.warning(f"round {self._round}: rejected update from {entry['site']}: {reason}")

    def _pin_key(self) -> None:
        """The hospitals' key id, learnt from the first round's majority and kept for the job.

        The server's context cannot compute it (it holds no secret key); an update under
        another key is refused from then on (its sum would decrypt to garbage at every site).
        """
        if self.key_id is not None or not self._accepted:
            return
        self.key_id = Counter(p["fingerprint"] for p in self._accepted).most_common(1)[0][0]
        kept = [(p, n) for p, n in zip(self._accepted, self._names) if p["fingerprint"] == self.key_id]
        for payload, name in zip(self._accepted, self._names):
            if payload["fingerprint"] != self.key_id:
                entry = next(s for s in self._sites if s["site"] == name and s["accepted"])
                self._reject(entry, f"a ciphertext under another key than the other sites' ({self.key_id[:16]}…)")
        self._accepted, self._names = [p for p, _ in kept], [n for _, n in kept]

    def aggregate_model(self) -> FLModel:
        self._pin_key()
        entry = {"round": self._round, "sites": self._sites}
        self.history.append(entry)
        if not self._accepted:
            self.reset_stats()
            raise RuntimeError(
                f"round {self._round}: every site's update was rejected; see {HISTORY_FILE} for the reasons"
            )
        tick = time.perf_counter()
        summed = he.add_encrypted(
            self._accepted,
            self.context,
            names=self._names,
            workers=self.workers or None,
            expected_fingerprint=self.key_id,
        )
        entry["aggregation"] = {
            "rule": "encrypted weighted sum",
            "seconds": time.perf_counter() - tick,
            "weight": summed["weight"],
            "sites": summed["sites"],
            "payload_bytes": he.payload_nbytes(summed),
        }
        accepted = [s for s in self._sites if s["accepted"]]
        weights = [float(s["n_samples"] or 1) for s in accepted]
        names = set.intersection(*(set(s["metrics"]) for s in accepted))
        metrics = {k: float(np.average([s["metrics"][k] for s in accepted], weights=weights)) for k in names}
        self.reset_stats()
        return FLModel(params_type=ParamsType.FULL, params=summed, metrics=metrics)


class EncryptedFedAvg(_RoundPolicy, ModelController):
    """FedAvg (or FedProx) whose global model stays encrypted on the server.

    Args:
        num_clients: sites per round.
        num_rounds: training rounds.
        aggregator: an EncryptedSumAggregator.
        fedprox_mu: FedProx's proximal weight sent to the sites (0: FedAvg).
        min_responses / round_timeout / wait_after_min: the job's round policy.
    """

    def __init__(
        self,
        num_clients: int,
        num_rounds: int,
        aggregator: EncryptedSumAggregator,
        persistor_id: str = "persistor",
        fedprox_mu: float = 0.0,
        task_name: str = "train",
        min_responses: int | None = None,
        round_timeout: int = 0,
        wait_after_min: int = 0,
    ):
        # Named, not **kwargs: FLARE's job export writes the arguments the signature names.
        super().__init__(
            persistor_id=persistor_id,
            ignore_result_error=True,
            min_responses=min_responses,
            round_timeout=round_timeout,
            wait_after_min=wait_after_min,
        )
        self.num_clients, self.num_rounds, self.aggregator = num_clients, num_rounds, aggregator
        self.fedprox_mu, self.task_name = fedprox_mu, task_name

    def _run_dir(self) -> str:
        return self.engine.get_workspace().get_run_dir(self.fl_ctx.get_job_id())

    def _announced_weights(self, counts: dict[str, int | None], targets: list[str]) -> dict[str, float]:
        known = [counts.get(s) for s in targets]
        if any(n is None or n <= 0 for n in known):
            return {s: 1.0 / len(targets) for s in targets}
        total = float(sum(known))
        return {s: n / total for s, n in zip(targets, known)}

    def run(self) -> None:
        model = self.load_model()
        sites = self.sample_clients(self.num_clients)
        replies = self.send_model_and_wait(task_name=SAMPLE_COUNT_TASK, data=FLModel(params={}), targets=sites)
        counts = {r.meta.get("client_name"): r.meta.get("n_samples") for r in replies}
        self.info(f"sample counts: {counts} (None: the site keeps its count private; weights become equal)")
        model.meta = {PLAINTEXT_INITIAL_KEY: True}
        for rnd in range(self.num_rounds):
            if self.abort_signal.triggered:
                return
            self.current_round = rnd
            targets = self.sample_clients(self.num_clients)
            model.current_round, model.total_rounds = rnd, self.num_rounds
            model.meta = {**(model.meta or {}), WEIGHTS_KEY: self._announced_weights(counts, targets)}
            if self.fedprox_mu:
                model.meta[AlgorithmConstants.FEDPROX_MU] = self.fedprox_mu
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
            results = self.send_model_and_wait(task_name=self.task_name, data=model, targets=targets)
            self.aggregator.reset_stats()
            for result in results:
                result.current_round = rnd
                self.aggregator.accept_model(result)
            aggregated = self.aggregator.aggregate_model()
            save_payload(aggregated.params, os.path.join(self._run_dir(), CIPHERTEXT_MODEL_FILE))
            self.info(
                f"round {rnd}: {aggregated.params['sites']} encrypted updates summed; metrics {aggregated.metrics}"
            )
            model = FLModel(params_type=ParamsType.FULL, params=aggregated.params, metrics=aggregated.metrics)
            model.meta = {}
        model.meta = {WEIGHTS_KEY: {}}
        final = self.send_model_and_wait(task_name=VALIDATE_TASK, data=model, targets=self.sample_clients())
        scores = {r.meta.get("client_name"): r.metrics for r in final}
        with open(os.path.join(self._run_dir(), FINAL_METRICS_FILE), "w") as f:
            json.dump(scores, f, indent=1)
        self.info(f"final model scored by the sites on their own test data: {scores}")
