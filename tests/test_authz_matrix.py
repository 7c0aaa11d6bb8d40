"""Who may call what, for every /api/, /v1/ and /metrics route, generated from the URL configuration.

The routes come from walking django.urls.get_resolver(), so a new endpoint is in the matrix the day it is
added. Each route is classified: DRF views by their permission_classes (IsAdminUser → staff, IsAuthenticated →
any signed-in user), plain views by the table PLAIN_VIEWS, and every URL kwarg as a user-owned object
(OWNED_KWARGS) or a shared catalogue name (CATALOGUE_KWARGS). A route the matrix cannot classify fails
test_every_route_is_classified with what to add. Then, for every route and method:

- no credentials → 401 (our error shape on /api and /metrics, OpenAI's on /v1);
- a staff route, called by a signed-in normal user → 403; any other route lets that user in;
- a route with a user-owned object in the URL, called by another user → 404 (the same as a missing object);
- a session-only route (permission SessionOnly: API key management), called with an API key → 403
  `key_management_requires_session`, even with the key's own user's objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import pytest
from django.test import Client
from django.urls import URLPattern, URLResolver, get_resolver, resolve
from django.urls.converters import IntConverter
from rest_framework.permissions import AllowAny, IsAdminUser, IsAuthenticated
from rest_framework.views import APIView

from conversations.models import Conversation, Message
from tests.factories import make_agent, make_api_key, make_model, make_provider, make_user
from usage.models import ApiKey
from usage.permissions import SessionOnly

pytestmark = pytest.mark.django_db

IN_SCOPE = ("/api/", "/v1/", "/metrics")
METHODS = ("get", "post", "put", "patch", "delete")

# Plain (non-DRF) views: (who may call them, their methods). Keyed by "module.qualname" of the view function.
PLAIN_VIEWS: dict[str, tuple[str, tuple[str, ...]]] = {
    "aiwriter.observability.metrics_view": ("staff", ("get",)),  # or the METRICS_TOKEN bearer
    "openai_compat.views.chat_completions": ("openai", ("post",)),
    "openai_compat.views.list_models": ("openai", ("get",)),
    "openai_compat.views.retrieve_model": ("openai", ("get",)),
    # /v1's catch-all: OpenAI's "Invalid URL" 404 for anyone, so nothing behind it answers without a key.
    "openai_compat.views.unknown_path": ("fallback", ("get", "post")),
    # /api/'s catch-all (after every API route): our JSON 404 for anyone, even with DEBUG on.
    "aiwriter.errors.unknown_api_path": ("api-fallback", ("get", "post")),
}
FALLBACKS = {"fallback", "api-fallback"}
# Routes anyone may read, and why.
PUBLIC = {
    "/api/schema/": "the OpenAPI schema is published for client generators (no data in it)",
}
# URL kwargs naming an object a user owns: another user asking for it gets 404.
OWNED_KWARGS = {"conversation_id", "message_id", "key_id"}
# URL kwargs naming a shared catalogue entry (agents, models, providers): the test names them all "matrix".
CATALOGUE_KWARGS = {"slug", "name", "model_id"}
# Non-staff routes whose URL names a catalogue entry, and why 404-for-another-user does not apply.
SHARED_OBJECT_ROUTES = {
    "/v1/models/<model_id>": "models are shared; which ones a key may use is tested in test_openai_api",
}


@dataclass
class Route:
    path: str  # "/api/conversations/<conversation_id>/"
    callback: object
    kwargs: list[str]
    placeholders: dict[str, object]  # a value of the right form for each kwarg: 0 for <int:…>, else "matrix"
    access: str = ""  # public, user, staff, openai, fallback
    session_only: bool = False  # a signed-in session, never an API key (SessionOnly)
    methods: tuple[str, ...] = ()
    problems: list[str] = field(default_factory=list)

    def url(self, **values: object) -> str:
        return re.sub(r"<(\w+)>", lambda m: str({**self.placeholders, **values}[m.group(1)]), self.path)


def _walk(resolver: URLResolver, prefix: str = "", converters: dict | None = None):
    """(pattern, view, the path converters of its kwargs) for every route under the resolver."""
    for entry in resolver.url_patterns:
        found = {**(converters or {}), **getattr(entry.pattern, "converters", {})}
        if isinstance(entry, URLResolver):
            yield from _walk(entry, prefix + str(entry.pattern), found)
        elif isinstance(entry, URLPattern):
            yield prefix + str(entry.pattern), entry.callback, found


def _simplify(pattern: str) -> str:
    """One spelling for both pattern kinds: "api/^providers/(?P<name>[^/]+)/$" → "/api/providers/<name>/",
    "api/keys/<int:key_id>/" → "/api/keys/<key_id>/"."""
    pattern = re.sub(r"\(\?P<(\w+)>[^)]*\)", r"<\1>", pattern)
    pattern = re.sub(r"<\w+:(\w+)>", r"<\1>", pattern)
    return "/" + pattern.replace("^", "").replace("$", "")


def _classify(route: Route) -> None:
    view_class = getattr(route.callback, "cls", None)
    if isinstance(view_class, type) and issubclass(view_class, APIView):
        actions = getattr(route.callback, "actions", None)  # a viewset's method → action map
        route.methods = tuple(m for m in METHODS if (m in actions if actions else hasattr(view_class, m)))
        permissions = list(view_class.permission_classes)
        if not all(isinstance(p, type) for p in permissions):
            route.problems.append(f"composed permission_classes {permissions}: classify {route.path} by hand")
        elif any(issubclass(p, AllowAny) for p in permissions):
            route.access = "public"
            if route.path not in PUBLIC:
                route.problems.append(f"{route.path} allows anyone (AllowAny): add it to PUBLIC with why")
        elif any(issubclass(p, IsAdminUser) for p in permissions):
            route.access = "staff"
        elif permissions and all(issubclass(p, IsAuthenticated) for p in permissions):
            route.access = "user"
            route.session_only = any(issubclass(p, SessionOnly) for p in permissions)
        else:
            route.problems.append(f"{route.path}: permission_classes {permissions} are not known to the matrix")
    else:
        name = f"{route.callback.__module__}.{route.callback.__qualname__}"
        if name not in PLAIN_VIEWS:
            route.problems.append(f"{route.path} is served by the plain view {name}: add it to PLAIN_VIEWS")
            return
        route.access, route.methods = PLAIN_VIEWS[name]
    if not route.methods:
        route.problems.append(f"{route.path}: no HTTP method found on {route.callback}")
    unknown = [k for k in route.kwargs if k not in OWNED_KWARGS | CATALOGUE_KWARGS and route.access not in FALLBACKS]
    if unknown:
        route.problems.append(f"{route.path}: URL kwarg(s) {unknown} are neither OWNED_KWARGS (a user's object, "
                              "404 for others) nor CATALOGUE_KWARGS (a shared name)")
    shared_only = route.kwargs and not set(route.kwargs) & OWNED_KWARGS
    if shared_only and route.access in ("user", "openai") and route.path not in SHARED_OBJECT_ROUTES:
        route.problems.append(f"{route.path} names an object but is neither staff-only nor user-owned: "
                              "add its kwarg to OWNED_KWARGS or the route to SHARED_OBJECT_ROUTES with why")


def _routes() -> list[Route]:
    routes = []
    for pattern, callback, converters in _walk(get_resolver()):
        path = _simplify(pattern)
        if not path.startswith(IN_SCOPE):
            continue
        kwargs = re.findall(r"<(\w+)>", path)
        placeholders = {k: 0 if isinstance(converters.get(k), IntConverter) else "matrix" for k in kwargs}
        route = Route(path=path, callback=callback, kwargs=kwargs, placeholders=placeholders)
        _classify(route)
        routes.append(route)
    return routes


ROUTES = _routes()


def _call(client: Client, method: str, url: str, **headers):
    if method in ("post", "put", "patch"):
        return getattr(client, method)(url, "{}", content_type="application/json", headers=headers)
    return getattr(client, method)(url, headers=headers)


def _is_our_error(response, code: str) -> bool:
    error = response.json().get("error") if response["Content-Type"].startswith("application/json") else None
    return isinstance(error, dict) and set(error) >= {"code", "message", "retryable"} and error["code"] == code


def _is_openai_error(response, code: str) -> bool:
    error = response.json().get("error") if response["Content-Type"].startswith("application/json") else None
    return isinstance(error, dict) and set(error) == {"message", "type", "code", "param"} and error["code"] == code


def _report(failures: list[str]) -> None:
    assert not failures, f"{len(failures)} route(s) break the authorization matrix:\n  " + "\n  ".join(failures)


def test_every_route_is_classified():
    paths = {r.path for r in ROUTES}
    # The walk found the API: a broken walk must not pass by finding nothing.
    assert {"/metrics", "/api/conversations/<conversation_id>/", "/api/providers/<name>/", "/v1/chat/completions",
            "/api/keys/<key_id>/"} <= paths, sorted(paths)
    _report([problem for r in ROUTES for problem in r.problems])
    for route in ROUTES:  # each generated URL reaches the view it was generated from
        assert resolve(route.url(path="embeddings")).func is route.callback, route.path


@pytest.mark.parametrize("route", [r for r in ROUTES if r.access == "fallback"], ids=lambda r: r.path)
def test_v1_fallback_is_openai_404_for_anyone(client, route):
    for method in route.methods:
        response = _call(client, method, route.url(path="embeddings"))
        assert response.status_code == 404 and _is_openai_error(response, None), (method, response.content)


@pytest.mark.parametrize("route", [r for r in ROUTES if r.access == "api-fallback"], ids=lambda r: r.path)
def test_api_fallback_is_our_json_404_for_anyone(client, route):
    for method in route.methods:
        response = _call(client, method, "/api/no-such-thing/")
        assert response.status_code == 404 and response.json()["error"]["code"] == "not_found", method


def test_no_credentials_is_401(client):
    failures = []
    for route in ROUTES:
        if route.access in FALLBACKS:
            continue
        for method in route.methods:
            response = _call(client, method, route.url())
            where = f"{method.upper()} {route.path}"
            if route.access == "public":
                if response.status_code != 200:
                    failures.append(f"{where}: public ({PUBLIC[route.path]}) but answered {response.status_code}")
            elif response.status_code != 401:
                failures.append(f"{where}: {response.status_code} without credentials, expected 401")
            elif route.access == "openai":
                if not _is_openai_error(response, "invalid_api_key"):
                    failures.append(f"{where}: 401 not in OpenAI's error shape: {response.content[:200]!r}")
            elif not _is_our_error(response, "not_authenticated") or not response.get("WWW-Authenticate"):
                failures.append(f"{where}: 401 without our error shape or WWW-Authenticate: {response.content[:200]!r}")
    _report(failures)


@pytest.fixture
def catalogue():
    """A provider, a model and an agent all named "matrix", so any catalogue kwarg names a real object."""
    model = make_model("matrix", provider=make_provider("matrix"))
    return make_agent("matrix", model=model)


def test_staff_routes_refuse_a_normal_user_and_admit_staff(client, catalogue):
    staff_routes = [r for r in ROUTES if r.access == "staff"]
    assert staff_routes, "no staff-only route found: is IsAdminUser still detected?"
    client.force_login(make_user())
    failures = []
    for route in staff_routes:
        for method in route.methods:
            response = _call(client, method, route.url())
            if response.status_code != 403 or not _is_our_error(response, "permission_denied"):
                failures.append(f"{method.upper()} {route.path}: a normal user got {response.status_code}, "
                                f"expected 403 permission_denied")
    client.force_login(make_user(staff=True))
    for route in staff_routes:
        if "get" in route.methods:  # the refusal above was about the user, not a missing page
            response = _call(client, "get", route.url())
            if response.status_code != 200:
                failures.append(f"GET {route.path}: staff got {response.status_code}, expected 200")
    _report(failures)


def test_user_routes_admit_a_normal_user(client, catalogue):
    """The other half of the classification: a route not marked staff-only does not refuse a normal user."""
    client.force_login(make_user())
    failures = []
    for route in ROUTES:
        if route.access != "user" or set(route.kwargs) & OWNED_KWARGS:
            continue  # owned-object routes are checked with real objects below
        for method in route.methods:
            response = _call(client, method, route.url())
            if response.status_code in (401, 403, 404) or response.status_code >= 500:
                failures.append(f"{method.upper()} {route.path}: a normal user got {response.status_code}")
    _report(failures)


def _owned_objects(user, agent) -> dict[str, object]:
    conversation = Conversation.objects.create(owner=user, agent=agent, title=f"{user.username}'s")
    message = Message.objects.create(conversation=conversation, role="user", content="mine", sequence=1,
                                     status=Message.Status.SUCCESS)
    key, _ = make_api_key(user)
    return {"conversation_id": conversation.pk, "message_id": message.pk, "key_id": key.pk}


def _variants(route: Route, alice: dict, bob: dict) -> list[dict]:
    """All of alice's ids; and, for nested objects, each of alice's ids under bob's own parent (and vice versa)."""
    owned = [k for k in route.kwargs if k in OWNED_KWARGS]
    variants = [{k: alice[k] for k in owned}]
    if len(owned) > 1:
        variants += [{k: (alice if k == foreign else bob)[k] for k in owned} for foreign in owned]
    return variants


def test_another_users_object_is_404(client, catalogue):
    alice, bob = make_user("alice"), make_user("bob")
    alices, bobs = _owned_objects(alice, catalogue), _owned_objects(bob, catalogue)
    owned_routes = [r for r in ROUTES if set(r.kwargs) & OWNED_KWARGS]
    assert owned_routes, "no route with a user-owned object found"
    client.force_login(bob)
    failures = []
    for route in owned_routes:
        for values in _variants(route, alices, bobs):
            for method in route.methods:
                response = _call(client, method, route.url(**values))
                if response.status_code != 404 or not _is_our_error(response, "not_found"):
                    failures.append(f"{method.upper()} {route.url(**values)} (alice's ids {values}) as bob: "
                                    f"{response.status_code} {response.content[:120]!r}, expected 404 not_found")
    _report(failures)
    # Nothing of alice's changed: a refused DELETE or PATCH did not go through.
    assert Conversation.objects.filter(pk=alices["conversation_id"], deleted_at=None, title="alice's").exists()
    assert Message.objects.filter(conversation_id=alices["conversation_id"]).count() == 1
    assert ApiKey.objects.get(pk=alices["key_id"]).revoked_at is None
    # The same URLs are real: alice reads her own.
    client.force_login(alice)
    for route in owned_routes:
        if "get" in route.methods:
            assert _call(client, "get", route.url(**alices)).status_code == 200, route.path


def test_session_only_routes_refuse_an_api_key(client, catalogue):
    """A key, however limited, cannot manage keys: otherwise it could mint one without its limits (issue 12)."""
    session_only = [r for r in ROUTES if r.session_only]
    assert {"/api/keys/", "/api/keys/<key_id>/"} <= {r.path for r in session_only}
    alice = make_user("alice")
    own = _owned_objects(alice, catalogue)  # her own objects: the refusal is about the credential, not the object
    _, raw = make_api_key(alice)
    failures = []
    for route in session_only:
        for method in route.methods:
            response = _call(client, method, route.url(**own), Authorization=f"Bearer {raw}")
            if response.status_code != 403 or not _is_our_error(response, "key_management_requires_session"):
                failures.append(f"{method.upper()} {route.path} with an API key: {response.status_code} "
                                f"{response.content[:120]!r}, expected 403 key_management_requires_session")
    _report(failures)
    assert ApiKey.objects.filter(user=alice).count() == 2 and not ApiKey.objects.filter(revoked_at__isnull=False)
