"""Homomorphic-encryption benchmark: the bundle's packed CKKS against stock FLARE HE.

Per model (the compact demo network and DenseNet-121 at 224x224): one round of 5 sites'
full-weight updates encrypted at the sites, added at the server with its key-less context,
decrypted at a site; seconds of each step, bytes per site each way, and the largest error
against the plaintext weighted mean. Then the AUC of the demo federation (embedded real
chest X-rays, 5 hospitals, issue-2 split) with HE against the same run in plaintext, per
seed, with the seconds a round takes each way. Prints one JSON object whose "ok" says
whether every target holds. Run: ``hospital-fl bench he --json``.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from hospital_fl.bench.federated_loop import run_federated_in_process
from hospital_fl.bench.machine import machine_info
from hospital_fl.data.federated import load_federated
from hospital_fl.data.splits import SplitConfig
from hospital_fl.evaluation.scoring import model_aucs
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.privacy import he
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights

__all__ = ["run_he_benchmark", "TARGETS", "cost_of_round"]

TARGETS = {
    "max_bytes_ratio": 4.0,  # ciphertext bytes per round per site / fp32 update bytes, each way
    "densenet_encrypt_decrypt_seconds": 10.0,  # per site
    "densenet_aggregate_5_seconds": 5.0,  # server
    "max_auc_drop": 0.002,  # |AUC with HE - AUC in plaintext|, mean over seeds
}
MODELS = {
    "compact_cnn": ModelConfig(),
    "densenet121": ModelConfig(arch="densenet121", image_size=224),
}


def _site_updates(state: dict[str, np.ndarray], sites: int, seed: int) -> list[dict[str, np.ndarray]]:
    """Each site's trained weights: the global model plus a small update of its own."""
    rng = np.random.default_rng(seed)
    updates = []
    for _ in range(sites):
        site = {}
        for k, v in state.items():
            v = np.asarray(v)
            if np.issubdtype(v.dtype, np.floating):
                scale = 0.01 * (float(np.abs(v).mean()) + 1e-3)
                site[k] = (v + rng.normal(0.0, scale, v.shape)).astype(v.dtype)
            else:
                site[k] = v.copy()
        updates.append(site)
    return updates


def cost_of_round(
    state: dict[str, np.ndarray], params: he.CKKSParams, sites: int = 5, seed: int = 0, workers: int | None = None
) -> dict:
    """One encrypted round of ``sites`` updates of ``state``: seconds, bytes and error."""
    updates = _site_updates(state, sites, seed)
    counts = [100 * (i + 1) for i in range(sites)]
    total = float(sum(counts))
    site_ctx = he.make_context(params)
    server_ctx = he.context_from_bytes(he.server_context_bytes(site_ctx), role="server")
    # Warm the encryption processes once: a site's process keeps them for the whole job.
    he.encrypt_update(state, state, 1.0, site_ctx, params, workers=workers)
    encrypt_s, payloads = [], []
    for update, n in zip(updates, counts):
        tick = time.perf_counter()
        payloads.append(he.encrypt_update(update, state, n / total, site_ctx, params, workers=workers))
        encrypt_s.append(time.perf_counter() - tick)
    tick = time.perf_counter()
    summed = he.add_encrypted(payloads, server_ctx, workers=workers)
    aggregate_s = time.perf_counter() - tick
    tick = time.perf_counter()
    mean, info = he.decrypt_update(summed, site_ctx, workers=workers)
    decrypt_s = time.perf_counter() - tick
    expected = {k: sum(n * np.asarray(u[k], np.float64) for u, n in zip(updates, counts)) / total for k in state}
    floats = [k for k in state if np.issubdtype(np.asarray(state[k]).dtype, np.floating)]
    error = max(float(np.max(np.abs(np.asarray(mean[k], np.float64) - expected[k]))) for k in floats)
    n_values = int(sum(np.asarray(v).size for v in state.values()))
    fp32 = 4 * n_values
    return {
        "values": n_values,
        "fp32_bytes": fp32,
        "ciphertexts_per_site": len(payloads[0]["chunks"]),
        "encrypt_seconds_per_site": float(np.mean(encrypt_s)),
        "aggregate_seconds": aggregate_s,
        "decrypt_seconds": decrypt_s,
        "encrypt_decrypt_seconds_per_site": float(np.mean(encrypt_s)) + decrypt_s,
        "bytes_per_site_uplink": int(np.mean([he.payload_nbytes(p) for p in payloads])),
        "bytes_per_site_downlink": he.payload_nbytes(summed),
        "ratio_uplink": float(np.mean([he.payload_nbytes(p) for p in payloads])) / fp32,
        "ratio_downlink": he.payload_nbytes(summed) / fp32,
        "max_abs_error": error,
        "decoded_weight": info["decoded_weight"],
        "_updates": updates,
        "_counts": counts,
    }


def _stock(state, updates, counts) -> dict:
    from hospital_fl.flare.stock.he import stock_he_costs

    costs = stock_he_costs(state, updates, counts)
    fp32 = 4 * int(sum(np.asarray(v).size for v in state.values()))
    return {
        **costs,
        "encrypt_decrypt_seconds_per_site": costs["encrypt_seconds_per_site"] + costs["decrypt_seconds"],
        "ratio_uplink": costs["bytes_per_site"] / fp32,
        "ratio_downlink": costs["downlink_bytes"] / fp32,
    }


def _auc_runs(params, seeds, rounds, split, model_cfg, train_cfg, progress, task) -> list[dict]:
    rows = []
    for seed in seeds:
        data = load_federated(dataclasses.replace(split, seed=seed))
        tcfg = dataclasses.replace(train_cfg, seed=seed)
        row = {"seed": seed}
        for name, he_params in (("plaintext", None), ("he", params)):
            run = run_federated_in_process(data, model_cfg, tcfg, rounds, he=he_params)
            auc, site_aucs = model_aucs(run.model, data)
            row[name] = {
                "auc": auc,
                "site_aucs": site_aucs,
                "seconds_per_round": run.seconds / rounds,
                "train_seconds_per_round": float(np.mean(run.train_seconds_per_round)),
            }
            if he_params is not None:
                row[name]["he_seconds_per_round"] = float(
                    np.mean(
                        [
                            r["he"]["encrypt_seconds_per_site"] * split.num_sites
                            + r["he"]["aggregate_seconds"]
                            + r["he"]["decrypt_seconds"]
                            for r in run.rounds
                        ]
                    )
                )
            if progress:
                progress.update(task, advance=1)
        row["auc_difference"] = row["he"]["auc"] - row["plaintext"]["auc"]
        rows.append(row)
    return rows


def run_he_benchmark(
    seeds: list[int] = (0, 1, 2),
    rounds: int = 10,
    split: SplitConfig = SplitConfig(),
    train_cfg: TrainConfig = TrainConfig(),
    params: he.CKKSParams = he.CKKSParams(),
    stock: bool = True,
    auc: bool = True,
    progress=None,
) -> dict:
    costs = {}
    task = progress.add_task("HE benchmark", total=len(MODELS) + (2 * len(seeds) if auc else 0)) if progress else None
    for name, model_cfg in MODELS.items():
        state = get_weights(build_cxr_model(model_cfg))
        ours = cost_of_round(state, params, sites=split.num_sites)
        updates, counts = ours.pop("_updates"), ours.pop("_counts")
        costs[name] = {"hospital_fl": ours, **({"stock_flare": _stock(state, updates, counts)} if stock else {})}
        if progress:
            progress.update(task, advance=1)
    rows = _auc_runs(params, seeds, rounds, split, ModelConfig(), train_cfg, progress, task) if auc else []
    dense = costs["densenet121"]["hospital_fl"]
    worst_ratio = max(max(c["hospital_fl"]["ratio_uplink"], c["hospital_fl"]["ratio_downlink"]) for c in costs.values())
    checks = {
        "bytes_ratio": worst_ratio <= TARGETS["max_bytes_ratio"],
        "densenet_encrypt_decrypt": dense["encrypt_decrypt_seconds_per_site"]
        <= TARGETS["densenet_encrypt_decrypt_seconds"],
        "densenet_aggregate_5": dense["aggregate_seconds"] <= TARGETS["densenet_aggregate_5_seconds"],
    }
    summary = {}
    if rows:
        diff = float(np.mean([r["auc_difference"] for r in rows]))
        summary = {
            "auc_plaintext_mean": float(np.mean([r["plaintext"]["auc"] for r in rows])),
            "auc_he_mean": float(np.mean([r["he"]["auc"] for r in rows])),
            "auc_difference_mean": diff,
            "auc_difference_max_abs": float(np.max([abs(r["auc_difference"]) for r in rows])),
            "seconds_per_round_plaintext": float(np.mean([r["plaintext"]["seconds_per_round"] for r in rows])),
            "seconds_per_round_he": float(np.mean([r["he"]["seconds_per_round"] for r in rows])),
            "he_seconds_per_round": float(np.mean([r["he"]["he_seconds_per_round"] for r in rows])),
        }
        checks["auc_within"] = abs(diff) <= TARGETS["max_auc_drop"]
    return {
        "benchmark": "he",
        "ok": all(checks.values()),
        "checks": checks,
        "targets": TARGETS,
        "ckks": params.to_json(),
        "sites": split.num_sites,
        "costs": costs,
        "federation": {"seeds": list(seeds), "rounds": rounds, **summary},
        "runs": rows,
        "machine": machine_info(),
        "command": "hospital-fl bench he --json",
    }


def plot_he(result: dict, path) -> None:
    """Bytes per site and seconds per step, the bundle's HE against stock FLARE HE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = result["costs"]
    models = list(costs)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    width = 0.38
    for j, (who, label) in enumerate((("hospital_fl", "hospital_fl"), ("stock_flare", "stock FLARE HE"))):
        if not all(who in costs[m] for m in models):
            continue
        xs = [i + (j - 0.5) * width for i in range(len(models))]
        left.bar(xs, [costs[m][who]["ratio_uplink"] for m in models], width, label=label)
        dense = costs["densenet121"][who]
        steps = ["encrypt_seconds_per_site", "aggregate_seconds", "decrypt_seconds"]
        right.bar([i + (j - 0.5) * width for i in range(3)], [dense[s] for s in steps], width, label=label)
    left.axhline(TARGETS["max_bytes_ratio"], color="k", linestyle="--", linewidth=1, label="target")
    left.set_xticks(range(len(models)), models)
    left.set_ylabel("ciphertext bytes / fp32 bytes (per site)")
    left.legend()
    right.set_xticks(range(3), ["encrypt (site)", "sum of 5 (server)", "decrypt (site)"])
    right.set_ylabel("seconds, DenseNet-121 (2 CPU cores)")
    right.legend()
    fig.suptitle("Homomorphic encryption: packed CKKS vs stock FLARE HE")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
