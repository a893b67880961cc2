"""Requesting exports and recalibrations: find the cached artifact or create it, and make sure a
worker task is on its way. The API side of ``worker/artifacts.py``; no torch here.

Cache key: (job, kind, checkpoint sha256, options). A request that finds a succeeded artifact
publishes nothing. A failure is never cached for good: one interrupted (its process killed, out
of time) or environmental (the worker lacks a package, e.g. onnx) is queued again by the next
request; any other is queued again by a request at least ``FAILED_RETRY_AFTER_S`` after it
failed (a back-off, so a broken build is not retried by every poll). A queued artifact whose message may be lost (publish failed, or
older than ``REPUBLISH_AFTER_S`` unclaimed) and a running one whose worker's lease expired are
published again; the worker's claim drops any duplicate.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from service import queue
from service.db import utcnow
from service.settings import Settings
from service.store import CheckpointRecord, Store
from service.store.exports import ArtifactKind, ArtifactRecord, ArtifactStatus

log = logging.getLogger(__name__)

REPUBLISH_AFTER_S = 30.0
# worker/artifacts.py's prefix of a failure that was no fault of the checkpoint's (the child was
# killed or ran out of time): such an artifact is tried again on the next request
INTERRUPTED = "interrupted: "
# worker/artifacts.py's prefix of a failure of the worker's installation (an ImportError): fixed
# by installing the package on the worker, so tried again on the next request too
ENVIRONMENT = "worker environment: "
# a failure of any other kind is tried again by a request this long after it failed
FAILED_RETRY_AFTER_S = 60.0


def export_options(fmt: str, fold_bn: bool, preprocessing: bool = False) -> dict[str, Any]:
    """The cache options of an export."""
    return {"format": fmt, "fold_bn": bool(fold_bn), "preprocessing": bool(preprocessing)}


def recalibrate_options(batches: int) -> dict[str, Any]:
    """The cache options of a recalibration."""
    return {"batches": int(batches)}


def retry_at(art: ArtifactRecord) -> datetime | None:
    """When a request may build a failed artifact again (UTC): at once after an interrupted or
    environmental failure, ``FAILED_RETRY_AFTER_S`` after any other; None unless it failed."""
    if art.status != ArtifactStatus.FAILED:
        return None
    failed_at = art.finished_at or art.updated_at
    if (art.error or "").startswith((INTERRUPTED, ENVIRONMENT)):
        return failed_at
    return failed_at + timedelta(seconds=FAILED_RETRY_AFTER_S)


def _needs_publish(art: ArtifactRecord) -> bool:
    now = utcnow()
    if art.status == ArtifactStatus.QUEUED:
        return art.enqueues == 0 or now - art.updated_at > timedelta(seconds=REPUBLISH_AFTER_S)
    if art.status == ArtifactStatus.RUNNING:
        return art.lease_expires_at is not None and art.lease_expires_at < now
    return False


def request_artifact(
    store: Store,
    settings: Settings,
    job_id: str,
    checkpoint: CheckpointRecord,
    kind: ArtifactKind,
    options: dict[str, Any],
) -> tuple[ArtifactRecord, bool]:
    """The artifact for (checkpoint, kind, options), created and published if new; returns
    (it, cached) where ``cached`` means the request found it already (no new row).

    A broker that is down leaves the artifact queued with no message counted; the next request
    publishes again. Raises NotFound if the job is gone.
    """
    art, created = store.request_artifact(
        job_id,
        kind=kind.value,
        checkpoint=checkpoint.name,
        checkpoint_sha256=checkpoint.sha256,
        options=options,
    )
    due = retry_at(art)
    retry = due is not None and utcnow() >= due
    if retry:
        retry = store.requeue_artifact(art.id)
        art = store.get_artifact(art.id) or art
    if created or retry or _needs_publish(art):
        try:
            queue.enqueue_artifact(art.id, settings)
        except Exception as exc:
            log.warning("artifact %s: publish failed: %r", art.id, exc)
        else:
            store.mark_artifact_enqueued(art.id)
        art = store.get_artifact(art.id) or art
    return art, not created


def recalibrations_by_name(store: Store, job_id: str) -> dict[str, ArtifactRecord]:
    """The succeeded recalibrations of a job, by the name of the checkpoint each wrote."""
    out: dict[str, ArtifactRecord] = {}
    for art in store.list_artifacts(job_id, kind=ArtifactKind.RECALIBRATE.value):
        if art.status == ArtifactStatus.SUCCEEDED and art.result and art.result.get("name"):
            out[str(art.result["name"])] = art
    return out
