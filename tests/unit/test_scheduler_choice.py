"""A scheduler per request: the names, and the swap against diffusers' own `SchedulerMixin.from_config`.

For each source config (the kind a model folder ships, and one built from a partial config so that diffusers
records `_use_default_values`) and each target class, the port's swapped config must give the scheduler diffusers
builds: the same effective config over the port's keys, the same timesteps and sigmas. One deliberate
difference: a model's own class keeps the model's config as the pipeline runs it (see the test).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import diffusers
import numpy as np
import pytest

from gateway.diffusion.sampling import img2img_scheduler_config
from gateway.diffusion.schedulers import (
    SCHEDULER_NAMES,
    SUPPORTED_SCHEDULERS,
    make_scheduler,
    scheduler_choices,
    scheduler_class,
    scheduler_name,
    swap_scheduler_config,
)
from gateway.errors import InvalidRequest
from gateway.jobs.admission import resolve_scheduler
from gateway.jobs.create import request_hash
from gateway.jobs.execute import scheduler_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

RTOL = 2e-6
SD15 = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "num_train_timesteps": 1000}
# (source class, the keys its scheduler_config.json holds)
SOURCES: list[tuple[str, dict[str, Any]]] = [
    ("PNDMScheduler", {**SD15, "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1}),
    ("PNDMScheduler", {**SD15, "skip_prk_steps": True, "clip_sample": False, "steps_offset": 1}),  # SD 1.5's
    ("EulerDiscreteScheduler", {**SD15, "steps_offset": 1, "timestep_spacing": "leading"}),
    ("DDIMScheduler", {**SD15, "clip_sample": False, "set_alpha_to_one": False}),  # steps_offset left to default
    ("DPMSolverMultistepScheduler", {**SD15, "prediction_type": "v_prediction", "use_karras_sigmas": True}),
]


def _diffusers_source(class_name: str, keys: dict[str, Any]) -> Any:
    """The scheduler as a loaded pipeline holds it, after the img2img pipeline's config rewrite."""
    cls = getattr(diffusers, class_name)
    scheduler = cls.from_config({"_class_name": class_name, **keys})
    rewritten = img2img_scheduler_config(dict(scheduler.config))
    scheduler._internal_dict = diffusers.configuration_utils.FrozenDict(rewritten)
    return scheduler


@pytest.mark.parametrize(("source", "keys"), SOURCES)
@pytest.mark.parametrize("target", SUPPORTED_SCHEDULERS)
def test_swap_is_diffusers_from_config(source: str, keys: dict[str, Any], target: str) -> None:
    original = _diffusers_source(source, keys)
    model_config = dict(original.config)  # what the manifest stores (export: `dict(pipeline.scheduler.config)`)
    swapped = swap_scheduler_config(model_config, target)
    # The model's own class is its scheduler as the pipeline holds it: `from_config` would also drop the keys
    # of `_use_default_values` that the img2img rewrite set (a DDIM config without steps_offset gets 1 from the
    # pipeline, then 0 back from `DDIMScheduler.from_config`); naming a model's own scheduler must run the same
    # as omitting it.
    reference = original if target == source else getattr(diffusers, target).from_config(original.config)
    try:
        ours = make_scheduler(swapped)
    except ValueError:
        # Options the port refuses (PRK steps of a PNDM swapped in from another class): not offered.
        assert scheduler_name(target) not in scheduler_choices(model_config)
        return
    assert scheduler_name(target) in scheduler_choices(model_config)
    held = dict(reference.config)  # DPM-Solver reads sigma_min/max only if its config has them (else None)
    for key, value in ours.config.items():
        assert held.get(key) == value, (key, held.get(key), value)
    ours.set_timesteps(12)
    reference.set_timesteps(12)
    # Karras sigmas go through log/exp: a float32 ulp apart (tests/unit/test_schedulers.py's tolerance).
    np.testing.assert_allclose(ours.timesteps, reference.timesteps.numpy(), rtol=RTOL, atol=RTOL)
    if hasattr(reference, "sigmas"):
        np.testing.assert_allclose(ours.sigmas, reference.sigmas.numpy(), rtol=RTOL, atol=RTOL)


def test_use_default_values_give_way_to_the_targets_defaults() -> None:
    """A key the source only had by default (here timestep_spacing "leading" of PNDM) takes the target's default
    ("linspace" for Euler), as diffusers does; a key the config set is kept."""
    pndm = diffusers.PNDMScheduler(**SD15, skip_prk_steps=True, steps_offset=1)
    config = dict(pndm.config)
    assert "timestep_spacing" in config["_use_default_values"]
    swapped = swap_scheduler_config(config, "EulerDiscreteScheduler")
    assert make_scheduler(swapped).config["timestep_spacing"] == "linspace"
    assert swapped["steps_offset"] == 1
    assert diffusers.EulerDiscreteScheduler.from_config(pndm.config).config["timestep_spacing"] == "linspace"


def test_the_models_own_class_keeps_its_config() -> None:
    config = {"_class_name": "EulerDiscreteScheduler", **SD15, "timestep_spacing": "trailing", "extra": 1}
    assert swap_scheduler_config(config, "EulerDiscreteScheduler") == config


def test_names() -> None:
    assert set(SCHEDULER_NAMES.values()) == set(SUPPORTED_SCHEDULERS)
    for short, class_name in SCHEDULER_NAMES.items():
        assert scheduler_class(short) == scheduler_class(class_name) == class_name
        assert scheduler_name(class_name) == short
    assert scheduler_class("Euler") is None and scheduler_class("LMSDiscreteScheduler") is None
    assert scheduler_name("LMSDiscreteScheduler") is None


def _pipeline(config: dict[str, Any]) -> Any:
    """The attributes `resolve_scheduler` reads of an `Img2ImgPipeline` (its choices built as its constructor does)."""
    served = img2img_scheduler_config(config)
    return SimpleNamespace(
        scheduler_config=served, scheduler_choices=scheduler_choices(served), manifest=SimpleNamespace(name="m")
    )


def test_resolve_scheduler() -> None:
    pndm = _pipeline({"_class_name": "PNDMScheduler", **SOURCES[0][1]})
    euler = _pipeline({"_class_name": "EulerDiscreteScheduler", **SOURCES[2][1]})
    assert resolve_scheduler(pndm, None) == "pndm" and resolve_scheduler(euler, None) == "euler"
    assert resolve_scheduler(pndm, "EulerAncestralDiscreteScheduler") == "euler_ancestral"
    assert resolve_scheduler(pndm, "dpmpp_2m") == "dpmpp_2m"
    assert list(scheduler_choices(pndm.scheduler_config)) == list(SCHEDULER_NAMES)
    assert "pndm" not in scheduler_choices(euler.scheduler_config)  # PNDM from an Euler config runs PRK steps
    for bad, model in (("lms", pndm), ("Euler", pndm), ("pndm", euler), ("PNDMScheduler", euler)):
        with pytest.raises(InvalidRequest) as info:
            resolve_scheduler(model, bad)
        assert info.value.message == "Invalid field 'scheduler'"
        valid = ", ".join(scheduler_choices(model.scheduler_config))
        assert f"must be one of: {valid} " in (info.value.details or "")
    # The run uses the model's own config for its own name and for no name.
    assert scheduler_config(pndm, None) is None
    assert scheduler_config(pndm, "pndm") == pndm.scheduler_config
    assert scheduler_config(pndm, "ddim") == scheduler_choices(pndm.scheduler_config)["ddim"]
    with pytest.raises(InvalidRequest):
        scheduler_config(euler, "pndm")


def test_scheduler_and_output_fields_identify_the_request() -> None:
    """An Idempotency-Key reused with another scheduler or format is another request (409), not a replay."""
    body = {"image": "data:image/png;base64,AAAA", "prompt": "a cat", "seed": 1}
    hashes = {
        request_hash(variant)
        for variant in (
            body,
            {**body, "scheduler": "euler"},
            {**body, "scheduler": "ddim"},
            {**body, "output_format": "jpeg"},
            {**body, "output_format": "jpeg", "output_quality": 80},
        )
    }
    assert len(hashes) == 5
    assert request_hash({**body, "scheduler": "ddim"}) == request_hash({"scheduler": "ddim", **body})
