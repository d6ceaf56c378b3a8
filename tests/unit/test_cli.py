import pytest
from hospital_fl.cli import main


@pytest.mark.parametrize(
    "option,value,listed",
    [
        ("--algorithm", "fedsgd", "'fedavg', 'fedprox', 'fedopt', 'scaffold'"),
        ("--aggregator", "mean", "'fedavg', 'trimmed_mean', 'median', 'norm_bounded', 'krum', 'multi_krum'"),
        ("--downlink", "topk", "'none', 'fp16', 'int8'"),
    ],
)
def test_unknown_choice_is_refused_before_anything_runs(option, value, listed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", option, value])

    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"{option}: invalid choice: '{value}' (choose from {listed})" in err
    assert "usage: hospital-fl demo" in err


@pytest.mark.parametrize(
    "option,listed",
    [
        ("--algorithm", "{fedavg,fedprox,fedopt,scaffold}"),
        ("--aggregator", "{fedavg,trimmed_mean,median,norm_bounded,krum,multi_krum}"),
        ("--uplink", "{none,fp16,int8,topk}"),
        ("--downlink", "{none,fp16,int8}"),
        ("--dp-mechanism", "{sample,client-local,client-central}"),
    ],
)
def test_help_lists_the_choices(option, listed, capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])

    assert f"{option} {listed}" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")


def test_missing_data_file_fails_without_leaving_a_report(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text("{}")  # from an earlier run

    code = main(
        ["demo", "--data", str(tmp_path / "missing.npz"), "--out", str(out), "--workspace", str(tmp_path / "ws")]
    )

    assert code == 2
    assert "dataset file: got" in capsys.readouterr().err
    assert not (out / "report.json").exists()
    assert not (tmp_path / "ws").exists()  # no FLARE system was started


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--uplink", "topk", "--topk", "2"], "compression.topk_fraction: got 2.0; it must lie in (0, 1]"),
        (["--aggregator", "trimmed_mean", "--trim", "3"], "trimming 3 per side needs at least 7 sites per round"),
        (["--min-clients", "9"], "min_clients: got 9; it must be an integer in 1..5"),
    ],
)
def test_bad_aggregation_and_compression_options_are_refused(argv, message, capsys):
    assert main(["demo", *argv]) == 2
    assert message in capsys.readouterr().err


def test_bad_sites_count_names_the_fix(capsys):
    assert main(["demo", "--sites", "1"]) == 2
    assert (
        "num_sites: got 1; a federation needs at least 2 sites. Fix: use --sites 2 or more" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "argv,option",
    [
        (["export-jobs", "--help"], "--jobs-dir"),
        (["demo", "--help"], "--poc"),
        (["demo", "--help"], "--aggregator"),
        (["bench", "--help"], "--stock"),
        (["bench", "--help"], "--parts"),
    ],
)
def test_help_describes_each_command(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 0
    assert option in capsys.readouterr().out


def test_allow_components_refuses_a_missing_kit_folder(tmp_path, capsys):
    assert main(["allow-components", str(tmp_path / "no-such-kit" / "local")]) == 2
    assert "site local folder: got" in capsys.readouterr().err
    assert not (tmp_path / "no-such-kit").exists()


def test_missing_job_folder_is_refused_before_anything_runs(tmp_path, capsys):
    assert (
        main(["demo", "--poc", "--job", str(tmp_path / "jobs" / "cxr_fedavg"), "--workspace", str(tmp_path / "ws")])
        == 2
    )
    assert "job folder: got" in capsys.readouterr().err
    assert not (tmp_path / "ws").exists()


def test_invalid_dp_settings_are_refused_before_flare_starts(tmp_path, capsys):
    ws = tmp_path / "ws"
    assert main(["demo", "--dp-epsilon", "0", "--workspace", str(ws)]) == 2
    assert "privacy.target_epsilon: got 0.0; epsilon must be > 0" in capsys.readouterr().err
    assert main(["demo", "--dp-epsilon", "8", "--dp-delta", "0.01", "--workspace", str(ws)]) == 2
    assert "privacy.delta: got 0.01; it must be below 1/n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["demo", "--dp-epsilon", "8", "--dp-mechanism", "svt", "--workspace", str(ws)])
    assert "--dp-mechanism: invalid choice: 'svt'" in capsys.readouterr().err
    assert not ws.exists()


def test_privacy_init_and_report_round_trip(tmp_path, capsys):
    import json

    from hospital_fl.privacy.ledger import PrivacyLedger

    kit = tmp_path / "site-1"
    assert (
        main(["privacy", "init", str(kit), "--site", "site-1", "--lifetime-epsilon", "20", "--job-epsilon", "8"]) == 0
    )
    ledger = PrivacyLedger(capsys.readouterr().out.strip())
    ledger.record("job-1", "sample", 1.0, 0.05, 100)
    assert main(["privacy", "report", str(kit)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["lifetime_budget"] == 20 and report["jobs"][0]["job_id"] == "job-1"
    assert report["lifetime_epsilon"] == ledger.epsilon(1e-5)
    ledger.path.unlink()
    assert main(["privacy", "report", str(kit)]) == 2
    assert "the file is missing" in capsys.readouterr().err
