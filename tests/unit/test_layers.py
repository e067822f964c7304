"""The gateway's layer contract (docs/DESIGN.md), checked on every module's imports: imports only go down
(`http` -> `jobs` -> `media`, `diffusion` -> `triton`), the cross-cutting modules (`settings`, `errors`,
`observability`) import no layer, and only `http` and the entry points `app` and `__main__` import
Starlette."""

from __future__ import annotations

import ast
from pathlib import Path

from gateway.settings import PROJECT_ROOT

GATEWAY = PROJECT_ROOT / "gateway"
# Higher imports lower; equal ranks (media, diffusion) do not import each other.
LAYER_RANKS = {"http": 4, "jobs": 3, "media": 2, "diffusion": 2, "triton": 1}
CROSS_CUTTING = frozenset({"settings", "errors", "observability"})
ENTRY_POINTS = frozenset({"app", "asgi", "__main__", "__init__"})
# The entry points that may import the web framework (asgi.py names the app type through app.py).
FRAMEWORK_ENTRY_POINTS = frozenset({"app", "__main__"})
WEB_FRAMEWORK = "starlette"


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def violations(root: Path) -> list[str]:
    """Every import under `root` (a gateway package tree) that breaks the contract."""
    found = []
    for path in sorted(root.rglob("*.py")):
        source = path.relative_to(root).parts[0].removesuffix(".py")  # the layer or module it belongs to
        for module in _imports(path):
            top, _, rest = module.partition(".")
            if top == WEB_FRAMEWORK and source != "http" and source not in FRAMEWORK_ENTRY_POINTS:
                found.append(f"{path.relative_to(root)} imports {module}")
            if top != "gateway" or source in ENTRY_POINTS:
                continue
            target = rest.split(".")[0]
            if target == source or (target in CROSS_CUTTING and source in LAYER_RANKS):
                continue
            down = source in LAYER_RANKS and target in LAYER_RANKS and LAYER_RANKS[target] < LAYER_RANKS[source]
            if not (down or (source in CROSS_CUTTING and target in CROSS_CUTTING)):
                found.append(f"{path.relative_to(root)} ({source}) imports {module}")
    return found


def test_imports_only_go_down_and_only_http_knows_the_web_framework() -> None:
    assert len(list(GATEWAY.rglob("*.py"))) > 40  # the walk finds the gateway
    assert violations(GATEWAY) == []


def test_the_contract_check_sees_each_kind_of_violation(tmp_path: Path) -> None:
    files = {
        "triton/client.py": "from gateway.http.routes import Routes\n",  # upward
        "media/codecs.py": "from gateway.diffusion import sampling\n",  # sideways, between equal ranks
        "jobs/runner.py": "import starlette.responses\nfrom gateway.media import storage\n",  # framework; down: fine
        "errors.py": "from gateway.jobs.model import Job\n",  # a cross-cutting module importing a layer
        "http/routes.py": "from starlette.requests import Request\nfrom gateway.errors import NotFound\n",  # fine
        "app.py": "from gateway.http import routes\nimport starlette\n",  # the composition root: anything
    }
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert violations(tmp_path) == [
        "errors.py (errors) imports gateway.jobs.model",
        "jobs/runner.py imports starlette.responses",
        "media/codecs.py (media) imports gateway.diffusion",
        "triton/client.py (triton) imports gateway.http.routes",
    ]
