"""bench/pet's pooled lesion comparison, on rows whose per-lesion errors are known."""

from __future__ import annotations

import pytest
from scipy.stats import wilcoxon

from bench.pet import lesion_summary


def _row(case: str, drf: int, method: str, b_max: list[float], b_mean: list[float]) -> dict:
    return {"case": case, "drf": drf, "method": method, "b_max_per_lesion": b_max,
            "b_mean_per_lesion": b_mean, "b_max_per_lesion_vs_truth": [v / 2 for v in b_max]}


def test_lesion_summary_pools_lesions_over_cases_and_pairs_methods_lesion_by_lesion() -> None:
    """Two 4 mm cases (3 + 2 lesions) and one 2 mm case: pooled means are over lesions (not
    over case means), signs are dropped, DRMC is paired with the filter lesion by lesion,
    and the 2 mm case stays in its own group."""
    rows = [
        _row("simulated whole-body seed 1 z 0-1 mm", 4, "gaussian 5mm", [0.1, -0.2, 0.3], [0.1] * 3),
        _row("simulated whole-body seed 1 z 0-1 mm", 4, "DRMC", [0.05, -0.1, 0.4], [0.2] * 3),
        _row("simulated whole-body seed 2 z 0-1 mm", 4, "gaussian 5mm", [0.2, 0.2], [0.1] * 2),
        _row("simulated whole-body seed 2 z 0-1 mm", 4, "DRMC", [-0.1, 0.1], [0.2] * 2),
        _row("simulated whole-body seed 3 z 0-1 mm, 2 mm grid", 4, "gaussian 5mm", [0.5], [0.5]),
        _row("simulated whole-body seed 3 z 0-1 mm, 2 mm grid", 4, "DRMC", [0.6], [0.6]),
        {"case": "real phantom x", "drf": 4, "method": "DRMC", "psnr": 30.0},  # no lesions
    ]
    by_grid = {s["grid"]: s for s in lesion_summary(rows)}
    assert set(by_grid) == {"4 mm grid", "2 mm grid"}
    four = by_grid["4 mm grid"]
    assert four["cases"] == 2 and four["lesions"] == 5
    assert four["b_max DRMC"] == pytest.approx((0.05 + 0.1 + 0.4 + 0.1 + 0.1) / 5)
    assert four["b_max gaussian 5mm"] == pytest.approx((0.1 + 0.2 + 0.3 + 0.2 + 0.2) / 5)
    assert four["b_max_vs_truth DRMC"] == pytest.approx(four["b_max DRMC"] / 2)
    assert four["b_max lesions DRMC better"] == 4  # all but the 0.4 vs 0.3 lesion
    assert four["b_mean lesions DRMC better"] == 0
    # the test is run on the five lesions' unsigned errors, paired lesion by lesion in case order
    drmc, filt = [0.05, 0.1, 0.4, 0.1, 0.1], [0.1, 0.2, 0.3, 0.2, 0.2]
    assert four["b_max wilcoxon p"] == pytest.approx(wilcoxon(drmc, filt).pvalue)
    assert four["b_mean wilcoxon p"] == pytest.approx(
        wilcoxon([0.2] * 5, [0.1] * 5).pvalue)
    assert four["b_mean wilcoxon p"] < four["b_max wilcoxon p"]  # 5 of 5 worse vs 4 of 5 better
    assert by_grid["2 mm grid"]["lesions"] == 1
