"""Request ids, access log and metrics: on the real `create_app` (no lifespan, so no Triton) and small apps."""

from __future__ import annotations

import asyncio
import io
import logging
import re
from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from gateway.app import create_app
from gateway.errors import InvalidRequest
from gateway.http.middleware import MetricsMiddleware, RequestIdMiddleware, metrics_endpoint, route_template
from gateway.http.ratelimit import RateLimitMiddleware, api_key_or_address
from gateway.observability import (
    REQUEST_ID_HEADER,
    Metrics,
    TritonBatchCollector,
    accept_request_id,
    configure_logging,
    current_request_id,
    triton_stats_source,
)
from gateway.settings import Settings

API_KEY = "unit-key-0123456789"
HEX_ID = re.compile(r"[0-9a-f]{32}")
log = logging.getLogger("gateway.test_observability")


def _settings(tmp_path: Path) -> Settings:
    return Settings(
        model_repository=tmp_path / "models",
        storage_dir=tmp_path / "images",
        jobs_db=tmp_path / "jobs.sqlite3",
        api_keys=frozenset({API_KEY}),
    )


def observed(app: Starlette, metrics: Metrics | None = None) -> Starlette:
    """The wiring app.py will do: request ids outermost, then metrics; `/metrics` served from app.state."""
    metrics = metrics or Metrics()
    app.state.metrics = metrics
    app.add_route("/metrics", metrics_endpoint, methods=["GET"])
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.add_middleware(RequestIdMiddleware)
    return app


def client(app: Any) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app, raise_app_exceptions=False), base_url="http://t")


async def scrape(http: httpx.AsyncClient) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    response = await http.get("/metrics")
    assert response.status_code == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = configure_logging("info", stream=stream)
    try:
        yield stream
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# --- request ids ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("incoming", "kept"),
    [
        ("abc-123_X.y", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("has space", False),
        ("semi;colon", False),
        ("", False),
        ("ünïcode", False),
        (None, False),
    ],
)
def test_accept_request_id(incoming: str | None, kept: bool) -> None:
    got = accept_request_id(incoming)
    assert (got == incoming) is kept
    if not kept:
        assert HEX_ID.fullmatch(got)


async def test_request_id_on_every_response_of_the_real_app(tmp_path: Path) -> None:
    """Success, API errors (401, 415, 400), routing errors (404, 405) and an unhandled 500 all carry the id."""
    app = observed(create_app(_settings(tmp_path)))
    auth = {"Authorization": f"Bearer {API_KEY}"}
    async with client(app) as http:
        cases = [
            (await http.get("/healthz"), 200),
            (await http.get("/v1/models"), 401),
            (await http.post("/v1/image-to-image", content=b"x", headers={**auth, "Content-Type": "text/plain"}), 415),
            (await http.post("/v1/image-to-image", content=b"{", headers={**auth, "Content-Type": "application/json"}),
             400),
            (await http.get("/nowhere"), 404),
            (await http.get("/v1/image-to-image"), 405),
            (await http.get("/readyz"), 500),  # no lifespan: the services are missing, an unhandled error
        ]  # fmt: skip
        ids = set()
        for response, status in cases:
            assert response.status_code == status, response.text
            assert HEX_ID.fullmatch(response.headers[REQUEST_ID_HEADER]), response.headers
            ids.add(response.headers[REQUEST_ID_HEADER])
            if status >= 400:
                assert set(response.json()["error"]) == {"code", "message", "details"}
        assert len(ids) == len(cases)
        echoed = await http.get("/healthz", headers={REQUEST_ID_HEADER: "client-trace.42"})
        assert echoed.headers[REQUEST_ID_HEADER] == "client-trace.42"
        replaced = await http.get("/healthz", headers={REQUEST_ID_HEADER: "x" * 65})
        assert HEX_ID.fullmatch(replaced.headers[REQUEST_ID_HEADER])


async def _boom(request: Request) -> Response:
    raise RuntimeError("bug")


async def _unexpected(request: Request, exc: Exception) -> Response:
    return JSONResponse({"error": {"code": "internal_error", "message": "x", "details": None}}, status_code=500)


@pytest.mark.parametrize("placement", ["add_middleware", "outermost"])
async def test_unhandled_error_gets_request_id_in_either_placement(placement: str) -> None:
    app = Starlette(routes=[Route("/boom", _boom)], exception_handlers={Exception: _unexpected})
    asgi: Any = app
    if placement == "add_middleware":
        app.add_middleware(RequestIdMiddleware)
    else:
        asgi = RequestIdMiddleware(app)
    async with client(asgi) as http:
        response = await http.get("/boom", headers={REQUEST_ID_HEADER: "trace-1"})
    assert response.status_code == 500
    assert response.headers[REQUEST_ID_HEADER] == "trace-1"
    assert response.json()["error"]["code"] == "internal_error"


async def _logs(request: Request) -> Response:
    log.info("inside the handler")
    await asyncio.to_thread(log.info, "inside a worker thread")
    assert request.state.request_id == current_request_id()
    return JSONResponse({"request_id": current_request_id()})


async def test_log_lines_carry_the_request_id_and_one_access_line(log_stream: io.StringIO) -> None:
    app = Starlette(routes=[Route("/items/{item_id}", _logs)])
    app.add_middleware(RequestIdMiddleware)
    async with client(app) as http:
        response = await http.get("/items/42", headers={REQUEST_ID_HEADER: "rid-7"})
    assert response.json() == {"request_id": "rid-7"}
    assert current_request_id() is None  # reset after the request
    lines = log_stream.getvalue().splitlines()
    assert any("[rid-7]" in line and "inside the handler" in line for line in lines), lines
    assert any("[rid-7]" in line and "inside a worker thread" in line for line in lines), lines
    access = [line for line in lines if "gateway.access" in line]
    assert len(access) == 1, lines
    assert re.search(r"\[rid-7\] GET /items/\{item_id\} 200 \d+\.\dms$", access[0]), access[0]
    log.info("outside any request")
    assert log_stream.getvalue().splitlines()[-1].count("[-]") == 1


def test_configure_logging_is_idempotent() -> None:
    root = logging.getLogger()
    level, before = root.level, list(root.handlers)
    try:
        configure_logging("debug", stream=io.StringIO())
        handler = configure_logging("warning", stream=io.StringIO())
        added = [h for h in root.handlers if h not in before]
        assert added == [handler] and root.level == logging.WARNING
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


# --- HTTP metrics ---------------------------------------------------------------------------------------------


def _count(samples: Mapping[Any, float], route: str, method: str, status: str) -> float:
    labels = frozenset({("route", route), ("method", method), ("status", status)})
    return samples.get(("imagen_http_requests_total", labels), 0.0)


async def test_http_metrics_use_route_templates_never_raw_paths(tmp_path: Path) -> None:
    async def probe(request: Request) -> Response:
        raise InvalidRequest("probe", request.path_params["probe_id"])

    metrics = Metrics()
    app = create_app(_settings(tmp_path))
    app.add_route("/v1/probes/{probe_id}", probe, methods=["GET"])
    observed(app, metrics)
    async with client(app) as http:
        await http.get("/v1/probes/aaa")
        await http.get("/v1/probes/bbb")
        await http.get("/v1/models")
        await http.get("/v1/image-to-image")  # 405: the route's template, not "unmatched"
        await http.get("/random/path/1")
        await http.get("/random/path/2")
        await http.request("BREW", "/healthz")
        samples = await scrape(http)
    assert _count(samples, "/v1/probes/{probe_id}", "GET", "400") == 2
    assert _count(samples, "/v1/models", "GET", "401") == 1
    assert _count(samples, "/v1/image-to-image", "GET", "405") == 1
    assert _count(samples, "unmatched", "GET", "404") == 2
    assert _count(samples, "/healthz", "other", "405") == 1
    routes = {dict(labels).get("route") for (name, labels) in samples if name == "imagen_http_requests_total"}
    assert not any("aaa" in str(r) or "random" in str(r) for r in routes), routes
    duration = ("imagen_http_request_duration_seconds_count", frozenset({("route", "unmatched"), ("method", "GET")}))
    assert samples[duration] == 2
    assert samples[("imagen_http_requests_in_flight", frozenset())] == 1  # the scrape itself


async def test_requests_answered_before_routing_are_labelled_with_their_route(tmp_path: Path) -> None:
    """The rate limiter answers 429 before the router runs; the label is still the route template."""
    metrics = Metrics()
    app = create_app(_settings(tmp_path))
    app.add_middleware(RateLimitMiddleware, per_minute=1, burst=1, key_fn=api_key_or_address(frozenset()))
    observed(app, metrics)
    async with client(app) as http:
        first = await http.post("/v1/image-to-image", content=b"x", headers={"Content-Type": "text/plain"})
        second = await http.post("/v1/image-to-image", content=b"x", headers={"Content-Type": "text/plain"})
        samples = await scrape(http)
    assert (first.status_code, second.status_code) == (401, 429)
    assert REQUEST_ID_HEADER in second.headers
    assert _count(samples, "/v1/image-to-image", "POST", "429") == 1


async def test_streaming_responses_pass_through() -> None:
    async def stream(request: Request) -> Response:
        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"data: {i}\n\n".encode()

        return StreamingResponse(chunks(), media_type="text/event-stream")

    metrics = Metrics()
    app = observed(Starlette(routes=[Route("/events/{job_id}", stream)]), metrics)
    async with client(app) as http:
        response = await http.get("/events/abc")
        samples = await scrape(http)
    assert response.text == "data: 0\n\ndata: 1\n\ndata: 2\n\n"
    assert REQUEST_ID_HEADER in response.headers
    assert _count(samples, "/events/{job_id}", "GET", "200") == 1


def test_route_template_without_a_router() -> None:
    assert route_template({"type": "http", "path": "/x", "method": "GET"}) == "unmatched"


# --- job and webhook instruments ------------------------------------------------------------------------------


async def test_job_and_webhook_helpers(tmp_path: Path) -> None:
    metrics = Metrics()
    metrics.record_job("completed")
    metrics.record_job("completed")
    metrics.record_job("canceled")
    metrics.record_webhook("retry")
    metrics.record_webhook("delivered")
    metrics.set_queue_depth(queued=5, running=2)
    with pytest.raises(ValueError, match="unknown job status"):
        metrics.record_job("exploded")
    with pytest.raises(ValueError, match="unknown webhook outcome"):
        metrics.record_webhook("lost")
    app = observed(Starlette(), metrics)
    async with client(app) as http:
        samples = await scrape(http)
    assert samples[("imagen_jobs_total", frozenset({("status", "completed")}))] == 2
    assert samples[("imagen_jobs_total", frozenset({("status", "canceled")}))] == 1
    assert samples[("imagen_jobs_total", frozenset({("status", "failed")}))] == 0  # exported from the start
    assert samples[("imagen_webhook_deliveries_total", frozenset({("outcome", "retry")}))] == 1
    assert samples[("imagen_webhook_deliveries_total", frozenset({("outcome", "failed")}))] == 0
    assert samples[("imagen_jobs_queued", frozenset())] == 5
    assert samples[("imagen_jobs_running", frozenset())] == 2


def test_job_manager_event_hook() -> None:
    """`Metrics.on_job_event` is what app.py passes as `JobManager(on_event=...)`."""
    metrics = Metrics()
    for event, value in [
        ("job_created", "queued"),
        ("queue_depth", (3, 1)),
        ("job_finished", "completed"),
        ("job_finished", "failed"),
        ("webhook", "retry"),
        ("webhook", "delivered"),
        ("something_new", 42),
    ]:
        metrics.on_job_event(event, value)

    def value(name: str, **labels: str) -> float | None:
        return metrics.registry.get_sample_value(name, labels)

    assert value("imagen_jobs_total", status="queued") == 1
    assert value("imagen_jobs_total", status="completed") == 1
    assert value("imagen_jobs_total", status="failed") == 1
    assert (value("imagen_jobs_queued"), value("imagen_jobs_running")) == (3, 1)
    assert value("imagen_webhook_deliveries_total", outcome="retry") == 1
    assert value("imagen_webhook_deliveries_total", outcome="delivered") == 1


def test_two_apps_do_not_share_a_registry() -> None:
    first, second = Metrics(), Metrics()
    first.record_job("completed")
    assert first.registry is not second.registry
    assert second.registry.get_sample_value("imagen_jobs_total", {"status": "completed"}) == 0
    assert first.registry.get_sample_value("imagen_jobs_total", {"status": "completed"}) == 1


async def test_metrics_endpoint_content_types() -> None:
    app = observed(Starlette())
    async with client(app) as http:
        plain = await http.get("/metrics")
        openmetrics = await http.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert plain.headers["content-type"].startswith("text/plain; version=0.0.4")
    assert openmetrics.headers["content-type"].startswith("application/openmetrics-text")
    assert openmetrics.text.rstrip().endswith("# EOF")


# --- Triton batch statistics ----------------------------------------------------------------------------------


def _triton_samples(metrics: Metrics) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels["model"]): sample.value
        for family in metrics.registry.collect()
        if family.name.startswith("imagen_triton_")
        for sample in family.samples
    }


async def _render(metrics: Metrics) -> None:
    await metrics.render()  # refreshes the Triton snapshot, as a scrape does


async def test_triton_batch_series_from_a_sync_or_async_source() -> None:
    counts = {"imagen-v2_unet": {"inference_count": 30, "execution_count": 12}, "idle_unet": {
        "inference_count": 0, "execution_count": 0}}  # fmt: skip

    async def async_source() -> Mapping[str, Mapping[str, int]]:
        return counts

    for source in (lambda: counts, async_source):
        metrics = Metrics(source)
        await _render(metrics)
        samples = _triton_samples(metrics)
        assert samples[("imagen_triton_inferences_total", "imagen-v2_unet")] == 30
        assert samples[("imagen_triton_executions_total", "imagen-v2_unet")] == 12
        assert samples[("imagen_triton_mean_batch_size", "imagen-v2_unet")] == 2.5
        assert ("imagen_triton_mean_batch_size", "idle_unet") not in samples  # no executions yet: no mean
        assert samples[("imagen_triton_inferences_total", "idle_unet")] == 0


@pytest.mark.parametrize("failure", ["raises", "hangs", "bad shape"])
async def test_scrape_answers_when_triton_is_down(failure: str) -> None:
    async def source() -> Mapping[str, Mapping[str, int]]:
        if failure == "raises":
            raise ConnectionError("triton is down")
        if failure == "hangs":
            await asyncio.sleep(60)
        return {"m": {"inference_count": 1}}  # no execution_count

    metrics = Metrics(source)
    metrics.triton.timeout_s = 0.05
    app = observed(Starlette(), metrics)
    async with client(app) as http:
        response = await http.get("/metrics")
    assert response.status_code == 200
    assert "imagen_http_requests_in_flight" in response.text
    assert "imagen_triton_inferences_total{" not in response.text


async def test_a_failed_scrape_clears_the_previous_snapshot() -> None:
    state = {"up": True}

    def source() -> Mapping[str, Mapping[str, int]]:
        if not state["up"]:
            raise ConnectionError("down")
        return {"u": {"inference_count": 4, "execution_count": 2}}

    collector = TritonBatchCollector(source)
    await collector.refresh()
    assert [s.value for f in collector.collect() for s in f.samples] == [4, 2, 2.0]
    state["up"] = False
    await collector.refresh()
    assert [s for f in collector.collect() for s in f.samples] == []


async def test_triton_stats_source_reads_tritons_json_statistics() -> None:
    """Triton's JSON statistics spell uint64 as strings and list one entry per version."""
    replies: dict[str, Callable[[], dict[str, Any]]] = {
        "a_unet": lambda: {"model_stats": [{"name": "a_unet", "version": "1", "inference_count": "40",
                                            "execution_count": "10"}]},
        "b_unet": lambda: {"model_stats": [{"inference_count": "3", "execution_count": "3"},
                                           {"inference_count": "5", "execution_count": "1"}]},
        "fresh_unet": lambda: {"model_stats": [{"name": "fresh_unet", "version": "1"}]},
    }  # fmt: skip

    async def statistics(model: str) -> dict[str, Any]:
        if model == "gone_unet":
            raise RuntimeError("model not loaded")
        return replies[model]()

    source = triton_stats_source(statistics, lambda: ["a_unet", "b_unet", "fresh_unet", "gone_unet", "a_unet"])
    assert await source() == {
        "a_unet": {"inference_count": 40, "execution_count": 10},
        "b_unet": {"inference_count": 8, "execution_count": 4},
        "fresh_unet": {"inference_count": 0, "execution_count": 0},
    }


async def test_api_errors_inside_the_app_keep_their_status(tmp_path: Path) -> None:
    async def bad(request: Request) -> Response:
        raise InvalidRequest("nope", "details")

    app = create_app(_settings(tmp_path))
    app.add_route("/bad", bad, methods=["GET"])
    metrics = Metrics()
    observed(app, metrics)
    async with client(app) as http:
        response = await http.get("/bad")
        samples = await scrape(http)
    assert response.status_code == 400 and REQUEST_ID_HEADER in response.headers
    assert _count(samples, "/bad", "GET", "400") == 1
