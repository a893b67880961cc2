"""100 concurrent POST /jobs, half of them repeating idempotency keys, against a real server."""

from __future__ import annotations

from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.harness import ServiceEnv, running_stack

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("e2e-idempotency")]

SPEC = {
    "name": "idem",
    "model": {"arch": "lenet", "norm": "bn"},
    "data": {"dataset": "digits"},
    "epochs": 1,
}
KEYLESS = 50
KEYS = 10
REPEATS_PER_KEY = 5


def test_concurrent_posts_make_one_job_per_key(any_env: ServiceEnv) -> None:
    """Exactly one job per distinct key plus one per keyless POST; no request lost or failed."""
    any_env.env["NORMCORE_MAX_ACTIVE_JOBS_PER_USER"] = "1000"
    with running_stack(any_env, workers=0) as stack:
        requests: list[str | None] = [None] * KEYLESS + [
            f"key-{k}" for k in range(KEYS) for _ in range(REPEATS_PER_KEY)
        ]

        def post(key: str | None) -> tuple[str | None, int, str]:
            headers = {"Authorization": f"Bearer {stack.token}"}
            if key is not None:
                headers["Idempotency-Key"] = key
            response = httpx.post(f"{stack.url}/jobs", json=SPEC, headers=headers, timeout=60)
            assert response.status_code in (200, 201), response.text
            return key, response.status_code, response.json()["id"]

        with ThreadPoolExecutor(max_workers=32) as pool:
            results = list(pool.map(post, requests))

        assert len(results) == KEYLESS + KEYS * REPEATS_PER_KEY
        keyless_ids = [job_id for key, _, job_id in results if key is None]
        assert len(set(keyless_ids)) == KEYLESS
        by_key: dict[str, set[str]] = {}
        for key, _, job_id in results:
            if key is not None:
                by_key.setdefault(key, set()).add(job_id)
        assert all(len(ids) == 1 for ids in by_key.values()), by_key
        # exactly one 201 per key: the others are replays answered 200
        created = Counter(key for key, status, _ in results if key is not None and status == 201)
        assert created == Counter({f"key-{k}": 1 for k in range(KEYS)})

        # the store holds exactly those jobs, none lost, none doubled
        with stack.client() as client:
            listed: list[str] = []
            cursor = None
            while True:
                params = {"limit": 50, **({"cursor": cursor} if cursor else {})}
                page = client.get("/jobs", params=params).json()
                listed += [job["id"] for job in page["items"]]
                cursor = page["next"]
                if not cursor:
                    break
        expected = set(keyless_ids) | {next(iter(ids)) for ids in by_key.values()}
        assert len(listed) == len(set(listed)) == KEYLESS + KEYS
        assert set(listed) == expected
