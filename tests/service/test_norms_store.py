"""Norm telemetry rows and job warnings in the store: seq/after paging, rewrites, resume, fencing."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from service.store import StaleAttempt, Store


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    s = Store(f"sqlite:///{tmp_path / 'store.db'}")
    s.upgrade()
    yield s
    s.dispose()


def _running(store: Store) -> tuple[str, int]:
    user = store.create_user("alice")
    job, _ = store.create_job(owner_id=user.id, spec={"epochs": 1}, name="j", queue="cpu")
    attempt = store.claim_job(job.id, worker_id="w1", lease_seconds=30)
    assert attempt == 1
    return job.id, attempt


def _record(step: int, var: float, layers: tuple[str, ...] = ("a.norm", "b.norm")) -> dict:
    return {
        "step": step,
        "epoch": step // 10,
        "trigger": "eval",
        "time": 1.0,
        "layers": [
            {"layer": n, "var_mean": var + i, "source": "running"} for i, n in enumerate(layers)
        ],
    }


def test_rows_page_by_seq_and_filter_by_layer(store: Store) -> None:
    job_id, attempt = _running(store)
    store.add_norms(job_id, attempt=attempt, records=[_record(0, 1.0), _record(10, 2.0)])
    rows, nxt = store.get_norms(job_id)
    assert [(r.step, r.layer, r.values["var_mean"]) for r in rows] == [
        (0, "a.norm", 1.0),
        (0, "b.norm", 2.0),
        (10, "a.norm", 2.0),
        (10, "b.norm", 3.0),
    ]
    assert [r.seq for r in rows] == sorted(r.seq for r in rows)
    assert nxt == rows[-1].seq
    page, nxt2 = store.get_norms(job_id, after=rows[1].seq, layer="b.norm")
    assert [(r.step, r.layer) for r in page] == [(10, "b.norm")] and nxt2 == page[-1].seq
    assert store.get_norms(job_id, after=nxt) == ([], nxt)
    # a rewrite of (step, layer) comes again under a larger seq
    store.add_norms(job_id, attempt=attempt, records=[_record(10, 5.0, ("a.norm",))])
    again, _ = store.get_norms(job_id, after=nxt)
    assert [(r.step, r.layer, r.values["var_mean"]) for r in again] == [(10, "a.norm", 5.0)]
    assert len(store.get_norms(job_id)[0]) == 4


def test_norm_layers_lists_the_jobs_layer_names(store: Store) -> None:
    job_id, attempt = _running(store)
    assert store.norm_layers(job_id) == []
    store.add_norms(job_id, attempt=attempt, records=[_record(0, 1.0, ("z.norm", "a.norm"))])
    store.add_norms(job_id, attempt=attempt, records=[_record(10, 1.0, ("a.norm",))])
    assert store.norm_layers(job_id) == ["a.norm", "z.norm"]


def test_downsampled_keeps_extremes_per_layer(store: Store) -> None:
    job_id, attempt = _running(store)
    values = [1.0] * 40
    values[17] = 99.0  # a spike must survive
    store.add_norms(
        job_id,
        attempt=attempt,
        records=[_record(i, v, ("a.norm",)) for i, v in enumerate(values)],
    )
    rows, nxt = store.get_norms_downsampled(job_id, max_points=6)
    assert len(rows) <= 6
    assert 99.0 in [r.values.get("var_mean") for r in rows]
    assert nxt == store.get_norms(job_id, limit=100)[1]


def test_resume_discards_later_rows_and_fences_stale_attempts(store: Store) -> None:
    job_id, attempt = _running(store)
    store.add_norms(job_id, attempt=attempt, records=[_record(0, 1.0), _record(10, 2.0)])
    assert store.discard_norms_after(job_id, attempt=attempt, step=0) == 2
    assert {r.step for r in store.get_norms(job_id)[0]} == {0}
    with pytest.raises(StaleAttempt):
        store.add_norms(job_id, attempt=attempt + 1, records=[_record(20, 1.0)])
    with pytest.raises(ValueError, match="malformed"):
        store.add_norms(job_id, attempt=attempt, records=[{"step": 1}])


def test_job_warnings_replace_by_code_and_source(store: Store) -> None:
    job_id, attempt = _running(store)
    assert store.get_job(job_id).warnings == []
    w: dict[str, Any] = {"code": "train_eval_gap", "message": "first", "source": "telemetry"}
    store.add_job_warning(job_id, attempt=attempt, warning=w)
    store.add_job_warning(job_id, attempt=None, warning={**w, "source": "validate"})
    store.add_job_warning(job_id, attempt=attempt, warning={**w, "message": "second"})
    got = store.get_job(job_id).warnings
    assert sorted((x["source"], x["message"]) for x in got) == [
        ("telemetry", "second"),
        ("validate", "first"),
    ]
    with pytest.raises(ValueError, match="message"):
        store.add_job_warning(job_id, attempt=attempt, warning={"code": "x", "source": "y"})
    with pytest.raises(StaleAttempt):
        store.add_job_warning(job_id, attempt=attempt + 1, warning=w)


def test_deleting_the_job_deletes_its_rows(store: Store) -> None:
    job_id, attempt = _running(store)
    store.add_norms(job_id, attempt=attempt, records=[_record(0, 1.0)])
    store.delete_job(job_id)
    assert store.get_norms(job_id) == ([], 0)
