"""A curious or compromised server against HE: it tries to make hospitals decrypt one hospital's
update, to slip in a late plaintext model, and a hospital with another key tries to poison the sum.

Real TenSEAL contexts, the real site filters (DecryptGlobalModel / EncryptUpdate), the real
EncryptedSumAggregator, real provisioning for the server kit's key id. The server's forgeries
use only what a server holds: the ciphertexts, the server context (no secret key), plaintext.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import tenseal as ts
from flare_messages import round_task, site_context
from hospital_fl.errors import InputError
from hospital_fl.flare import he as flare_he
from hospital_fl.flare.kits.provision import provision
from hospital_fl.privacy import he
from hospital_fl.privacy.he_kit import HE_KIT_FILE, HEKitFacts, read_kit_facts
from hospital_fl.privacy.he_packing import canary_units
from hospital_fl.privacy.he_params import CKKSParams
from nvflare.apis.dxo import DXO, DataKind
from nvflare.apis.shareable import Shareable
from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
from nvflare.fuel.sec.security_content_service import SecurityContentManager, SecurityContentService

PARAMS = CKKSParams()
SITES = ("site-1", "site-2", "site-3")
WEIGHTS = {"site-1": 0.5, "site-2": 0.25, "site-3": 0.25}


@pytest.fixture(scope="module")
def contexts():
    site = he.make_context(PARAMS)
    return site, he.context_from_bytes(he.server_context_bytes(site), role="server")


def _model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"conv.weight": rng.normal(0, 0.1, (8, 1, 3, 3)).astype(np.float32), "fc.bias": rng.normal(0, 0.1, 2)}




class Round:
    """Three hospitals of one job: round 0 trained on the initial model, each update encrypted."""

    def __init__(self, job: str, site_ctx, monkeypatch, hospitals: int = 3, min_sites: int = 3):
        self.job, self.initial = job, _model(0)
        if not getattr(monkeypatch, "_he_state_isolated", False):  # the filters' per-process state, per test
            monkeypatch.setattr(flare_he, "_ROUND_STATE", {})
            monkeypatch._he_state_isolated = True
        monkeypatch.setitem(flare_he._SITE_CONTEXTS, job, site_ctx)
        key_id = he.context_fingerprint(site_ctx)
        monkeypatch.setitem(flare_he._SITE_FACTS, job, HEKitFacts("client", key_id, hospitals, min_sites))
        self.decrypt, self.encrypt = flare_he.DecryptGlobalModel(), flare_he.EncryptUpdate(ckks=PARAMS.to_json())
        self.updates, self.payloads = {}, {}
        for i, site in enumerate(SITES):
            meta = {flare_he.PLAINTEXT_INITIAL_KEY: True, flare_he.WEIGHTS_KEY: dict(WEIGHTS)}
            self.receive(site, DXO(DataKind.WEIGHTS, data=self.initial, meta=meta), 0)  # the round-0 model is accepted
            diff = {k: (v * 0 + 0.01 * (i + 1)).astype(v.dtype) for k, v in self.initial.items()}
            self.updates[site] = {k: self.initial[k] + diff[k] for k in diff}
            sent = self.encrypt.process_dxo(DXO(DataKind.WEIGHT_DIFF, data=diff), Shareable(), site_context(site, job))
            self.payloads[site] = sent.data

    def receive(self, site: str, dxo: DXO, rnd: int) -> DXO:
        return self.decrypt.process_dxo(dxo, round_task(rnd), site_context(site, self.job))

    def state(self, site: str) -> dict:
        return flare_he._ROUND_STATE[(site, self.job)]


def _aggregate(payload: dict, announced: dict[str, float], rnd: int = 0) -> DXO:
    return DXO(DataKind.WEIGHTS, data=payload, meta={flare_he.AGGREGATE_KEY: {"round": rnd, "weights": announced}})


def _every_site_refuses(r: Round, dxo: DXO, match: str) -> None:
    for site in SITES:
        before = r.state(site)["reference"]
        with pytest.raises(InputError, match=match):
            r.receive(site, dxo, 1)
        assert r.state(site)["reference"] is before and r.state(site)["last_aggregate"] is None  # nothing decrypted


def test_honest_aggregate_is_decrypted_once_and_a_replay_refused(contexts, monkeypatch):
    site_ctx, server_ctx = contexts
    r = Round("job-honest", site_ctx, monkeypatch)
    aggregator = flare_he.EncryptedSumAggregator()
    aggregator.context, aggregator.key_id = server_ctx, he.context_fingerprint(site_ctx)
    for site in SITES:
        aggregator.accept_model(
            FLModel(params_type=ParamsType.FULL, params=r.payloads[site], current_round=0, meta={"client_name": site})
        )
    summed = aggregator.aggregate_model()
    # What EncryptedFedAvg announces with the aggregate: the sites summed and their weights.
    claim = {s: WEIGHTS[s] for s in summed.meta["hospital_fl_he_sites"]}

    for site in SITES:
        got = r.receive(site, _aggregate(summed.params, claim), 1).data
        expected = sum(WEIGHTS[s] * r.updates[s]["conv.weight"] for s in SITES)
        np.testing.assert_allclose(got["conv.weight"], expected, atol=1e-3)
        with pytest.raises(InputError, match="already decrypted the aggregate of round 0"):
            r.receive(site, _aggregate(summed.params, claim), 2)


def test_one_sites_ciphertext_forwarded_as_the_aggregate_is_refused_by_every_site(contexts, monkeypatch):
    r = Round("job-forward", contexts[0], monkeypatch)
    alone = r.payloads["site-1"]

    # Announced truthfully as one site: refused before anything is decrypted.
    _every_site_refuses(r, _aggregate(alone, {"site-1": 0.5}), "decrypts only aggregates of at least 3 hospitals")
    # Announced as the round's three sites, header edited to match: the canary (0.5) is not their sum (1.0).
    forged = {**alone, "sites": 3, "weight": 1.0}
    _every_site_refuses(r, _aggregate(forged, WEIGHTS), "sum of weights 0.500000.*must equal the sum 1.000000")


def test_scaled_or_patched_single_ciphertext_passes_the_canary_but_not_the_tags(contexts, monkeypatch):
    _, server_ctx = contexts
    r = Round("job-scaled", contexts[0], monkeypatch)
    alone = r.payloads["site-1"]
    # site-1's ciphertext added to itself: canary 2 * 0.5 = 1.0, the announced sum.
    doubled = he.add_encrypted([alone, alone], server_ctx)
    _every_site_refuses(r, _aggregate({**doubled, "sites": 3}, WEIGHTS), "contribution tags")

    # site-1's ciphertext plus a plaintext that brings the canary to 1.0 (no key needed to add plaintext).
    layout = he.Layout.from_json(alone["layout"])
    cfg = PARAMS.packing()
    index = layout.canary_index
    chunk, field, slot = index // cfg.values_per_chunk, (index % cfg.values_per_chunk) // cfg.slots, index % cfg.slots
    patch = np.zeros(cfg.slots)
    patch[slot] = (canary_units(0.25, cfg) * 2) << (cfg.field_bits * field)
    vector = ts.ckks_vector_from(server_ctx, alone["chunks"][chunk]) + patch.tolist()
    chunks = list(alone["chunks"])
    chunks[chunk] = vector.serialize()
    patched = {**alone, "chunks": chunks, "sites": 3, "weight": 1.0}
    _every_site_refuses(r, _aggregate(patched, WEIGHTS), "contribution tags")


def test_an_honest_sum_of_fewer_sites_than_the_minimum_is_refused(contexts, monkeypatch):
    site_ctx, server_ctx = contexts
    r = Round("job-two", site_ctx, monkeypatch)
    two = he.add_encrypted([r.payloads["site-1"], r.payloads["site-2"]], server_ctx)
    claim = {"site-1": 0.5, "site-2": 0.25}
    _every_site_refuses(r, _aggregate(two, claim), "announced as the sum of 2 site.*at least 3 hospitals")

    # A consortium of two hospitals (the kit says so): its two-site aggregates decrypt.
    small = Round("job-small", site_ctx, monkeypatch, hospitals=2)
    two = he.add_encrypted([small.payloads["site-1"], small.payloads["site-2"]], server_ctx)
    assert small.receive("site-3", _aggregate(two, claim), 1).data["fc.bias"].shape == (2,)


def test_canary_mismatch_from_misannounced_weights_is_refused(contexts, monkeypatch):
    _, server_ctx = contexts
    r = Round("job-weights", contexts[0], monkeypatch)
    total = he.add_encrypted([r.payloads[s] for s in SITES], server_ctx)
    # The server claims site-1 carried 0.25 and site-3 0.5: the canary still sums to 1, the tags do not.
    lied = {"site-1": 0.25, "site-2": 0.25, "site-3": 0.5}
    _every_site_refuses(r, _aggregate(total, lied), "contribution tags")
    # Claiming a fourth site (not in the sum) and shrinking site-3's weight so the canary still adds up.
    more = {"site-1": 0.5, "site-2": 0.25, "site-3": 0.125, "site-4": 0.125}
    _every_site_refuses(r, _aggregate({**total, "sites": 4}, more), "contribution tags")


def test_plaintext_is_accepted_only_as_the_jobs_first_model(contexts, monkeypatch):
    site_ctx, _ = contexts
    r = Round("job-plain", site_ctx, monkeypatch)
    initial = {flare_he.PLAINTEXT_INITIAL_KEY: True, flare_he.WEIGHTS_KEY: dict(WEIGHTS)}
    for rnd in (0, 3):  # after round 0's model, a plaintext "initial" one is refused whatever round it claims
        with pytest.raises(InputError, match="only the first model of the job .*may arrive in plaintext"):
            r.receive("site-1", DXO(DataKind.WEIGHTS, data=_model(9), meta=initial), rnd)
    # A first task that claims a later round may not be plaintext either.
    monkeypatch.setitem(flare_he._SITE_CONTEXTS, "job-late", site_ctx)
    late = flare_he.DecryptGlobalModel()
    with pytest.raises(InputError, match="plaintext for round 2 marked initial"):
        late.process_dxo(DXO(DataKind.WEIGHTS, data=_model(9), meta=initial), round_task(2), site_context("site-1", "job-late"))


@pytest.fixture(scope="module")
def kits(tmp_path_factory):
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "site_configs"
    return provision(example, tmp_path_factory.mktemp("he_kits") / "out")


def _serve_from(monkeypatch, startup) -> None:
    monkeypatch.setattr(SecurityContentService, "security_content_manager", SecurityContentManager(str(startup)))


def test_server_kit_pins_the_hospitals_key_and_refuses_a_foreign_ciphertext_first_or_alone(kits, monkeypatch):
    server_startup = kits.out_dir / "kits" / "localhost" / "startup"
    kit_context = kits.out_dir / "kits" / "hospital-a" / "startup" / "client_context.tenseal"
    hospital = he.load_context(kit_context, role="client")
    _serve_from(monkeypatch, server_startup)  # as FLARE does at start: signatures checked
    facts = flare_he.load_kit_facts("server", None)
    assert facts.key_id == he.context_fingerprint(hospital) == read_kit_facts(server_startup / HE_KIT_FILE).key_id

    foreign = he.make_context(PARAMS)  # another consortium's key
    reference = _model(0)
    aggregator = flare_he.EncryptedSumAggregator()
    aggregator.context, aggregator.key_id = flare_he.load_kit_context("server", None), facts.key_id

    def send(site, ctx):
        payload = he.encrypt_update(_model(1), reference, 0.5, ctx, PARAMS, workers=1)
        aggregator.accept_model(FLModel(params=payload, current_round=0, meta={"client_name": site}))

    send("rogue", foreign)  # alone
    with pytest.raises(RuntimeError, match="every site's update was rejected"):
        aggregator.aggregate_model()
    assert "another provisioning's key" in aggregator.history[-1]["sites"][0]["reason"]

    send("rogue", foreign)  # first, before the hospitals
    send("hospital-a", hospital)
    send("hospital-b", hospital)
    summed = aggregator.aggregate_model()
    assert summed.meta["hospital_fl_he_sites"] == ["hospital-a", "hospital-b"]
    assert summed.params["fingerprint"] == facts.key_id


def test_edited_or_deleted_kit_facts_are_refused(kits, monkeypatch, tmp_path):
    startup = shutil.copytree(kits.out_dir / "kits" / "hospital-a" / "startup", tmp_path / "startup")
    facts = json.loads((startup / HE_KIT_FILE).read_text())
    assert (facts["hospitals"], facts["min_aggregate_sites"]) == (3, 3)

    (startup / HE_KIT_FILE).write_text(json.dumps({**facts, "min_aggregate_sites": 2}))  # loosened by hand
    _serve_from(monkeypatch, startup)
    with pytest.raises(InputError, match="invalidSignature.*changed after provisioning"):
        flare_he.load_kit_facts("client", None)
    (startup / HE_KIT_FILE).unlink()  # deleted, to fall back to the server's count
    _serve_from(monkeypatch, startup)
    with pytest.raises(InputError, match="noSuchContent.*the kit's signature lists it, but it is missing"):
        flare_he.load_kit_facts("client", None)
