"""The ASGI app factory of the gateway's worker processes: `python -m gateway --workers N` (or IMAGEN_WORKERS=N).

uvicorn starts each worker process afresh and imports `gateway.asgi:create_app_from_env` in it (`factory=True`),
so a worker gets its settings from the environment alone: the launcher writes its command-line overrides into
the environment (`IMAGEN_*`) before it starts the workers. Start it through the launcher only: it runs uvicorn
with the connection cap and request-head deadline (`gateway.http.limits.GuardedH11Protocol`) and without
uvicorn's access log, which would write every path, image capability URLs included. A bare
`uvicorn --factory gateway.asgi:create_app_from_env` has neither.
"""

from __future__ import annotations

import os

from gateway.app import App, create_app
from gateway.observability import configure_logging
from gateway.settings import Settings

APP_FACTORY = "gateway.asgi:create_app_from_env"


def create_app_from_env() -> App:
    """One worker's app: Settings from `IMAGEN_*`, the gateway's log handler installed in this process."""
    settings = Settings.from_env(os.environ)
    configure_logging(settings.log_level)
    return create_app(settings)
