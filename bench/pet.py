"""bench/pet: DRMC and district CT->PET on data held out from training.

pet-denoise, for DRF 4 and 10:
* the real PET phantoms in ../shared/data/pet (BQML ones in SUV, the PROPCNTS one in
  pseudo-SUV), each made low dose by ``lowdose_from_pet`` (OSEM and the twin's 4 mm
  post-filter); reference: the original series;
* simulated cases from the PET/CT twin: whole-body phantoms with organ uptake and 8 lesions
  (6-15 mm radius), seeds not used in training (1000+), a 400 mm window each on the 4 mm PET
  grid (abdomen-thorax; thorax-head; seeds 1000, 1001 and 1005-1010) and a 250 mm window on a
  2 mm grid (the real phantoms' voxel size; seed 1002); reference: the full-dose
  reconstruction, with lesion masks for the SUV biases (lesions of at least 1 ml); every
  reconstruction post-filtered (4 mm).
Methods: the low-dose input, a Gaussian filter (5 mm FWHM, fixed beforehand), the validated
Gaussian (its FWHM, 2-12 mm, chosen by mean PSNR on the other cases of the same kind at the same
DRF, never on the case scored: leave one phantom out for the real phantoms), DRMC (the shipped models, each
case denoised by the one the pipeline would choose for its voxel size, its input scaled into
the model's training activity range as the pipeline does; the row says which, and the scale).
Metrics: PSNR (data range: the reference's maximum), SSIM (3-D, Gaussian sigma 1.5), and in
lesions, B_mean = |SUVmean_pred - SUVmean_ref| / SUVmean_ref and the same for SUVmax (DRMC
paper, following Zhou et al.), averaged over lesions; on simulated cases also against the
noise-free activity (``*_vs_truth``). ``pet_denoise_lesions`` pools the simulated cases'
lesions per PET grid and DRF and pairs DRMC with the filter lesion by lesion (how many
lesions each wins, Wilcoxon signed-rank p), since a case holds only 5-8 lesions.

ct2pet: whole-body phantoms (seeds 1000+; the shipped model saw seeds 1-5 and lidc-idri-0001)
against the twin's noise-free activity (organ uptake drawn per case): MAE, PSNR, SSIM in the
body, MAE per district, mean SUV per organ (predicted, true); whole-body model vs district
models.

Times are CPU seconds per case on this machine. Results: bench/results/pet.json.
Run: ``.venv/bin/python -m bench.pet``; candidate DRMC models:
``--denoise-model DIR [--denoise-model DIR2] --out FILE`` (pet-denoise rows only, into FILE;
with several, each case goes to the one chosen by voxel size, as in the pipeline);
the real phantoms at other noise levels: ``--real-counts C [C ...] --out FILE`` (the expected
counts per slice ``lowdose_from_pet`` gives each slice before thinning, default 2e5; only the
real phantoms run). Real-phantom rows carry ``counts_per_object_voxel``: the low-dose counts
per voxel of the object (smoothed reference above 10 % of its maximum), the measure the
twin's cases are compared by (docs/research/pet-experiments.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.ndimage import gaussian_filter

from dicomnode.research.simulate import PET_MM
from dicomnode.research.training import BENCH_PHANTOM_SEEDS
from dicomnode.resources import example_data_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pet.json"
DATA = example_data_dir()
WORK = ROOT / "bench" / "work" / "pet"
# held-out simulated cases for pet-denoise: (phantom seed, heights above the soles in mm, PET
# voxel size in mm); the shipped model saw phantom seeds 1-7
SIMULATED_DENOISE = ((1000, (900.0, 1300.0), PET_MM), (1001, (1250.0, 1650.0), PET_MM),
                     (1002, (1000.0, 1250.0), 2.0),
                     # six more 4 mm cases (23-37 s each to simulate): with two, the SUVmax
                     # comparison with the filter rested on 14 lesions and turned on a few
                     *((s, ((900.0, 1300.0), (1250.0, 1650.0))[s % 2], PET_MM)
                       for s in range(1005, 1011)))
# lesions smaller than this many PET voxels (1 ml at 4 mm) are left out of the SUV biases: at
# 1-2 PSF widths their mean is mostly partial volume and the relative bias mostly noise
MIN_LESION_VOXELS = 16
# held-out whole-body phantoms for ct2pet (the shipped models were trained on seeds 1-5 and
# chosen on 500-501); one case takes about 1 min on 2 cores (each model over its own districts
# only, in 32^3 patches, stride 16)
CT2PET_SEEDS = BENCH_PHANTOM_SEEDS[:3]
REAL_COUNTS_PER_SLICE = 2e5  # lowdose_from_pet's default: the real raw counts are not in DICOM
REAL_PHANTOMS = ("philips-gemini-ctac", "ge-advance-bigendian", "ge-signa-petmr-fdg")
# the filter widths the validated Gaussian chooses between (FWHM, mm)
GAUSS_FWHMS_MM = (2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0)
SHIPPED_CT2PET_SAW = {**{s: "trained" for s in range(1, 6)}, 500: "chosen", 501: "chosen"}
warnings.simplefilter("ignore")


def psnr(pred: np.ndarray, ref: np.ndarray, data_range: float | None = None) -> float:
    mse = float(np.mean((pred - ref) ** 2))
    return 10 * np.log10((data_range or float(ref.max())) ** 2 / mse)


def ssim3d(a: np.ndarray, b: np.ndarray, data_range: float | None = None) -> float:
    rng = data_range or float(b.max() - b.min()) or 1.0
    c1, c2 = (0.01 * rng) ** 2, (0.03 * rng) ** 2
    mu_a, mu_b = gaussian_filter(a, 1.5), gaussian_filter(b, 1.5)
    saa = gaussian_filter(a * a, 1.5) - mu_a ** 2
    sbb = gaussian_filter(b * b, 1.5) - mu_b ** 2
    sab = gaussian_filter(a * b, 1.5) - mu_a * mu_b
    return float(np.mean((2 * mu_a * mu_b + c1) * (2 * sab + c2)
                         / ((mu_a ** 2 + mu_b ** 2 + c1) * (saa + sbb + c2))))


def lesion_bias(pred: np.ndarray, ref: np.ndarray, lesions: np.ndarray,
                min_voxels: int = MIN_LESION_VOXELS) -> dict[str, float]:
    bm, bx = [], []
    for i in range(1, int(lesions.max()) + 1):
        m = lesions == i
        if m.sum() < min_voxels:
            continue
        bm.append((pred[m].mean() - ref[m].mean()) / ref[m].mean())
        bx.append((pred[m].max() - ref[m].max()) / ref[m].max())
    if not bm:
        return {"b_mean": float("nan"), "b_max": float("nan"), "lesions": 0}
    # the DRMC definitions average the absolute relative errors; the signed means say which
    # way a method errs (below 0: lower than the reference); the per-lesion signed errors
    # let lesion_summary pool lesions over cases and pair methods lesion by lesion
    return {"b_mean": float(np.mean(np.abs(bm))), "b_max": float(np.mean(np.abs(bx))),
            "b_mean_signed": float(np.mean(bm)), "b_max_signed": float(np.mean(bx)),
            "lesions": len(bm), "b_mean_per_lesion": [round(float(v), 5) for v in bm],
            "b_max_per_lesion": [round(float(v), 5) for v in bx]}


def lesion_summary(rows: list[dict], method: str = "DRMC", baseline: str = "gaussian 5mm"
                   ) -> list[dict]:
    """The simulated cases' lesions pooled per PET grid and DRF: each method's mean absolute
    SUVmean / SUVmax bias over all lesions (against the full-dose image and against the
    noise-free activity), and ``method`` paired with ``baseline`` lesion by lesion: in how
    many lesions its absolute error is the smaller, and the two-sided Wilcoxon signed-rank p
    of the paired absolute errors (the DRMC paper marks p < 0.05)."""
    from scipy.stats import wilcoxon

    groups: dict[tuple[str, int], dict[str, dict[str, list[float]]]] = {}
    for r in rows:
        if "b_max_per_lesion" not in r:
            continue
        grid = r["case"].split(", ")[1] if ", " in r["case"] else f"{PET_MM:g} mm grid"
        per = groups.setdefault((grid, r["drf"]), {}).setdefault(r["method"], {})
        for key in ("b_mean_per_lesion", "b_max_per_lesion", "b_mean_per_lesion_vs_truth",
                    "b_max_per_lesion_vs_truth"):
            per.setdefault(key, []).extend(abs(v) for v in r.get(key, []))
        per.setdefault("cases", []).append(r["case"])
    out = []
    for (grid, drf), methods in groups.items():
        row: dict[str, object] = {"grid": grid, "drf": drf,
                                  "cases": len(methods[baseline]["cases"]),
                                  "lesions": len(methods[baseline]["b_max_per_lesion"])}
        for name, per in methods.items():
            for key, values in per.items():
                if key != "cases" and values:
                    row[f"{key.replace('_per_lesion', '')} {name}"] = float(np.mean(values))
        for key in ("b_max_per_lesion", "b_max_per_lesion_vs_truth", "b_mean_per_lesion"):
            a = np.array(methods[method].get(key, []))
            b = np.array(methods[baseline].get(key, []))
            if len(a) and len(a) == len(b):
                short = key.replace("_per_lesion", "")
                row[f"{short} lesions {method} better"] = int(np.sum(a < b))
                row[f"{short} wilcoxon p"] = (1.0 if np.array_equal(a, b)
                                              else float(wilcoxon(a, b).pvalue))
        out.append(row)
    return out


def validated_gaussian_rows(cases: list[dict]) -> list[dict]:
    """The best Gaussian filter without looking at the test series: for each case, the FWHM
    (of ``GAUSS_FWHMS_MM``) with the highest mean PSNR over the *other* cases of the same kind
    (real phantoms, or simulated cases) at the same DRF, then scored on the case itself.
    ``cases``: dicts with kind, case, drf, low, ref, spacing, lesions, truth, extra and the
    PSNR ``sweep`` per FWHM. A case with no other case of its kind and DRF gets no row."""
    from dicomnode.research.simulate import gaussian_fwhm

    rows = []
    for c in cases:
        others = [o for o in cases if o is not c and o["kind"] == c["kind"]
                  and o["drf"] == c["drf"]]
        if not others:
            continue
        fwhm = max(GAUSS_FWHMS_MM, key=lambda f: float(np.mean([o["sweep"][f] for o in others])))
        img = gaussian_fwhm(c["low"], c["spacing"], fwhm)
        row = {"case": c["case"], "drf": c["drf"], "method": "gaussian validated",
               "psnr": psnr(img, c["ref"]), "ssim": ssim3d(img, c["ref"]), "fwhm_mm": fwhm,
               "fwhm_chosen_on": sorted(o["case"] for o in others),
               # the width that would have been best on this case itself (not used)
               "fwhm_best_on_this_case": max(GAUSS_FWHMS_MM, key=lambda f: c["sweep"][f]),
               **c["extra"]}
        if c["lesions"] is not None:
            row.update(lesion_bias(img, c["ref"], c["lesions"]))
            if c["truth"] is not None:
                row.update({f"{k}_vs_truth": v for k, v
                            in lesion_bias(img, c["truth"], c["lesions"]).items()
                            if k != "lesions"})
        rows.append(row)
        print_row(row)
    return rows


def print_row(row: dict) -> None:
    """One results row on stdout as the run goes, rounded, without the per-lesion lists."""
    print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v)
                      for k, v in row.items() if "per_lesion" not in k}), flush=True)


def write_json(path: Path, payload: dict) -> None:
    """A results file (the shipped models' or a candidate's)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2))


def ct2pet_rows(gens: dict, seeds: tuple[int, ...]) -> list[dict]:
    """Whole-body model vs district models on held-out whole-body phantoms (one row each)."""
    from scipy.ndimage import zoom

    from dicomnode.pipelines.ct2pet import district_masks, synthesize
    from dicomnode.research.phantom import whole_body
    from dicomnode.research.simulate import pet_truth

    ct_rows = []
    for seed in seeds:
        body = whole_body(seed)
        hu, spacing, affine = body.hu, body.spacing, body.affine
        truth4, _, _ = pet_truth(hu, spacing, rng=np.random.default_rng(seed), lesions=0,
                                 organs=body.organs)
        truth = np.clip(zoom(truth4, [t / s for s, t in zip(truth4.shape, hu.shape,
                                                            strict=True)], order=1), 0, 20)
        truth = truth[: hu.shape[0], : hu.shape[1], : hu.shape[2]]
        inside = hu > -500
        districts = district_masks(hu, spacing, affine)
        for districts_on, label in ((False, "whole-body model"), (True, "district models")):
            t0 = time.perf_counter()
            pred = synthesize(gens, hu, spacing, affine, districts_on=districts_on)
            secs = time.perf_counter() - t0
            n = tuple(min(a, b) for a, b in zip(pred.shape, truth.shape, strict=True))
            p, t, b = (x[: n[0], : n[1], : n[2]] for x in (pred, truth, inside))
            row = {"case": f"whole-body phantom seed {seed}", "method": label,
                   "mae_suv": float(np.abs(p - t)[b].mean()),
                   "mae_norm": float(np.abs(p - t)[b].mean() / 20),
                   # the district paper's convention: SUV clipped to [0, 20] and divided by 20
                   "psnr": psnr(p / 20, t / 20, data_range=1.0),
                   "ssim": ssim3d(p / 20, t / 20, data_range=1.0),
                   "mean_suv_outside_body": float(p[~b].mean()), "seconds": secs}
            for d, m in districts.items():
                m = m[: n[0], : n[1], : n[2]]
                if m.any():
                    row[f"mae_suv_{d}"] = float(np.abs(p - t)[m].mean())
            for organ, m in body.organs.items():
                m = m[: n[0], : n[1], : n[2]]
                row[f"suv_{organ}"] = [round(float(p[m].mean()), 3), round(float(t[m].mean()), 3)]
            ct_rows.append(row)
            print_row(row)
    return ct_rows


def main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--only", choices=["pet-denoise", "ct2pet"], default=None,
                        help="run one part and merge it into the existing results file")
    parser.add_argument("--ct2pet-model", type=Path, default=None,
                        help="a candidate ct2pet model directory instead of the shipped one; "
                             "only ct2pet runs, and its rows go to --out, not pet.json")
    parser.add_argument("--denoise-model", type=Path, action="append", default=None,
                        help="a candidate pet-denoise model directory instead of the shipped "
                             "ones (repeated: chosen between by voxel size, as the pipeline "
                             "does); only pet-denoise runs, and its rows go to --out")
    parser.add_argument("--out", type=Path, default=RESULTS.parent / "pet-candidate.json",
                        help="results file of a --ct2pet-model or --denoise-model run")
    parser.add_argument("--real-counts", type=float, nargs="+", default=None,
                        help="counts per slice of the real phantoms' simulated low dose "
                             f"(default {REAL_COUNTS_PER_SLICE:g}); only the real phantoms "
                             "run, and their rows go to --out")
    parser.add_argument("--real-phantom", choices=REAL_PHANTOMS, action="append", default=None,
                        help="only this real phantom (repeated: several); with one, no "
                             "validated Gaussian (it is chosen on the other phantoms)")
    parser.add_argument("--grid", type=float, action="append", default=None,
                        help="with --denoise-model: only the simulated cases on this PET grid "
                             "in mm (repeated: several), no real phantoms; a quicker screen "
                             "of a candidate, not the benchmark")
    parser.add_argument("--ct2pet-seeds", type=int, nargs="+", default=list(CT2PET_SEEDS),
                        help="held-out whole-body phantom seeds for ct2pet (not 1-5, 500-501: training, choice)")
    args = parser.parse_args()
    if args.grid and args.denoise_model is None:
        parser.error("--grid screens a --denoise-model candidate; the benchmark runs every case")
    from dicomnode.dicom.volume import load_series
    from dicomnode.pipelines.ct2pet import load_generators
    from dicomnode.pipelines.models import load_entry, load_network, scan_models
    from dicomnode.pipelines.pet_denoise import (
        DEFAULT_MODELS,
        choose_model,
        denoise,
        input_scale,
        to_suv,
    )
    from dicomnode.research import phantom, simulate, simulate_io
    from dicomnode.research.phantom import whole_body
    from dicomnode.research.simulate import (
        POSTFILTER_MM,
        PetTwin,
        gaussian_fwhm,
        simulate_pet,
    )
    from dicomnode.research.simulate_io import lowdose_from_pet

    seeds = tuple(args.ct2pet_seeds)
    seen = {s: SHIPPED_CT2PET_SAW[s] for s in seeds if s in SHIPPED_CT2PET_SAW}
    if seen:
        parser.error(f"phantom seeds {seen}: these trained or chose the shipped ct2pet models "
                     "(seeds 1-5 trained them, 500-501 chose among training seeds)")
    if args.ct2pet_model is not None:
        entry = load_entry(args.ct2pet_model)
        candidate = {"benchmark": "pet", "device": "cpu", "cpus": os.cpu_count(),
                     "model": f"{args.ct2pet_model} ({entry.manifest.name} "
                              f"{entry.manifest.version}: {entry.manifest.trained_on})",
                     "ct2pet": ct2pet_rows(load_generators(entry, "cpu"), seeds),
                     "command": f"python -m bench.pet --ct2pet-model {args.ct2pet_model} "
                                f"--ct2pet-seeds {' '.join(map(str, seeds))} --out {args.out}"}
        write_json(args.out, candidate)
        return
    models, problems = scan_models(ROOT / "models")
    assert not problems, problems
    denoise_entries = ([models[n] for n in DEFAULT_MODELS if n in models]
                       if args.denoise_model is None
                       else [load_entry(d) for d in args.denoise_model])
    drmcs = [load_network(e, device="cpu") for e in denoise_entries]
    out: dict[str, object] = {"benchmark": "pet", "device": "cpu", "cpus": os.cpu_count()}
    if args.denoise_model is not None or args.real_counts is not None:
        args.only = "pet-denoise"
    if args.denoise_model is not None:
        out["model"] = "; ".join(f"{d} ({e.manifest.name} {e.manifest.version}: "
                                 f"{e.manifest.trained_on})"
                                 for d, e in zip(args.denoise_model, denoise_entries, strict=True))
    rows = []
    swept: list[dict] = []  # each case's Gaussian sweep, for the validated Gaussian

    def evaluate(case: str, drf: int, low: np.ndarray, ref: np.ndarray, spacing: tuple,
                 lesions: np.ndarray | None, truth: np.ndarray | None = None,
                 extra: dict | None = None) -> None:
        t0 = time.perf_counter()
        drmc = choose_model(drmcs, spacing)
        scale, _ = input_scale(drmc, low)
        enhanced = denoise(drmc, low, roi=32, scale=scale)
        t_drmc = time.perf_counter() - t0
        for method, img in (("low-dose", low), ("gaussian 5mm", gaussian_fwhm(low, spacing, 5.0)),
                            ("DRMC", enhanced)):
            row = {"case": case, "drf": drf, "method": method, "psnr": psnr(img, ref),
                   "ssim": ssim3d(img, ref), **(extra or {})}
            if lesions is not None:
                row.update(lesion_bias(img, ref, lesions))
            if lesions is not None and truth is not None:
                # the same biases against the noise-free activity (the twin knows it): the
                # full-dose image's own noise raises its SUVmax, which the DRMC definition
                # (against the full-dose image) rewards in any method that keeps noise
                row.update({f"{k}_vs_truth": v for k, v in lesion_bias(img, truth, lesions).items()
                            if k != "lesions"})
            if method == "DRMC":
                row["seconds"] = t_drmc
                row["model"] = f"{drmc.entry.manifest.name} {drmc.entry.manifest.version}"
                row["input_scale"] = round(scale, 4)
            rows.append(row)
            print_row(row)
        swept.append({"kind": case.split(" ")[0], "case": case, "drf": drf, "low": low,
                      "ref": ref, "spacing": spacing, "lesions": lesions, "truth": truth,
                      "extra": extra or {},
                      "sweep": {f: psnr(gaussian_fwhm(low, spacing, f), ref)
                                for f in GAUSS_FWHMS_MM}})

    # simulated inputs are cached in WORK per version of the twin's code
    twin_code = hashlib.sha256(b"".join(
        Path(m.__file__).read_bytes() for m in (simulate, simulate_io, phantom) if m.__file__)
    ).hexdigest()[:12]
    previous = (json.loads(RESULTS.read_text())
                if args.only and args.denoise_model is None and RESULTS.exists() else {})
    out.update({k: v for k, v in previous.items()
                if k in ("pet_denoise", "pet_denoise_lesions", "ct2pet")})
    names = () if args.only == "ct2pet" or args.grid else tuple(args.real_phantom
                                                                 or REAL_PHANTOMS)
    for name in names:  # the reference read once, made low dose at every count level asked
        src = sorted(p for p in (DATA / "pet" / name).iterdir() if p.is_file())
        ref_vol = load_series(src)
        ref, factor, _ = to_suv(ref_vol)
        ref = np.clip(ref, 0, None)
        obj = gaussian_fwhm(ref, ref_vol.spacing, 8.0) > 0.1 * ref.max()
        slices_with_object = int(np.count_nonzero(obj.sum(axis=(1, 2))))
        for counts, drf in ((c, d) for c in args.real_counts or (REAL_COUNTS_PER_SLICE,)
                            for d in (4, 10)):
            folder = WORK / (f"{name}-drf{drf}-postfilter{POSTFILTER_MM:g}mm-{twin_code}"
                             + ("" if counts == REAL_COUNTS_PER_SLICE else f"-counts{counts:g}"))
            if not folder.exists():
                lowdose_from_pet(src, folder, drf=drf, seed=7, postfilter_mm=POSTFILTER_MM,
                                 counts_per_slice=counts)
            low = load_series(sorted(folder.iterdir())).array * factor
            density = counts / drf * slices_with_object / max(int(obj.sum()), 1)
            evaluate(f"real phantom {name}", drf, low, ref, ref_vol.spacing, None,
                     extra={"counts_per_slice": counts,
                            "counts_per_object_voxel": round(density, 3)})
    for seed, window, pet_mm in (() if args.only == "ct2pet" or args.real_counts is not None
                                 else [c for c in SIMULATED_DENOISE
                                       if not args.grid or c[2] in args.grid]):
        cache = WORK / (f"twin-seed{seed}-z{window[0]:.0f}-{window[1]:.0f}-{pet_mm:g}mm-"
                        f"{twin_code}.npz")
        if cache.exists():
            with np.load(cache) as z:
                twin = PetTwin(truth=z["truth"], full=z["full"], lesions=z["lesions"],
                               low={4: z["low4"], 10: z["low10"]},
                               spacing=tuple(float(v) for v in z["spacing"]))
        else:
            body = whole_body(seed, z_range_mm=window)
            t0 = time.perf_counter()
            twin = simulate_pet(body.hu, body.spacing, drfs=(4, 10), seed=seed, angles=64,
                                pet_mm=pet_mm, lesions=8, radius_mm=(6.0, 15.0), organs=body.organs,
                                processes=os.cpu_count() or 1)
            print(f"simulated seed {seed} {window} in {time.perf_counter() - t0:.0f} s",
                  flush=True)
            cache.parent.mkdir(parents=True, exist_ok=True)
            np.savez(cache, truth=twin.truth, full=twin.full, lesions=twin.lesions,
                     low4=twin.low[4], low10=twin.low[10], spacing=np.array(twin.spacing))
        for drf, low in twin.low.items():
            evaluate(f"simulated whole-body seed {seed} z {window[0]:.0f}-{window[1]:.0f} mm"
                     + ("" if pet_mm == PET_MM else f", {pet_mm:g} mm grid"),
                     drf, low, twin.full, twin.spacing, twin.lesions, twin.truth)
    rows += validated_gaussian_rows(swept)
    if args.only != "ct2pet" and args.real_counts is None:
        out["pet_denoise_lesions"] = lesion_summary(rows)
        for summary in out["pet_denoise_lesions"]:
            print_row(summary)
    if args.denoise_model is not None or args.real_counts is not None:
        out["pet_denoise"] = rows
        out["command"] = ("python -m bench.pet "
                          + "".join(f"--denoise-model {d} " for d in args.denoise_model or ())
                          + "".join(f"--grid {g:g} " for g in args.grid or ())
                          + "".join(f"--real-phantom {n} " for n in args.real_phantom or ())
                          + ("" if args.real_counts is None else
                             f"--real-counts {' '.join(f'{c:g}' for c in args.real_counts)} ")
                          + f"--out {args.out}")
        write_json(args.out, out)
        return
    if args.only != "ct2pet":
        out["pet_denoise"] = rows

    ct_rows = [] if args.only == "pet-denoise" else ct2pet_rows(
        load_generators(models["ct2pet-district"], "cpu"), seeds)
    if args.only != "pet-denoise":
        out["ct2pet"] = ct_rows
    out["command"] = "python -m bench.pet" + (
        "" if seeds == CT2PET_SEEDS else f" --ct2pet-seeds {' '.join(map(str, seeds))}")
    write_json(RESULTS, out)


if __name__ == "__main__":
    main()
