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


def test_validated_gaussian_chooses_its_width_on_the_other_cases_never_on_the_scored_one() -> None:
    """Three 'real' cases at DRF 4 whose PSNR sweeps peak at different widths: each case gets
    the width best on average over the other two, not its own best; a simulated case and a
    DRF 10 case have no other case of their kind and DRF, so they get no row."""
    import numpy as np

    from bench.pet import GAUSS_FWHMS_MM, validated_gaussian_rows

    rng = np.random.default_rng(0)
    ref = np.zeros((12, 12, 12), np.float32)
    ref[4:8, 4:8, 4:8] = 1.0
    low = (ref + rng.normal(0, 0.2, ref.shape)).astype(np.float32)

    def case(name: str, best: float, kind: str = "real", drf: int = 4) -> dict:
        sweep = {f: 30.0 - abs(f - best) for f in GAUSS_FWHMS_MM}
        return {"kind": kind, "case": name, "drf": drf, "low": low, "ref": ref,
                "spacing": (2.0, 2.0, 2.0), "lesions": None, "truth": None,
                "extra": {"counts_per_slice": 1.0}, "sweep": sweep}

    cases = [case("a", 2.0), case("b", 4.0), case("c", 12.0), case("s", 5.0, "simulated"),
             case("d", 6.0, drf=10)]
    rows = {r["case"]: r for r in validated_gaussian_rows(cases)}
    assert set(rows) == {"a", "b", "c"}
    # a: mean over b (peak 4) and c (peak 12) is flat between 4 and 12; the first such width
    assert rows["a"]["fwhm_mm"] == 4.0 and rows["a"]["fwhm_best_on_this_case"] == 2.0
    assert rows["b"]["fwhm_mm"] == 2.0 and rows["b"]["fwhm_chosen_on"] == ["a", "c"]
    assert rows["c"]["fwhm_mm"] == 2.0 and rows["c"]["fwhm_best_on_this_case"] == 12.0
    assert rows["a"]["method"] == "gaussian validated" and rows["a"]["counts_per_slice"] == 1.0
    # the row's PSNR is the chosen filter's on the case itself
    from bench.pet import psnr
    from dicomnode.research.simulate import gaussian_fwhm

    assert rows["b"]["psnr"] == psnr(gaussian_fwhm(low, (2.0, 2.0, 2.0), 2.0), ref)
