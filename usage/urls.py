from django.urls import path

from usage import views

urlpatterns = [
    path("me/", views.MeView.as_view(), name="me"),
    path("usage/stats/", views.UsageStatsView.as_view(), name="usage-stats"),
    path("usage/records/", views.UsageRecordsView.as_view(), name="usage-records"),
    path("usage/records/export.csv", views.UsageRecordsExportView.as_view(), name="usage-records-export"),
    path("usage/quota/", views.QuotaView.as_view(), name="usage-quota"),
    path("usage/cache-hit-rate/", views.CacheHitRateView.as_view(), name="usage-cache-hit-rate"),
    path("usage/balance/", views.BalanceView.as_view(), name="usage-balance"),
    path("usage/ledger/", views.LedgerView.as_view(), name="usage-ledger"),
    path("usage/credits/", views.CreditsView.as_view(), name="usage-credits"),
    path("usage/consume/", views.ConsumeView.as_view(), name="usage-consume"),
    path("agents/<slug:slug>/debug/route/", views.DebugRouteView.as_view(), name="agent-debug-route"),
    path("agents/<slug:slug>/debug/preview/", views.DebugPreviewView.as_view(), name="agent-debug-preview"),
    path("agents/<slug:slug>/debug/run/", views.DebugRunView.as_view(), name="agent-debug-run"),
    path("keys/", views.ApiKeyListView.as_view(), name="api-keys"),
    path("keys/<int:key_id>/", views.ApiKeyDetailView.as_view(), name="api-key-detail"),
]
