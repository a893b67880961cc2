"""Metric rows a resumed attempt rewrites, as followers read them: on a SQLite file and PostgreSQL.

Live rows (``get_metrics``): a rewritten row comes under a new seq with its ``attempt`` and
``replaces`` (the seq it supersedes). Final rows (``get_metrics(final=True)``): only rows no
resume can rewrite (at or before the newest checkpoint, or all once the job finished), so a
follower gets each (split, step) once.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service.store import Store
from tests.service.store_backends import BACKENDS, open_store, pg_database


@pytest.fixture(scope="module")
def pg_url(postgres_server: str) -> Iterator[str]:
    yield from pg_database(postgres_server)


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    yield from open_store(request, tmp_path, "pg_url")


def _running(store: Store) -> tuple[str, int]:
    """A new job claimed by a worker: (job id, attempt 1)."""
    user = store.create_user("alice")
    job, _ = store.create_job(owner_id=user.id, spec={"epochs": 1}, name="j", queue="cpu")
    attempt = store.claim_job(job.id, worker_id="w1", lease_seconds=1)
    assert attempt == 1
    return job.id, attempt


def _resume(store: Store, job_id: str, *, from_step: int) -> int:
    """Lose attempt N's lease, claim N + 1 and discard the rows past ``from_step``, as a resumed
    attempt does first."""
    later = datetime.now(UTC) + timedelta(seconds=60)
    assert store.requeue_expired(now=later, max_attempts=5) == [job_id]
    attempt = store.claim_job(job_id, worker_id="w2", lease_seconds=600)
    assert attempt is not None
    store.discard_metrics_after(job_id, attempt=attempt, step=from_step)
    return attempt


def _rows(steps: range, *, tag: float, val_every: int = 5) -> list[dict[str, Any]]:
    out = []
    for s in steps:
        out.append({"step": s, "epoch": s // val_every, "split": "train", "values": {"v": tag}})
        if s % val_every == 0:
            out.append({"step": s, "epoch": s // val_every, "split": "val", "values": {"v": tag}})
    return out


def _checkpoint(store: Store, job_id: str, attempt: int, step: int) -> None:
    store.add_checkpoint(
        job_id,
        attempt=attempt,
        name=f"step-{step}",
        epoch=step // 5,
        step=step,
        bytes=1000,
        sha256="0" * 64,
        files={},
        metrics={},
        path=f"jobs/{job_id}/checkpoints/step-{step}",
    )


def _poll(store: Store, job_id: str, after: int, *, final: bool) -> tuple[list[Any], int]:
    rows, nxt = store.get_metrics(job_id, after=after, limit=10_000, final=final)
    return rows, nxt


def test_a_rewritten_row_names_the_row_it_replaces(store: Store) -> None:
    job_id, first = _running(store)
    store.add_metrics(job_id, attempt=first, rows=_rows(range(1, 11), tag=1.0))
    seen, after = _poll(store, job_id, 0, final=False)
    assert len(seen) == 12
    assert all(r.attempt == 1 and r.replaces is None for r in seen)
    old = {(r.split, r.step): r.seq for r in seen}

    second = _resume(store, job_id, from_step=5)
    # Discarded rows leave the history at once; nothing new for a follower yet.
    history, _ = _poll(store, job_id, 0, final=False)
    assert {(r.split, r.step) for r in history} == {("train", s) for s in range(1, 6)} | {
        ("val", 5)
    }
    assert _poll(store, job_id, after, final=False)[0] == []
    assert store.last_metrics(job_id)["train"]["step"] == 5

    store.add_metrics(job_id, attempt=second, rows=_rows(range(6, 11), tag=2.0))
    again, _ = _poll(store, job_id, after, final=False)
    assert [(r.split, r.step) for r in again] == [("train", s) for s in range(6, 11)] + [
        ("val", 10)
    ]
    for r in again:
        assert r.attempt == 2 and r.values == {"v": 2.0}
        assert r.replaces == old[(r.split, r.step)] and r.seq > after
    assert store.last_metrics(job_id)["val"]["values"] == {"v": 2.0}

    # A row written twice by one attempt names its predecessor too.
    store.add_metrics(job_id, attempt=second, rows=_rows(range(10, 11), tag=3.0))
    latest, _ = _poll(store, job_id, max(r.seq for r in again), final=False)
    by_key = {(r.split, r.step): r.seq for r in again}
    assert [(r.split, r.step, r.replaces) for r in latest] == [
        ("train", 10, by_key[("train", 10)]),
        ("val", 10, by_key[("val", 10)]),
    ]


def test_final_rows_come_once_each_in_seq_order(store: Store) -> None:
    job_id, first = _running(store)
    got: list[Any] = []
    after = 0

    def poll() -> None:
        nonlocal after
        rows, after = _poll(store, job_id, after, final=True)
        got.extend(rows)

    store.add_metrics(job_id, attempt=first, rows=_rows(range(1, 8), tag=1.0))
    poll()
    assert got == []  # no checkpoint yet: every row may still be rewritten
    _checkpoint(store, job_id, first, 5)
    poll()
    assert [(r.split, r.step) for r in got] == [("train", s) for s in range(1, 6)] + [("val", 5)]

    second = _resume(store, job_id, from_step=5)
    poll()
    store.add_metrics(job_id, attempt=second, rows=_rows(range(6, 9), tag=2.0))
    poll()
    assert len(got) == 6  # rows 6..8 wait for the next checkpoint
    _checkpoint(store, job_id, second, 8)
    store.add_metrics(job_id, attempt=second, rows=_rows(range(9, 13), tag=2.0))
    poll()
    assert [r.step for r in got[6:]] == [6, 7, 8]
    assert all(r.attempt == 2 for r in got[6:])
    store.finish_job(job_id, attempt=second, status="succeeded")
    poll()

    keys = [(r.split, r.step) for r in got]
    assert len(keys) == len(set(keys))
    history, _ = _poll(store, job_id, 0, final=False)
    assert got == history
    assert [r.seq for r in got] == sorted(r.seq for r in got)


def test_rows_a_resume_discards_and_never_rewrites_leave_every_view(store: Store) -> None:
    job_id, first = _running(store)
    store.add_metrics(job_id, attempt=first, rows=_rows(range(1, 11), tag=1.0))
    _checkpoint(store, job_id, first, 5)
    second = _resume(store, job_id, from_step=5)
    store.add_metrics(job_id, attempt=second, rows=_rows(range(6, 8), tag=2.0))
    store.finish_job(job_id, attempt=second, status="failed", error="boom")

    history, _ = _poll(store, job_id, 0, final=False)
    final, _ = _poll(store, job_id, 0, final=True)
    assert final == history
    assert [(r.split, r.step, r.attempt) for r in history] == (
        [("train", s, 1) for s in range(1, 6)] + [("val", 5, 1), ("train", 6, 2), ("train", 7, 2)]
    )
    assert store.last_metrics(job_id)["val"]["step"] == 5


def test_a_resume_behind_the_newest_checkpoint_still_names_what_it_replaces(
    store: Store,
) -> None:
    # The newest checkpoint was found corrupt: the resume starts from an older one, so rows a
    # final follower already got are rewritten; they come again, each naming its predecessor.
    job_id, first = _running(store)
    store.add_metrics(job_id, attempt=first, rows=_rows(range(1, 11), tag=1.0))
    _checkpoint(store, job_id, first, 10)
    got, after = _poll(store, job_id, 0, final=True)
    assert len(got) == 12
    second = _resume(store, job_id, from_step=5)
    store.add_metrics(job_id, attempt=second, rows=_rows(range(6, 11), tag=2.0))
    again, _ = _poll(store, job_id, after, final=True)
    old = {(r.split, r.step): r.seq for r in got}
    assert [r.replaces for r in again] == [old[(r.split, r.step)] for r in again]
    assert len(again) == 6
