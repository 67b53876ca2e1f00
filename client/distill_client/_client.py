"""``Distill`` (sync) and ``AsyncDistill`` (async): resources mirroring the HTTP API.

    client.files    create / list / retrieve / delete / content
    client.jobs     create / list / retrieve / cancel / delete / events (list or stream=True) / wait
    client.models   list / retrieve / delete / download / predict / report
    client.webhooks create / list / retrieve / delete / deliveries
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import time
import urllib.parse
from hashlib import sha256
from pathlib import Path
from typing import IO, Any, AsyncIterator, Iterator, Union

import httpx

from ._base import (DEFAULT_MAX_RETRIES, DEFAULT_TIMEOUT, STREAM_READ_TIMEOUT_S, AsyncPaginator, AsyncTransport,
                    SSEDecoder, SyncPage, SyncTransport, _Options, parse, retry_delay)
from ._errors import APIConnectionError, DistillError, JobFailedError
from .types import Deleted, Estimate, File, Job, JobEvent, Model, PredictResponse, WebhookDelivery, WebhookEndpoint

__all__ = ["Distill", "AsyncDistill", "EventStream", "AsyncEventStream"]

FileInput = Union[str, os.PathLike, bytes, IO[bytes], tuple]
"""A path, raw bytes, an open binary file, or (filename, bytes-or-file)."""
STREAM_TIMEOUT = httpx.Timeout(STREAM_READ_TIMEOUT_S, connect=10.0)


def _files(file: FileInput, filename: str | None):
    """A factory for the multipart ``file`` part, called once per attempt (a path is reopened each time)."""
    def build(opened: contextlib.ExitStack) -> dict:
        if isinstance(file, (str, os.PathLike)):
            path = Path(file)
            return {"file": (filename or path.name, opened.enter_context(open(path, "rb")))}
        if isinstance(file, (bytes, bytearray)):
            return {"file": (filename or "upload", bytes(file))}
        if isinstance(file, tuple):
            name, content = file[0], file[1]
            if hasattr(content, "seek"):
                content.seek(0)
            return {"file": (filename or name, content)}
        if hasattr(file, "read"):
            if hasattr(file, "seek"):
                file.seek(0)
            return {"file": (filename or Path(getattr(file, "name", "upload")).name, file)}
        raise TypeError("file must be a path, bytes, a binary file object or (filename, content)")
    return build


def _job_body(body: dict | None, fields: dict) -> dict:
    if body is not None and not isinstance(body, dict):
        raise TypeError("body must be a dict (the job as the API takes it)")
    return {**(body or {}), **fields}


def _download_target(path: str | os.PathLike, response: httpx.Response, model_id: str) -> Path:
    """``path`` itself, or the server's filename inside it when ``path`` is a folder."""
    target = Path(path)
    if not (target.is_dir() or str(path).endswith(("/", os.sep))):
        return target
    disposition = response.headers.get("content-disposition", "")
    match = re.search(r"filename\*=(?:UTF-8|utf-8)''([^;]+)", disposition) or \
        re.search(r'filename="?([^";]+)"?', disposition)
    name = Path(urllib.parse.unquote(match.group(1))).name if match else model_id
    target.mkdir(parents=True, exist_ok=True)
    return target / name


def _check_sha256(response: httpx.Response, digest: str, target: Path) -> None:
    expected = response.headers.get("x-content-sha256")
    if expected and expected != digest:
        raise DistillError(f"download of {target.name} is corrupt: sha256 {digest}, the server says {expected}")


# ---- sync --------------------------------------------------------------------------------------------------

class _Resource:
    def __init__(self, client: "Distill") -> None:
        self._client = client
        self._t: SyncTransport = client._transport


class Files(_Resource):
    def create(self, *, file: FileInput, purpose: str, filename: str | None = None) -> File:
        """Upload a dataset (CSV / JSONL; ``purpose="dataset"``) or a model (``purpose="model"``)."""
        return parse(File, self._t.json("POST", "/files", files=_files(file, filename), data={"purpose": purpose},
                                        idempotent=True))

    def list(self, *, purpose: str | None = None, limit: int = 20) -> SyncPage[File]:
        def fetch(after):
            return self._t.json("GET", "/files", params={"purpose": purpose, "limit": limit, "after": after})
        return SyncPage(fetch, File, fetch(None))

    def retrieve(self, file_id: str) -> File:
        return parse(File, self._t.json("GET", f"/files/{file_id}"))

    def delete(self, file_id: str) -> Deleted:
        return parse(Deleted, self._t.json("DELETE", f"/files/{file_id}"))

    def content(self, file_id: str) -> bytes:
        return self._t.request("GET", f"/files/{file_id}/content").content


class EventStream:
    """A job's events as they happen (Server-Sent Events), oldest first, ending after the job's
    final stage. A dropped connection is resumed with ``Last-Event-ID``: no event is lost or repeated."""

    def __init__(self, client: "Distill", job_id: str, after: int | None) -> None:
        self._client, self.job_id, self.last_event_id = client, job_id, after
        self._response: httpx.Response | None = None
        self._closed = False
        self.reconnects = 0

    def __iter__(self) -> Iterator[JobEvent]:
        transport = self._client._transport
        failures, delay_s = 0, None
        while not self._closed:
            headers = {"Accept": "text/event-stream"}
            if self.last_event_id is not None:
                headers["Last-Event-ID"] = str(self.last_event_id)
            received = 0
            try:
                self._response = transport.request("GET", f"/distillation/jobs/{self.job_id}/events",
                                                   params={"stream": "true"}, headers=headers, stream=True,
                                                   timeout=STREAM_TIMEOUT)
                try:
                    decoder = SSEDecoder()
                    for line in self._response.iter_lines():
                        message = decoder.feed(line)
                        if decoder.retry_ms is not None:
                            delay_s = decoder.retry_ms / 1000
                        if message is None:
                            continue
                        event = parse(JobEvent, json.loads(message["data"]))
                        self.last_event_id, received, failures = event.id, received + 1, 0
                        yield event
                        if event.is_final:
                            return
                finally:
                    self._response.close()
            except httpx.TransportError as exc:  # dropped mid-stream
                if self._closed:
                    return
                failures += 1
                if failures > max(transport.options.max_retries, 1):
                    raise APIConnectionError(f"event stream of {self.job_id} lost: {exc}") from exc
                self.reconnects += 1
                time.sleep(delay_s if delay_s is not None else retry_delay(failures - 1))
                continue
            # The server ended the stream before the final stage (its time limit): go on from the
            # last event, unless the job is over and nothing new came.
            if received == 0 and self._client.jobs.retrieve(self.job_id).finished:
                return
            self.reconnects += 1

    def close(self) -> None:
        self._closed = True
        if self._response is not None:
            self._response.close()

    def __enter__(self) -> "EventStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Jobs(_Resource):
    def create(self, body: dict | None = None, /, **fields: Any) -> Job:
        """Submit a job: ``jobs.create(task=..., teacher={"file_id": ...}, ...)`` or ``jobs.create(body)``."""
        return parse(Job, self._t.json("POST", "/distillation/jobs", json=_job_body(body, fields), idempotent=True))

    def estimate(self, body: dict | None = None, /, **fields: Any) -> Estimate:
        """What the job would cost (steps, rows or tokens, FLOPs, duration); nothing is queued."""
        return parse(Estimate, self._t.json("POST", "/distillation/jobs/estimate", json=_job_body(body, fields)))

    def list(self, *, status: str | None = None, limit: int = 20) -> SyncPage[Job]:
        def fetch(after):
            return self._t.json("GET", "/distillation/jobs", params={"status": status, "limit": limit, "after": after})
        return SyncPage(fetch, Job, fetch(None))

    def retrieve(self, job_id: str) -> Job:
        return parse(Job, self._t.json("GET", f"/distillation/jobs/{job_id}"))

    def cancel(self, job_id: str) -> Job:
        return parse(Job, self._t.json("POST", f"/distillation/jobs/{job_id}/cancel"))

    def delete(self, job_id: str) -> Deleted:
        return parse(Deleted, self._t.json("DELETE", f"/distillation/jobs/{job_id}"))

    def events(self, job_id: str, *, after: int | None = None, stream: bool = False,
               limit: int = 1000) -> list[JobEvent] | EventStream:
        """Every event so far (oldest first, newer than ``after``), or with ``stream=True`` an
        :class:`EventStream` that yields them live until the job's final stage."""
        if stream:
            self.retrieve(job_id)  # a typed 404 now, not on first iteration
            return EventStream(self._client, job_id, after)
        collected: list[JobEvent] = []
        while True:
            page = self._t.json("GET", f"/distillation/jobs/{job_id}/events",
                                params={"after": after, "limit": limit})
            collected += [parse(JobEvent, e) for e in page["data"]]
            if not page.get("has_more") or not page["data"]:
                return collected
            after = collected[-1].id

    def wait(self, job_id: str, *, poll_interval: float = 1.0, timeout: float | None = None,
             raise_on_failure: bool = False) -> Job:
        """Poll until the job is succeeded, failed or cancelled; the final job (TimeoutError past ``timeout``)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.retrieve(job_id)
            if job.finished:
                if raise_on_failure and job.status != "succeeded":
                    raise JobFailedError(job)
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            time.sleep(poll_interval)


class Models(_Resource):
    def list(self, *, limit: int = 20) -> SyncPage[Model]:
        def fetch(after):
            return self._t.json("GET", "/models", params={"limit": limit, "after": after})
        return SyncPage(fetch, Model, fetch(None))

    def retrieve(self, model_id: str) -> Model:
        return parse(Model, self._t.json("GET", f"/models/{model_id}"))

    def delete(self, model_id: str) -> Deleted:
        return parse(Deleted, self._t.json("DELETE", f"/models/{model_id}"))

    def download(self, model_id: str, path: str | os.PathLike, *, format: str = "model") -> Path:
        """Stream the student to disk: a ``.safetensors`` file (MLP) or a ``.tar.gz`` of a Hugging
        Face folder; ``format="adapter"`` a LoRA adapter ``.tar.gz``. ``path`` a file or a folder
        (then the server's filename); checked against the server's sha256. Returns the file's path."""
        response = self._t.request("GET", f"/models/{model_id}/download", params={"format": format}, stream=True,
                                   timeout=STREAM_TIMEOUT)
        try:
            target = _download_target(path, response, model_id)
            partial = target.with_name(target.name + ".part")
            digest = sha256()
            with open(partial, "wb") as out:
                for chunk in response.iter_bytes(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        finally:
            response.close()
        _check_sha256(response, digest.hexdigest(), target)
        partial.replace(target)
        return target

    def predict(self, model_id: str, inputs: list) -> PredictResponse:
        """Rows of features (MLP classifiers) or texts (text classifiers)."""
        return parse(PredictResponse, self._t.json("POST", f"/models/{model_id}/predict", json={"inputs": inputs}))

    def report(self, model_id: str) -> str:
        """The model's printable HTML report (loss curves, evaluation, spec, lineage)."""
        return self._t.request("GET", f"/models/{model_id}/report", headers={"Accept": "text/html"}).text


class Webhooks(_Resource):
    def create(self, *, url: str, events: list[str], description: str = "") -> WebhookEndpoint:
        """Register an endpoint; the answer's ``secret`` (shown once) verifies the signed deliveries."""
        return parse(WebhookEndpoint, self._t.json("POST", "/webhooks", json={"url": url, "events": events,
                                                                               "description": description}))

    def list(self, *, limit: int = 20) -> SyncPage[WebhookEndpoint]:
        def fetch(after):
            return self._t.json("GET", "/webhooks", params={"limit": limit, "after": after})
        return SyncPage(fetch, WebhookEndpoint, fetch(None))

    def retrieve(self, webhook_id: str) -> WebhookEndpoint:
        return parse(WebhookEndpoint, self._t.json("GET", f"/webhooks/{webhook_id}"))

    def delete(self, webhook_id: str) -> Deleted:
        return parse(Deleted, self._t.json("DELETE", f"/webhooks/{webhook_id}"))

    def deliveries(self, webhook_id: str, *, limit: int = 20) -> SyncPage[WebhookDelivery]:
        def fetch(after):
            return self._t.json("GET", f"/webhooks/{webhook_id}/deliveries", params={"limit": limit, "after": after})
        return SyncPage(fetch, WebhookDelivery, fetch(None))


class Distill:
    """The synchronous client.

    ``api_key`` defaults to ``DISTILL_API_KEY``; ``base_url`` to ``DISTILL_BASE_URL`` or
    ``http://localhost:8000`` (``/v1`` is added). 429, 5xx and connection errors are retried
    ``max_retries`` times with exponential backoff and jitter, honouring ``Retry-After``."""

    def __init__(self, *, api_key: str | None = None, base_url: str | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
                 default_headers: dict[str, str] | None = None, http_client: httpx.Client | None = None) -> None:
        self._options = _Options(api_key, base_url, max_retries, default_headers)
        self._transport = SyncTransport(self._options, timeout, http_client)
        self.files = Files(self)
        self.jobs = Jobs(self)
        self.models = Models(self)
        self.webhooks = Webhooks(self)

    @property
    def base_url(self) -> str:
        return self._options.base_url

    @property
    def api_key(self) -> str | None:
        return self._options.api_key

    @property
    def max_retries(self) -> int:
        return self._options.max_retries

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> "Distill":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---- async -------------------------------------------------------------------------------------------------

class _AsyncResource:
    def __init__(self, client: "AsyncDistill") -> None:
        self._client = client
        self._t: AsyncTransport = client._transport


class AsyncFiles(_AsyncResource):
    async def create(self, *, file: FileInput, purpose: str, filename: str | None = None) -> File:
        if isinstance(file, (str, os.PathLike)):  # async transports need bytes or an async stream
            file = (filename or Path(file).name, await asyncio.to_thread(Path(file).read_bytes))
        elif hasattr(file, "read") and not isinstance(file, (bytes, tuple)):
            file = (filename or Path(getattr(file, "name", "upload")).name, file.read())
        return parse(File, await self._t.json("POST", "/files", files=_files(file, filename),
                                              data={"purpose": purpose}, idempotent=True))

    def list(self, *, purpose: str | None = None, limit: int = 20) -> AsyncPaginator[File]:
        async def fetch(after):
            return await self._t.json("GET", "/files", params={"purpose": purpose, "limit": limit, "after": after})
        return AsyncPaginator(fetch, File)

    async def retrieve(self, file_id: str) -> File:
        return parse(File, await self._t.json("GET", f"/files/{file_id}"))

    async def delete(self, file_id: str) -> Deleted:
        return parse(Deleted, await self._t.json("DELETE", f"/files/{file_id}"))

    async def content(self, file_id: str) -> bytes:
        return (await self._t.request("GET", f"/files/{file_id}/content")).content


class AsyncEventStream:
    """``async for event in await client.jobs.events(id, stream=True)``: as :class:`EventStream`."""

    def __init__(self, client: "AsyncDistill", job_id: str, after: int | None) -> None:
        self._client, self.job_id, self.last_event_id = client, job_id, after
        self._response: httpx.Response | None = None
        self._closed = False
        self.reconnects = 0

    async def __aiter__(self) -> AsyncIterator[JobEvent]:
        transport = self._client._transport
        failures, delay_s = 0, None
        while not self._closed:
            headers = {"Accept": "text/event-stream"}
            if self.last_event_id is not None:
                headers["Last-Event-ID"] = str(self.last_event_id)
            received = 0
            try:
                self._response = await transport.request("GET", f"/distillation/jobs/{self.job_id}/events",
                                                         params={"stream": "true"}, headers=headers, stream=True,
                                                         timeout=STREAM_TIMEOUT)
                try:
                    decoder = SSEDecoder()
                    async for line in self._response.aiter_lines():
                        message = decoder.feed(line)
                        if decoder.retry_ms is not None:
                            delay_s = decoder.retry_ms / 1000
                        if message is None:
                            continue
                        event = parse(JobEvent, json.loads(message["data"]))
                        self.last_event_id, received, failures = event.id, received + 1, 0
                        yield event
                        if event.is_final:
                            return
                finally:
                    await self._response.aclose()
            except httpx.TransportError as exc:
                if self._closed:
                    return
                failures += 1
                if failures > max(transport.options.max_retries, 1):
                    raise APIConnectionError(f"event stream of {self.job_id} lost: {exc}") from exc
                self.reconnects += 1
                await asyncio.sleep(delay_s if delay_s is not None else retry_delay(failures - 1))
                continue
            if received == 0 and (await self._client.jobs.retrieve(self.job_id)).finished:
                return
            self.reconnects += 1

    async def close(self) -> None:
        self._closed = True
        if self._response is not None:
            await self._response.aclose()

    async def __aenter__(self) -> "AsyncEventStream":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()


class AsyncJobs(_AsyncResource):
    async def create(self, body: dict | None = None, /, **fields: Any) -> Job:
        return parse(Job, await self._t.json("POST", "/distillation/jobs", json=_job_body(body, fields),
                                             idempotent=True))

    async def estimate(self, body: dict | None = None, /, **fields: Any) -> Estimate:
        return parse(Estimate, await self._t.json("POST", "/distillation/jobs/estimate",
                                                  json=_job_body(body, fields)))

    def list(self, *, status: str | None = None, limit: int = 20) -> AsyncPaginator[Job]:
        async def fetch(after):
            return await self._t.json("GET", "/distillation/jobs",
                                      params={"status": status, "limit": limit, "after": after})
        return AsyncPaginator(fetch, Job)

    async def retrieve(self, job_id: str) -> Job:
        return parse(Job, await self._t.json("GET", f"/distillation/jobs/{job_id}"))

    async def cancel(self, job_id: str) -> Job:
        return parse(Job, await self._t.json("POST", f"/distillation/jobs/{job_id}/cancel"))

    async def delete(self, job_id: str) -> Deleted:
        return parse(Deleted, await self._t.json("DELETE", f"/distillation/jobs/{job_id}"))

    async def events(self, job_id: str, *, after: int | None = None, stream: bool = False,
                     limit: int = 1000) -> list[JobEvent] | AsyncEventStream:
        if stream:
            await self.retrieve(job_id)
            return AsyncEventStream(self._client, job_id, after)
        collected: list[JobEvent] = []
        while True:
            page = await self._t.json("GET", f"/distillation/jobs/{job_id}/events",
                                      params={"after": after, "limit": limit})
            collected += [parse(JobEvent, e) for e in page["data"]]
            if not page.get("has_more") or not page["data"]:
                return collected
            after = collected[-1].id

    async def wait(self, job_id: str, *, poll_interval: float = 1.0, timeout: float | None = None,
                   raise_on_failure: bool = False) -> Job:
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = await self.retrieve(job_id)
            if job.finished:
                if raise_on_failure and job.status != "succeeded":
                    raise JobFailedError(job)
                return job
            if deadline is not None and time.monotonic() >= deadline:
                raise TimeoutError(f"job {job_id} still {job.status} after {timeout} s")
            await asyncio.sleep(poll_interval)


class AsyncModels(_AsyncResource):
    def list(self, *, limit: int = 20) -> AsyncPaginator[Model]:
        async def fetch(after):
            return await self._t.json("GET", "/models", params={"limit": limit, "after": after})
        return AsyncPaginator(fetch, Model)

    async def retrieve(self, model_id: str) -> Model:
        return parse(Model, await self._t.json("GET", f"/models/{model_id}"))

    async def delete(self, model_id: str) -> Deleted:
        return parse(Deleted, await self._t.json("DELETE", f"/models/{model_id}"))

    async def download(self, model_id: str, path: str | os.PathLike, *, format: str = "model") -> Path:
        response = await self._t.request("GET", f"/models/{model_id}/download", params={"format": format},
                                         stream=True, timeout=STREAM_TIMEOUT)
        try:
            target = _download_target(path, response, model_id)
            partial = target.with_name(target.name + ".part")
            digest = sha256()
            with open(partial, "wb") as out:
                async for chunk in response.aiter_bytes(1 << 20):
                    digest.update(chunk)
                    out.write(chunk)
        finally:
            await response.aclose()
        _check_sha256(response, digest.hexdigest(), target)
        partial.replace(target)
        return target

    async def predict(self, model_id: str, inputs: list) -> PredictResponse:
        return parse(PredictResponse, await self._t.json("POST", f"/models/{model_id}/predict",
                                                         json={"inputs": inputs}))

    async def report(self, model_id: str) -> str:
        return (await self._t.request("GET", f"/models/{model_id}/report", headers={"Accept": "text/html"})).text


class AsyncWebhooks(_AsyncResource):
    async def create(self, *, url: str, events: list[str], description: str = "") -> WebhookEndpoint:
        return parse(WebhookEndpoint, await self._t.json("POST", "/webhooks", json={
            "url": url, "events": events, "description": description}))

    def list(self, *, limit: int = 20) -> AsyncPaginator[WebhookEndpoint]:
        async def fetch(after):
            return await self._t.json("GET", "/webhooks", params={"limit": limit, "after": after})
        return AsyncPaginator(fetch, WebhookEndpoint)

    async def retrieve(self, webhook_id: str) -> WebhookEndpoint:
        return parse(WebhookEndpoint, await self._t.json("GET", f"/webhooks/{webhook_id}"))

    async def delete(self, webhook_id: str) -> Deleted:
        return parse(Deleted, await self._t.json("DELETE", f"/webhooks/{webhook_id}"))

    def deliveries(self, webhook_id: str, *, limit: int = 20) -> AsyncPaginator[WebhookDelivery]:
        async def fetch(after):
            return await self._t.json("GET", f"/webhooks/{webhook_id}/deliveries",
                                      params={"limit": limit, "after": after})
        return AsyncPaginator(fetch, WebhookDelivery)


class AsyncDistill:
    """The asynchronous client; the same options and resources as :class:`Distill`, awaited."""

    def __init__(self, *, api_key: str | None = None, base_url: str | None = None,
                 max_retries: int = DEFAULT_MAX_RETRIES, timeout: float | httpx.Timeout | None = DEFAULT_TIMEOUT,
                 default_headers: dict[str, str] | None = None,
                 http_client: httpx.AsyncClient | None = None) -> None:
        self._options = _Options(api_key, base_url, max_retries, default_headers)
        self._transport = AsyncTransport(self._options, timeout, http_client)
        self.files = AsyncFiles(self)
        self.jobs = AsyncJobs(self)
        self.models = AsyncModels(self)
        self.webhooks = AsyncWebhooks(self)

    @property
    def base_url(self) -> str:
        return self._options.base_url

    @property
    def api_key(self) -> str | None:
        return self._options.api_key

    async def close(self) -> None:
        await self._transport.close()

    async def __aenter__(self) -> "AsyncDistill":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()
