"""Disk a user's jobs may hold: the per-user quota and the keep_last bound checked at submit, and
deleting a job with its rows and files (``DELETE /jobs/{id}``)."""

from __future__ import annotations

import logging
import shutil

from normcore.spec import JobSpec
from service.errors import InvalidInput, LimitExceeded
from service.settings import Settings
from service.store import Store, UserRecord

log = logging.getLogger(__name__)


def check_keep_last(spec: JobSpec, settings: Settings) -> None:
    """Refuse (InvalidInput at ["checkpoint", "keep_last"]) more kept checkpoints than the
    server's ``max_keep_last``."""
    bound = settings.max_keep_last
    if spec.checkpoint.keep_last > bound:
        raise InvalidInput(
            ["checkpoint", "keep_last"],
            f"checkpoint.keep_last={spec.checkpoint.keep_last} but this server keeps at most "
            f"{bound} checkpoints per job: ask for {bound} or fewer",
        )


def check_disk_quota(store: Store, settings: Settings, user: UserRecord) -> None:
    """Refuse (LimitExceeded, numbers ``used`` and ``quota`` in bytes) a user whose jobs already
    hold ``disk_quota_bytes_per_user`` or more (``Store.disk_usage``: recorded checkpoint
    sizes plus log text). No quota when the setting is None."""
    quota = settings.disk_quota_bytes_per_user
    if quota is None:
        return
    used = store.disk_usage(user.id)
    if used >= quota:
        raise LimitExceeded(
            f"your jobs hold {used:,} bytes of checkpoints and logs and your disk quota is "
            f"{quota:,} bytes; delete jobs you no longer need (normcore delete ID) and submit "
            "again",
            used=used,
            quota=quota,
        )


def delete(store: Store, settings: Settings, job_id: str) -> bool:
    """Delete a job's rows (one transaction) and then its folder; False if it did not exist.

    The rows go first: the job row carries the fencing token, so from then on a worker still
    running the job is refused every write and heartbeat (NotFound), kills its training process
    and removes the folder again once that process is dead (``worker.runner``), covering files
    written between this removal and the kill.
    """
    job = store.delete_job(job_id)
    if job is None:
        return False
    shutil.rmtree(settings.job_dir(job_id), ignore_errors=True)
    log.info("job %s (%s, owner %s) deleted", job_id, job.status, job.owner_id)
    return True
