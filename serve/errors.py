"""Every error the server answers with, mapped to an HTTP status and OpenAI's error body in ONE
place: selfspec's typed errors, vLLM's `ErrorResponse`/exceptions, pydantic validation errors,
and Ray's "replica gone" errors. Nothing else in `serve/` picks a status code.

The body is vLLM's `ErrorResponse` shape, which is OpenAI's:
    {"error": {"message": ..., "type": ..., "param": ..., "code": <status>}}
so the official `openai` client raises its matching exception class (NotFoundError, ...).
"""

from __future__ import annotations

import logging
from http import HTTPStatus

from core.errors import (
    AdapterError,
    ConfigError,
    ExpertNotFoundError,
    RegistryError,
    SelfspecError,
)
from router.types import RouterError

log = logging.getLogger(__name__)


class ServeError(SelfspecError):
    """A request the server refuses; subclasses fix the status."""

    status = HTTPStatus.BAD_REQUEST

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param

    def __reduce__(self):  # raised in the engine replica, mapped in the ingress: keep `param`
        return type(self), (str(self), self.param)


class InvalidRequestError(ServeError):
    """Malformed JSON, a missing or wrongly typed field, an unsupported parameter."""


class UnknownModelError(ServeError):
    status = HTTPStatus.NOT_FOUND


class AuthenticationError(ServeError):
    status = HTTPStatus.UNAUTHORIZED


class PayloadTooLargeError(ServeError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class EngineUnavailableError(ServeError):
    status = HTTPStatus.SERVICE_UNAVAILABLE


class LimitExceededError(InvalidRequestError):
    """A request over one of the ingress caps (n, max_tokens, prompts, nesting depth)."""


class RequestTimeoutError(ServeError):
    """The request ran past ingress.request_timeout_s; the engine stopped working on it."""

    status = HTTPStatus.REQUEST_TIMEOUT


class EngineRequestError(ServeError):
    """A request vLLM's serving classes refused with an `ErrorResponse` (a prompt over the
    context, a bad sampling parameter): its status and OpenAI body, passed on unchanged."""

    def __init__(self, status: int, body: dict):
        super().__init__(body.get("error", {}).get("message", ""),
                         body.get("error", {}).get("param"))
        self.status, self.body = HTTPStatus(status), body

    @classmethod
    def from_response(cls, err) -> EngineRequestError:
        return cls(int(err.error.code), err.model_dump())

    def __reduce__(self):
        return type(self), (int(self.status), self.body)


# selfspec's own errors outside serve/ (first match wins: subclasses before bases).
_SELFSPEC_STATUS: list[tuple[type[Exception], HTTPStatus]] = [
    (ExpertNotFoundError, HTTPStatus.NOT_FOUND),
    (RegistryError, HTTPStatus.SERVICE_UNAVAILABLE),  # the server's registry, not the request
    (AdapterError, HTTPStatus.UNPROCESSABLE_ENTITY),
    (RouterError, HTTPStatus.BAD_REQUEST),  # the router refuses bad text, e.g. lone surrogates
    (ConfigError, HTTPStatus.BAD_REQUEST),
    (SelfspecError, HTTPStatus.BAD_REQUEST),
]


def error_body(message: str, status: int, param: str | None = None,
               err_type: str | None = None) -> dict:
    """OpenAI's error object, built with vLLM's own protocol model."""
    from vllm.entrypoints.serve.engine.protocol import ErrorInfo, ErrorResponse

    err_type = err_type or _type_name(status)
    return ErrorResponse(error=ErrorInfo(message=message, type=err_type, param=param,
                                         code=int(status))).model_dump()


def map_exception(exc: BaseException) -> tuple[int, dict]:
    """Any exception -> (status, OpenAI error body). Unknown errors are 500 without details."""
    exc = _cause(exc)
    if isinstance(exc, EngineRequestError):
        return int(exc.status), exc.body
    if isinstance(exc, ServeError):
        return int(exc.status), error_body(str(exc), exc.status, exc.param)
    for cls, status in _SELFSPEC_STATUS:
        if isinstance(exc, cls):
            return int(status), error_body(str(exc), status)
    from pydantic import ValidationError
    if isinstance(exc, ValidationError):
        return _pydantic(exc)
    vllm = _vllm_exception(exc)
    if vllm is not None:
        return vllm
    if _replica_gone(exc):
        status = HTTPStatus.SERVICE_UNAVAILABLE
        return int(status), error_body("the engine is restarting; retry in a few seconds",
                                       status)
    log.exception("unexpected error while serving a request", exc_info=exc)
    status = HTTPStatus.INTERNAL_SERVER_ERROR
    return int(status), error_body(f"internal error ({type(exc).__name__}); the server keeps "
                                   "serving, see its log for details", status)


def json_error(exc_or_status: BaseException | int, message: str | None = None,
               headers: dict | None = None):
    """A starlette JSONResponse for an exception (or a status + message)."""
    from starlette.responses import JSONResponse

    if isinstance(exc_or_status, BaseException):
        status, body = map_exception(exc_or_status)
    else:
        status, body = int(exc_or_status), error_body(message or "", exc_or_status)
    return JSONResponse(body, status_code=status, headers=headers)


def _pydantic(exc) -> tuple[int, dict]:
    errs = exc.errors()
    parts = [f"{'.'.join(map(str, e['loc'])) or 'body'}: {e['msg']}" for e in errs[:5]]
    more = f" (and {len(errs) - 5} more)" if len(errs) > 5 else ""
    param = ".".join(map(str, errs[0]["loc"])) if errs and errs[0]["loc"] else None
    status = HTTPStatus.BAD_REQUEST
    return int(status), error_body("invalid request: " + "; ".join(parts) + more, status, param)


def _vllm_exception(exc: BaseException) -> tuple[int, dict] | None:
    try:
        from vllm.entrypoints.serve import create_error_response
        from vllm.exceptions import VLLMError
    except ImportError:  # pragma: no cover - serve/ always runs beside vLLM
        return None
    if not isinstance(exc, (VLLMError, ValueError, TypeError, OverflowError)):
        return None
    err = create_error_response(exc)
    return int(err.error.code), err.model_dump()


def _cause(exc: BaseException) -> BaseException:
    """The error the engine replica raised, out of the RayTaskError that carried it to the
    ingress (that one is also an instance of the cause's class, but its message is the whole
    remote traceback)."""
    try:
        from ray.exceptions import RayTaskError
    except ImportError:  # pragma: no cover
        return exc
    while isinstance(exc, RayTaskError) and isinstance(exc.cause, BaseException):
        exc = exc.cause
    return exc


def _replica_gone(exc: BaseException) -> bool:
    try:
        from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError
        from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
    except ImportError:  # pragma: no cover
        return False
    return isinstance(exc, (RayActorError, ActorDiedError, ActorUnavailableError,
                            BackPressureError, DeploymentUnavailableError))


def _type_name(status: int) -> str:
    # OpenAI's client keys its exception classes on the status; the type names match vLLM's.
    return {400: "BadRequestError", 401: "AuthenticationError", 403: "PermissionDeniedError",
            404: "NotFoundError", 408: "RequestTimeoutError", 413: "RequestTooLargeError",
            415: "BadRequestError",
            422: "UnprocessableEntityError", 429: "RateLimitError",
            503: "ServiceUnavailableError"}.get(int(status), "InternalServerError")
