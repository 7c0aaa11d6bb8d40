from django.urls import path, re_path

from openai_compat import views

app_name = "openai"

urlpatterns = [
    path("chat/completions", views.chat_completions, name="chat-completions"),
    path("models", views.list_models, name="models"),
    path("models/<path:model_id>", views.retrieve_model, name="model"),
    re_path(r"^(?P<path>.*)$", views.unknown_path),  # last: /v1 answers every path in OpenAI's error shape
]
