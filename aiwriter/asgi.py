import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "aiwriter.settings")
django.setup(set_prefix=False)  # as django.core.asgi.get_asgi_application, with our handler (no thread hops)

from aiwriter import daphne_tuning  # noqa: E402
from aiwriter.asgi_handler import LoopASGIHandler  # noqa: E402

daphne_tuning.apply()

django_asgi_app = LoopASGIHandler()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402

from aiwriter.observability import track_websockets  # noqa: E402
from aiwriter.routing import websocket_urlpatterns  # noqa: E402
from aiwriter.ws_auth import WebsocketAuthMiddleware  # noqa: E402
from conversations import sweeper  # noqa: E402

router = ProtocolTypeRouter(
    {
        "http": django_asgi_app,
        "websocket": track_websockets(
            AllowedHostsOriginValidator(WebsocketAuthMiddleware(URLRouter(websocket_urlpatterns)))),
    }
)


async def application(scope, receive, send):
    # Every server process runs its own sweeper (dead generations' locks, slots and holds), started on its first
    # connection: `make run` and each deployed process get it without cron (SWEEPER_INTERVAL_SECONDS).
    if scope["type"] != "lifespan":
        sweeper.start()
    return await router(scope, receive, send)
