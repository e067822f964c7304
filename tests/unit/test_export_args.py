"""Issue 12: the export CLI's SDXL and turbo flags; issue 18: the CPU arena and the rate limiter's CPU budget;
issue 24: the batchers' priority levels (parsing and rendering only; the exports themselves run in the integration
session, tests/integration/conftest.py)."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest

from export.__main__ import TURBO_SCHEDULER, parse_args
from export.calibrate import BatchPolicy, choose_policy, render_batching
from export.repository import (
    CPU_THREADS_RESOURCE,
    DEFAULT_PRIORITY_LEVEL,
    PRIORITY_LEVELS,
    ServingOptions,
    TensorSpec,
    config_parameters,
    render_config,
)
from gateway.settings import Settings
from gateway.triton import client as triton_client
from gateway.triton.server import CPU_THREADS_RESOURCE as SERVER_CPU_THREADS_RESOURCE
from gateway.triton.server import cpu_budget_args


def test_turbo_tiny_defaults_to_the_trailing_ancestral_scheduler_unless_one_is_named() -> None:
    args = parse_args(["--tiny", "--arch", "sdxl", "--turbo"])
    assert (args.arch, args.turbo, args.scheduler) == ("sdxl", True, TURBO_SCHEDULER)
    assert parse_args(["--tiny", "--turbo", "--scheduler", "euler"]).scheduler == "euler"
    plain = parse_args(["--tiny"])
    assert (plain.arch, plain.turbo, plain.scheduler) == ("sd", False, "pndm")
    assert parse_args(["--model-dir", "x", "--turbo"]).turbo  # a real distilled folder: defaults only


@pytest.mark.parametrize("extra", [["--size", "large"], ["--scheduler", "euler"]])
def test_tiny_only_flags_are_refused_with_a_model_dir(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model-dir", "x", *extra])
    assert exit_info.value.code == 2 and "only apply to --tiny" in capsys.readouterr().err


def test_inpainting_is_a_tiny_option(capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 25: `--tiny --inpainting` builds a 9-channel UNet; a folder's or checkpoint's UNet config decides."""
    assert parse_args(["--tiny", "--inpainting", "--arch", "sdxl"]).inpainting
    assert not parse_args(["--tiny"]).inpainting
    for argv, message in (
        (["--model-dir", "x", "--inpainting"], "--inpainting only applies to --tiny"),
        (["--checkpoint", "x.safetensors", "--inpainting"], "--inpainting only applies to --tiny"),
        (["--tiny", "--size", "published", "--inpainting"], "not --size published"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            parse_args(argv)
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_unknown_arch_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--arch", "sd3"])
    assert "invalid choice: 'sd3'" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [([], "1"), (["--cpu-mem-arena"], "1"), (["--no-cpu-mem-arena"], "0")])
def test_the_python_runners_cpu_arena_is_on_unless_turned_off(flag: list[str], value: str) -> None:
    """On for speed (the calibrated batch bound bounds what it holds); `--cpu-mem-arena` is still accepted."""
    args = parse_args(["--tiny", *flag])
    options = ServingOptions(cpu_mem_arena=args.cpu_mem_arena)
    config = render_config("m_unet", [TensorSpec("sample", "FP32", (-1, 4, -1, -1))], [], options, "model.onnx")
    assert f'parameters {{ key: "cpu_mem_arena" value: {{ string_value: "{value}" }} }}' in config


@pytest.mark.parametrize(("flag", "value"), [([], "0"), (["--mem-pattern"], "1")])
def test_memory_patterns_are_off_unless_asked_for(flag: list[str], value: str) -> None:
    """Off: faster and less held with the arena on CPU (docs/benchmarks.md); the runner reads the parameter."""
    args = parse_args(["--tiny", *flag])
    options = ServingOptions(mem_pattern=args.mem_pattern)
    config = render_config("m_unet", [TensorSpec("sample", "FP32", (-1, 4, -1, -1))], [], options, "model.onnx")
    assert f'parameters {{ key: "mem_pattern" value: {{ string_value: "{value}" }} }}' in config


def _instance_group(options: ServingOptions) -> str:
    config = render_config("m_unet", [TensorSpec("sample", "FP32", (-1, 4, -1, -1))], [], options, "model.onnx")
    (line,) = [line for line in config.splitlines() if line.startswith("instance_group")]
    return line


@pytest.mark.parametrize("backend", ["python", "onnxruntime"])
def test_cpu_instances_ask_the_rate_limiter_for_their_threads(backend: str) -> None:
    limiter = 'rate_limiter {{ resources [ {{ name: "cpu_threads" global: true count: {} }} ] }}'
    assert limiter.format(3) in _instance_group(ServingOptions(backend=backend, intra_op_threads=3))
    # 0 threads is onnxruntime's "every core": the instance asks for all of this (the export's) host.
    assert limiter.format(os.cpu_count()) in _instance_group(ServingOptions(backend=backend, intra_op_threads=0))
    assert CPU_THREADS_RESOURCE == SERVER_CPU_THREADS_RESOURCE  # the name the server's budget flag names


def test_tensorrt_plans_ask_for_no_cpu_threads() -> None:
    assert "rate_limiter" not in _instance_group(ServingOptions(backend="tensorrt", intra_op_threads=3))


def test_the_server_budget_flags_and_the_largest_ask(tmp_path: Path) -> None:
    """0 is off; otherwise the budget, raised to the largest ask (Triton would refuse to load that instance)."""
    for name, threads in (("a", 1), ("b", 6)):
        (tmp_path / name).mkdir()
        config = render_config(name, [], [], ServingOptions(intra_op_threads=threads), "model.onnx")
        (tmp_path / name / "config.pbtxt").write_text(config)
    assert cpu_budget_args(0, tmp_path) == []
    assert cpu_budget_args(8, tmp_path) == ["--rate-limit=execution_count", "--rate-limit-resource=cpu_threads:8"]
    assert cpu_budget_args(2, tmp_path)[1] == "--rate-limit-resource=cpu_threads:6"
    assert cpu_budget_args(2, tmp_path / "empty")[1] == "--rate-limit-resource=cpu_threads:2"


def test_the_cpu_budget_setting() -> None:
    assert Settings().triton_cpu_budget == os.cpu_count()
    assert Settings.from_env({"IMAGEN_TRITON_CPU_BUDGET": "0"}).triton_cpu_budget == 0


@pytest.mark.parametrize(
    ("seconds", "policy"),
    [
        # The 2-core CPU's 512 px UNet: 1.02 s a row alone, 0.92 at 2 rows, 1.5 at 4: two rows, no more.
        ({1: 1.02, 2: 1.84, 4: 6.0}, BatchPolicy(2, (2,), 102_000)),
        # A 1.5 % gain is noise, not a reason to batch; the limit still takes one guided image's 2 rows.
        ({1: 1.0, 2: 1.97}, BatchPolicy(2, (), 0)),
        ({1: 0.1, 2: 0.1, 4: 0.1, 8: 0.12}, BatchPolicy(8, (8,), 10_000)),  # a GPU: capped by what was measured
        ({1: 0.1, 2: 0.1, 4: 0.4, 8: 0.2}, BatchPolicy(2, (2,), 10_000)),  # the first doubling that fails stops it
        # A millisecond model (the tiny one: 11 ms a row, flat): the execution overhead makes 2 rows worth it.
        ({1: 0.011, 2: 0.022, 4: 0.044}, BatchPolicy(2, (2,), 1_100)),
    ],
)
def test_the_calibrated_batch_policy(seconds: dict[int, float], policy: BatchPolicy) -> None:
    assert choose_policy(seconds) == policy


def test_the_calibrated_limit_stays_within_the_export_cap() -> None:
    assert choose_policy({1: 1.0, 2: 2.0}, cap=1) == BatchPolicy(1, (), 0)
    assert choose_policy({1: 0.1, 2: 0.1, 4: 0.1, 8: 0.1}, cap=4) == BatchPolicy(4, (4,), 10_000)


def test_the_calibrated_batching_line() -> None:
    """The line `--calibrate` rewrites keeps the priority levels when the export had them."""
    assert render_batching(BatchPolicy(1, (), 0)) == "dynamic_batching { max_queue_delay_microseconds: 0 }"
    assert render_batching(BatchPolicy(1, (), 0), priority_levels=True) == (
        "dynamic_batching { max_queue_delay_microseconds: 0 priority_levels: 3 default_priority_level: 2 }"
    )
    assert render_batching(BatchPolicy(4, (4,), 800), priority_levels=True) == (
        "dynamic_batching { preferred_batch_size: [ 4 ] max_queue_delay_microseconds: 800 "
        "priority_levels: 3 default_priority_level: 2 }"
    )


def test_the_exports_priority_levels_are_the_gateways() -> None:
    """The export cannot import the gateway: its copies of the levels and of the level a request without one gets
    (the gateway's default priority's) are held equal here."""
    assert PRIORITY_LEVELS == triton_client.PRIORITY_LEVELS
    assert triton_client.triton_priority(triton_client.DEFAULT_PRIORITY) == DEFAULT_PRIORITY_LEVEL
    levels = {triton_client.triton_priority(p) for p in range(triton_client.PRIORITY_LEVELS)}
    assert levels == set(range(1, PRIORITY_LEVELS + 1))  # every job priority is one of the models' levels


@pytest.mark.parametrize(
    "options",
    [
        ServingOptions(),
        ServingOptions(runtime="torch"),
        ServingOptions(backend="onnxruntime"),
        ServingOptions(backend="tensorrt"),
    ],
    ids=["python", "python-torch", "onnxruntime", "tensorrt"],
)
@pytest.mark.parametrize(("name", "delay"), [("m_unet", 500), ("m_vae_decoder", 0)])
@pytest.mark.parametrize("levels", [False, True], ids=["default", "triton-priority-levels"])
def test_every_backends_batcher_has_the_priority_levels_when_asked(
    options: ServingOptions, name: str, delay: int, levels: bool
) -> None:
    options = dataclasses.replace(options, triton_priority_levels=levels)
    config = render_config(name, [TensorSpec("sample", "FP32", (-1, 4, -1, -1))], [], options, "model.onnx")
    (line,) = [line for line in config.splitlines() if line.startswith("dynamic_batching")]
    suffix = " priority_levels: 3 default_priority_level: 2" if levels else ""
    assert line == f"dynamic_batching {{ max_queue_delay_microseconds: {delay}{suffix} }}"


def test_the_priority_levels_flag() -> None:
    assert not parse_args(["--tiny"]).triton_priority_levels
    assert parse_args(["--tiny", "--triton-priority-levels"]).triton_priority_levels


def test_calibrate_needs_the_python_runner(capsys: pytest.CaptureFixture[str]) -> None:
    assert parse_args(["--tiny", "--calibrate"]).calibrate
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--calibrate", "--backend", "onnxruntime"])
    assert "--backend python only" in capsys.readouterr().err


# --- issue 19: the torch runtime's flags ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--runtime", "torch", "--backend", "onnxruntime"], "--backend python only"),
        (["--runtime", "torch", "--fp16"], "computes in fp16 on CUDA by itself"),
        (["--runtime", "torch", "--calibrate"], "does not apply to --runtime torch"),
        (["--no-cuda-graphs"], "only apply to --runtime torch"),
        (["--torch-compile"], "only apply to --runtime torch"),
    ],
)
def test_torch_runtime_flags_that_do_not_apply_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--tiny", *argv])
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_torch_runtime_config_names_the_runtime_component_and_cuda_settings() -> None:
    args = parse_args(["--tiny", "--runtime", "torch", "--no-cuda-graphs", "--torch-compile"])
    options = ServingOptions(
        runtime=args.runtime, cuda_graphs=not args.no_cuda_graphs, torch_compile=args.torch_compile
    )
    spec = [TensorSpec("sample", "FP32", (-1, 4, -1, -1))]
    config = render_config(
        "m_unet", spec, spec, options, "", torch_params={"component": "unet", "cuda_dtype": "float16"}
    )
    assert config_parameters(config) == {
        "runtime": "torch",
        "component": "unet",
        "cuda_dtype": "float16",
        "intra_op_threads": "0",
        "cuda_graphs": "0",
        "torch_compile": "1",
    }
    assert "onnx_file" not in config and 'backend: "python"' in config and "KIND_AUTO" in config
    # The onnxruntime runner's configs are as before: no runtime parameter (absent means onnxruntime).
    assert "runtime" not in render_config("m_unet", spec, spec, ServingOptions(), "model.onnx")
    assert (options.served_by, ServingOptions().served_by, ServingOptions(backend="tensorrt").served_by) == (
        "torch",
        "onnxruntime",
        "tensorrt",
    )


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tiny", "--config", "x"], "only apply to --checkpoint"),
        (["--model-dir", "x", "--allow-pickle"], "only apply to --checkpoint"),
        (["--checkpoint", "m.safetensors", "--size", "large"], "only apply to --tiny"),
        (["--model-dir", "x", "--arch", "sdxl"], "--arch only applies to --tiny and --checkpoint"),
        (["--checkpoint", "m.safetensors", "--tiny"], "not allowed with argument"),
    ],
)
def test_single_file_flags_that_do_not_apply_are_refused(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_a_checkpoint_with_its_configs_parses() -> None:
    args = parse_args(["--checkpoint", "m.safetensors", "--config", "sd15", "--allow-pickle"])
    assert (str(args.checkpoint), str(args.config), args.allow_pickle, args.tiny) == (
        "m.safetensors",
        "sd15",
        True,
        False,
    )
