from __future__ import annotations

import re
import uuid

from asgiref.sync import iscoroutinefunction, markcoroutinefunction
from django.conf import settings
from django.urls import reverse

from aiwriter.errors import error_response
from aiwriter.logging import request_id_var

_SAFE_ID = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


class RequestIdMiddleware:
    """Takes X-Request-ID from the client (if sane) or makes one; echoes it back and tags logs."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def _start(self, request) -> str:
        incoming = request.headers.get("X-Request-ID", "")
        request_id = incoming if _SAFE_ID.match(incoming) else uuid.uuid4().hex
        request.request_id = request_id
        # Not reset on the way out: Django logs the response (django.request) after the middleware
        # chain returns, and every request sets its own id first anyway.
        request_id_var.set(request_id)
        return request_id

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        request_id = self._start(request)
        response = self.get_response(request)
        response["X-Request-ID"] = request_id
        return response

    async def __acall__(self, request):
        request_id = self._start(request)
        response = await self.get_response(request)
        response["X-Request-ID"] = request_id
        return response


class RejectNulMiddleware:
    """A NUL character (%00) in the path or the query string is bad input everywhere: 400 before any view can pass
    it to PostgreSQL (which cannot hold NUL in text: a lookup would fail with a 500). In OpenAI's shape on /v1."""

    async_capable = True
    sync_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    @staticmethod
    def _refusal(request):
        if "\x00" in request.path:
            message = "The path may not contain NUL characters."
        elif request.META.get("QUERY_STRING") and any(  # no query string (an API POST): no QueryDict to build
                "\x00" in key or any("\x00" in v for v in values) for key, values in request.GET.lists()):
            message = "Query parameters may not contain NUL characters."
        else:
            return None
        if request.path.startswith("/v1/"):
            from openai_compat.errors import OpenAIError

            return OpenAIError(message, code="invalid_value").response()
        return error_response("bad_request", message, 400)

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return self._refusal(request) or self.get_response(request)

    async def __acall__(self, request):
        return self._refusal(request) or await self.get_response(request)


class ContentSecurityPolicyMiddleware:
    """Adds Content-Security-Policy to HTML pages: CONTENT_SECURITY_POLICY, or CONTENT_SECURITY_POLICY_ADMIN
    under the admin (whose templates carry a few inline styles). JSON and event streams run no scripts: no header.
    """

    async_capable = True
    sync_capable = True

    def __init__(self, get_response):
        self.get_response = get_response
        self._admin_prefix: str | None = None
        if iscoroutinefunction(get_response):
            markcoroutinefunction(self)

    def _add_header(self, request, response):
        if "Content-Security-Policy" in response or not response.get("Content-Type", "").startswith("text/html"):
            return response
        if settings.DEBUG and response.status_code >= 400:
            return response  # Django's debug error pages are styled and scripted inline
        if self._admin_prefix is None:
            self._admin_prefix = reverse("admin:index")
        admin = request.path.startswith(self._admin_prefix)
        policy = settings.CONTENT_SECURITY_POLICY_ADMIN if admin else settings.CONTENT_SECURITY_POLICY
        if policy:
            response["Content-Security-Policy"] = policy
        return response

    def __call__(self, request):
        if iscoroutinefunction(self):
            return self.__acall__(request)
        return self._add_header(request, self.get_response(request))

    async def __acall__(self, request):
        return self._add_header(request, await self.get_response(request))
