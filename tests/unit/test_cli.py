import pytest
from hospital_fl.cli import main


def test_unknown_algorithm_is_refused_before_anything_runs(capsys):
    assert main(["demo", "--algorithm", "fedsgd"]) == 2

    err = capsys.readouterr().err
    assert "algorithm: got 'fedsgd'; it must be one of ('fedavg', 'fedprox')" in err
    assert "Try 'hospital-fl demo --help'" in err


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


def test_bad_sites_count_names_the_fix(capsys):
    assert main(["demo", "--sites", "1"]) == 2
    assert (
        "num_sites: got 1; a federation needs at least 2 sites. Fix: use --sites 2 or more" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    "argv,option",
    [(["export-jobs", "--help"], "--jobs-dir"), (["demo", "--help"], "--poc"), (["bench", "--help"], "--stock")],
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
