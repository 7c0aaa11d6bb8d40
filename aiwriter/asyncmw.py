"""Django's stock middleware, minus a thread hop per step when serving async.

In async mode Django's MiddlewareMixin runs every process_request and process_response through
sync_to_async: with the stock stack that is 13 hops into the one thread-sensitive worker per request
(of 19 in all for a /v1 call, measured in bench/), ~60 µs CPU and ~200 µs wall each on the 2-core bench
machine. These subclasses run those steps on the event loop instead, because here they only touch
the request, the response and settings. Where a step may reach the database (saving a modified
session, messages that fall back to the session, CSRF_USE_SESSIONS) it still goes through the thread,
exactly as before. Sync mode (WSGI, the sync test client) is unchanged. CSRF's process_view, which the handler
calls (and wraps in a hop of its own), has an async twin `aprocess_view` that aiwriter.asgi_handler uses.
"""

from __future__ import annotations

from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib.auth import middleware as auth
from django.contrib.messages import middleware as messages
from django.contrib.messages.storage import default_storage
from django.contrib.sessions import middleware as sessions
from django.http import HttpRequest, HttpResponse, HttpResponseBase
from django.middleware import clickjacking, common, csrf, security
from django.utils.functional import SimpleLazyObject, empty


class InlineAsyncMixin:
    """MiddlewareMixin.__acall__ without sync_to_async around steps that do no I/O."""

    def _request_needs_thread(self, request: HttpRequest) -> bool:
        return False

    def _response_needs_thread(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        return False

    async def __acall__(self, request: HttpRequest) -> Any:
        response = None
        if hasattr(self, "process_request"):
            if self._request_needs_thread(request):
                response = await sync_to_async(self.process_request, thread_sensitive=True)(request)
            else:
                response = self.process_request(request)
        response = response or await self.get_response(request)
        if hasattr(self, "process_response"):
            if self._response_needs_thread(request, response):
                response = await sync_to_async(self.process_response, thread_sensitive=True)(request, response)
            else:
                response = self.process_response(request, response)
        return response


class SecurityMiddleware(InlineAsyncMixin, security.SecurityMiddleware):
    pass


class SessionMiddleware(InlineAsyncMixin, sessions.SessionMiddleware):
    # process_request only makes a lazy SessionStore; process_response writes only a modified session.
    def _response_needs_thread(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        session = getattr(request, "session", None)
        return session is not None and (session.modified or settings.SESSION_SAVE_EVERY_REQUEST)


class CommonMiddleware(InlineAsyncMixin, common.CommonMiddleware):
    pass


class CsrfViewMiddleware(InlineAsyncMixin, csrf.CsrfViewMiddleware):
    # With the secret in the session, reading or rotating it may load or touch the session.
    def _request_needs_thread(self, request: HttpRequest) -> bool:
        return settings.CSRF_USE_SESSIONS

    def _response_needs_thread(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        return settings.CSRF_USE_SESSIONS

    def _view_needs_thread(self, request: HttpRequest, callback: Any) -> bool:
        # process_view returns at once for an exempt view (/v1: bearer keys, no cookies) or a safe method; a checked
        # POST reads the form body (maybe spooled to disk) and, with CSRF_USE_SESSIONS, the session.
        if settings.CSRF_USE_SESSIONS:
            return True
        return not (getattr(request, "csrf_processing_done", False) or getattr(callback, "csrf_exempt", False)
                    or request.method in ("GET", "HEAD", "OPTIONS", "TRACE"))

    async def aprocess_view(self, request: HttpRequest, callback: Any, callback_args: Any,
                            callback_kwargs: Any) -> HttpResponseBase | None:
        """process_view for the async handler (aiwriter.asgi_handler picks it): on the loop unless it may do I/O."""
        if self._view_needs_thread(request, callback):
            return await sync_to_async(self.process_view, thread_sensitive=True)(request, callback, callback_args,
                                                                                 callback_kwargs)
        return self.process_view(request, callback, callback_args, callback_kwargs)


class AuthenticationMiddleware(InlineAsyncMixin, auth.AuthenticationMiddleware):
    pass  # request.user stays lazy: the database is reached only when a view asks for the user


class MessageMiddleware(InlineAsyncMixin, messages.MessageMiddleware):
    """The message storage is built when something uses it (a page, a view adding a message): building it costs a
    cookie signer and the session's storage, ~2 % of the CPU of a /v1 call, which never uses messages."""

    def process_request(self, request: HttpRequest) -> None:
        request._messages = SimpleLazyObject(lambda: default_storage(request))

    def process_response(self, request: HttpRequest, response: HttpResponse) -> HttpResponse:
        if not _messages_used(request):
            return response  # nothing read nor added: nothing to store
        return super().process_response(request, response)

    # Storing messages may fall back to the session (and so the database): only then in the thread.
    def _response_needs_thread(self, request: HttpRequest, response: HttpResponseBase) -> bool:
        if not _messages_used(request):
            return False
        storage = request._messages
        return bool(storage.used or storage.added_new)


def _messages_used(request: HttpRequest) -> bool:
    storage = getattr(request, "_messages", None)
    if isinstance(storage, SimpleLazyObject):
        return storage._wrapped is not empty
    return storage is not None


class XFrameOptionsMiddleware(InlineAsyncMixin, clickjacking.XFrameOptionsMiddleware):
    pass
