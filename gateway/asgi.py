"""The ASGI app factory of the gateway's worker processes: `python -m gateway --workers N` (or IMAGEN_WORKERS=N).

uvicorn starts each worker process afresh and imports `gateway.asgi:create_app_from_env` in it (`factory=True`),
so a worker gets its settings from the environment alone: the launcher writes its command-line overrides into
the environment (`IMAGEN_*`) before it starts the workers. Start it through the launcher only: it runs uvicorn
with the connection cap and request-head deadline (`gateway.http.limits.GuardedH11Protocol`) and without
uvicorn's access log, which would write every path, image capability URLs included. A bare
`uvicorn --factory gateway.asgi:create_app_from_env` lacks the connection limits; the factory itself turns the
access log off.
"""

from __future__ import annotations

import logging
import os

from gateway.app import App, create_app
from gateway.observability import configure_logging
from gateway.settings import Settings

APP_FACTORY = "gateway.asgi:create_app_from_env"


# uvicorn's access log writes every request line, image capability paths included; `gateway.access` logs each
# request with its route template instead.
UVICORN_ACCESS_LOGGER = "uvicorn.access"


def create_app_from_env() -> App:
    """One worker's app: Settings from `IMAGEN_*`, the gateway's log handler installed in this process, and
    uvicorn's access log off however uvicorn was started."""
    settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level)
    logging.getLogger(UVICORN_ACCESS_LOGGER).disabled = True
    return create_app(settings)
