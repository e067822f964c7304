"""One entry per route: its method, path, handler and OpenAPI operation, so a route cannot be served without its
documentation or documented without being served (`routes.routes()` and `openapi._paths()` read one table)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from starlette.requests import Request

if TYPE_CHECKING:  # the table is written before any handler exists; routes.py builds them, and imports the table
    from gateway.http.responses import ErrorDialect
    from gateway.http.routes import HandlerSources

Operation = dict[str, Any]
EndpointFunction = Callable[[Request], Any]


@dataclass(frozen=True)
class Endpoint:
    """A route and its documentation; `include_in_schema=False` (and no operation) marks one deliberately
    undocumented. `handler` picks the endpoint from what `routes()` built; `errors` is the route's error dialect."""

    method: str
    path: str
    handler: Callable[[HandlerSources], EndpointFunction]
    operation: Operation | None
    include_in_schema: bool = True
    errors: ErrorDialect | None = None  # None: the app's handlers answer in the native shape

    def __post_init__(self) -> None:
        if (self.operation is not None) != self.include_in_schema:
            raise ValueError(f"{self.method} {self.path}: an operation exactly when it is included in the schema")
