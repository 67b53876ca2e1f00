"""Typed errors. Every HTTP error carries the server's RFC 9457 problem details
(``status``, ``code``, ``param``, ``detail``); ``str(error)`` shows the server's message.

    DistillError
    └── APIError                    message, status, code, param, detail, body
        ├── APIConnectionError      the server could not be reached (after the retries)
        │   └── APITimeoutError
        ├── APIResponseValidationError  a 2xx body that is not what the API promises
        └── APIStatusError          any HTTP error status (response kept)
            ├── BadRequestError          400
            ├── AuthenticationError      401
            ├── PermissionDeniedError    403
            ├── NotFoundError            404
            ├── ConflictError            409
            ├── PayloadTooLargeError     413
            ├── UnprocessableError       422  (alias UnprocessableEntityError)
            ├── RateLimitError           429
            └── InternalServerError      5xx
"""

from __future__ import annotations

from typing import Any

import httpx

__all__ = ["DistillError", "APIError", "APIConnectionError", "APITimeoutError", "APIResponseValidationError",
           "APIStatusError", "BadRequestError", "AuthenticationError", "PermissionDeniedError", "NotFoundError",
           "ConflictError", "PayloadTooLargeError", "UnprocessableError", "UnprocessableEntityError",
           "RateLimitError", "InternalServerError", "JobFailedError"]


class DistillError(Exception):
    """The base of every error this package raises."""


class APIError(DistillError):
    def __init__(self, message: str, *, request: httpx.Request | None = None, body: Any = None,
                 status: int | None = None, code: str | None = None, param: str | None = None,
                 detail: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.request = request
        self.body = body
        self.status = status
        self.code = code
        self.param = param
        self.detail = detail if detail is not None else message

    @property
    def status_code(self) -> int | None:  # the OpenAI SDK's name
        return self.status

    def __str__(self) -> str:
        return self.message


class APIConnectionError(APIError):
    def __init__(self, message: str = "Connection error.", *, request: httpx.Request | None = None) -> None:
        super().__init__(message, request=request)


class APITimeoutError(APIConnectionError):
    def __init__(self, request: httpx.Request | None = None) -> None:
        super().__init__("Request timed out.", request=request)


class APIResponseValidationError(APIError):
    pass


class APIStatusError(APIError):
    def __init__(self, message: str, *, response: httpx.Response, body: Any, code: str | None,
                 param: str | None, detail: str | None) -> None:
        super().__init__(message, request=response.request, body=body, status=response.status_code, code=code,
                         param=param, detail=detail)
        self.response = response


class BadRequestError(APIStatusError): ...
class AuthenticationError(APIStatusError): ...
class PermissionDeniedError(APIStatusError): ...
class NotFoundError(APIStatusError): ...
class ConflictError(APIStatusError): ...
class PayloadTooLargeError(APIStatusError): ...
class UnprocessableError(APIStatusError): ...
class RateLimitError(APIStatusError): ...
class InternalServerError(APIStatusError): ...


UnprocessableEntityError = UnprocessableError

_BY_STATUS = {400: BadRequestError, 401: AuthenticationError, 403: PermissionDeniedError, 404: NotFoundError,
              409: ConflictError, 413: PayloadTooLargeError, 422: UnprocessableError, 429: RateLimitError}


class JobFailedError(DistillError):
    """``jobs.wait(..., raise_on_failure=True)``: the job ended failed or cancelled."""

    def __init__(self, job: Any) -> None:
        error = getattr(job, "error", None)
        reason = f": [{error.code}]{f' ({error.param})' if error.param else ''} {error.message}" if error else ""
        super().__init__(f"job {job.id} {job.status}{reason}")
        self.job = job


def status_error(response: httpx.Response) -> APIStatusError:
    """The typed error for an error response, from its problem+json body (or an OpenAI-style
    ``{"error": {...}}`` body on the OpenAI-shaped routes, or plain text)."""
    try:
        body = response.json()
    except ValueError:
        body = response.text
    code = param = detail = None
    if isinstance(body, dict):
        problem = body["error"] if isinstance(body.get("error"), dict) else body
        detail = problem.get("detail") or problem.get("message") or problem.get("title")
        code = problem.get("code") or problem.get("type")
        param = problem.get("param")
    elif isinstance(body, str) and body.strip():
        detail = body.strip()[:500]
    detail = str(detail) if detail is not None else response.reason_phrase
    message = f"{detail} (HTTP {response.status_code}" + (f", code {code}" if code else "") \
        + (f", param {param}" if param else "") + ")"
    cls = _BY_STATUS.get(response.status_code) or (InternalServerError if response.status_code >= 500
                                                   else APIStatusError)
    return cls(message, response=response, body=body, code=code, param=param, detail=detail)
