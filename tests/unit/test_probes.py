"""Issue 22, point 9: `/readyz` and `/metrics` need no key, so what they ask of Triton is bounded: one round per
interval per process, however many probes arrive (600 `/readyz` were ~5,400 Triton calls)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from gateway.observability import Coalesced, triton_stats_source
from gateway.settings import Settings
from tests.unit.fakes import routes_app


async def test_concurrent_and_repeated_calls_share_one_call_per_interval() -> None:
    calls = 0

    async def probe() -> bool:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.01)
        return False  # a falsy answer is kept too

    coalesced = Coalesced(probe, ttl_s=0.2)
    assert await asyncio.gather(*(coalesced() for _ in range(600))) == [False] * 600
    assert [await coalesced() for _ in range(10)] == [False] * 10 and calls == 1
    await asyncio.sleep(0.25)
    await coalesced()
    assert calls == 2


async def test_a_failure_is_not_kept() -> None:
    answers: list[Any] = [RuntimeError("triton down"), True]

    async def probe() -> bool:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return bool(answer)

    coalesced = Coalesced(probe)
    with pytest.raises(RuntimeError):
        await coalesced()
    assert await coalesced() is True


class CountingEngine:
    def __init__(self) -> None:
        self.ready_calls = 0
        self.stats_calls = 0

    async def models_ready(self, models: list[str]) -> bool:
        self.ready_calls += 1
        await asyncio.sleep(0.005)
        return True

    async def statistics(self, model: str) -> dict[str, Any]:
        self.stats_calls += 1
        return {"model_stats": [{"inference_count": "4", "execution_count": "2"}]}


async def test_600_readiness_probes_make_one_triton_round(tmp_path: Path) -> None:
    engine = CountingEngine()
    settings = Settings(storage_dir=tmp_path, jobs_db=tmp_path / "jobs.sqlite3")
    pipeline = SimpleNamespace(manifest=SimpleNamespace(models=["tiny_unet", "tiny_vae_decoder"]))
    _, app = routes_app(settings, engine=engine, pipelines={"tiny": pipeline})
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test") as http:
        answers = await asyncio.gather(*(http.get("/readyz") for _ in range(600)))
    assert {a.status_code for a in answers} == {200} and engine.ready_calls == 1


async def test_scrapes_share_one_statistics_round() -> None:
    engine = CountingEngine()
    source = triton_stats_source(engine.statistics, lambda: ["a", "b"])
    results = await asyncio.gather(*(source() for _ in range(100)))
    assert results[0] == {"a": {"inference_count": 4, "execution_count": 2}, "b": results[0]["a"]}
    assert engine.stats_calls == 2  # one per model, once
