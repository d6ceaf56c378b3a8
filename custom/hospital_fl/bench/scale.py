"""How one FLARE server copes with more hospitals: 5, 20 and 50 simulated sites.

Each size runs the compact CXR job through FLARE's simulator (SimEnv) on the embedded chest
X-rays split into N sites, so the total training work per round stays the same and what
grows with N is what the server handles: N tasks out, N updates in, screened and averaged.

What is measured, per size:

- ``seconds_per_round``: wall time between the server's "Round k started" log lines (the last
  round ends at "Finished FedAvg."), averaged over rounds.
- ``server_cpu_seconds_per_round``: CPU seconds the simulator's server process used between
  the first round's start and the job's end, per round. That process is the one the
  simulator starts its client workers from: it hosts the FLARE server (controller,
  aggregator, persistor) and the simulated clients' connection endpoints; each site's
  training runs in its own worker process and is not counted.
- ``server_peak_rss_mib``: that process's peak resident memory (the kernel's high-water
  mark, VmHWM, read every 0.2 s until the process ends).
- ``uplink_bytes_per_round``: bytes of model updates the sites sent per round, as recorded
  in round_history.json (``payload_bytes``, summed over sites). The downlink (the global
  model to each site) is not measured.

The simulator runs ``threads`` client workers at a time, fewer than the smallest size (50
sites' workers at once would not fit in memory: each holds torch and the job, about half a
GiB). With fewer workers than sites FLARE starts a worker process for each site and task, so
every size runs its sites the same way and each site costs one worker start per round.

Targets: at 50 hospitals the server's CPU time per round is at most 10x that at 5 (server
work at most linear in the sites), and its peak memory grows at most linearly
(peak(N) <= peak(5) * N / 5). Wall time per round on this shared 2-core machine is reported
beside it, with its ratio, but is not a target: it includes the sites' training.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re
import shutil
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from hospital_fl.bench.machine import machine_info
from hospital_fl.data.splits import SplitConfig
from hospital_fl.errors import InputError
from hospital_fl.flare.aggregator import HISTORY_FILE
from hospital_fl.flare.kits.site_policy import allow_bundle_components
from hospital_fl.flare.recipes.cxr import build_recipe
from hospital_fl.flare.runners.simulator import run_recipe_in_simulator, simulator_env
from hospital_fl.jobspec import JobSpec
from hospital_fl.training.config import TrainConfig

__all__ = ["SIZES", "run_scale_point", "run_scale_benchmark", "scale_verdict", "round_times", "scale_spec"]

SIZES = (5, 20, 50)
DEFAULT_THREADS = 4
SAMPLE_S = 0.2
_SIMULATOR = "nvflare.private.fed.app.simulator.simulator"
_WORKER = "nvflare.private.fed.app.simulator.simulator_worker"
_STAMP = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")
_ROUND = re.compile(r"Round (\d+) started\.")


def scale_spec(num_sites: int, rounds: int) -> JobSpec:
    """The compact CXR job on the embedded data split into ``num_sites`` hospitals."""
    return JobSpec(
        name=f"scale_{num_sites}",
        num_rounds=rounds,
        split=SplitConfig(num_sites=num_sites),
        train=TrainConfig(torch_threads=1),
    )


class _ServerSampler:
    """Samples, every SAMPLE_S, the simulator's processes below this one: which process starts
    the client workers (the server side), and each candidate's peak RSS and CPU seconds."""

    def __init__(self):
        self.samples: dict[int, list[tuple[float, float, int]]] = {}  # pid -> [(time, cpu s, VmHWM bytes)]
        self.worker_parents: Counter[int] = Counter()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="scale-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(SAMPLE_S):
            for proc in psutil.Process().children(recursive=True):
                try:
                    cmdline = " ".join(proc.cmdline())
                    if _WORKER in cmdline:
                        self.worker_parents[proc.ppid()] += 1
                    elif _SIMULATOR in cmdline:
                        cpu = proc.cpu_times()
                        sample = (time.time(), cpu.user + cpu.system, _peak_rss(proc))
                        self.samples.setdefault(proc.pid, []).append(sample)
                except psutil.Error:
                    continue

    def __enter__(self) -> "_ServerSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def server(self) -> list[tuple[float, float, int]]:
        if not self.worker_parents:
            raise RuntimeError("no simulator worker process was seen, so the server process is unknown")
        return self.samples.get(self.worker_parents.most_common(1)[0][0], [])


def _peak_rss(proc: psutil.Process) -> int:
    """The process's peak resident set size (VmHWM) in bytes; the current RSS where /proc lacks it."""
    try:
        for line in Path(f"/proc/{proc.pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return proc.memory_info().rss


def round_times(log_text: str) -> list[float]:
    """Epoch seconds at which each round started, then the job's end ("Finished FedAvg.")."""
    marks, stamp = {}, None
    for line in log_text.splitlines():
        if m := _STAMP.match(line):
            stamp = dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        if stamp is None:
            continue
        if m := _ROUND.search(line):
            marks.setdefault(int(m.group(1)), stamp)
        elif "Finished FedAvg." in line:
            marks.setdefault("end", stamp)
    rounds = sorted(k for k in marks if k != "end")
    return [marks[k] for k in rounds] + ([marks["end"]] if "end" in marks else [])


def _cpu_at(samples: list[tuple[float, float, int]], when: float) -> float:
    """CPU seconds of the sampled process at ``when`` (the last sample at or before it)."""
    before = [cpu for t, cpu, _ in samples if t <= when]
    return before[-1] if before else samples[0][1]


def run_scale_point(num_sites: int, rounds: int, workspace: Path, threads: int = DEFAULT_THREADS) -> dict:
    """Run the job with ``num_sites`` simulated hospitals; returns this size's figures."""
    spec = scale_spec(num_sites, rounds)
    workspace = Path(workspace).resolve()
    job_ws = workspace / spec.name
    env = simulator_env(workspace, spec.name, num_sites)
    # simulator_env runs one worker per site; at 50 sites that would not fit in memory.
    env.num_threads = threads
    allow_bundle_components(job_ws / "local")
    with _ServerSampler() as sampler:
        run = run_recipe_in_simulator(build_recipe(spec), env, job_ws)
    server = sampler.server()
    logs = sorted((job_ws / "server").glob("**/log.txt"), key=lambda p: len(p.parts))
    marks = round_times(logs[0].read_text(errors="replace"))
    if len(marks) != rounds + 1 or not server:
        raise RuntimeError(f"{job_ws}: found {len(marks)} round marks and {len(server)} server samples")
    history = json.loads(next((job_ws / "server").rglob(HISTORY_FILE)).read_text())
    uplink = [sum(site.get("payload_bytes") or 0 for site in entry["sites"]) for entry in history]
    return {
        "sites": num_sites,
        "rounds": rounds,
        "simulator_threads": env.num_threads,
        "wall_seconds": round(run.wall_seconds, 2),
        "seconds_per_round": round((marks[-1] - marks[0]) / rounds, 3),
        "server_cpu_seconds_per_round": round((_cpu_at(server, marks[-1]) - _cpu_at(server, marks[0])) / rounds, 3),
        "server_peak_rss_mib": round(max(peak for _, _, peak in server) / 2**20, 1),
        "uplink_bytes_per_round": int(sum(uplink) / len(uplink)),
        "uplink_bytes_per_round_per_site": int(sum(uplink) / len(uplink) / num_sites),
        "sites_per_round": [len(entry["sites"]) for entry in history],
    }


def scale_verdict(points: list[dict]) -> dict:
    """Growth ratios of every size against the smallest, and the verdict against the targets."""
    base = points[0]
    ratios = {}
    for point in points[1:]:
        ratios[str(point["sites"])] = {
            "sites": round(point["sites"] / base["sites"], 2),
            "seconds_per_round": round(point["seconds_per_round"] / base["seconds_per_round"], 2),
            "server_cpu_seconds_per_round": round(
                point["server_cpu_seconds_per_round"] / base["server_cpu_seconds_per_round"], 2
            ),
            "server_peak_rss_mib": round(point["server_peak_rss_mib"] / base["server_peak_rss_mib"], 3),
            "uplink_bytes_per_round": round(point["uplink_bytes_per_round"] / base["uplink_bytes_per_round"], 2),
            "server_marginal_mib_per_site": round(
                (point["server_peak_rss_mib"] - base["server_peak_rss_mib"]) / (point["sites"] - base["sites"]), 2
            ),
        }
    # At most linear in the sites: 10x the sites (50 vs 5) may cost the server at most 10x.
    cpu_ok = all(r["server_cpu_seconds_per_round"] <= r["sites"] for r in ratios.values())
    memory_ok = all(r["server_peak_rss_mib"] <= r["sites"] for r in ratios.values())
    return {
        "ratios_vs_smallest": ratios,
        "targets": {
            "server_cpu_per_round": "ratio <= sites ratio (50 vs 5 hospitals: <= 10x)",
            "server_memory": "peak(N) <= peak(smallest) * N / smallest (at most linear)",
        },
        "server_cpu_per_round_ok": cpu_ok,
        "server_memory_linear_ok": memory_ok,
        "ok": cpu_ok and memory_ok,
    }


def run_scale_benchmark(
    workspace: str | Path,
    sizes: tuple[int, ...] = SIZES,
    rounds: int = 2,
    threads: int = DEFAULT_THREADS,
    progress=None,
) -> dict:
    """Every size in turn (smallest first); JSON-ready figures, ratios and verdict.

    Raises:
        InputError: fewer than two sizes, a size under 2, or rounds < 1.
    """
    sizes = tuple(sorted(sizes))
    if len(sizes) < 2 or sizes[0] < 2:
        raise InputError("sizes", list(sizes), "it needs two or more sizes, each >= 2 sites", "use e.g. 5 20 50")
    if rounds < 1:
        raise InputError("rounds", rounds, "it must be >= 1", "use 2 or 3")
    if not 1 <= threads < sizes[0]:
        raise InputError(
            "threads",
            threads,
            f"it must lie in 1..{sizes[0] - 1} (below the smallest size), so that every size runs its sites the "
            "same way: a worker process per site and task",
            f"use e.g. {max(1, min(DEFAULT_THREADS, sizes[0] - 1))}",
        )
    root = Path(workspace).resolve()
    shutil.rmtree(root, ignore_errors=True)
    points = []
    for n in sizes:
        points.append(run_scale_point(n, rounds, root, threads))
        if progress is not None:
            progress(points[-1])
    spec = dataclasses.asdict(scale_spec(sizes[0], rounds).model)
    return {
        "benchmark": "scale",
        "settings": {"model": spec, "rounds": rounds, "simulator_threads": threads, "data": "embedded, split per size"},
        "points": points,
        **scale_verdict(points),
        "machine": machine_info(),
    }
