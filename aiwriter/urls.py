from django.contrib import admin
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView

from aiwriter import errors, health, observability, static

handler400 = "aiwriter.errors.handler400"
handler403 = "aiwriter.errors.handler403"
handler404 = "aiwriter.errors.handler404"
handler500 = "aiwriter.errors.handler500"

urlpatterns = [
    path("", include("aiwriter.pages")),  # chat page, /account/, /accounts/ login, /admin/dashboard/
    path("healthz", health.healthz, name="healthz"),
    path("readyz", health.readyz, name="readyz"),
    path("metrics", observability.metrics_view, name="metrics"),
    path("favicon.ico", static.favicon, name="favicon"),
    path("admin/", admin.site.urls),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/", include("usage.urls")),
    path("api/", include("conversations.urls")),
    path("api/ai/", include("writer.urls")),  # writer: generate-text, topics, optimize
    path("api/", include("agents.urls")),  # staff: providers, models, agents, ai-services
    path("v1/", include("openai_compat.urls")),
    re_path(r"^api/", errors.unknown_api_path),  # last: JSON 404 for unknown API paths, DEBUG or not
]
