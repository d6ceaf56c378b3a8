"""Aggregation benchmark on the embedded real chest X-rays: non-IID, attacks, compression, scaling.

Four parts, each a sweep of in-process federations (hospital_fl.bench.federated_loop:
the FLARE job's site and server maths without FLARE's start-up), 5 hospitals, the demo's
model and rounds, several seeds:

- noniid: Dirichlet alpha 0.1 / 0.5 / 100 x FedAvg, FedProx, FedOpt (server Adam),
  SCAFFOLD and every robust rule;
- attack: one of five sites sends a x50 scaled, sign-flipped or random update, or trains on
  flipped labels; FedAvg against each robust rule (rules without the norm and direction
  screens, so the figure is the rule's own);
- compression: fp16, int8 and top-k 1% with error feedback on the uplink;
- inflate: one of five sites negates its update (an ordinary norm) and claims 100x its
  images; the default job (FedAvg + norm and direction screens + bounded weights) and every
  robust rule as the jobs deploy them (with both screens), and the default job without the
  direction screen (``fedavg_no_direction``);
- bounded: no attacker; the default job against FedAvg without the direction screen and
  against the unbounded sample-count weights without it (``fedavg_unbounded``, FedAvg as it
  was), the cost of the bound and the screen to honest, Dirichlet-skewed sites;
- direction: the default job with and without the direction screen under the sign-flip,
  scale, random and label-flip attacks;
- timing: server aggregation seconds for 5, 20 and 50 sites on the DenseNet-121 parameter set.

Every finished run is appended to ``runs.jsonl`` beside the output, and a rerun skips the
points already there, so an interrupted sweep resumes. Run: ``hospital-fl bench aggregation``.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from hospital_fl.aggregation.server_optimizer import ServerOptimizerConfig
from hospital_fl.aggregation.strategy import AggregationConfig, aggregate_round
from hospital_fl.bench.attacks import ATTACKS, Attack
from hospital_fl.bench.federated_loop import run_federated_in_process
from hospital_fl.bench.machine import machine_info
from hospital_fl.compression.codecs import CompressionConfig
from hospital_fl.data.federated import load_federated
from hospital_fl.data.splits import SplitConfig
from hospital_fl.evaluation.scoring import model_aucs
from hospital_fl.models.cxr import ModelConfig, build_cxr_model
from hospital_fl.training.config import TrainConfig
from hospital_fl.training.loops import get_weights

__all__ = ["PARTS", "run_aggregation_benchmark", "summarize", "aggregation_seconds", "plot_aggregation"]

PARTS = ("noniid", "attack", "compression", "timing", "inflate", "bounded", "direction")
ALPHAS = (0.1, 0.5, 100.0)
ROBUST = ("trimmed_mean", "median", "norm_bounded", "multi_krum", "krum")
METHODS = ("fedavg", "fedprox", "fedopt", "scaffold", *ROBUST)
CODECS = {
    "fp16": CompressionConfig("fp16"),
    "int8": CompressionConfig("int8"),
    "topk1%": CompressionConfig("topk", 0.01),
}
FEDPROX_MU = 0.01
SERVER_ADAM = ServerOptimizerConfig("adam", lr=0.01)
INFLATE_RULES = ("fedavg", "norm_bounded", "trimmed_mean", "median", "multi_krum")
INFLATE_ARMS = (*INFLATE_RULES, "fedavg_no_direction")  # the last: comparison only, no target
BOUNDED_ARMS = ("fedavg", "fedavg_no_direction", "fedavg_unbounded")
DIRECTION_ATTACKS = ("sign_flip", "scale", "random", "label_flip")
# Targets.
ROBUST_NO_ATTACK_GAP, ATTACK_GAP = 0.01, 0.03
INT8_RATIO, INT8_LOSS, TOPK_RATIO, TOPK_LOSS = 3.9, 0.005, 30.0, 0.02
INFLATE_GAP, BOUNDED_COST = 0.03, 0.005


def _method_settings(method: str, screen: bool = True) -> dict:
    """run_federated_in_process arguments for a method name."""
    outlier = {} if screen else {"outlier_factor": None, "min_cosine": None}
    if method == "fedavg_unbounded":  # FedAvg as it was: the claimed counts, no bound, no direction screen
        return {"aggregation": AggregationConfig(claim_cap=None, **{"min_cosine": None, **outlier})}
    if method == "fedavg_no_direction":  # the default job without the direction screen
        return {"aggregation": AggregationConfig(**{"min_cosine": None, **outlier})}
    if method == "fedprox":
        return {"fedprox_mu": FEDPROX_MU, "aggregation": AggregationConfig(**outlier)}
    if method == "fedopt":
        return {"server_optimizer": SERVER_ADAM, "aggregation": AggregationConfig(**outlier)}
    if method == "scaffold":
        return {"scaffold": True, "aggregation": AggregationConfig(**outlier)}
    return {"aggregation": AggregationConfig(rule=method, **outlier)}


def _points(parts: list[str]) -> list[dict]:
    points = []
    if "noniid" in parts:
        points += [{"part": "noniid", "alpha": a, "method": m} for a in ALPHAS for m in METHODS]
    if "attack" in parts:
        points += [
            {"part": "attack", "alpha": 0.5, "method": m, "attack": k} for k in ATTACKS for m in ("fedavg", *ROBUST)
        ]
    if "compression" in parts:
        points += [{"part": "compression", "alpha": 0.5, "method": "fedavg", "codec": c} for c in CODECS]
    if "inflate" in parts:
        points += [{"part": "inflate", "alpha": 0.5, "method": m, "attack": "inflate"} for m in INFLATE_ARMS]
    if "bounded" in parts:
        points += [{"part": "bounded", "alpha": 0.5, "method": m} for m in BOUNDED_ARMS]
    if "direction" in parts:
        points += [
            {"part": "direction", "alpha": 0.5, "method": m, "attack": k}
            for k in DIRECTION_ATTACKS
            for m in ("fedavg", "fedavg_no_direction")
        ]
    return points


def _key(point: dict, seed: int) -> str:
    return json.dumps({**point, "seed": seed}, sort_keys=True)


def _run_point(point: dict, seed: int, rounds: int, split: SplitConfig, model_cfg, train_cfg, data_cache) -> dict:
    cache_key = (point["alpha"], seed)
    if cache_key not in data_cache:
        data_cache.clear()
        data_cache[cache_key] = load_federated(dataclasses.replace(split, alpha=point["alpha"], seed=seed))
    data = data_cache[cache_key]
    attack = Attack(point["attack"]) if point.get("attack") else None
    # The attack part measures a rule on its own; the others measure the rules as jobs deploy them.
    settings = _method_settings(point["method"], screen=point["part"] != "attack")
    if point.get("codec"):
        settings["compression"] = CODECS[point["codec"]]
    run = run_federated_in_process(
        data, model_cfg, dataclasses.replace(train_cfg, seed=seed), rounds, attack=attack, **settings
    )
    auc, site_aucs = model_aucs(run.model, data)
    return {
        **point,
        "seed": seed,
        "auc": auc,
        "site_aucs": site_aucs,
        "seconds": run.seconds,
        "bytes_per_round_per_site": run.bytes_per_round_per_site,
        "uncompressed_bytes_per_round_per_site": run.uncompressed_bytes_per_round_per_site,
        "rejections": sum(len(r["rejected"]) for r in run.rounds),
        "direction_rejections": sum("cosine" in why for r in run.rounds for why in r["rejected"].values()),
        "weight_clips": sum(len(r.get("weight_clips", [])) for r in run.rounds),
        "skipped_rounds": sum(1 for r in run.rounds if "skipped" in r),
    }


def aggregation_seconds(
    site_counts: tuple[int, ...] = (5, 20, 50), rules: tuple[str, ...] = ("fedavg", *ROBUST), repeats: int = 1
) -> dict:
    """Server seconds of ``aggregate_round`` (validation + rule) on DenseNet-121-shaped updates."""
    shapes = {k: v.shape for k, v in get_weights(build_cxr_model(ModelConfig(arch="densenet121"))).items()}
    n_values = int(sum(np.prod(s) for s in shapes.values()))
    rng = np.random.default_rng(0)
    out = {"parameters": n_values, "rules": {}}
    for n in site_counts:
        updates = [
            {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.01) for k, s in shapes.items()}
            for _ in range(n)
        ]
        for rule in rules:
            cfg = AggregationConfig(rule=rule, byzantine=min(1, (n - 3) // 2))
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                aggregate_round(cfg, updates, [100] * n)
                best = min(best, time.perf_counter() - t0)
            out["rules"].setdefault(rule, {})[str(n)] = best
        del updates
    for rule, by_n in out["rules"].items():
        per_site = [by_n[str(n)] / n for n in site_counts]
        # "Linear": seconds per site at the largest federation at most 2x that at the smallest.
        by_n["linear"] = bool(per_site[-1] <= 2.0 * per_site[0])
    return out


def run_aggregation_benchmark(
    seeds: list[int],
    parts: list[str] = list(PARTS),
    rounds: int = 10,
    split: SplitConfig = SplitConfig(),
    model_cfg: ModelConfig = ModelConfig(),
    train_cfg: TrainConfig = TrainConfig(),
    runs_file: str | Path | None = None,
    progress=None,
) -> dict:
    for part in parts:
        if part not in PARTS:
            raise ValueError(f"unknown benchmark part {part!r}; use some of {PARTS}")
    points = _points(parts)
    done: dict[str, dict] = {}
    if runs_file and Path(runs_file).exists():
        for line in Path(runs_file).read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                point = {k: row[k] for k in ("part", "alpha", "method", "attack", "codec") if k in row}
                done[_key(point, row["seed"])] = row
    todo = [(p, s) for s in seeds for p in points if _key(p, s) not in done]
    task = progress.add_task("aggregation benchmark", total=len(todo)) if progress and todo else None
    data_cache: dict = {}
    for point, seed in todo:
        row = _run_point(point, seed, rounds, split, model_cfg, train_cfg, data_cache)
        done[_key(point, seed)] = row
        if runs_file:
            Path(runs_file).parent.mkdir(parents=True, exist_ok=True)
            with open(runs_file, "a") as f:
                f.write(json.dumps(row, default=float) + "\n")
        if task is not None:
            progress.update(task, advance=1)
    rows = [done[_key(p, s)] for s in seeds for p in points]
    timing = aggregation_seconds() if "timing" in parts else None
    return summarize(rows, seeds, rounds, train_cfg, timing)


def _mean(rows, **match) -> float | None:
    vals = [r["auc"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return float(np.mean(vals)) if vals else None


def summarize(rows: list[dict], seeds: list[int], rounds: int, train_cfg: TrainConfig, timing: dict | None) -> dict:
    noniid = {
        str(a): {m: _mean(rows, part="noniid", alpha=a, method=m) for m in METHODS}
        for a in ALPHAS
        if any(r["part"] == "noniid" and r["alpha"] == a for r in rows)
    }
    attack = {
        k: {m: _mean(rows, part="attack", attack=k, method=m) for m in ("fedavg", *ROBUST)}
        for k in ATTACKS
        if any(r["part"] == "attack" and r.get("attack") == k for r in rows)
    }
    reference = noniid.get("0.5", {}).get("fedavg")
    compression = {}
    for codec in CODECS:
        mine = [r for r in rows if r.get("codec") == codec]
        if mine:
            compression[codec] = {
                "auc": float(np.mean([r["auc"] for r in mine])),
                "bytes_per_round_per_site": float(np.mean([r["bytes_per_round_per_site"] for r in mine])),
                "reduction": float(
                    np.mean([r["uncompressed_bytes_per_round_per_site"] / r["bytes_per_round_per_site"] for r in mine])
                ),
                "auc_loss": (reference - float(np.mean([r["auc"] for r in mine]))) if reference else None,
            }
    inflate = {m: _mean(rows, part="inflate", method=m) for m in INFLATE_ARMS if _mean(rows, part="inflate", method=m)}
    bounded = {m: _mean(rows, part="bounded", method=m) for m in BOUNDED_ARMS}
    bounded = {m: v for m, v in bounded.items() if v is not None}
    direction = {
        k: {m: _mean(rows, part="direction", attack=k, method=m) for m in ("fedavg", "fedavg_no_direction")}
        for k in DIRECTION_ATTACKS
        if any(r["part"] == "direction" and r.get("attack") == k for r in rows)
    }
    targets = {}
    # The no-attack reference of the inflate part: the default job as shipped, no attacker.
    no_attack = bounded.get("fedavg", reference)
    if no_attack is not None:
        for rule, auc in inflate.items():
            if rule in INFLATE_RULES:
                targets[f"inflate_{rule}_within_{INFLATE_GAP}_of_no_attack"] = bool(no_attack - auc <= INFLATE_GAP)
    if "fedavg_unbounded" in bounded and "fedavg_no_direction" in bounded:
        targets[f"bounded_weights_cost_at_most_{BOUNDED_COST}"] = bool(
            bounded["fedavg_unbounded"] - bounded["fedavg_no_direction"] <= BOUNDED_COST
        )
    if "fedavg" in bounded and "fedavg_no_direction" in bounded:
        targets[f"direction_screen_cost_at_most_{BOUNDED_COST}"] = bool(
            bounded["fedavg_no_direction"] - bounded["fedavg"] <= BOUNDED_COST
        )
    for kind, by_arm in direction.items():
        if None not in by_arm.values():
            # The screen must not make a known attack worse (seed-averaged AUC, 0.005 slack).
            targets[f"direction_screen_no_worse_under_{kind}"] = bool(
                by_arm["fedavg"] >= by_arm["fedavg_no_direction"] - BOUNDED_COST
            )
    if reference is not None:
        for rule in ROBUST:
            targets[f"{rule}_no_attack_within_{ROBUST_NO_ATTACK_GAP}"] = bool(
                reference - noniid["0.5"][rule] <= ROBUST_NO_ATTACK_GAP
            )
        for kind, by_rule in attack.items():
            best = max(ROBUST, key=lambda r: by_rule[r])
            targets[f"{kind}_best_robust_within_{ATTACK_GAP}({best})"] = bool(reference - by_rule[best] <= ATTACK_GAP)
        if "int8" in compression:
            c = compression["int8"]
            targets["int8_bytes_and_auc"] = bool(c["reduction"] >= INT8_RATIO and c["auc_loss"] <= INT8_LOSS)
        if "topk1%" in compression:
            c = compression["topk1%"]
            targets["topk1%_bytes_and_auc"] = bool(c["reduction"] >= TOPK_RATIO and c["auc_loss"] <= TOPK_LOSS)
    if timing is not None:
        targets["aggregation_time_linear_in_sites"] = all(by_n["linear"] for by_n in timing["rules"].values())
    return {
        "benchmark": "cxr aggregation: non-IID, attacks, compression, server scaling",
        "settings": {
            "rounds": rounds,
            "sites": 5,
            "seeds": seeds,
            "local_epochs": train_cfg.epochs,
            "fedprox_mu": FEDPROX_MU,
            "fedopt": dataclasses.asdict(SERVER_ADAM),
            "attacker": "site-1 (index 0); scale x50, sign_flip -1x, random N(0,1), label_flip 1-y, "
            "inflate -1x with 100x the claimed images",
            "claim_cap": AggregationConfig().claim_cap,
            "min_cosine": AggregationConfig().min_cosine,
            "runtime": "in-process federation (the FLARE job's site and server functions)",
        },
        "machine": machine_info(),
        "fedavg_alpha0.5_no_attack_auc": reference,
        "noniid_auc": noniid,
        "attack_auc": attack,
        "compression": compression,
        "inflate_auc": inflate,
        "inflate_no_attack_reference_auc": no_attack if inflate else None,
        "bounded_no_attack_auc": bounded,
        "direction_attack_auc": direction,
        "aggregation_seconds": timing,
        "targets": targets,
        "ok": all(targets.values()) if targets else None,
        "runs": rows,
    }


def plot_aggregation(result: dict, path: str | Path) -> Path:
    """Two panels: AUC by method per alpha, and AUC by rule per attack."""
    import matplotlib.pyplot as plt

    from hospital_fl.evaluation.plots import save_figure

    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5))
    for ax, table, title in (
        (axes[0], result["noniid_auc"], "non-IID (no attacker): AUC by Dirichlet alpha"),
        (axes[1], result["attack_auc"], "1 of 5 sites attacking (alpha 0.5)"),
    ):
        groups = list(table)
        if not groups:
            ax.set_visible(False)
            continue
        methods = list(table[groups[0]])
        width = 0.8 / len(methods)
        for j, m in enumerate(methods):
            vals = [table[g][m] if table[g][m] is not None else 0.0 for g in groups]
            ax.bar(np.arange(len(groups)) + j * width, vals, width, label=m)
        ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, groups)
        ax.set_ylim(0.4, 1.0)
        ax.set_ylabel("held-out test AUC (mean over seeds)")
        ax.set_title(title)
        if result.get("fedavg_alpha0.5_no_attack_auc"):
            ax.axhline(result["fedavg_alpha0.5_no_attack_auc"], color="k", ls="--", lw=1, label="FedAvg, alpha 0.5")
        ax.legend(fontsize=7, ncol=2, loc="lower left")
    return save_figure(fig, path)
