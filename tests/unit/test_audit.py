"""The audit trail: a chain that verifies, each kind of tampering found by line, safe concurrent appends."""

import argparse
import hashlib
import itertools
import json
import multiprocessing
import stat
import threading
from datetime import datetime, timedelta, timezone

import pytest
from hospital_fl.audit import (
    AUDIT_FILE,
    GENESIS_HASH,
    AuditRecord,
    anchor,
    append_event,
    read_trail,
    verify_trail,
)
from hospital_fl.cli.audit import add_audit_commands
from hospital_fl.errors import InputError

START = datetime(2026, 3, 1, 9, 0, tzinfo=timezone.utc)
EVENTS = [
    ("provision.run", "operator@consortium.org", {"kits": 4}),
    ("kit.issued", "operator@consortium.org", {"participant": "site-1"}),
    ("kit.issued", "operator@consortium.org", {"participant": "site-2"}),
    ("job.submitted", "admin@site-1.org", {"job_id": "fedavg-01", "rounds": 10}),
    ("privacy.spend", "site-1", {"job_id": "fedavg-01", "epsilon": 1.25, "note": "Zürich"}),
]


def _trail(tmp_path, n=5):
    path = tmp_path / "consortium" / AUDIT_FILE
    for i, (event, actor, details) in enumerate(EVENTS[:n]):
        append_event(path, event, actor, details, now=START + timedelta(minutes=i))
    return path


def _lines(path):
    return path.read_text(encoding="utf-8").splitlines(keepends=True)


def _write(path, lines):
    path.write_text("".join(lines), encoding="utf-8")


def _problems(path, **kwargs):
    result = verify_trail(path, **kwargs)
    assert not result.ok
    return result.problems


def _sealed(fields):
    """A record line with a correct hash over whatever fields it is given: what a forger can write."""
    body = json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    digest = hashlib.sha256(body.encode("utf-8")).hexdigest()
    return json.dumps({**fields, "hash": digest}, sort_keys=True, separators=(",", ":"), ensure_ascii=False) + "\n"


# -- a sound chain ----------------------------------------------------------------------
def test_chain_of_events_verifies_and_reads_back(tmp_path):
    path = _trail(tmp_path)

    result = verify_trail(path)
    records = read_trail(path)

    assert result.ok and result.problems == ()
    assert result.records == 5 and result.last_hash == records[-1].hash
    assert [r.seq for r in records] == [0, 1, 2, 3, 4]
    assert records[0].prev == GENESIS_HASH
    assert all(later.prev == earlier.hash for earlier, later in itertools.pairwise(records))
    assert records[4].details["note"] == "Zürich" and records[0].time == "2026-03-01T09:00:00.000000Z"
    assert stat.S_IMODE(path.stat().st_mode) == 0o640


def test_hash_covers_every_field_but_hash_and_the_version(tmp_path):
    path = _trail(tmp_path, n=1)
    line = json.loads(_lines(path)[0])

    assert line["v"] == 1
    assert _sealed({k: v for k, v in line.items() if k != "hash"}) == _lines(path)[0]


def test_append_returns_the_record_as_read_back(tmp_path):
    path = tmp_path / AUDIT_FILE

    record = append_event(path, "job.submitted", "admin", {"sites": ("a", "b")})

    assert isinstance(record, AuditRecord)
    assert read_trail(path) == [record]
    assert record.time.endswith("Z")


# -- tampering, each found by its line ---------------------------------------------------
def test_edited_details_value_is_found_on_its_line(tmp_path):
    path = _trail(tmp_path)
    lines = _lines(path)
    lines[3] = lines[3].replace('"rounds":10', '"rounds":100')
    _write(path, lines)

    problems = _problems(path)

    assert len(problems) == 1
    assert problems[0].startswith("line 4:") and "edited" in problems[0]


def test_deleted_middle_line_is_found(tmp_path):
    path = _trail(tmp_path)
    lines = _lines(path)
    del lines[2]
    _write(path, lines)

    problems = _problems(path)

    assert any(p.startswith("line 3:") and "prev does not match the hash of line 2" in p for p in problems)
    assert any(p.startswith("line 3:") and "seq 3 does not follow seq 1" in p for p in problems)
    assert all(p.startswith("line 3:") for p in problems)


def test_swapped_lines_are_found(tmp_path):
    path = _trail(tmp_path)
    lines = _lines(path)
    lines[1], lines[2] = lines[2], lines[1]
    _write(path, lines)

    problems = _problems(path)

    for line in (2, 3, 4):
        assert any(p.startswith(f"line {line}:") and "prev does not match" in p for p in problems)
    assert any(p.startswith("line 3:") and "s before line 2" in p for p in problems)


def test_appended_line_with_forged_prev_is_found(tmp_path):
    path = _trail(tmp_path)
    last = json.loads(_lines(path)[-1])
    forged = _sealed(
        {
            "v": 1,
            "seq": last["seq"] + 1,
            "time": "2026-03-01T10:00:00.000000Z",
            "event": "privacy.spend",
            "actor": "site-1",
            "details": {"epsilon": 0.0},
            "prev": "ab" * 32,
        }
    )
    _write(path, [*_lines(path), forged])

    problems = _problems(path)

    assert len(problems) == 1 and problems[0].startswith("line 6: prev does not match the hash of line 5")


def test_truncated_last_line_is_found_as_a_partial_write(tmp_path):
    path = _trail(tmp_path)
    lines = _lines(path)
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    _write(path, lines)

    result = verify_trail(path)

    assert not result.ok and result.records == 4
    assert len(result.problems) == 1 and result.problems[0].startswith("line 5:")
    assert "partial write" in result.problems[0]


def test_non_json_line_is_found_and_later_records_still_checked(tmp_path):
    path = _trail(tmp_path)
    lines = _lines(path)
    lines.insert(2, "this is not json\n")
    lines[4] = lines[4].replace("site-1", "site-9")
    _write(path, lines)

    problems = _problems(path)

    assert any(p.startswith("line 3: not JSON") for p in problems)
    assert any(p.startswith("line 5:") and "edited" in p for p in problems)


def test_wrong_version_missing_fields_and_bad_seq_are_named(tmp_path):
    path = _trail(tmp_path, n=2)
    first, second = (json.loads(line) for line in _lines(path))
    second_v2 = _sealed({**{k: v for k, v in second.items() if k != "hash"}, "v": 2})
    first_seq5 = _sealed({**{k: v for k, v in first.items() if k not in ("hash", "seq")}, "seq": 5})
    _write(path, [first_seq5, second_v2, '{"v": 1, "seq": 2}\n'])

    problems = _problems(path)

    assert any(p.startswith("line 1: seq 5, expected 0") for p in problems)
    assert any(p.startswith("line 2: format version 2") for p in problems)
    assert any(p.startswith("line 3: missing fields time, event") for p in problems)


def test_time_going_backwards_beyond_tolerance_is_a_problem(tmp_path):
    path = tmp_path / AUDIT_FILE
    append_event(path, "job.submitted", "admin", now=START)
    append_event(path, "job.submitted", "admin", now=START - timedelta(seconds=1))  # clock step: tolerated
    append_event(path, "job.submitted", "admin", now=START - timedelta(hours=1))

    problems = _problems(path)

    assert problems == (
        "line 3: time 2026-03-01T08:00:00.000000Z is 3599.0 s before line 2's 2026-03-01T08:59:59.000000Z",
    )


# -- appending onto damage ---------------------------------------------------------------
@pytest.mark.parametrize(
    "damage, line",
    [
        (lambda lines: [*lines[:-1], lines[-1][:-10]], 5),  # partial write
        (lambda lines: [*lines, "garbage\n"], 6),
        (lambda lines: [*lines[:-1], lines[-1].replace("Zürich", "Zurich")], 5),  # edited last record
    ],
)
def test_append_refuses_a_damaged_tail(tmp_path, damage, line):
    path = _trail(tmp_path)
    _write(path, damage(_lines(path)))
    before = path.read_bytes()

    with pytest.raises(InputError, match=rf"damaged at line {line} .*hospital-fl audit verify"):
        append_event(path, "job.submitted", "admin")

    assert path.read_bytes() == before


def test_tail_is_found_past_read_blocks(tmp_path):
    path = tmp_path / AUDIT_FILE
    for i in range(3):
        append_event(path, "job.submitted", "admin", {"blob": "x" * 20_000, "i": i})

    record = append_event(path, "job.submitted", "admin", {"i": 3})

    assert record.seq == 3 and verify_trail(path).ok


# -- anchors -----------------------------------------------------------------------------
def test_anchor_detects_removed_last_records(tmp_path):
    path = _trail(tmp_path)
    published = anchor(path)
    assert published == {"records": 5, "last_hash": read_trail(path)[-1].hash}
    assert verify_trail(path, anchor=published).ok
    _write(path, _lines(path)[:3])

    assert verify_trail(path).ok  # a shortened chain is still a valid chain
    problems = _problems(path, anchor=published)

    assert len(problems) == 1 and "no record with seq 4" in problems[0]


def test_anchor_detects_a_chain_rewritten_from_an_edited_point(tmp_path):
    path = _trail(tmp_path)
    published = anchor(path)
    records = read_trail(path)
    rewritten, prev = [], GENESIS_HASH
    for r in records:
        details = {**r.details, "epsilon": 0.1} if r.event == "privacy.spend" else r.details
        fields = {"v": 1, "seq": r.seq, "time": r.time, "event": r.event, "actor": r.actor, "details": details}
        line = _sealed({**fields, "prev": prev})
        rewritten.append(line)
        prev = json.loads(line)["hash"]
    _write(path, rewritten)

    assert verify_trail(path).ok
    problems = _problems(path, anchor=published)

    assert len(problems) == 1 and "rewritten" in problems[0]


def test_anchor_refuses_a_damaged_trail_and_a_malformed_anchor(tmp_path):
    path = _trail(tmp_path)
    good = anchor(path)
    with pytest.raises(InputError, match="last_hash"):
        verify_trail(path, anchor={"records": 5, "last_hash": "xyz"})
    _write(path, [*_lines(path), "garbage\n"])
    with pytest.raises(InputError, match="line 6"):
        anchor(path)
    assert good["records"] == 5


# -- bad input ----------------------------------------------------------------------------
@pytest.mark.parametrize("event", ["", "Job.Submitted", "job submitted", "job/submitted", None])
def test_invalid_event_name_is_refused(tmp_path, event):
    with pytest.raises(InputError) as err:
        append_event(tmp_path / AUDIT_FILE, event, "admin")

    assert err.value.name == "event" and "provision.run" in err.value.fix
    assert not (tmp_path / AUDIT_FILE).exists()


def test_empty_actor_is_refused(tmp_path):
    with pytest.raises(InputError) as err:
        append_event(tmp_path / AUDIT_FILE, "job.submitted", "  ")
    assert err.value.name == "actor"


@pytest.mark.parametrize(
    "details, key",
    [
        ({"job": {"started": datetime(2026, 1, 1)}}, "details['job']['started']"),
        ({"sites": ["a", {1, 2}]}, "details['sites'][1]"),
        ({"epsilon": float("nan")}, "details['epsilon']"),
        ({"ok": 1, 7: "int key"}, "details[7]"),
    ],
)
def test_unserialisable_details_name_the_key(tmp_path, details, key):
    with pytest.raises(InputError) as err:
        append_event(tmp_path / AUDIT_FILE, "job.submitted", "admin", details)

    assert err.value.name == key
    assert key in str(err.value)


def test_details_must_be_a_dict_and_now_timezone_aware(tmp_path):
    with pytest.raises(InputError, match="details"):
        append_event(tmp_path / AUDIT_FILE, "job.submitted", "admin", ["not", "a", "dict"])
    with pytest.raises(InputError, match="timezone-aware"):
        append_event(tmp_path / AUDIT_FILE, "job.submitted", "admin", now=datetime(2026, 1, 1))


def test_missing_trail_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="missing"):
        read_trail(tmp_path / AUDIT_FILE)
    with pytest.raises(InputError, match="missing"):
        verify_trail(tmp_path / AUDIT_FILE)


# -- concurrency --------------------------------------------------------------------------
def _append_many(path, worker, count):
    for i in range(count):
        append_event(path, "privacy.spend", f"site-{worker}", {"worker": worker, "i": i})


def test_concurrent_appends_from_four_processes_keep_one_chain(tmp_path):
    path = tmp_path / "trail" / AUDIT_FILE
    spawn = multiprocessing.get_context("spawn")
    workers = [spawn.Process(target=_append_many, args=(str(path), w, 25)) for w in range(4)]
    for p in workers:
        p.start()
    for p in workers:
        p.join(timeout=120)

    assert [p.exitcode for p in workers] == [0, 0, 0, 0]
    result = verify_trail(path)
    assert result.ok, result.problems
    records = read_trail(path)
    assert result.records == 100 and [r.seq for r in records] == list(range(100))
    assert sorted((r.details["worker"], r.details["i"]) for r in records) == [
        (w, i) for w in range(4) for i in range(25)
    ]


def test_concurrent_appends_from_threads_keep_one_chain(tmp_path):
    path = tmp_path / AUDIT_FILE
    threads = [threading.Thread(target=_append_many, args=(path, w, 20)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    result = verify_trail(path)
    assert result.ok and result.records == 120


# -- the CLI ------------------------------------------------------------------------------
def _run(argv):
    parser = argparse.ArgumentParser(prog="hospital-fl")
    add_audit_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_verify_ok_prints_the_anchor(tmp_path, capsys):
    path = _trail(tmp_path)

    code = _run(["audit", "verify", str(path)])

    out = capsys.readouterr().out
    last_hash = read_trail(path)[-1].hash
    assert code == 0
    assert f"--anchor-records 5 --anchor-hash {last_hash}" in out


def test_cli_verify_lists_problems_and_exits_1(tmp_path, capsys):
    path = _trail(tmp_path)
    lines = _lines(path)
    del lines[1]
    _write(path, lines)

    code = _run(["audit", "verify", str(path)])

    assert code == 1
    assert "line 2: prev does not match" in capsys.readouterr().out


def test_cli_verify_with_anchor(tmp_path, capsys):
    path = _trail(tmp_path)
    published = anchor(path)
    anchor_args = ["--anchor-records", str(published["records"]), "--anchor-hash", published["last_hash"]]
    assert _run(["audit", "verify", str(path), *anchor_args]) == 0
    _write(path, _lines(path)[:-1])

    assert _run(["audit", "verify", str(path), *anchor_args]) == 1
    assert "no record with seq 4" in capsys.readouterr().out
    assert _run(["audit", "verify", str(path), "--anchor-records", "5"]) == 2


def test_cli_missing_file_exits_2(tmp_path, capsys):
    assert _run(["audit", "verify", str(tmp_path / "none.jsonl")]) == 2
    assert _run(["audit", "show", str(tmp_path / "none.jsonl")]) == 2
    assert "missing" in capsys.readouterr().err


def test_cli_show_filters_by_event_prefix_and_last(tmp_path, capsys):
    path = _trail(tmp_path)

    code = _run(["audit", "show", str(path), "--event", "kit.", "--last", "1"])

    out = capsys.readouterr().out
    assert code == 0
    assert "1 of 5 records" in out
    assert "site-2" in out and "site-1" not in out and "provision.run" not in out
