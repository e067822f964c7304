"""Issue 12: the export CLI's SDXL and turbo flags (parsing only; the exports themselves run in the integration
session, tests/integration/conftest.py)."""

from __future__ import annotations

import pytest

from export.__main__ import TURBO_SCHEDULER, parse_args


def test_turbo_tiny_defaults_to_the_trailing_ancestral_scheduler_unless_one_is_named() -> None:
    args = parse_args(["--tiny", "--arch", "sdxl", "--turbo"])
    assert (args.arch, args.turbo, args.scheduler) == ("sdxl", True, TURBO_SCHEDULER)
    assert parse_args(["--tiny", "--turbo", "--scheduler", "euler"]).scheduler == "euler"
    plain = parse_args(["--tiny"])
    assert (plain.arch, plain.turbo, plain.scheduler) == ("sd", False, "pndm")
    assert parse_args(["--model-dir", "x", "--turbo"]).turbo  # a real distilled folder: defaults only


@pytest.mark.parametrize("extra", [["--arch", "sdxl"], ["--scheduler", "euler"]])
def test_tiny_only_flags_are_refused_with_a_model_dir(extra: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(["--model-dir", "x", *extra])
    assert exit_info.value.code == 2 and "only apply to --tiny" in capsys.readouterr().err


def test_unknown_arch_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse_args(["--tiny", "--arch", "sd3"])
    assert "invalid choice: 'sd3'" in capsys.readouterr().err


@pytest.mark.parametrize(("flag", "value"), [([], "0"), (["--cpu-mem-arena"], "1")])
def test_the_python_runners_cpu_arena_is_off_unless_asked_for(flag: list[str], value: str) -> None:
    """Off, a model process frees a big batch's activations after each call instead of holding the peak."""
    from export.repository import ServingOptions, TensorSpec, render_config

    args = parse_args(["--tiny", *flag])
    options = ServingOptions(cpu_mem_arena=args.cpu_mem_arena)
    config = render_config("m_unet", [TensorSpec("sample", "FP32", (-1, 4, -1, -1))], [], options, "model.onnx")
    assert f'parameters {{ key: "cpu_mem_arena" value: {{ string_value: "{value}" }} }}' in config
