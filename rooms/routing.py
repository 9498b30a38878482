from django.urls import path

from rooms.consumers import ChatConsumer, EchoConsumer

websocket_urlpatterns = [
    path("chat", ChatConsumer.as_asgi()),
    path("echo", EchoConsumer.as_asgi()),
]
