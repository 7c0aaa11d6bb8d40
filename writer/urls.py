from django.urls import path

from writer import views

urlpatterns = [
    path("generate-text/", views.GenerateTextView.as_view(), name="writer-generate-text"),
    path("topics/", views.TopicsView.as_view(), name="writer-topics"),
    path("optimize/", views.OptimizeView.as_view(), name="writer-optimize"),
]
