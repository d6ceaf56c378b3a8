"""`hospital-fl bench scale`: round marks from a FLARE server log, growth ratios and the verdict,
the input checks, and one small size through FLARE's simulator with every figure measured."""

from __future__ import annotations

import pytest
from hospital_fl.bench.scale import round_times, run_scale_benchmark, run_scale_point, scale_verdict
from hospital_fl.errors import InputError

# What FLARE's FedAvg writes: the time stamp sits on the line before the centred message.
SERVER_LOG = """\
2026-12-05 12:31:19,087 - RoundPolicyFedAvg - INFO - [identity=simulator_server] - 
--------------------------------------------------------------------------------
                                Round 0 started.                                
--------------------------------------------------------------------------------
2026-12-05 12:31:20,500 - UpdateAggregator - INFO - round 0: claimed sample counts bounded
2026-12-05 12:31:29,250 - RoundPolicyFedAvg - INFO - [identity=simulator_server] - 
--------------------------------------------------------------------------------
                                Round 1 started.                                
--------------------------------------------------------------------------------
2026-12-05 12:31:41,141 - RoundPolicyFedAvg - INFO - [identity=simulator_server] - 
================================================================================
                                Finished FedAvg.                                
================================================================================
"""


def _point(sites: int, seconds: float, cpu: float, rss: float) -> dict:
    return {
        "sites": sites,
        "seconds_per_round": seconds,
        "server_cpu_seconds_per_round": cpu,
        "server_peak_rss_mib": rss,
        "uplink_bytes_per_round": 1000 * sites,
    }


def test_round_marks_are_read_from_the_line_before_each_message():
    marks = round_times(SERVER_LOG)

    assert len(marks) == 3
    assert marks[1] - marks[0] == pytest.approx(10.163)
    assert marks[2] - marks[1] == pytest.approx(11.891)


def test_ratios_are_against_the_smallest_size_and_the_verdict_is_linear_growth():
    points = [_point(5, 10.0, 0.5, 400.0), _point(20, 30.0, 1.5, 430.0), _point(50, 70.0, 4.0, 480.0)]

    result = scale_verdict(points)

    fifty = result["ratios_vs_smallest"]["50"]
    assert fifty == {
        "sites": 10.0,
        "seconds_per_round": 7.0,
        "server_cpu_seconds_per_round": 8.0,
        "server_peak_rss_mib": 1.2,
        "uplink_bytes_per_round": 10.0,
        "server_marginal_mib_per_site": 1.78,
    }
    assert result["server_cpu_per_round_ok"] and result["server_memory_linear_ok"] and result["ok"]


def test_server_work_growing_faster_than_the_sites_fails_the_verdict():
    points = [_point(5, 10.0, 0.5, 400.0), _point(50, 70.0, 5.5, 480.0)]

    result = scale_verdict(points)

    assert result["ratios_vs_smallest"]["50"]["server_cpu_seconds_per_round"] == 11.0
    assert not result["server_cpu_per_round_ok"] and not result["ok"]
    assert result["server_memory_linear_ok"]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(sizes=(5,)), "sizes: got [5]; it needs two or more sizes, each >= 2 sites"),
        (dict(sizes=(5, 20), rounds=0), "rounds: got 0; it must be >= 1"),
        (dict(sizes=(5, 20), threads=5), "threads: got 5; it must lie in 1..4 (below the smallest size)"),
    ],
)
def test_bad_settings_are_refused_before_anything_runs(tmp_path, kwargs, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        run_scale_benchmark(tmp_path / "scale", **kwargs)
    assert not (tmp_path / "scale").exists()


@pytest.mark.integration
def test_two_simulated_hospitals_through_flare_give_every_figure(tmp_path):
    point = run_scale_point(2, rounds=1, workspace=tmp_path, threads=1)

    assert point["sites"] == 2 and point["sites_per_round"] == [2]
    assert 0 < point["seconds_per_round"] < point["wall_seconds"]
    assert 0 < point["server_cpu_seconds_per_round"] < point["seconds_per_round"] * 2  # 2 cores at most
    assert 100 < point["server_peak_rss_mib"] < 4096  # the server process holds torch and FLARE
    # the compact model's fp32 update (187 395 parameters) from each of the two sites
    assert point["uplink_bytes_per_round_per_site"] == 749580
    assert point["uplink_bytes_per_round"] == 2 * 749580
