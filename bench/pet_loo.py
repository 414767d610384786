"""bench/pet_loo: pet-denoise trained with real PET, scored on a phantom it never saw.

The three real PET phantoms in ../shared/data/pet rotate through three roles. For each test
phantom T, the shipped 2 mm model (``models/pet-denoise-drmc-2mm``) is fine-tuned with
``dicomnode train pet-denoise --with-twin`` on

* another phantom's (A) low-dose pairs, DRF 4 and 10, made by ``lowdose_from_pet`` with noise
  seed 11 (bench/pet uses 7), drawn half of the time,
* mixed with the twin: ``--cases`` simulated cases on the 2 mm grid, counts x1-16 (as the
  shipped 2 mm model was trained),

its checkpoint chosen by PSNR on the third phantom's (B) pairs, never on T. T is then scored
by ``python -m bench.pet --real-phantom T`` (noise seed 7, as every bench/pet row), beside the
low-dose input, the 5 mm Gaussian and the validated Gaussian (its width chosen on the other
two phantoms; ``bench.pet``). Each phantom trains one fold, chooses for one and is tested in
one. Results: ``bench/results/pet-loo.json`` (training statistics per fold and every row).

Run: ``.venv/bin/python -m bench.pet_loo [--seconds 720] [--cases 2]``. The twin's cases are
simulated once into bench/work (about 5 min a case on 2 cores); ``--seconds`` is each fold's
training budget (validation included).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from bench.pet import REAL_PHANTOMS, WORK, write_json
from dicomnode.resources import example_data_dir

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "pet-loo.json"
SHIPPED = ROOT / "models" / "pet-denoise-drmc-2mm"
# test phantom: (trained on, checkpoint chosen on)
FOLDS = {"philips-gemini-ctac": ("ge-signa-petmr-fdg", "ge-advance-bigendian"),
         "ge-advance-bigendian": ("philips-gemini-ctac", "ge-signa-petmr-fdg"),
         "ge-signa-petmr-fdg": ("ge-advance-bigendian", "philips-gemini-ctac")}
TRAIN_NOISE_SEED = 11
DRFS = (4, 10)


def low_dose_pairs(name: str) -> list[str]:
    """LOW_DIR:FULL_DIR for ``name`` at each DRF (made once, with the training noise seed)."""
    from dicomnode.research.simulate import POSTFILTER_MM
    from dicomnode.research.simulate_io import lowdose_from_pet

    full = example_data_dir() / "pet" / name
    specs = []
    for drf in DRFS:
        low = WORK / "loo" / f"{name}-drf{drf}-seed{TRAIN_NOISE_SEED}"
        if not low.exists():
            lowdose_from_pet(sorted(p for p in full.iterdir() if p.is_file()), low, drf=drf,
                             seed=TRAIN_NOISE_SEED, postfilter_mm=POSTFILTER_MM)
        specs.append(f"{low}:{full}")
    return specs


def run(cmd: list[str]) -> str:
    print("$", " ".join(cmd), flush=True)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    print(r.stdout[-3000:], r.stderr[-3000:], sep="\n", flush=True)
    r.check_returncode()
    return r.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seconds", type=float, default=720.0,
                        help="training budget of each fold, validation included")
    parser.add_argument("--cases", type=int, default=2, help="simulated twin cases mixed in")
    parser.add_argument("--validate-every", type=float, default=150.0)
    parser.add_argument("--fold", choices=REAL_PHANTOMS, action="append", default=None,
                        help="only the fold testing this phantom (repeated: several)")
    args = parser.parse_args()
    out: dict[str, object] = {"benchmark": "pet-loo", "device": "cpu", "cpus": os.cpu_count(),
                              "start_model": str(SHIPPED.relative_to(ROOT)),
                              "seconds_per_fold": args.seconds, "twin_cases": args.cases,
                              "command": f"python -m bench.pet_loo --seconds {args.seconds:g} "
                                         f"--cases {args.cases}"}
    py = sys.executable
    done: list[dict] = []
    for test in args.fold or REAL_PHANTOMS:
        trained, chosen = FOLDS[test]
        model = WORK / "loo" / f"pet-denoise-loo-{test}"
        t0 = time.perf_counter()
        cmd = [py, "-m", "dicomnode.cli", "train", "pet-denoise", "--output", str(model),
               "--init", str(SHIPPED), "--with-twin", "--cases", str(args.cases),
               "--pet-mm", "2", "--count-scale", "1", "16", "--lesion-weight", "4",
               "--data-cache", str(WORK / "loo" / f"twin-2mm-{args.cases}.npz"),
               "--seconds", f"{args.seconds:g}", "--validate-every", f"{args.validate_every:g}",
               "--version", "1.2.0"]
        for spec in low_dose_pairs(trained):
            cmd += ["--pairs", spec]
        for spec in low_dose_pairs(chosen):
            cmd += ["--validation-pairs", spec]
        log = run(cmd)
        wall = time.perf_counter() - t0
        training = json.loads((model / "training.json").read_text())
        scored = WORK / "loo" / f"bench-{test}.json"
        run([py, "-m", "bench.pet", "--denoise-model", str(model), "--real-phantom", test,
             "--real-counts", "2e5", "--out", str(scored)])
        rows = json.loads(scored.read_text())["pet_denoise"]
        fold = {"test": test, "trained_on": trained, "checkpoint_chosen_on": chosen,
                "wall_seconds": round(wall, 1),
                "training": {k: training.get(k) for k in ("iterations", "seconds", "pairs",
                                                            "checkpoints", "kept")},
                "train_log_tail": log.strip().splitlines()[-4:],
                "rows": [{k: v for k, v in r.items() if k != "model"}
                         | ({"model": f"fold model (trained on {trained}, chosen on {chosen})"}
                            if r["method"] == "DRMC" else {}) for r in rows]}
        # a fold run alone (--fold) replaces its earlier result and keeps the others'
        earlier = json.loads(RESULTS.read_text())["folds"] if RESULTS.exists() else []
        done.append(fold)
        ran = {f["test"] for f in done}
        out["folds"] = sorted([f for f in earlier if f["test"] not in ran] + done,
                              key=lambda f: REAL_PHANTOMS.index(f["test"]))
        write_json(RESULTS, out)


if __name__ == "__main__":
    main()
