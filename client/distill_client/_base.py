"""The HTTP core shared by the sync and async clients: configuration, retries with
exponential backoff and jitter (honouring ``Retry-After``), typed errors, cursor pages and
a Server-Sent Events decoder."""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import os
import random
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable, Generic, Iterator, TypeVar

import httpx
from pydantic import BaseModel

from ._errors import APIConnectionError, APIResponseValidationError, APITimeoutError, status_error
from ._version import __version__

T = TypeVar("T", bound=BaseModel)

DEFAULT_BASE_URL = "http://localhost:8000"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
DEFAULT_MAX_RETRIES = 2
INITIAL_RETRY_DELAY_S = 0.5
MAX_RETRY_DELAY_S = 8.0
MAX_RETRY_AFTER_S = 60.0  # a longer Retry-After is not waited for: the normal backoff applies
STREAM_READ_TIMEOUT_S = 90.0  # the server sends a keep-alive comment every 15 s by default


def api_base(base_url: str | None) -> str:
    """The server's root (argument, DISTILL_BASE_URL or localhost:8000) with the /v1 prefix added."""
    url = (base_url or os.environ.get("DISTILL_BASE_URL") or DEFAULT_BASE_URL).rstrip("/")
    return url if url.endswith("/v1") else url + "/v1"


def retry_after(response: httpx.Response | None) -> float | None:
    """Seconds the server asked to wait (Retry-After: seconds or an HTTP date; retry-after-ms)."""
    if response is None:
        return None
    value: float | None = None
    with contextlib.suppress(ValueError, TypeError):
        if "retry-after-ms" in response.headers:
            value = float(response.headers["retry-after-ms"]) / 1000
        elif "retry-after" in response.headers:
            raw = response.headers["retry-after"]
            try:
                value = float(raw)
            except ValueError:
                value = email.utils.parsedate_to_datetime(raw).timestamp() - time.time()
    if value is None or not 0 <= value <= MAX_RETRY_AFTER_S:
        return None
    return value


def retry_delay(attempt: int, response: httpx.Response | None = None) -> float:
    """Retry-After when the server gave one, else 0.5 s, 1 s, 2 s ... (at most 8 s) less up to 25 % jitter."""
    asked = retry_after(response)
    if asked is not None:
        return asked
    return min(INITIAL_RETRY_DELAY_S * 2 ** attempt, MAX_RETRY_DELAY_S) * (1 - 0.25 * random.random())


def should_retry(response: httpx.Response) -> bool:
    """429 and 5xx are retried; no other 4xx is, except the 409 the server answers to a retry whose
    ``Idempotency-Key`` still has its first request in flight (it says when to come back)."""
    if response.status_code == 429 or response.status_code >= 500:
        return True
    return response.status_code == 409 and "retry-after" in response.headers \
        and b"idempotency_key_in_use" in _peek(response)


def _peek(response: httpx.Response) -> bytes:
    with contextlib.suppress(Exception):
        return response.read()
    return b""


def parse(model: type[T], payload: Any) -> T:
    try:
        return model.model_validate(payload)
    except ValueError as exc:
        raise APIResponseValidationError(f"unexpected response for {model.__name__}: {exc}", body=payload) from exc


class _Options:
    def __init__(self, api_key: str | None, base_url: str | None, max_retries: int,
                 default_headers: dict[str, str] | None) -> None:
        self.api_key = api_key if api_key is not None else os.environ.get("DISTILL_API_KEY")
        self.base_url = api_base(base_url)
        if max_retries < 0:
            raise ValueError("max_retries must be >= 0")
        self.max_retries = max_retries
        self.headers = {"User-Agent": f"distill-client/{__version__}", "Accept": "application/json",
                        **({"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}),
                        **(default_headers or {})}


def _request_headers(method: str, headers: dict | None, idempotent: bool) -> dict:
    headers = dict(headers or {})
    if idempotent and method == "POST":  # one key for all the retries of this call: the server runs it once
        headers.setdefault("Idempotency-Key", f"distill-client-{uuid.uuid4().hex}")
    return headers


class SyncTransport:
    def __init__(self, options: _Options, timeout: float | httpx.Timeout | None,
                 http_client: httpx.Client | None) -> None:
        self.options = options
        self._own = http_client is None
        self.http = http_client or httpx.Client(timeout=timeout, follow_redirects=True)
        self.timeout = timeout

    def close(self) -> None:
        if self._own:
            self.http.close()

    def request(self, method: str, path: str, *, params: dict | None = None, json: Any = None,
                files: Callable[[contextlib.ExitStack], dict] | None = None, data: dict | None = None,
                headers: dict | None = None, stream: bool = False, timeout: Any = None,
                idempotent: bool = False) -> httpx.Response:
        """Send with retries; the successful response (unread when ``stream``), else a typed error."""
        headers = {**self.options.headers, **_request_headers(method, headers, idempotent)}
        params = {k: v for k, v in (params or {}).items() if v is not None}
        url = self.options.base_url + path
        for attempt in range(self.options.max_retries + 1):
            retries_left = self.options.max_retries - attempt
            with contextlib.ExitStack() as opened:
                request = self.http.build_request(method, url, params=params, json=json, data=data,
                                                  files=files(opened) if files else None, headers=headers,
                                                  timeout=timeout if timeout is not None else self.timeout)
                try:
                    response = self.http.send(request, stream=stream)
                except httpx.TimeoutException as exc:
                    if retries_left:
                        time.sleep(retry_delay(attempt))
                        continue
                    raise APITimeoutError(request) from exc
                except httpx.TransportError as exc:
                    if retries_left:
                        time.sleep(retry_delay(attempt))
                        continue
                    raise APIConnectionError(f"Connection error: cannot reach {url}: {exc}", request=request) from exc
            if response.is_success:
                return response
            if retries_left and should_retry(response):
                response.close()
                time.sleep(retry_delay(attempt, response))
                continue
            response.read()
            response.close()
            raise status_error(response)
        raise AssertionError("unreachable")

    def json(self, method: str, path: str, **kwargs) -> Any:
        return self.request(method, path, **kwargs).json()


class AsyncTransport:
    def __init__(self, options: _Options, timeout: float | httpx.Timeout | None,
                 http_client: httpx.AsyncClient | None) -> None:
        self.options = options
        self._own = http_client is None
        self.http = http_client or httpx.AsyncClient(timeout=timeout, follow_redirects=True)
        self.timeout = timeout

    async def close(self) -> None:
        if self._own:
            await self.http.aclose()

    async def request(self, method: str, path: str, *, params: dict | None = None, json: Any = None,
                      files: Callable[[contextlib.ExitStack], dict] | None = None, data: dict | None = None,
                      headers: dict | None = None, stream: bool = False, timeout: Any = None,
                      idempotent: bool = False) -> httpx.Response:
        headers = {**self.options.headers, **_request_headers(method, headers, idempotent)}
        params = {k: v for k, v in (params or {}).items() if v is not None}
        url = self.options.base_url + path
        for attempt in range(self.options.max_retries + 1):
            retries_left = self.options.max_retries - attempt
            with contextlib.ExitStack() as opened:
                request = self.http.build_request(method, url, params=params, json=json, data=data,
                                                  files=files(opened) if files else None, headers=headers,
                                                  timeout=timeout if timeout is not None else self.timeout)
                try:
                    response = await self.http.send(request, stream=stream)
                except httpx.TimeoutException as exc:
                    if retries_left:
                        await asyncio.sleep(retry_delay(attempt))
                        continue
                    raise APITimeoutError(request) from exc
                except httpx.TransportError as exc:
                    if retries_left:
                        await asyncio.sleep(retry_delay(attempt))
                        continue
                    raise APIConnectionError(f"Connection error: cannot reach {url}: {exc}", request=request) from exc
            if response.is_success:
                return response
            await response.aread()
            if retries_left and should_retry(response):
                await response.aclose()
                await asyncio.sleep(retry_delay(attempt, response))
                continue
            await response.aclose()
            raise status_error(response)
        raise AssertionError("unreachable")

    async def json(self, method: str, path: str, **kwargs) -> Any:
        return (await self.request(method, path, **kwargs)).json()


# ---- cursor pages ------------------------------------------------------------------------------------------

class SyncPage(Generic[T]):
    """One page of a list (``data``, ``has_more``, ``first_id``, ``last_id``). Iterating it walks
    every item of every later page too, fetching them with ``after=last_id`` as it goes."""

    def __init__(self, fetch: Callable[[str | None], dict], model: type[T], payload: dict) -> None:
        self._fetch, self._model = fetch, model
        self.data: list[T] = [parse(model, item) for item in payload.get("data", [])]
        self.has_more: bool = bool(payload.get("has_more"))
        self.first_id: str | None = payload.get("first_id")
        self.last_id: str | None = payload.get("last_id") or (self.data[-1].id if self.data else None)

    def has_next_page(self) -> bool:
        return self.has_more and self.last_id is not None

    def get_next_page(self) -> "SyncPage[T]":
        if not self.has_next_page():
            raise StopIteration("no next page")
        return SyncPage(self._fetch, self._model, self._fetch(self.last_id))

    def iter_pages(self) -> Iterator["SyncPage[T]"]:
        page = self
        while True:
            yield page
            if not page.has_next_page():
                return
            page = page.get_next_page()

    def __iter__(self) -> Iterator[T]:
        for page in self.iter_pages():
            yield from page.data

    def __repr__(self) -> str:
        return f"SyncPage(data={self.data!r}, has_more={self.has_more})"


class AsyncPage(Generic[T]):
    def __init__(self, fetch: Callable[[str | None], Awaitable[dict]], model: type[T], payload: dict) -> None:
        self._fetch, self._model = fetch, model
        self.data: list[T] = [parse(model, item) for item in payload.get("data", [])]
        self.has_more: bool = bool(payload.get("has_more"))
        self.first_id: str | None = payload.get("first_id")
        self.last_id: str | None = payload.get("last_id") or (self.data[-1].id if self.data else None)

    def has_next_page(self) -> bool:
        return self.has_more and self.last_id is not None

    async def get_next_page(self) -> "AsyncPage[T]":
        if not self.has_next_page():
            raise StopAsyncIteration("no next page")
        return AsyncPage(self._fetch, self._model, await self._fetch(self.last_id))

    async def iter_pages(self) -> AsyncIterator["AsyncPage[T]"]:
        page = self
        while True:
            yield page
            if not page.has_next_page():
                return
            page = await page.get_next_page()

    async def __aiter__(self) -> AsyncIterator[T]:
        async for page in self.iter_pages():
            for item in page.data:
                yield item


class AsyncPaginator(Generic[T]):
    """What the async ``list()`` methods return: ``await`` it for the first page, or
    ``async for`` over it for every item of every page."""

    def __init__(self, fetch: Callable[[str | None], Awaitable[dict]], model: type[T]) -> None:
        self._fetch, self._model = fetch, model

    async def _first(self) -> AsyncPage[T]:
        return AsyncPage(self._fetch, self._model, await self._fetch(None))

    def __await__(self):
        return self._first().__await__()

    async def __aiter__(self) -> AsyncIterator[T]:
        page = await self._first()
        async for item in page:
            yield item


# ---- Server-Sent Events ------------------------------------------------------------------------------------

class SSEDecoder:
    """Lines in, messages out (the WHATWG event-stream rules: ``id``, ``event``, ``data`` (joined
    by newlines), ``retry``; lines starting with ``:`` are comments, e.g. keep-alives)."""

    def __init__(self) -> None:
        self.retry_ms: int | None = None
        self._event: str | None = None
        self._data: list[str] = []
        self._id: str | None = None

    def feed(self, line: str) -> dict | None:
        line = line.rstrip("\r\n")
        if not line:
            if not self._data:
                self._event = None
                return None
            message = {"id": self._id, "event": self._event or "message", "data": "\n".join(self._data)}
            self._event, self._data = None, []
            return message
        if line.startswith(":"):
            return None
        field, _, value = line.partition(":")
        value = value[1:] if value.startswith(" ") else value
        if field == "data":
            self._data.append(value)
        elif field == "event":
            self._event = value
        elif field == "id" and "\0" not in value:
            self._id = value
        elif field == "retry" and value.isdigit():
            self.retry_ms = int(value)
        return None
