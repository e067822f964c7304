"""`python -m export.trt_build`: build every missing TensorRT plan of a model repository with `trtexec`.

A plan only loads in the TensorRT version and on the GPU architecture it was built with, so this runs where
Triton runs: in the NGC TensorRT container of Triton's release (24.10 here), as a one-shot before Triton starts
(docker/compose.yaml `trt-build`, the init container of docker/k8s/overlays/gpu-tensorrt). `python -m export
--backend tensorrt` writes, beside each model, the recipe (`plan.build.json`) with the exact `trtexec` command;
this reads the recipes and runs the commands of the models whose plan is missing or older than its ONNX.

Each plan is built into a `.partial` file and renamed into place, so a Triton (or a rerun) never sees half a
plan. Standard library only: the TensorRT container's own Python runs it.

Exit codes: 0 every plan is in place, 1 a build failed (the one-shot then fails and Triton does not start on a
repository with a missing plan), 2 bad arguments or no trtexec.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

RECIPE_FILE = "plan.build.json"
RECIPE_VERSION = 1
PARTIAL_SUFFIX = ".partial"
SAVE_ENGINE = "--saveEngine="
TIMING_CACHE = "--timingCacheFile="
# Where the NGC TensorRT (and Triton SDK) containers keep trtexec when it is not on PATH.
TRTEXEC_FALLBACK = Path("/usr/src/tensorrt/bin/trtexec")
DEFAULT_REPOSITORY = Path("/data/models")
# The TensorRT cache folder on the models volume (export's ServingOptions.trt_cache_dir): created group-writable
# before Triton starts, so that Triton can write onnxruntime's TensorRT engine cache there.
DEFAULT_CACHE_DIR = Path("/data/trt-cache")


def find_recipes(repository: Path) -> list[Path]:
    """Every model folder of the repository that has a plan recipe, by model name."""
    return sorted(repository.glob(f"*/{RECIPE_FILE}"))


def load_recipe(path: Path) -> dict[str, Any]:
    recipe: dict[str, Any] = json.loads(path.read_text())
    if recipe.get("recipe_version") != RECIPE_VERSION:
        raise ValueError(f"{path}: recipe_version {recipe.get('recipe_version')!r}, expected {RECIPE_VERSION}")
    return recipe


def needs_build(model_dir: Path, recipe: dict[str, Any]) -> bool:
    """A plan is built when it is missing or older than the ONNX it comes from (a re-export)."""
    plan, onnx = model_dir / recipe["plan"], model_dir / recipe["onnx"]
    return not plan.is_file() or plan.stat().st_mtime < onnx.stat().st_mtime


def build_command(recipe: dict[str, Any], trtexec: str, timing_cache: str | None) -> list[str]:
    """The recipe's argv (run in the model folder) with this host's trtexec, the plan written to `.partial`,
    and the timing cache moved when `timing_cache` is given."""
    argv = [trtexec]
    for arg in recipe["argv"][1:]:
        if arg.startswith(SAVE_ENGINE):
            arg = SAVE_ENGINE + recipe["plan"] + PARTIAL_SUFFIX
        elif arg.startswith(TIMING_CACHE) and timing_cache is not None:
            arg = TIMING_CACHE + timing_cache
        argv.append(arg)
    return argv


def _timing_cache_of(argv: list[str]) -> Path | None:
    for arg in argv:
        if arg.startswith(TIMING_CACHE):
            return Path(arg[len(TIMING_CACHE) :])
    return None


def _make_shared_dir(path: Path) -> None:
    """The cache folder, group-writable and setgid: Triton (another uid, in this one's group) writes the
    onnxruntime TensorRT engine cache there too."""
    if not path.is_dir():
        path.mkdir(parents=True)
        path.chmod(0o2775)


def _find_trtexec(explicit: str | None) -> str | None:
    if explicit:
        return explicit
    found = shutil.which("trtexec")
    if found:
        return found
    return str(TRTEXEC_FALLBACK) if TRTEXEC_FALLBACK.is_file() else None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m export.trt_build", description=__doc__.splitlines()[0])
    parser.add_argument("--repository", type=Path, default=DEFAULT_REPOSITORY, help="Triton model repository")
    parser.add_argument("--trtexec", help="trtexec binary (default: on PATH, else /usr/src/tensorrt/bin/trtexec)")
    parser.add_argument("--timing-cache", help="timing cache file (default: the recipe's, on the models volume)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR, help="TensorRT cache folder to prepare")
    parser.add_argument("--dry-run", action="store_true", help="print the exact commands, build nothing")
    parser.add_argument("--force", action="store_true", help="rebuild plans that are already in place")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    repository = args.repository.absolute()
    if not repository.is_dir():
        print(f"trt_build: error: no model repository at {repository}", file=sys.stderr)
        return 2
    trtexec = _find_trtexec(args.trtexec) or ("trtexec" if args.dry_run else None)
    if trtexec is None:
        print("trt_build: error: trtexec not found (run this in the NGC TensorRT container)", file=sys.stderr)
        return 2
    if not args.dry_run:
        try:
            _make_shared_dir(args.cache_dir)
        except OSError as exc:
            print(f"trt_build: error: cannot create {args.cache_dir}: {exc.strerror}", file=sys.stderr)
            return 2
    recipes = find_recipes(repository)
    todo = []
    for path in recipes:
        recipe = load_recipe(path)
        if args.force or needs_build(path.parent, recipe):
            todo.append((path.parent, recipe))
        else:
            print(f"# {path.parent.name}: {recipe['plan']} is up to date")
    print(f"# {len(todo)} of {len(recipes)} plans to build in {repository}")
    for model_dir, recipe in todo:
        command = build_command(recipe, trtexec, args.timing_cache)
        partial, plan = model_dir / (recipe["plan"] + PARTIAL_SUFFIX), model_dir / recipe["plan"]
        print(f"cd {shlex.quote(str(model_dir))} && {shlex.join(command)}")
        print(f"mv {shlex.quote(str(partial))} {shlex.quote(str(plan))}", flush=True)
        if args.dry_run:
            continue
        cache = _timing_cache_of(command)
        if cache is not None:
            _make_shared_dir(cache.parent)
        result = subprocess.run(command, cwd=model_dir, check=False)  # noqa: S603 - argv from our own recipe
        if result.returncode != 0 or not partial.is_file():
            partial.unlink(missing_ok=True)
            print(f"trt_build: error: {model_dir.name}: trtexec exited {result.returncode}", file=sys.stderr)
            return 1
        os.replace(partial, plan)
    return 0


if __name__ == "__main__":
    sys.exit(main())
