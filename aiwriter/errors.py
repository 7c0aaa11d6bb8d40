"""One error shape for every API error: {"error": {"code", "message", "retryable"}}."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import PermissionDenied, RequestDataTooBig
from django.db import DatabaseError, InterfaceError, OperationalError
from django.http import Http404, HttpResponsePermanentRedirect, JsonResponse
from django.urls import Resolver404, resolve
from django.views.decorators.csrf import csrf_exempt
from rest_framework import exceptions, status
from rest_framework.response import Response

logger = logging.getLogger(__name__)


class ApiError(exceptions.APIException):
    """A client-facing error with a machine-readable code. Raise it from services."""

    status_code: int = status.HTTP_400_BAD_REQUEST
    code = "bad_request"
    message = "Bad request."
    retryable = False

    def __init__(self, message: str | None = None, *, code: str | None = None, status_code: int | None = None,
                 retryable: bool | None = None, headers: dict | None = None, extra: dict | None = None):
        self.message = message or self.message
        if code:
            self.code = code
        if status_code:
            self.status_code = status_code
        if retryable is not None:
            self.retryable = retryable
        self.headers = headers or {}
        self.extra = extra or {}
        super().__init__(detail=self.message, code=self.code)


class NotFound(ApiError):
    status_code = 404
    code = "not_found"
    message = "Not found."


class Conflict(ApiError):
    status_code = 409
    code = "conflict"
    message = "Conflict."


class RequestTooLarge(ApiError):
    """The body is over DATA_UPLOAD_MAX_MEMORY_SIZE (MAX_REQUEST_BYTES); /v1 answers with the same code."""

    status_code = 413
    code = "request_too_large"

    def __init__(self, message: str | None = None, **kwargs):
        limit = settings.DATA_UPLOAD_MAX_MEMORY_SIZE
        super().__init__(message or f"The request body is larger than {limit} bytes.", **kwargs)


class ServiceUnavailable(ApiError):
    status_code = 503
    code = "service_unavailable"
    message = "A backing service is unavailable; try again."
    retryable = True


def error_body(code: str, message: str, retryable: bool = False, **extra) -> dict:
    body = {"code": code, "message": message, "retryable": retryable}
    body.update(extra)
    return {"error": body}


def error_response(code: str, message: str, status_code: int, retryable: bool = False, **extra) -> JsonResponse:
    return JsonResponse(error_body(code, message, retryable, **extra), status=status_code)


_DRF_CODES = {
    exceptions.NotAuthenticated: "not_authenticated",
    exceptions.AuthenticationFailed: "authentication_failed",
    exceptions.PermissionDenied: "permission_denied",
    exceptions.NotFound: "not_found",
    exceptions.MethodNotAllowed: "method_not_allowed",
    exceptions.NotAcceptable: "not_acceptable",
    exceptions.UnsupportedMediaType: "unsupported_media_type",
    exceptions.Throttled: "rate_limited",
    exceptions.ParseError: "bad_request",
    exceptions.ValidationError: "invalid",
}


def message_from_detail(detail) -> str:
    """A validation error's one-line message, naming each field ("content: This field may not be blank.")."""
    if isinstance(detail, list):
        return "; ".join(message_from_detail(d) for d in detail)
    if isinstance(detail, dict):
        return "; ".join(f"{k}: {message_from_detail(v)}" for k, v in detail.items())
    return str(detail)



def api_exception_handler(exc, context) -> Response | None:
    if isinstance(exc, Http404):
        exc = exceptions.NotFound()
    elif isinstance(exc, PermissionDenied):
        exc = exceptions.PermissionDenied()
    elif isinstance(exc, RequestDataTooBig):  # Django's own check, when DRF reads the body: 413, not 400
        exc = RequestTooLarge()
    elif isinstance(exc, (OperationalError, InterfaceError)):
        logger.warning("database unavailable: %s", exc.__class__.__name__)
        exc = ServiceUnavailable("The database is unavailable; try again.", code="database_unavailable")
    elif isinstance(exc, DatabaseError):
        return None  # a real bug: let Django log it and render 500

    if isinstance(exc, ApiError):
        body = error_body(exc.code, exc.message, exc.retryable, **exc.extra)
        return Response(body, status=exc.status_code, headers=exc.headers)

    if isinstance(exc, exceptions.APIException):
        code = next((c for cls, c in _DRF_CODES.items() if isinstance(exc, cls)), None) or exc.default_code
        body = error_body(code, message_from_detail(exc.detail), isinstance(exc, exceptions.Throttled))
        if isinstance(exc, exceptions.ValidationError):
            body["error"]["fields"] = exc.detail
        headers = {}
        auth_header = getattr(exc, "auth_header", None)  # set by DRF's authentication on 401s
        if auth_header:
            headers["WWW-Authenticate"] = auth_header
        wait = getattr(exc, "wait", None)  # Throttled's seconds to wait (not in its type stubs)
        if wait:
            headers["Retry-After"] = str(int(wait) + 1)
        return Response(body, status=exc.status_code, headers=headers)
    return None


def handler404(request, exception=None):
    return error_response("not_found", "Not found.", 404)


@csrf_exempt  # nothing to protect, and a POST without a token still gets the 404, not a CSRF page
def unknown_api_path(request, path: str = ""):
    """The last /api/ route: an unknown API path answers in the JSON error shape even with DEBUG on (Django's
    handler404 is not used then). A path that exists with a trailing slash is redirected as APPEND_SLASH would."""
    if settings.APPEND_SLASH and not request.path_info.endswith("/"):
        match = _resolve(request.path_info + "/")
        if match is not None and match.func is not unknown_api_path:
            return HttpResponsePermanentRedirect(request.get_full_path(force_append_slash=True))
    return handler404(request)


def _resolve(path: str):
    try:
        return resolve(path)
    except Resolver404:
        return None


def handler500(request):
    return error_response("internal_error", "Internal server error.", 500, retryable=True)


def handler403(request, exception=None):
    return error_response("permission_denied", "Permission denied.", 403)


def handler400(request, exception=None):
    if isinstance(exception, RequestDataTooBig):  # a body too large for a non-DRF view (or the CSRF check)
        too_large = RequestTooLarge()
        return error_response(too_large.code, too_large.message, too_large.status_code)
    return error_response("bad_request", "Bad request.", 400)
