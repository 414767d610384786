"""Chaos: kill -9 of the node at seeded random points, the disk and the audit trail as the
oracle. The rounds are ``bench/chaos.py``'s own code (the bench runs more of them).

* during receive, ten rounds on one spool and database: no acknowledged instance is lost, no
  partial file is an instance, and the series re-sent at the end completes once, one job;
* during a job and during a push, alternately: every series ends with one job, its results
  delivered, no second result, on SQLite and on PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import job_push_rounds, receive_rounds

pytestmark = pytest.mark.slow

ROUNDS = 10


def test_ten_kill9_rounds_during_receive_lose_nothing(tmp_path: Path) -> None:
    result = receive_rounds(tmp_path, rounds=ROUNDS)
    assert result["instances_acknowledged"] >= ROUNDS
    assert result["acknowledged_lost"] == 0
    assert result["rows_not_matching_file"] == 0
    assert result["temporary_leftovers"] == 0
    assert result["resend_storescu_rc"] == 0
    assert result["series_instances"] == result["series_slices"]
    assert result["completions"] == 1 and result["jobs"] == 1
    assert result["crashed_runs_closed"] == ROUNDS  # each crash's association closed
    print(f"chaos: {ROUNDS} kill -9 rounds during receive, {result['instances_acknowledged']} "
          "instances acknowledged, 0 lost, 1 completion, 1 job")


def test_kill9_during_jobs_and_pushes_delivers_each_result_once(db_url: str,
                                                                 tmp_path: Path) -> None:
    result = job_push_rounds(tmp_path, rounds=4, db_url=db_url)
    assert result["kills"].get("job", 0) >= 1 and result["kills"]["push"] == 2
    assert result["jobs"] == result["series"] == 4
    assert result["jobs_per_series_max"] == 1 and result["jobs_succeeded"] == 4
    # a job killed mid-run is re-run after its lease is reclaimed, unless its worker finished
    # it before its next heartbeat noticed the node was gone (lease_s / 4 = 0.75 s here); a
    # push round's kill can land on a later series' running job too: each re-run once
    assert 1 <= result["jobs_reclaimed"] <= result["kills"]["running_jobs_killed"]
    assert result["job_attempts"] == 4 + result["jobs_reclaimed"]
    assert result["results_not_delivered"] == 0
    assert result["duplicate_results"] == 0  # no killed attempt's result reached the PACS
    assert result["deliveries"] == {"DELIVERED": result["result_instances"]}
    print(f"chaos: {result}")
