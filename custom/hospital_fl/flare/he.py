"""Homomorphic encryption in a FLARE job: the server aggregates updates it cannot read.

Each hospital's kit carries FLARE's ``client_context.tenseal`` (CKKS, with the secret key
the hospitals share) and the server's kit ``server_context.tenseal`` (no secret key), both
made by FLARE's HEBuilder at provisioning and signed with the kit. A round reads:

1. before round 1 ``EncryptedFedAvg`` asks each site for its sample count (the ``sample_count``
   task; a DP site declines, and the round weights become equal) and announces every
   site's aggregation weight p_i = n_i / sum n with each round's model;
2. ``DecryptGlobalModel`` (client input filter) decrypts the global model. It accepts a
   plaintext model only as the first model of the job (marked initial, round 0); an
   aggregate only when the server's announcement of the sites it sums (``AGGREGATE_KEY``)
   names at least the site's minimum of hospitals (startup/hospital_fl_he.json), and the
   decrypted canary and contribution tags prove the ciphertext is exactly their sum
   (hospital_fl.privacy.he.decrypt_update); and each aggregate round once, in order.
   Anything else is refused before the executor sees it: FLARE answers the task with the
   filter's error, and nothing decrypted reaches the model;
3. the executor trains as in any job; ``EncryptUpdate`` (client output filter) turns the
   update into full weights, multiplies them by p_i and encrypts the whole state with its
   contribution tags for (job, round, site) (hospital_fl.privacy.he: fixed-point packing,
   several values per CKKS slot);
4. ``EncryptedSumAggregator`` adds the ciphertexts with the server context and refuses
   anything else (a plaintext update, a ciphertext under another key than the one the
   server kit records, a different layout), naming the site, while the round goes on with
   the others;
5. the sum is the next global model, still encrypted: the server writes it to
   ``FL_global_model.ckks`` and sends it on with the sites it sums and their weights;
   after the last round the sites decrypt and score it on their own test data (the
   ``validate`` task) and keep it.

Metrics the sites report (AUC, loss) and sample counts travel in plaintext, as in FLARE's
own HE jobs. SimEnv runs have no kits and so no contexts: HE jobs run in POC or production.

One module (~600 lines): its classes are the four sides of one protocol (encrypt, sum,
announce, decrypt) whose checks must agree, and their class paths are the wire format of the HE
job.
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

from hospital_fl.aggregation.strategy import AggregationConfig
from hospital_fl.aggregation.validation import metrics_problem
from hospital_fl.aggregation.weights import bounded_weights
from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import HISTORY_FILE, read_declared_images, write_history
from hospital_fl.flare.controllers import _RoundPolicy
from hospital_fl.privacy import he
from hospital_fl.privacy.he_kit import DEFAULT_MIN_AGGREGATE_SITES, HE_KIT_FILE, HEKitFacts, facts_from_json

__all__ = [
    "DecryptGlobalModel",
    "EncryptUpdate",
    "EncryptedSumAggregator",
    "EncryptedFedAvg",
    "SAMPLE_COUNT_TASK",
    "VALIDATE_TASK",
    "WEIGHTS_KEY",
    "PLAINTEXT_INITIAL_KEY",
    "AGGREGATE_KEY",
    "load_kit_facts",
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
AGGREGATE_KEY = "hospital_fl_he_aggregate"  # {"round": r, "weights": {site: p_i}} of the sites an aggregate sums
_SUMMED_SITES_KEY = "hospital_fl_he_sites"  # aggregator -> controller: whose updates were added
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


def load_kit_facts(role: str, fl_ctx: FLContext | None) -> HEKitFacts | None:
    """startup/hospital_fl_he.json of this participant's kit (signature checked in secure
    mode), or None where the kit has none (a POC system's kits, made without provisioning).

    Raises:
        InputError: the file's signature does not verify, it is malformed, or it is another role's.
    """
    data, result = SecurityContentService.load_content(HE_KIT_FILE)
    manager = SecurityContentService.security_content_manager
    signed_for = getattr(manager, "signature", None) or {}
    if result in (LoadResult.NO_SUCH_CONTENT, LoadResult.NOT_MANAGED) and HE_KIT_FILE not in signed_for:
        return None
    secure = fl_ctx.get_prop("secure_mode", True) if fl_ctx else True
    if result != LoadResult.OK and (secure or data is None):
        rule = {
            LoadResult.NO_SUCH_CONTENT: "the kit's signature lists it, but it is missing (its HE rules would fall "
            "back to what the server announces)",
            LoadResult.INVALID_SIGNATURE: "its signature does not verify: it was changed after provisioning",
        }.get(result, "an HE kit's file must carry the provisioning's signature")
        raise InputError(
            f"{role} kit's startup/{HE_KIT_FILE}",
            result.value,
            rule,
            "restore the kit the consortium operator provisioned (hospital-fl provision); a different "
            "min_aggregate_sites is set in the site configs and re-provisioned",
        )
    try:
        facts = facts_from_json(json.loads(data), f"startup/{HE_KIT_FILE}")
    except (ValueError, UnicodeDecodeError) as err:
        raise InputError(f"startup/{HE_KIT_FILE}", "unreadable", f"it must be JSON ({err})", "re-provision") from None
    if facts.role != role:
        raise InputError(f"startup/{HE_KIT_FILE}: role", facts.role, f"this is a {role} kit", "re-provision")
    return facts


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

# What the input filter learnt in this job process, for the output filter and later tasks:
# the global weights (the fixed-point frames and the base of a difference), this site's
# announced weight and round, how many models arrived, and the last aggregate round decrypted.
_ROUND_STATE: dict[tuple[str, str], dict] = {}  # by (site, job): one process may host several sites (tests)
_STATE_LOCK = threading.Lock()
_SITE_CONTEXTS: dict[str, object] = {}
_SITE_FACTS: dict[str, HEKitFacts | None] = {}


def _site_context(fl_ctx: FLContext):
    job = fl_ctx.get_job_id() or "job"
    with _STATE_LOCK:
        if job not in _SITE_CONTEXTS:
            _SITE_CONTEXTS[job] = load_kit_context("client", fl_ctx)
        return _SITE_CONTEXTS[job]


def _site_facts(fl_ctx: FLContext) -> HEKitFacts | None:
    job = fl_ctx.get_job_id() or "job"
    with _STATE_LOCK:
        if job not in _SITE_FACTS:
            _SITE_FACTS[job] = load_kit_facts("client", fl_ctx)
        return _SITE_FACTS[job]


def _min_aggregate_sites(fl_ctx: FLContext, state: dict) -> int:
    """min(the site's min_aggregate_sites, hospitals in the consortium), both from the signed kit.

    A kit without startup/hospital_fl_he.json (a POC system's) has neither: then min(3, the
    most sites the server announced for a round of this job), which trusts the server's count.
    """
    facts = _site_facts(fl_ctx)
    if facts is not None:
        return facts.required_sites
    return min(DEFAULT_MIN_AGGREGATE_SITES, max(1, state["largest_round"]))


def _aggregate_claim(job: str, announced: object) -> he.AggregateClaim:
    if not isinstance(announced, dict) or set(announced) != {"round", "weights"}:
        raise InputError(
            "global model",
            "an aggregate without the sites it sums" if announced is None else f"announcement {announced!r:.80}",
            f"an encrypted model must come with {AGGREGATE_KEY}: the round and {{site: weight}} of the sites summed",
            "run the server's job as exported (EncryptedFedAvg); nothing was decrypted",
        )
    return he.AggregateClaim(job, announced["round"], announced["weights"])


class DecryptGlobalModel(DXOFilter):
    """Client input filter: decrypts the global model the server sends, or refuses it.

    A plaintext model is accepted only as the job's first model, marked initial by the
    controller, for round 0. An encrypted one only with the server's announcement of the
    sites it sums: at least the site's minimum (startup/hospital_fl_he.json), the decrypted
    canary and tags exactly theirs, and a later aggregate round than the last one decrypted.
    """

    def __init__(self):
        super().__init__(supported_data_kinds=[DataKind.WEIGHTS], data_kinds_to_filter=[DataKind.WEIGHTS])

    def process_dxo(self, dxo: DXO, shareable: Shareable, fl_ctx: FLContext) -> DXO | None:
        meta = dict(dxo.meta or {})
        site, job = fl_ctx.get_identity_name(), fl_ctx.get_job_id() or "job"
        task_round = shareable.get_header(AppConstants.CURRENT_ROUND)
        announced = meta.get(WEIGHTS_KEY) or {}
        with _STATE_LOCK:
            state = _ROUND_STATE.setdefault((site, job), {"models": 0, "last_aggregate": None, "largest_round": 0})
            state["largest_round"] = max(state["largest_round"], len(announced) if isinstance(announced, dict) else 0)
            models, last = state["models"], state["last_aggregate"]
        if he.is_encrypted(dxo.data):
            claim = _aggregate_claim(job, meta.get(AGGREGATE_KEY))
            if last is not None and claim.round <= last:
                raise InputError(
                    "global model",
                    f"an aggregate of round {claim.round}",
                    f"this site already decrypted the aggregate of round {last}; each round's is decrypted once, "
                    "in order (two different sums of one round would show their difference)",
                    "nothing was decrypted; the server must send each round's aggregate once",
                )
            weights, info = he.decrypt_update(
                dxo.data, _site_context(fl_ctx), claim=claim, min_sites=_min_aggregate_sites(fl_ctx, state)
            )
            self.log_info(
                fl_ctx,
                f"decrypted the aggregate of round {claim.round}: {info['n_chunks']} ciphertexts, sites and weights "
                f"{dict(sorted(claim.weights.items()))} (canary and tags checked), weight {info['decoded_weight']:.4f}",
            )
        elif meta.get(PLAINTEXT_INITIAL_KEY) and models == 0 and task_round in (None, 0):
            weights = dict(dxo.data)
        else:
            seen = f"after {models} model(s) in this job" if models else f"for round {task_round}"
            raise InputError(
                "global model",
                f"plaintext {seen}" + (" marked initial" if meta.get(PLAINTEXT_INITIAL_KEY) else ""),
                "in an HE job only the first model of the job (the initial one, round 0) may arrive in plaintext; "
                "every later one arrives encrypted",
                "the server's job must be the HE job as exported (EncryptedFedAvg); refusing to train on it",
            )
        with _STATE_LOCK:
            state.update(
                models=models + 1,
                reference={k: np.asarray(v) for k, v in weights.items()},
                weight=announced.get(site) if isinstance(announced, dict) else None,
                round=task_round,
            )
            if he.is_encrypted(dxo.data):
                state["last_aggregate"] = claim.round
        meta.pop(PLAINTEXT_INITIAL_KEY, None)
        meta.pop(AGGREGATE_KEY, None)
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
        job = fl_ctx.get_job_id() or "job"
        with _STATE_LOCK:
            state = dict(_ROUND_STATE.get((fl_ctx.get_identity_name(), job)) or {})
        if "reference" not in state:
            raise RuntimeError("no global model was received in this job before its update; nothing to encrypt")
        reference, weight, rnd = state["reference"], state["weight"], state["round"]
        if weight is None:
            raise InputError(
                "aggregation weight",
                None,
                f"the server announced no weight for {fl_ctx.get_identity_name()} in this round",
                "run the HE job as exported (EncryptedFedAvg announces each site's weight)",
            )
        if rnd is None:
            raise InputError(
                "train task",
                "no round",
                "an encrypted update carries its round (it proves to the other sites which round it belongs to)",
                "run the HE job as exported (EncryptedFedAvg sends each round's number)",
            )
        contribution = he.Contribution(job, int(rnd), fl_ctx.get_identity_name())
        update = {k: np.asarray(v) for k, v in dxo.data.items()}
        if dxo.data_kind == DataKind.WEIGHT_DIFF:
            update = {k: (reference[k] + v).astype(v.dtype) for k, v in update.items()}
        tick = time.perf_counter()
        payload = he.encrypt_update(
            update,
            reference,
            float(weight),
            _site_context(fl_ctx),
            self.params,
            workers=self.workers or None,
            contribution=contribution,
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
    plaintext update, a ciphertext under another key than the hospitals' (the key id the
    server kit's startup/hospital_fl_he.json records; a POC kit without it: the key most
    of the first round's updates carry), a layout or parameters that differ from the
    round's first update.
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
            facts = load_kit_facts("server", fl_ctx)
            if facts is not None:
                self.key_id = facts.key_id
            else:
                self.logger.warning(
                    f"the server kit has no startup/{HE_KIT_FILE} (a POC system's kit): the hospitals' key id is "
                    "taken from the first round's majority; provision with hospital-fl provision to pin it"
                )
        elif event_type == EventType.END_RUN:
            write_history(fl_ctx.get_engine().get_workspace().get_run_dir(fl_ctx.get_job_id()), self.history)

    def reset_stats(self) -> None:
        self._accepted: list[dict] = []
        self._names: list[str] = []
        self._sites: list[dict] = []

    def accept_model(self, model: FLModel) -> None:
        meta = model.meta or {}
        site = meta.get("client_name", "unknown")
        self._round = model.current_round if model.current_round is not None else self._round
        payload = model.params
        # The same metric screen as the plaintext aggregator: this class averages them itself.
        metric_problem = metrics_problem(model.metrics or {})
        entry = {
            "site": site,
            "accepted": True,
            "reason": None,
            "n_samples": meta.get("n_samples"),
            "train_seconds": meta.get("train_seconds"),
            "encrypt_seconds": meta.get("hospital_fl_he_seconds"),
            "metrics": (model.metrics or {}) if metric_problem is None else {},
            "privacy": meta.get("privacy"),
            "encrypted": he.is_encrypted(payload),
            "payload_bytes": he.payload_nbytes(payload) if he.is_encrypted(payload) else None,
        }
        self._sites.append(entry)
        if metric_problem is not None:
            self._reject(entry, metric_problem)
            return
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
        """Without a key id from the kit: the first round's majority, kept for the job.

        The server's context cannot compute it (it holds no secret key); an update under
        another key is refused from then on (its sum would decrypt to garbage at every site).
        A foreign update that arrives first or alone wins this vote, hence the kit's id.
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
        summed_sites = list(self._names)
        self.reset_stats()
        return FLModel(
            params_type=ParamsType.FULL, params=summed, metrics=metrics, meta={_SUMMED_SITES_KEY: summed_sites}
        )


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
        if any(isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n <= 0 for n in known):
            return {s: 1.0 / len(targets) for s in targets}
        # The same bound as the plaintext aggregator: declared counts, else k x the median claim.
        declared = read_declared_images(self.fl_ctx) or {}
        bounded, clips = bounded_weights(known, [declared.get(s) for s in targets], AggregationConfig().claim_cap)
        self.weight_clips = [{"site": targets[c.index], **c.as_dict()} for c in clips]
        if self.weight_clips:
            self.info(f"claimed sample counts bounded: {self.weight_clips}")
        total = float(sum(bounded))
        return {s: n / total for s, n in zip(targets, bounded)}

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
            announced = self._announced_weights(counts, targets)
            model.meta = {**(model.meta or {}), WEIGHTS_KEY: announced}
            if self.fedprox_mu:
                model.meta[AlgorithmConstants.FEDPROX_MU] = self.fedprox_mu
            self.fl_ctx.set_prop(AppConstants.CURRENT_ROUND, rnd, private=True, sticky=False)
            results = self.send_model_and_wait(task_name=self.task_name, data=model, targets=targets)
            self.aggregator.reset_stats()
            for result in results:
                result.current_round = rnd
                self.aggregator.accept_model(result)
            aggregated = self.aggregator.aggregate_model()
            if getattr(self, "weight_clips", None):
                self.aggregator.history[-1].setdefault("aggregation", {})["weight_clips"] = self.weight_clips
            save_payload(aggregated.params, os.path.join(self._run_dir(), CIPHERTEXT_MODEL_FILE))
            # every round, as the plaintext aggregator does: status and a restarted server read it
            write_history(self._run_dir(), self.aggregator.history)
            self.info(
                f"round {rnd}: {aggregated.params['sites']} encrypted updates summed; metrics {aggregated.metrics}"
            )
            model = FLModel(params_type=ParamsType.FULL, params=aggregated.params, metrics=aggregated.metrics)
            # Which sites' updates the aggregate sums, with the weights they encrypted with:
            # each site checks this against the decrypted canary and tags before using it.
            summed = aggregated.meta[_SUMMED_SITES_KEY]
            model.meta = {AGGREGATE_KEY: {"round": rnd, "weights": {s: announced[s] for s in summed}}}
        model.meta = {**(model.meta or {}), WEIGHTS_KEY: {}}
        final = self.send_model_and_wait(task_name=VALIDATE_TASK, data=model, targets=self.sample_clients())
        scores = {r.meta.get("client_name"): r.metrics for r in final}
        with open(os.path.join(self._run_dir(), FINAL_METRICS_FILE), "w") as f:
            json.dump(scores, f, indent=1)
        self.info(f"final model scored by the sites on their own test data: {scores}")
