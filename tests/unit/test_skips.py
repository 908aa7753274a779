"""Every skip on record (one skip policy for training and data check).

SkipPolicy is the one rule (data check and the loop); SkipTally counts and rate-limits the
log; SkipLog is output_dir/skipped.jsonl; SkipRecorder (train/skips.py) feeds it from the
batches a run consumed and cuts it back on resume.
"""

import json
import logging
from types import SimpleNamespace

import pytest
import torch

from vlpretrain.data.samples import SampleSource, SkippedSample
from vlpretrain.data.skips import (
    ENTRY_KEYS,
    MIN_RECORDS_FOR_SKIP_POLICY,
    SKIP_LOG_NAME,
    SkipLog,
    SkipPolicy,
    SkipTally,
    TooManySkipsError,
    skip_entry,
)
from vlpretrain.distributed.env import DistEnv
from vlpretrain.train.skips import SkipRecorder

ENV = DistEnv(0, 0, 1, torch.device("cpu"), "gloo")


def skipped(line, reason="malformed_json", dataset="captions", index=0):
    source = SampleSource(dataset, f"/data/{dataset}.jsonl", line)
    return SkippedSample(index, source, reason, f"detail of line {line}")


def batch(*samples):
    return SimpleNamespace(stats=SimpleNamespace(skipped=tuple(samples)))


def state(step, skips, seen):
    return SimpleNamespace(step=step, skipped={"any": skips}, records_seen=seen)


def test_policy_needs_min_records_then_compares_the_fraction():
    policy = SkipPolicy(0.1, min_records=100)
    assert not policy.exceeded(50, 99)  # too early for a verdict
    assert not policy.exceeded(10, 100)  # 10% is allowed
    assert policy.exceeded(11, 100)
    assert SkipPolicy(0.1, min_records=0).exceeded(1, 5)
    assert not SkipPolicy(0.0, min_records=0).exceeded(0, 0)
    with pytest.raises(TooManySkipsError, match=r"11 of 100 records skipped \(11.00%\)"):
        policy.check(11, 100, "the details")


def test_training_and_data_check_share_the_policys_minimum():
    # both build SkipPolicy(max_skip_fraction) with the default minimum
    recorder = SkipRecorder("unused", ["captions"], 0.2, ENV, resume_step=0)
    assert recorder.policy == SkipPolicy(0.2)
    assert SkipPolicy(0.2).min_records == MIN_RECORDS_FOR_SKIP_POLICY == 100


def test_judge_gives_the_verdict_line_of_an_epoch():
    policy = SkipPolicy(0.1)
    assert policy.judge(10, 100, "an epoch of 100 records") == (
        True,
        "OK: skip fraction 10.00% of an epoch of 100 records (max 10.00%)",
    )
    assert policy.judge(11, 100, "an epoch of 100 records") == (
        False,
        "FAIL: skip fraction 11.00% of an epoch of 100 records (max 10.00%)",
    )
    passes, line = policy.judge(5, 10, "an epoch of 10 records")  # 50 %, but only 10 records
    assert passes and line.endswith(
        "not judged: the skip policy judges from 100 records seen on (a run that sees 100 or "
        "more of these records stops)"
    )
    assert policy.judge(0, 10, "an epoch of 10 records")[1].endswith(
        "judges from 100 records seen on"
    )


def test_tally_logs_the_first_three_per_dataset_and_reason_then_one_in_100(caplog):
    tally = SkipTally(["captions", "qa"])
    with caplog.at_level(logging.WARNING):
        for line in range(1, 251):
            tally.record(skipped(line))
        tally.record(skipped(7, "missing_image", "qa", 1))
    logged = [r.getMessage() for r in caplog.records]
    # lines 1, 2, 3, then the 100th and 200th skip; qa's first
    assert len(logged) == 6
    assert logged[0].startswith("/data/captions.jsonl:1 (dataset 'captions'): skipped")
    assert "[captions: malformed_json #100]" in logged[3]
    assert "[qa: missing_image #1]" in logged[5]
    summary = tally.summary()
    assert summary.splitlines()[:2] == [
        "skipped 251 of 251 records",
        "  captions: malformed_json: 250 of 250",
    ]
    assert "  qa: missing_image: 1 of 1" in summary
    assert tally.by_reason() == {"malformed_json": 250, "missing_image": 1}


def test_tally_logs_a_bad_record_once_however_many_epochs_read_it(caplog):
    tally = SkipTally(["captions"])
    with caplog.at_level(logging.WARNING):
        for _epoch in range(3):  # a one-bad-line dataset read in three epochs
            tally.record(skipped(4))
    logged = [r.getMessage() for r in caplog.records]
    assert len(logged) == 1 and "/data/captions.jsonl:4 (dataset 'captions')" in logged[0]
    # counted every time it was read; one example, not the same line three times
    assert tally.summary().splitlines()[1:] == [
        "  captions: malformed_json: 3 of 3",
        "      e.g. /data/captions.jsonl:4 (dataset 'captions'): skipped (malformed_json) "
        "detail of line 4",
    ]


def test_skip_log_round_trip_and_truncation(tmp_path):
    log = SkipLog(tmp_path / SKIP_LOG_NAME)
    entries = [skip_entry(skipped(k), step=k, rank=k % 2) for k in range(1, 6)]
    assert tuple(entries[0]) == ENTRY_KEYS
    assert entries[0] == {"step": 1, "rank": 1, "dataset": "captions",
                          "file": "/data/captions.jsonl", "line": 1,
                          "reason": "malformed_json", "detail": "detail of line 1"}  # fmt: skip
    log.append(entries)
    assert log.read() == entries
    assert log.truncate_after(3) == entries[:3]
    assert log.read() == entries[:3]
    with open(log.path, "a") as handle:
        handle.write('{"step": 4, "ra')  # a write torn by a kill
    assert log.read() == entries[:3]
    assert log.truncate_after(0) == [] and log.read() == []  # a fresh run starts empty


def test_recorder_writes_consumed_skips_and_survives_a_resume(tmp_path):
    recorder = SkipRecorder(tmp_path, ["captions"], 0.5, ENV, resume_step=0)
    recorder.add([batch(skipped(1), skipped(2)), batch()], step=1)
    recorder.flush(state(1, 2, 20))
    recorder.add([batch(skipped(5))], step=2)
    recorder.flush(state(2, 3, 40))
    lines = (tmp_path / SKIP_LOG_NAME).read_text().splitlines()
    assert [(json.loads(x)["step"], json.loads(x)["line"]) for x in lines] == [(1, 1), (1, 2),
                                                                              (2, 5)]  # fmt: skip
    # resume from a step-1 checkpoint: step 2 is redone, its skip must not be listed twice
    resumed = SkipRecorder(tmp_path, ["captions"], 0.5, ENV, resume_step=1)
    assert resumed.tally.num_skipped == 2
    resumed.add([batch(skipped(5))], step=2)
    resumed.flush(state(2, 3, 40))
    lines = (tmp_path / SKIP_LOG_NAME).read_text().splitlines()
    assert [json.loads(x)["line"] for x in lines] == [1, 2, 5]


def test_recorder_stops_the_run_naming_datasets_and_reasons(tmp_path):
    recorder = SkipRecorder(tmp_path, ["captions", "qa"], 0.01, ENV, resume_step=0)
    recorder.add([batch(skipped(3, "too_long", "qa", 1), skipped(4, "too_long", "qa", 1))], 1)
    recorder.flush(state(1, 2, 99))  # 2 of 99: below the 100 records needed for a verdict
    recorder.add([batch(skipped(9, "missing_image", "captions", 0))], 2)
    with pytest.raises(TooManySkipsError) as info:
        recorder.flush(state(2, 3, 150))
    message = str(info.value)
    assert "3 of 150 records skipped (2.00%), above data.max_skip_fraction 1.00%" in message
    assert "  qa: too_long: 2" in message and "  captions: missing_image: 1" in message
    assert "/data/qa.jsonl:3" in message
    assert f"every skipped record: {tmp_path / SKIP_LOG_NAME}" in message
    assert "dataset 0" not in message and "dataset 1" not in message


def test_recorder_flushes_once_per_step_and_summarises(tmp_path, caplog):
    recorder = SkipRecorder(tmp_path, ["captions"], 1.0, ENV, resume_step=0, summary_every=2)
    with caplog.at_level(logging.WARNING):
        recorder.add([batch(skipped(1))], step=1)
        recorder.flush(state(1, 1, 10))
        recorder.flush(state(1, 1, 10))  # the save-step flush after the logging-step one
        recorder.add([batch(skipped(2))], step=2)
        recorder.flush(state(2, 2, 20))
        recorder.finish(state(2, 2, 20))
    assert len(SkipLog(tmp_path / SKIP_LOG_NAME).read()) == 2
    summaries = [r.getMessage() for r in caplog.records if "every skipped record" in r.getMessage()]
    assert len(summaries) == 1  # step 2: due and changed; finish: nothing new since
    assert summaries[0].startswith("skipped 2 of 20 records\n  captions: malformed_json: 2")
