"""What one benchmark run measures: the workload, the load levels, the repeats and the thread pinning."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

BENCH_ROOT = Path(__file__).resolve().parent
PROJECT_ROOT = BENCH_ROOT.parent
RESULTS_DIR = BENCH_ROOT / "results"
WORK_DIR = RESULTS_DIR / "tmp"  # git-ignored: exported models, logs, generated images
TRITON_ENV = PROJECT_ROOT / ".venv-triton"

# Ports: one block, far from the defaults (8000-8080) that a developer's `make serve` uses.
PORT_BASE = 19400
# The sizes `--models` takes (export.tiny.SIZES keys with a plan below); `--quick` and the full run default to
# the first two: `large` (Stable Diffusion 1.5's shapes) is run only when named.
MODEL_SIZES = ("tiny", "medium", "large")
DEFAULT_SIZES = ("tiny", "medium")


@dataclass(frozen=True)
class Workload:
    """The same request for every system."""

    prompt: str = "a watercolor painting of a lighthouse at dusk"
    negative_prompt: str = "blurry"
    strength: float = 0.5
    steps: int = 8
    guidance_scale: float = 7.5
    seed: int = 1234
    image_side: int = 512  # the input image; each system resizes it to its model's grid


@dataclass(frozen=True)
class ModelPlan:
    """One model config and the load applied to it."""

    size: str  # export.tiny.SIZES key
    concurrency: tuple[int, ...]
    requests_per_level: int  # measured requests per closed-loop run (per repeat)
    peer_requests: int  # measured requests per peer run (one-at-a-time servers: throughput is flat in load)
    peer_concurrency: tuple[int, ...]  # peers are measured at these levels
    poisson_rate_fraction: float = 0.7  # open-loop rate as a fraction of the service's best closed-loop rate
    poisson_requests: int = 24
    overhead_requests: int = 20  # sequential gateway requests for the gateway-overhead measurement
    # Triton max_batch_size for this model (None: the config's). The medium UNet's exported attention is unfused:
    # at 64x64 latents one batch of 16 rows materializes ~17 GB of attention scores and the stub is OOM-killed.
    max_batch_size: int | None = None
    workload: Workload = field(default_factory=Workload)
    repeats: int | None = None  # None: the config's; a slow model may take fewer
    warmup_requests: int | None = None  # per level (None: max(level, the config's)); per peer (None: the config's)
    overhead_fresh: int = 3  # gateway-overhead requests each on a fresh connection
    limit_calls: int | None = None  # timed calls per limit timing (None: the config's); a slow model may take fewer

    @property
    def name(self) -> str:
        return f"bench-{self.size}"


@dataclass(frozen=True)
class BenchConfig:
    models: tuple[ModelPlan, ...]
    repeats: int = 3
    warmup_requests: int = 2  # per system and level, before the measured repeats; never counted
    threads: int = field(default_factory=lambda: os.cpu_count() or 1)
    max_queue_delay_us: int = 500  # the export's default UNet queue delay
    max_batch_size: int = 16
    limit_calls: int = 3  # timed session calls per (component, batch size) for the limit
    transport_calls: int = 50  # identity calls / sequential gateway requests for the transport cost
    port_base: int = PORT_BASE
    mode: str = "full"
    peers: bool = True  # False (`--no-peers`): this service and its limit only

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def large_plan() -> ModelPlan:
    """Stable Diffusion 1.5's published UNet, CLIP ViT-L and VAE configs with random weights (export.tiny `large`),
    with `sample_size` 32, so the model's native size (what the gateway and the peers resize to) is 256 px: the
    same weights and layer shapes at a quarter of the pixels. One repeat, two levels, 4 steps x 0.5 = 2 UNet steps
    with guidance (batches of 2 rows per request)."""
    return ModelPlan(
        size="large",
        concurrency=(1, 4),
        requests_per_level=1,  # c=4 sends 4 (at least one per worker)
        peer_requests=1,
        peer_concurrency=(1,),  # one-at-a-time servers: throughput is flat in load
        poisson_requests=2,
        overhead_requests=1,
        overhead_fresh=1,
        max_batch_size=4,  # a cap; the export's --calibrate picks the policy within it
        repeats=1,
        warmup_requests=1,
        limit_calls=1,
        workload=Workload(steps=4, strength=0.5, image_side=256),
    )


def quick_config(sizes: tuple[str, ...] = DEFAULT_SIZES) -> BenchConfig:
    """`--quick`: fewer levels, requests and repeats; under 10 minutes on 2 cores for tiny + medium."""
    plans = {
        "tiny": ModelPlan(
            size="tiny",
            concurrency=(1, 2, 4, 8, 16),
            requests_per_level=16,
            peer_requests=8,
            peer_concurrency=(1, 8),
            poisson_requests=24,
            workload=Workload(steps=8, strength=0.5),
        ),
        "medium": ModelPlan(
            size="medium",
            concurrency=(1, 8),
            requests_per_level=2,  # c=8 sends 8 (at least one per worker)
            peer_requests=2,
            peer_concurrency=(1,),  # a one-at-a-time server: c=8 would need 8 requests of ~13 s each
            poisson_requests=3,
            overhead_requests=1,
            overhead_fresh=1,
            max_batch_size=4,
            # Four denoising steps (with guidance: UNet batches of 2 per request), the loop the service batches;
            # ~13 s per image on 2 cores, so one repeat and one warm-up request per level keep --quick near 10 min.
            repeats=1,
            warmup_requests=1,
            workload=Workload(steps=8, strength=0.5),
        ),
        "large": large_plan(),
    }
    return BenchConfig(
        models=tuple(plans[s] for s in sizes), repeats=2, limit_calls=2, transport_calls=30, mode="quick"
    )


def full_config(sizes: tuple[str, ...] = DEFAULT_SIZES) -> BenchConfig:
    plans = {
        "tiny": ModelPlan(
            size="tiny",
            concurrency=(1, 2, 4, 8, 16),
            requests_per_level=48,
            peer_requests=16,
            peer_concurrency=(1, 2, 4, 8, 16),
            poisson_requests=64,
            workload=Workload(steps=40, strength=0.5),  # 20 UNet steps
        ),
        "medium": ModelPlan(
            size="medium",
            concurrency=(1, 2, 4, 8, 16),
            requests_per_level=24,
            peer_requests=6,
            peer_concurrency=(1, 8),
            poisson_requests=24,
            max_batch_size=4,
            workload=Workload(steps=40, strength=0.5),  # 20 UNet steps
        ),
        "large": large_plan(),
    }
    return BenchConfig(models=tuple(plans[s] for s in sizes), repeats=3, mode="full")


def smoke_config(port_base: int = PORT_BASE + 60) -> BenchConfig:
    """The CI smoke test: tiny model, one level, two steps, one repeat."""
    plan = ModelPlan(
        size="tiny",
        concurrency=(2,),
        requests_per_level=4,
        peer_requests=2,
        peer_concurrency=(2,),
        poisson_requests=4,
        overhead_requests=3,
        workload=Workload(steps=2, strength=1.0),
    )
    return replace(
        BenchConfig(models=(plan,), repeats=1, warmup_requests=1, limit_calls=1, transport_calls=5, mode="smoke"),
        port_base=port_base,
    )
