"""Issue 21: the manual cannot drift from the code it documents. Every variable `Settings.from_env` reads is in
the settings page, every `IMAGEN_*` the page names is one it reads, and the README stays a front page."""

from __future__ import annotations

import re
from collections.abc import Mapping

from gateway.settings import PROJECT_ROOT, Settings

SETTINGS_PAGE = PROJECT_ROOT / "docs" / "settings.md"
README_MAX_LINES = 200


class _Recording(dict[str, str]):
    """An empty environment that records every variable asked for."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    def get(self, key: str, default: str | None = None) -> str | None:  # type: ignore[override]
        self.asked.append(key)
        return default


def _variables_read() -> set[str]:
    env = _Recording()
    Settings.from_env(env)
    assert isinstance(env, Mapping) and env.asked  # the recorder saw the reads
    return set(env.asked)


def test_the_settings_page_lists_every_variable_settings_reads_and_no_other() -> None:
    page = SETTINGS_PAGE.read_text()
    table = [line for line in page.splitlines() if line.startswith("| `IMAGEN_")]
    named = set(re.findall(r"IMAGEN_[A-Z0-9_]+", "\n".join(line.split("|")[1] for line in table)))
    read = _variables_read()
    assert sorted(read - named) == [], "read by Settings but not in docs/settings.md's table"
    assert sorted(named - read) == [], "in docs/settings.md's table but not read by Settings"


def test_the_readme_is_a_front_page() -> None:
    assert len((PROJECT_ROOT / "README.md").read_text().splitlines()) <= README_MAX_LINES


def _parameter_rows() -> dict[str, tuple[str, str]]:
    """docs/api.md's request table: parameter -> (accepted values, default)."""
    rows = {}
    for line in (PROJECT_ROOT / "docs" / "api.md").read_text().splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if len(cells) == 3 and re.fullmatch(r"`[a-z_]+`", cells[0]):
            rows.setdefault(cells[0].strip("`"), (cells[1], cells[2]))
    return rows


def test_the_api_page_quotes_the_limits_and_defaults_the_validator_enforces() -> None:
    from gateway.jobs.request import PARAMETER_LIMITS

    rows = _parameter_rows()
    assert set(PARAMETER_LIMITS) <= set(rows), sorted(set(PARAMETER_LIMITS) - set(rows))
    for name, limits in PARAMETER_LIMITS.items():
        accepted, default = rows[name]
        if "minimum" in limits:
            quoted = re.search(r"(\d+(?:\.\d+)?)–(\d+(?:\.\d+)?)", accepted)
            assert quoted, (name, accepted)
            assert (float(quoted[1]), float(quoted[2])) == (limits["minimum"], limits["maximum"]), (name, accepted)
        if "max_length" in limits and name not in ("model", "scheduler"):  # those two are checked by value
            assert f"≤ {limits['max_length']}" in accepted, (name, accepted)
        if limits.get("default") is not None:
            expected = limits["default"]
            assert default.strip("`") == str(expected) or float(default) == expected, (name, default)
