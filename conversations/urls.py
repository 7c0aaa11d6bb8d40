from django.urls import path

from conversations import views

urlpatterns = [
    path("conversations/", views.ConversationListView.as_view(), name="conversation-list"),
    path("conversations/<int:conversation_id>/", views.ConversationDetailView.as_view(), name="conversation-detail"),
    path("conversations/<int:conversation_id>/messages/", views.MessageListView.as_view(), name="message-list"),
    path("conversations/<int:conversation_id>/messages/<int:message_id>/retry/", views.MessageRetryView.as_view(),
         name="message-retry"),
    path("memory/", views.MemoryView.as_view(), name="memory"),
]
