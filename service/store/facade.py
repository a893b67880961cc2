"""``Store``: the one object callers hold, composed of the store's parts.

Each part (users, jobs, attempts and leases, recovery, results, workers, deletion) is a class over
the same :class:`~service.store.database.Database`; ``Store`` inherits them all, so
``store.create_job(...)`` and ``store.claim_job(...)`` read as before the split.
"""

from __future__ import annotations

from service.store.attempts import AttemptStore
from service.store.deletion import DeletionStore
from service.store.exports import ArtifactStore
from service.store.jobs import JobStore
from service.store.norms import NormStore
from service.store.recovery import RecoveryStore
from service.store.results import ResultStore
from service.store.scheduling import SchedulingStore
from service.store.sweeps import SweepStore
from service.store.users import UserStore
from service.store.workers import WorkerStore


class Store(
    UserStore,
    JobStore,
    SweepStore,
    AttemptStore,
    RecoveryStore,
    ResultStore,
    WorkerStore,
    DeletionStore,
    SchedulingStore,
    ArtifactStore,
    NormStore,
):
    """All service state: users and tokens, jobs, attempts, metrics, checkpoints, logs, workers.

    Every public method is one transaction (``requeue_expired`` and ``take_unpublished``: one
    per job) and returns frozen records; errors are :class:`~service.store.errors.StoreError`
    subclasses or ValueError for bad arguments.
    """
