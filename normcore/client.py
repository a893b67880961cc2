"""A small HTTP client for the normcore training service (needs only httpx).

    from normcore.client import Client
    client = Client("http://127.0.0.1:8000", token="...")
    job = client.submit("spec.json")
    for row in client.iter_metrics(job["id"]):  # each (split, step) once, final values
        print(row["epoch"], row["split"], row["values"])
    path = client.download(job["id"])

URL and token default to the ``NORMCORE_URL`` and ``NORMCORE_TOKEN`` environment variables.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from normcore.specfile import SpecFileError, read_spec

if TYPE_CHECKING:
    import httpx

__all__ = ["DEFAULT_URL", "ApiError", "Client", "JobFailed", "SpecFileError", "read_spec"]

DEFAULT_URL = "http://127.0.0.1:8000"
FINISHED = ("succeeded", "failed", "cancelled", "timed_out")


class ApiError(Exception):
    """The server answered with an error: ``status`` and the server's ``detail``."""

    def __init__(self, status: int, detail: Any) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status
        self.detail = detail


class JobFailed(RuntimeError):
    """A job waited for ended as failed; ``job`` is its last state, ``error`` its message."""

    def __init__(self, job: dict[str, Any]) -> None:
        self.job = job
        self.error = job.get("error")
        super().__init__(f"job {job.get('id')} failed: {self.error}")


class ChecksumMismatch(RuntimeError):
    """A downloaded file's sha256 differs from the server's ETag."""


class Client:
    """Talks to the service's HTTP API; every error answer raises ApiError."""

    def __init__(
        self,
        url: str | None = None,
        token: str | None = None,
        timeout: float = 30,
    ) -> None:
        try:
            import httpx
        except ImportError as exc:
            raise ImportError(
                "normcore.client needs httpx: pip install 'normcore[client]'"
            ) from exc

        self.url = (url or os.environ.get("NORMCORE_URL") or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get("NORMCORE_TOKEN")
        headers = {"Accept": "application/json"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout)

    def close(self) -> None:
        """Close the connection pool."""
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except (ValueError, AttributeError):
                detail = response.text
            raise ApiError(response.status_code, detail)
        return response

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._check(self._http.request(method, path, **kwargs)).json()

    def submit(
        self, spec: dict[str, Any] | str | Path, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit a job spec (a dict or a JSON/YAML file); returns the job."""
        body = spec if isinstance(spec, dict) else read_spec(spec)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/jobs", json=body, headers=headers)

    def get(self, job_id: str) -> dict[str, Any]:
        """One job with its status, last metrics and checkpoints."""
        return self._request("GET", f"/jobs/{job_id}")

    def list(self, status: str | None = None, limit: int = 50) -> Iterator[dict[str, Any]]:
        """Every job visible to the caller, newest first, fetched ``limit`` per page."""
        cursor: str | None = None
        while True:
            params: dict[str, Any] = {"limit": limit}
            if status:
                params["status"] = status
            if cursor:
                params["cursor"] = cursor
            page = self._request("GET", "/jobs", params=params)
            yield from page["items"]
            cursor = page.get("next")
            if not cursor:
                return

    def metrics(
        self, job_id: str, after: int = 0, limit: int = 1000, final: bool = False
    ) -> dict[str, Any]:
        """Metric rows with ``seq > after``: ``{"items": [...], "next": seq}``.

        Each row carries its ``attempt`` and ``replaces`` (the seq of the row it supersedes, or
        None). ``final=True`` asks only for rows no resume can rewrite any more (see
        ``iter_metrics``).
        """
        params: dict[str, Any] = {"after": after, "limit": limit}
        if final:
            params["final"] = "true"
        return self._request("GET", f"/jobs/{job_id}/metrics", params=params)

    def norms(
        self,
        job_id: str,
        after: int = 0,
        limit: int = 1000,
        layer: str | None = None,
        max_points: int | None = None,
    ) -> dict[str, Any]:
        """Norm telemetry rows with ``seq > after``: ``{"items": [...], "next": seq}``, one row
        per (record, norm layer) with ``step``, ``trigger``, ``layer`` and ``values`` (README,
        "Norm telemetry"); ``layer`` keeps one layer, ``max_points`` downsamples per (layer,
        value name) keeping each bucket's extremes."""
        params: dict[str, Any] = {"after": after, "limit": limit}
        if layer is not None:
            params["layer"] = layer
        if max_points is not None:
            params["max_points"] = max_points
        return self._request("GET", f"/jobs/{job_id}/norms", params=params)

    def iter_metrics(
        self,
        job_id: str,
        poll: float = 1.0,
        until_done: bool = True,
        after: int = 0,
        final: bool | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Follow a job's metric rows in seq order; with ``until_done`` keep polling until the
        job finishes, else stop when no more rows are there now.

        ``final`` defaults to ``until_done``: a follower gets final rows, a snapshot
        (``until_done=False``) the rows as they stand now.

        ``final=True`` yields each (split, step) once, with its final value: the
        server hands out a row only once a checkpoint at or past its step is recorded, or the
        job has finished, because a resumed attempt rewrites exactly the rows past the
        checkpoint it resumes from. The rows followed are then the job's history (what
        ``GET /jobs/{id}/metrics`` lists afterwards), so a plot or a sum over them is right; they
        lag the training by up to one checkpoint interval. One exception: if a resume finds the
        newest checkpoint corrupt and falls back to an older one, the rows it rewrites come
        again, each with ``replaces`` set to the seq of the row it supersedes.

        ``final=False`` yields every row as soon as it is written. A row rewritten by a resumed
        attempt then comes again, with a larger ``attempt`` and ``replaces`` set to the seq of
        the row it supersedes (same split and step): key the rows by (split, step) and let a
        later row overwrite an earlier one.
        """
        page_size = 1000
        final = until_done if final is None else final
        while True:
            # Read the status first: rows written before the job finished are then in the drain.
            finished = until_done and self.get(job_id)["status"] in FINISHED
            while True:
                page = self.metrics(job_id, after=after, limit=page_size, final=final)
                yield from page["items"]
                after = page["next"]
                if len(page["items"]) < page_size:
                    break
            if not until_done or finished:
                return
            time.sleep(poll)

    def wait(self, job_id: str, timeout: float | None = None, poll: float = 1.0) -> dict[str, Any]:
        """Poll until the job finishes; return it, or raise JobFailed (failed) / TimeoutError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["status"] == "failed":
                raise JobFailed(job)
            if job["status"] in FINISHED:
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job['status']} after {timeout}s")
            time.sleep(poll)

    def submit_sweep(
        self, sweep: dict[str, Any] | str | Path, idempotency_key: str | None = None
    ) -> dict[str, Any]:
        """Submit a sweep (a dict or a JSON/YAML file: base spec, grid, seeds, metric, ...);
        returns the sweep with its cells. A cell that fails a submit check: ApiError 422."""
        body = sweep if isinstance(sweep, dict) else read_spec(sweep)
        headers = {"Idempotency-Key": idempotency_key} if idempotency_key else {}
        return self._request("POST", "/sweeps", json=body, headers=headers)

    def get_sweep(self, sweep_id: str) -> dict[str, Any]:
        """One sweep: status, counts per job status, cells with their jobs."""
        return self._request("GET", f"/sweeps/{sweep_id}")

    def list_sweeps(self, limit: int = 100) -> list[dict[str, Any]]:
        """The caller's sweeps, newest first."""
        return self._request("GET", "/sweeps", params={"limit": limit})["items"]

    def wait_sweep(
        self, sweep_id: str, timeout: float | None = None, poll: float = 1.0
    ) -> dict[str, Any]:
        """Poll until every run of the sweep ended (or it was cancelled); return the sweep.

        Raises TimeoutError after ``timeout`` seconds (None: wait for ever).
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            sweep = self.get_sweep(sweep_id)
            if sweep["status"] in ("succeeded", "failed", "cancelled"):
                return sweep
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"sweep {sweep_id} still {sweep['status']} after {timeout}s")
            time.sleep(poll)

    def sweep_report(self, sweep_id: str, format: str = "json") -> Any:
        """The sweep's report: a dict for "json", text for "csv", bytes for "svg" and "png"."""
        response = self._check(
            self._http.get(f"/sweeps/{sweep_id}/report", params={"format": format})
        )
        if format == "json":
            return response.json()
        return response.text if format == "csv" else response.content

    def cancel_sweep(self, sweep_id: str) -> dict[str, Any]:
        """Release no more runs and cancel every queued or running job of the sweep."""
        return self._request("POST", f"/sweeps/{sweep_id}/cancel")

    def delete_sweep(self, sweep_id: str) -> None:
        """Delete the sweep and every job it made."""
        self._check(self._http.delete(f"/sweeps/{sweep_id}"))

    def cancel(self, job_id: str) -> dict[str, Any]:
        """Ask the job to stop (cancelled at once if still queued); returns the job."""
        return self._request("POST", f"/jobs/{job_id}/cancel")

    def label(
        self,
        job_id: str,
        *,
        tags: list[str] | None = None,
        add: list[str] | tuple[str, ...] = (),
        remove: list[str] | tuple[str, ...] = (),
        note: str | None = None,
    ) -> dict[str, Any]:
        """Change a job's tags and/or note (``PATCH /jobs/{id}``); returns the job.

        ``tags`` replaces the whole list; ``add``/``remove`` edit the current one (read first).
        ``note`` None leaves the note alone, "" removes it. Raises ApiError (422 for a tag or
        note the server refuses, 404 for an unknown job).
        """
        body: dict[str, Any] = {}
        if tags is not None or add or remove:
            current = tags if tags is not None else self.get(job_id)["spec"].get("tags", [])
            body["tags"] = [t for t in [*current, *add] if t not in set(remove)]
        if note is not None:
            body["note"] = note
        return self._request("PATCH", f"/jobs/{job_id}", json=body)

    def delete(self, job_id: str) -> None:
        """Delete a job with its rows and files (a running job is stopped first); 404 raises."""
        self._check(self._http.request("DELETE", f"/jobs/{job_id}"))

    def checkpoints(self, job_id: str) -> list[dict[str, Any]]:
        """The job's checkpoints: name, epoch, step, bytes, sha256, metrics."""
        return self._request("GET", f"/jobs/{job_id}/checkpoints")

    def download(
        self, job_id: str, name: str | None = None, path: str | Path | None = None
    ) -> Path:
        """Stream a checkpoint's model.safetensors to ``path`` (default: the newest checkpoint,
        into the current folder) and verify its sha256 against the ETag."""
        if name is None:
            points = self.checkpoints(job_id)
            if not points:
                raise ApiError(404, f"job {job_id} has no checkpoints yet")
            name = max(points, key=lambda c: (c.get("epoch") or 0, c.get("step") or 0))["name"]
        target = Path(path) if path is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{job_id}-{name}.safetensors"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        digest = hashlib.sha256()
        with self._http.stream("GET", f"/jobs/{job_id}/checkpoints/{name}") as response:
            if response.status_code >= 400:
                response.read()
                self._check(response)
            etag = response.headers.get("etag", "").removeprefix("W/").strip('"')
            with open(partial, "wb") as fh:
                for chunk in response.iter_bytes():
                    digest.update(chunk)
                    fh.write(chunk)
        if etag and digest.hexdigest() != etag:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(
                f"checkpoint {name} of job {job_id}: sha256 {digest.hexdigest()} != ETag {etag}"
            )
        partial.replace(target)
        return target

    def validate(self, spec: dict[str, Any] | str | Path) -> dict[str, Any]:
        """What a spec (a dict or a JSON/YAML file) would do to its norm layers, without
        training or storing it (``POST /jobs/validate``): per layer the batch its statistics
        come from, per device and globally, the momentum's half-life in steps, steps per epoch,
        parameters, a memory estimate and warnings. Raises ApiError (422 where a submit would
        be refused)."""
        body = spec if isinstance(spec, dict) else read_spec(spec)
        return self._request("POST", "/jobs/validate", json=body)

    def checkpoint_diff(
        self, job_id: str, name: str, against_job: str, against_name: str
    ) -> dict[str, Any]:
        """Per module, per tensor: the change from checkpoint ``against_job/against_name`` to
        ``job_id/name`` (relative L2, max and mean absolute change, float64). Raises ApiError
        (404 for a job or checkpoint the caller cannot see, 422 for another architecture)."""
        return self._request(
            "GET",
            f"/jobs/{job_id}/checkpoints/{name}/diff",
            params={"against": f"{against_job}/{against_name}"},
        )

    def stats(self, job_id: str, name: str) -> dict[str, Any]:
        """Running statistics of every norm layer of a checkpoint."""
        return self._request("GET", f"/jobs/{job_id}/checkpoints/{name}/stats")

    def logs(self, job_id: str, after: int = 0, limit: int = 1000) -> dict[str, Any]:
        """The job's log lines with ``seq > after``: ``{"items": [...], "next": seq}``."""
        return self._request("GET", f"/jobs/{job_id}/logs", params={"after": after, "limit": limit})

    def jobspec_schema(self) -> dict[str, Any]:
        """The JSON schema the server validates job specs against."""
        return self._request("GET", "/schema/jobspec")

    def _newest_checkpoint(self, job_id: str) -> str:
        points = [c for c in self.checkpoints(job_id) if not c.get("recalibrated_from")]
        if not points:
            raise ApiError(404, f"job {job_id} has no checkpoints yet")
        return max(points, key=lambda c: (c.get("epoch") or 0, c.get("step") or 0))["name"]

    def export(
        self,
        job_id: str,
        name: str | None = None,
        path: str | Path | None = None,
        *,
        format: str = "onnx",
        fold_bn: bool = True,
        preprocessing: bool = False,
        timeout: float = 600.0,
    ) -> tuple[Path, dict[str, Any]]:
        """Export a checkpoint (default: the newest) to ONNX and save it to ``path`` (a file or
        folder; default: the current folder); returns (the file, its equivalence certificate).

        A worker builds the file (``GET .../export``); this waits for it up to ``timeout``
        seconds, then streams it and checks its sha256 against the ETag. ``fold_bn`` folds BN
        into the conv or linear before it; ``preprocessing`` puts the training normalization in
        the graph (its input is then the raw image in [0, 1]). Raises ApiError (422 when the
        worker could not export it, 404 for an unknown job or checkpoint), TimeoutError, or
        ChecksumMismatch.
        """
        name = name or self._newest_checkpoint(job_id)
        target = Path(path) if path is not None else Path.cwd()
        if target.is_dir():
            target = target / f"{job_id}-{name}.{format}"
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{target.name}.part")
        params = {"format": format, "fold_bn": fold_bn, "preprocessing": preprocessing}
        deadline = time.monotonic() + timeout
        while True:
            wait = max(0.0, min(20.0, deadline - time.monotonic()))
            url = f"/jobs/{job_id}/checkpoints/{name}/export"
            with self._http.stream("GET", url, params={**params, "wait": wait}) as response:
                if response.status_code == 202:
                    response.read()
                    if time.monotonic() >= deadline:
                        raise TimeoutError(f"export of {job_id}/{name} not ready after {timeout}s")
                    continue
                if response.status_code >= 400:
                    response.read()
                    self._check(response)
                certificate = json.loads(response.headers.get("x-normcore-certificate", "{}"))
                etag = response.headers.get("etag", "").removeprefix("W/").strip('"')
                digest = hashlib.sha256()
                with open(partial, "wb") as fh:
                    for chunk in response.iter_bytes():
                        digest.update(chunk)
                        fh.write(chunk)
                break
        if etag and digest.hexdigest() != etag:
            partial.unlink(missing_ok=True)
            raise ChecksumMismatch(f"export of {job_id}/{name}: sha256 != ETag {etag}")
        partial.replace(target)
        return target, certificate

    def export_certificate(
        self, job_id: str, name: str, *, fold_bn: bool = True, preprocessing: bool = False
    ) -> dict[str, Any]:
        """The equivalence certificate of a checkpoint's ONNX export (largest logit difference
        from eager on a probe of validation images, probe size, onnxruntime version, opset,
        folded layers); waits up to 20 s for the worker and returns the artifact's status
        (``{"status": "queued"|"running", ...}``) if it is still being built."""
        return self._request(
            "GET",
            f"/jobs/{job_id}/checkpoints/{name}/export/certificate",
            params={"fold_bn": fold_bn, "preprocessing": preprocessing, "wait": 20},
        )

    def recalibrate(
        self, job_id: str, name: str, batches: int = 50, *, timeout: float = 600.0
    ) -> dict[str, Any]:
        """Recompute a checkpoint's BN statistics over ``batches`` training batches on a worker
        (precise BN) and wait for it; returns the finished artifact, whose ``result`` names the
        new checkpoint (``<name>-recal<batches>``) and holds its validation ``metrics`` beside
        the original's (``original_metrics``). Raises ApiError (422 for a norm without running
        statistics or a bad ``batches``) or TimeoutError."""
        deadline = time.monotonic() + timeout
        url = f"/jobs/{job_id}/checkpoints/{name}/recalibrate"
        while True:
            wait = max(0.0, min(20.0, deadline - time.monotonic()))
            response = self._check(
                self._http.post(url, json={"batches": batches}, params={"wait": wait})
            )
            body = response.json()
            if response.status_code != 202:
                return body
            if time.monotonic() >= deadline:
                raise TimeoutError(f"recalibration of {job_id}/{name} not done after {timeout}s")

    def artifacts(self, job_id: str, kind: str | None = None) -> list[dict[str, Any]]:
        """The job's exports and recalibrations (``kind``: "export" or "recalibrate"), with
        status, result and certificate."""
        params = {"kind": kind} if kind else {}
        return self._request("GET", f"/jobs/{job_id}/artifacts", params=params)
