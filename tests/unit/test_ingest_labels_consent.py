"""Label files and the consent registry: layouts, stated rules, and errors that name line and value."""

import datetime as dt

import pytest
from hospital_fl.data.ingest.consent import ConsentPolicy, read_consent
from hospital_fl.data.ingest.labels import CXR14_FINDINGS, read_labels
from hospital_fl.errors import InputError

TODAY = dt.date(2026, 11, 23)


def _write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_chestxray14_layout_multi_hot_patient_and_view(tmp_path):
    path = _write(
        tmp_path,
        "Data_Entry.csv",
        "Image Index,Finding Labels,Follow-up #,Patient ID,View Position\n"
        "00000001_000.png,Cardiomegaly|Effusion,0,1,PA\n"
        "00000002_000.png,No Finding,0,2,ap\n",
    )

    table = read_labels(path)

    assert table.layout == "chestxray14" and table.label_names == CXR14_FINDINGS
    first = table.get("scans/00000001_000.dcm")  # matched by name without extension
    assert first.labels[CXR14_FINDINGS.index("Cardiomegaly")] == 1
    assert first.labels[CXR14_FINDINGS.index("Effusion")] == 1 and sum(first.labels) == 2
    assert first.patient_id == "1" and first.view_position == "PA"
    assert sum(table.get("00000002_000").labels) == 0 and table.get("00000002_000").view_position == "AP"
    assert table.get("00000003_000.dcm") is None


def test_plain_layout_accepts_numbers_and_words(tmp_path):
    path = _write(tmp_path, "labels.csv", "file,label\na.dcm,1\nb.dcm,normal\nc.dcm,Pneumonia\n")

    table = read_labels(path)

    assert table.label_names == ("Pneumonia",)
    assert [table.get(n).labels for n in ("a.dcm", "b.dcm", "c.dcm")] == [(1,), (0,), (1,)]


def test_unknown_finding_names_line_value_and_fix(tmp_path):
    path = _write(
        tmp_path, "cxr.csv", "Image Index,Finding Labels\nx.png,Effusion\ny.png,Pneumonia|Pleural Thickening\n"
    )

    with pytest.raises(InputError) as err:
        read_labels(path)

    text = str(err.value)
    assert "cxr.csv line 3 Finding Labels" in text and "'Pleural Thickening' is not one" in text
    assert "Pleural_Thickening" in text  # the fix shows the spelling


@pytest.mark.parametrize(
    "body, expected",
    [
        ("file,label\na.dcm,2\n", "line 2 label: got '2'; a plain label must be 0, 1, normal or pneumonia"),
        ("file,label\na.dcm,1\na.png,0\n", "each image may be labelled once; line 2 already labels it"),
        ("name,value\na,1\n", "the label file must have columns"),
        ("file,label\n", "has a header but no rows"),
        ("", "the label file is empty"),
        ("Image Index,Finding Labels\nx.png,No Finding|Mass\n", "'No Finding' cannot be combined"),
    ],
)
def test_bad_label_files_are_clear_errors(tmp_path, body, expected):
    with pytest.raises(InputError, match="Fix:") as err:
        read_labels(_write(tmp_path, "l.csv", body))
    assert expected in str(err.value)


def test_unreadable_label_file(tmp_path):
    path = tmp_path / "l.csv"
    path.write_bytes(b"\xff\xfe\x00garbage\x81")
    with pytest.raises(InputError, match="UTF-8 CSV"):
        read_labels(path)
    with pytest.raises(InputError, match="the label file must exist"):
        read_labels(tmp_path / "missing.csv")


def test_consent_latest_row_wins_and_window_expires(tmp_path):
    path = _write(
        tmp_path,
        "consent.csv",
        "patient_id,status,date\n"
        "p1,granted,2025-01-01\n"
        "p1,revoked,2026-06-01\n"  # later revocation wins
        "p2,revoked,2024-01-01\n"
        "p2,granted,2026-02-01\n"  # later re-consent wins
        "p3,granted,2023-01-01\n"
        "p4,Withdrawn,2026-01-01\n",
    )

    registry = read_consent(path, today=TODAY)
    no_window, one_year = ConsentPolicy(), ConsentPolicy(window_days=365)

    assert registry.status("p1", no_window, TODAY) == "revoked"
    assert registry.status("p2", one_year, TODAY) == "granted"
    assert registry.status("p3", no_window, TODAY) == "granted"
    assert registry.status("p3", one_year, TODAY) == "expired"
    assert registry.status("p4", no_window, TODAY) == "revoked"
    assert registry.status("p9", no_window, TODAY) == "missing"
    unusable = registry.unusable(["h1", "h2", "h3", "h9"], lambda p: "h" + p[1:], one_year, TODAY)
    assert unusable == {"h1": "revoked", "h3": "expired", "h9": "missing"}


@pytest.mark.parametrize(
    "body, expected",
    [
        ("patient_id,status,date\np1,maybe,2026-01-01\n", "line 2 status: got 'maybe'; consent status must be one of"),
        ("patient_id,status,date\np1,granted,01/02/2026\n", "line 2 date: got '01/02/2026'; consent dates must be ISO"),
        ("patient_id,status,date\np1,granted,2027-01-01\n", "cannot be dated after today (2026-11-23)"),
        ("patient,status\np1,granted\n", "the registry needs columns patient_id, status, date"),
    ],
)
def test_bad_consent_files_are_clear_errors(tmp_path, body, expected):
    with pytest.raises(InputError, match="Fix:") as err:
        read_consent(_write(tmp_path, "consent.csv", body), today=TODAY)
    assert expected in str(err.value)


def test_consent_window_must_be_positive():
    with pytest.raises(InputError, match="rolling consent window must be a whole number of days >= 1"):
        ConsentPolicy(window_days=0)
