"""bench/sr: SR4ZCT against linear and cubic interpolation on lidc-idri-0001.

The 2.5 mm LIDC series is the ground truth. Thick acquisitions of 5 mm / 2.5 mm overlap and
7.5 mm / 2.5 mm overlap are simulated from it (F_down along z: 9-point box average over each
thick slice), then brought back to the 2.5 mm grid by linear interpolation, cubic
interpolation (a cubic spline through the thick slice centres) and SR4ZCT (trained on the thick
volume's own axial images for the settings' default number of iterations).

Metrics, as in the paper: PSNR and SSIM of the coronal and the sagittal images, averaged over
images, on the body's bounding box (empty regions cropped), HU clipped to [-1024, 3071] with
data range 4095. SSIM: Gaussian window sigma 1.5, K1 0.01, K2 0.03. Also wall time and peak
resident memory. Reference: the paper's Table 1 (5 mm / 2.5 mm, lung CT: original 31.43 dB,
SR4ZCT 38.46 dB coronal); the absolute numbers differ (another target resolution and data
range), the comparison with the interpolations in the same run is what counts.

Training iterations, training time and applying time are reported separately: the budget is
iterations, so the quality does not depend on how busy the machine was; the times do.

Run: ``.venv/bin/python -m bench.sr [--iterations N]``. Results: bench/results/sr.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.interpolate import CubicSpline
from scipy.ndimage import gaussian_filter

from dicomnode.dicom.volume import load_series
from dicomnode.pipelines.ct_tissue import body_mask
from dicomnode.pipelines.sr4zct import (
    SRBudget,
    _centres,
    _interp_matrix,
    apply_axis,
    cpu_has_bf16,
    degrade_matrix,
    super_resolve,
)
from dicomnode.resources import example_data_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "sr.json"
LIDC = example_data_dir() / "ct" / \
    "lidc-idri-0001"
warnings.simplefilter("ignore")
LO, HI = -1024.0, 3071.0


def psnr2d(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10((HI - LO) ** 2 / mse)


def ssim2d(a: np.ndarray, b: np.ndarray) -> float:
    c1, c2 = (0.01 * (HI - LO)) ** 2, (0.03 * (HI - LO)) ** 2
    mu_a, mu_b = gaussian_filter(a, 1.5), gaussian_filter(b, 1.5)
    saa = gaussian_filter(a * a, 1.5) - mu_a ** 2
    sbb = gaussian_filter(b * b, 1.5) - mu_b ** 2
    sab = gaussian_filter(a * b, 1.5) - mu_a * mu_b
    num = (2 * mu_a * mu_b + c1) * (2 * sab + c2)
    den = (mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2)
    return float(np.mean(num / den))


def views(pred: np.ndarray, gt: np.ndarray) -> dict[str, float]:
    p, g = np.clip(pred, LO, HI).astype(np.float64), np.clip(gt, LO, HI).astype(np.float64)
    out = {}
    for name, axis in (("coronal", 1), ("sagittal", 2)):
        ps, ss = [], []
        for i in range(g.shape[axis]):
            a, b = np.take(p, i, axis=axis), np.take(g, i, axis=axis)
            ps.append(psnr2d(a, b))
            ss.append(ssim2d(a, b))
        out[f"{name}_psnr"] = float(np.mean(ps))
        out[f"{name}_ssim"] = float(np.mean(ss))
    return out


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--iterations", type=int, default=SRBudget().iterations)
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto",
                        help="bfloat16 convolutions when applying (auto: where the CPU has it)")
    args = parser.parse_args()
    vol = load_series(sorted(LIDC.glob("*.dcm")))
    body = body_mask(vol.array)
    rows = np.nonzero(body.any(axis=(0, 2)))[0]
    cols = np.nonzero(body.any(axis=(0, 1)))[0]
    gt = vol.array[:, rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1].copy()
    r_xy, r0 = float(vol.spacing[1]), float(vol.spacing[0])
    print(f"ground truth {gt.shape} (body bounding box), {r0} mm slices", flush=True)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for r, o in ((5.0, 2.5), (7.5, 2.5)):
        key = f"{r:g}mm/{o:g}mm overlap"
        thick = apply_axis(degrade_matrix(gt.shape[0], r0, 0, r, o), gt, 0)
        z_gt, z_thick = _centres(gt.shape[0], r0, 0), _centres(thick.shape[0], r, o)
        entry: dict[str, dict[str, float]] = {}
        t0 = time.perf_counter()
        linear = apply_axis(_interp_matrix(z_gt, z_thick), thick, 0)
        entry["linear"] = {**views(linear, gt), "seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        cubic = CubicSpline(z_thick, thick, axis=0, extrapolate=True)(
            np.clip(z_gt, z_thick[0], z_thick[-1])).astype(np.float32)
        entry["cubic"] = {**views(cubic, gt), "seconds": time.perf_counter() - t0}
        t0 = time.perf_counter()
        sr, stats = super_resolve(thick, r_xy=r_xy, r_z=r, o_z=o, r_target=r0,
                                  budget=SRBudget(iterations=args.iterations),
                                  bf16={"auto": None, "on": True, "off": False}[args.bf16])
        n = min(len(sr), len(gt))
        # the SR grid starts at the same place (first thick slice's lower edge); it may end one
        # slice short of the ground truth: compare the common slices, for all three methods
        entry["sr4zct"] = {**views(sr[:n], gt[:n]), "seconds": time.perf_counter() - t0,
                           "peak_rss_mib": peak_rss_mib(), **stats}
        entry["linear_common"] = views(linear[:n], gt[:n])
        entry["cubic_common"] = views(cubic[:n], gt[:n])
        results[key] = entry
        for m in ("linear_common", "cubic_common", "sr4zct"):
            e = entry[m]
            print(f"{key:22} {m:14} cor {e['coronal_psnr']:.2f} dB / {e['coronal_ssim']:.4f}  "
                  f"sag {e['sagittal_psnr']:.2f} dB / {e['sagittal_ssim']:.4f}", flush=True)
        e = entry["sr4zct"]
        print(f"{key:22} SR4ZCT {e['iterations']:.0f} iterations, train {e['train_s']:.0f} s, "
              f"apply {e['apply_s']:.0f} s", flush=True)
    met = all(
        results[k]["sr4zct"][f"{v}_{m}"] > max(results[k]["linear_common"][f"{v}_{m}"],
                                               results[k]["cubic_common"][f"{v}_{m}"])
        for k in results for v in ("coronal", "sagittal") for m in ("psnr", "ssim"))
    out = {"benchmark": "sr", "data": "lidc-idri-0001 (2.5 mm), body bounding box",
           "shape": list(gt.shape), "device": "cpu", "cpus": os.cpu_count(),
           "iterations": args.iterations, "bf16": args.bf16,
           "cpu_has_bf16": cpu_has_bf16(), "results": results,
           "target_met": met,
           "target": "SR4ZCT beats linear and cubic on PSNR and SSIM, coronal and sagittal, "
                     "at both settings",
           "command": f"python -m bench.sr --iterations {args.iterations} --bf16 {args.bf16}"}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(out, indent=2))
    print(f"target met: {met}")


if __name__ == "__main__":
    main()
