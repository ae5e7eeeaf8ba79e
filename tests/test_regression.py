"""Regression anchor: the seeded 10-step tiny DuMo run reproduces the losses pinned in tests/assets."""
from __future__ import annotations

import json
import math

from regression_run import ASSET, KEYS, OVERRIDES, run


def test_pinned_losses(tmp_path):
    with open(ASSET) as f:
        pinned = json.load(f)
    assert pinned["overrides"] == OVERRIDES, "the pinned run's config changed: regenerate on purpose"
    rows = run(str(tmp_path))
    assert [r["step"] for r in rows] == list(range(1, 11))
    for got, want in zip(rows, pinned["rows"]):
        for k in KEYS:
            assert math.isclose(got[k], want[k], rel_tol=1e-4, abs_tol=1e-6), (got["step"], k, got[k], want[k])
    # the run actually trains: its losses move
    assert len({round(r["loss"], 3) for r in rows}) > 5
