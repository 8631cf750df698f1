"""The dependency floors in pyproject.toml are what the suite runs on (issue 30, item 9): each floor is
no higher than the installed version and in its major series (a floor two majors back was never
tested), and polars is new enough for the scan keywords store.scan_parts uses."""

from __future__ import annotations

import re
import tomllib
from importlib.metadata import version
from pathlib import Path

from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]


def floors() -> dict[str, Version]:
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    out = {}
    for dep in deps:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)(?:\[[^]]*\])?>=([0-9.]+)", dep.replace(" ", ""))
        assert m, f"{dep}: every main dependency has a plain >= floor"
        out[m.group(1)] = Version(m.group(2))
    return out


def test_floors_are_the_tested_series():
    wrong = []
    for name, floor in floors().items():
        installed = Version(version(name).split("+")[0])
        if floor > installed or floor.major != installed.major:
            wrong.append(f"{name}>={floor} (tested: {installed})")
    assert not wrong


def test_polars_floor_has_the_scan_keywords():
    assert floors()["polars"] >= Version("1.30")  # scan_parquet(missing_columns=, extra_columns=)
