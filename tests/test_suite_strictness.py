"""Tests that could pass while the thing they check is broken (issue 30, item 8): a consumer check
(Label Studio, CVAT/datumaro, ultralytics, Ray) goes through conftest.consumer_import, which fails in
CI (FLORENCE_ANNOTATE_STRICT_CONSUMERS=1) instead of skipping on a broken install."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def test_no_test_skips_a_consumer_check_on_its_own():
    found = []
    for path in sorted(TESTS.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Call) and ast.unparse(node.func) == "pytest.importorskip":
                found.append(f"{path.name}:{node.lineno}")
    assert not found, f"use conftest.consumer_import: {found}"
