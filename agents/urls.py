from django.urls import path
from rest_framework.routers import SimpleRouter

from agents import views

router = SimpleRouter()
router.register("providers", views.ProviderViewSet, basename="provider")
router.register("models", views.LLMModelViewSet, basename="llmmodel")
router.register("agents", views.AgentViewSet, basename="agent")

urlpatterns = [
    path("ai-services/health/", views.HealthView.as_view(), name="ai-services-health"),
    path("ai-services/metrics/", views.MetricsView.as_view(), name="ai-services-metrics"),
    path("ai-services/cache/clear/", views.CacheClearView.as_view(), name="ai-services-cache-clear"),
    *router.urls,
]
