"""Training the ``petct-lesions`` middle-fusion U-Net (``dicomnode train petct-lesions``).

Recipe (METHODS.md, the seed paper), with the CPU budget of this project:

* inputs on the PET grid: CT clipped to [-1000, 1000] HU and scaled to [0, 1]; SUV divided by
  20 or by 40, chosen at random per patch (the paper's intensity augmentation);
* 32^3 patches (128 mm at 4 mm), half of them centred on a lesion voxel, mirrored at random
  along each axis; batch 4;
* loss: soft Dice + focal (gamma 2), on the sigmoid of one logit per voxel;
* Adam, learning rate 1e-3 falling to 1e-4 on a cosine;
* weight averaging: the weights written are the mean of those at every step of the last
  ``average_share`` of training (stochastic weight averaging), as the paper averages the end
  of training.

Training data: the PET/CT twin (``simulate``'s chest phantom with spherical lesions, phantom
seeds from 3000, never used by the bench), or a site's own labelled studies
(:func:`labelled_study`: one folder per study with its CT series, its PET series and a SEG of
the lesions drawn on either). The budget is in iterations, so the result does not depend on how
busy the machine is.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.pipelines.petct_lesions import petct_inputs

__all__ = ["PATCH", "TRAIN_SEEDS_FROM", "labelled_study", "simulated_cases", "train_petct"]

Case = tuple[np.ndarray, np.ndarray, np.ndarray]  # CT HU on the PET grid, SUV, lesion mask

PATCH = 32
TRAIN_SEEDS_FROM = 3000  # bench/lesions.py scores seeds 2000-2009


def simulated_cases(count: int, write_ct: Callable[[Path], list[Path]], *,
                    seed: int = TRAIN_SEEDS_FROM, pet_mm: float = 4.0, lesions: int = 6
                    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(CT HU on the PET grid, full-dose SUV, lesion mask) of ``count`` twin cases, read back
    from the DICOM the twin writes, exactly as the pipeline reads a study. ``write_ct``
    writes the CT series each case starts from into a folder (the CLI: the chest phantom)."""
    import tempfile

    from dicomnode.dicom.grid import resample_onto
    from dicomnode.dicom.volume import load_series
    from dicomnode.research.simulate_io import write_case

    out = []
    for i in range(count):
        with tempfile.TemporaryDirectory() as tmp:
            files = write_ct(Path(tmp) / "phantom-ct")
            case = write_case(files, Path(tmp), drfs=(), seed=seed + i, pet_mm=pet_mm,
                              lesions=lesions)
            ct = load_series(sorted(case.ct.glob("*.dcm")), modality="CT")
            pet = load_series(sorted(case.full.glob("*.dcm")), modality="PT")
        assert pet.suv is not None
        hu = resample_onto(ct.array.astype(np.float32), ct.affine, pet.affine, pet.shape,
                           cval=-1024.0)
        out.append((hu, (pet.array * pet.suv.factor).astype(np.float32),
                    case.twin.lesions > 0))
    return out


def _series_in(folder: Path) -> dict[tuple[str, str], list[Path]]:
    """The DICOM files under ``folder``, by (Modality, SeriesInstanceUID); others skipped."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    found: dict[tuple[str, str], list[Path]] = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError):
            continue
        key = (str(ds.get("Modality", "")), str(ds.get("SeriesInstanceUID", "")))
        found.setdefault(key, []).append(path)
    return found


def _seg_mask(path: Path, volume: Any) -> np.ndarray | None:
    """The union of a SEG's segments on ``volume``'s grid, or None when the SEG references
    none of its slices."""
    import highdicom as hd

    seg = hd.seg.segread(path)
    refs = {i.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
            for i in s.ReferencedInstanceSequence}
    uids = [str(ds.SOPInstanceUID) for ds in volume.datasets]
    if not refs or not refs <= set(uids):
        return None
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=uids, ignore_spatial_locations=True,
        assert_missing_frames_are_empty=True)
    return np.asarray(np.asarray(pixels).reshape(len(uids), *volume.shape[1:], -1).any(axis=-1))


def labelled_study(folder: Path) -> Case:
    """One labelled PET/CT study read as the pipeline reads it: (CT HU on the PET grid, SUV,
    lesion mask on the PET grid).

    ``folder`` holds exactly one CT series, one PET series (with what SUVbw needs) and one or
    more SEG objects whose segments are the lesions, drawn on the PET or on the CT (then
    carried to the PET grid, nearest neighbour); every segment of every SEG counts as lesion.
    CT and PET must share a Frame of Reference. Anything else is a ``ValueError`` naming the
    folder and what is wrong.
    """
    from dicomnode.dicom.grid import resample_onto
    from dicomnode.dicom.volume import load_series

    series = _series_in(folder)
    by_modality: dict[str, list[list[Path]]] = {}
    for (modality, _uid), files in series.items():
        by_modality.setdefault(modality, []).append(files)
    counts = {m: len(by_modality.get(m, [])) for m in ("CT", "PT", "SEG")}
    if counts["CT"] != 1 or counts["PT"] != 1 or counts["SEG"] < 1:
        raise ValueError(f"{folder}: needs one CT series, one PET series and a SEG; found "
                         f"{counts['CT']} CT, {counts['PT']} PET, {counts['SEG']} SEG series")
    ct = load_series(by_modality["CT"][0], modality="CT")
    pet = load_series(by_modality["PT"][0], modality="PT")
    if pet.suv is None:
        raise ValueError(f"{folder}: the PET cannot be converted to SUV ({pet.suv_problem})")
    if ct.frame_of_reference_uid != pet.frame_of_reference_uid:
        raise ValueError(f"{folder}: CT and PET have different Frames of Reference")
    mask = np.zeros(pet.shape, bool)
    for seg_path in (p for files in by_modality["SEG"] for p in files):
        on_pet = _seg_mask(seg_path, pet)
        if on_pet is None:
            on_ct = _seg_mask(seg_path, ct)
            if on_ct is None:
                raise ValueError(f"{folder}: {seg_path.name} references neither series")
            on_pet = resample_onto(on_ct.astype(np.float32), ct.affine, pet.affine,
                                   pet.shape, order=0) > 0.5
        mask |= on_pet
    hu = resample_onto(ct.array.astype(np.float32), ct.affine, pet.affine, pet.shape,
                       cval=-1024.0)
    return hu, (pet.array * pet.suv.factor).astype(np.float32), mask


def _batch(cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]], rng: np.random.Generator,
           size: int) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = [], []
    for _ in range(size):
        hu, suv, mask = cases[int(rng.integers(len(cases)))]
        if rng.random() < 0.5 and mask.any():
            centre = np.argwhere(mask)[int(rng.integers(int(mask.sum())))]
        else:
            centre = np.array([int(rng.integers(s)) for s in mask.shape])
        start = [int(np.clip(c - PATCH // 2, 0, max(0, s - PATCH)))
                 for c, s in zip(centre, mask.shape, strict=True)]
        sl = tuple(slice(a, a + PATCH) for a in start)
        x = petct_inputs(hu[sl], suv[sl], float(rng.choice([20.0, 40.0])))
        y = mask[sl][None].astype(np.float32)
        pad = [(0, 0)] + [(0, PATCH - n) for n in y.shape[1:]]
        x, y = np.pad(x, pad, mode="edge"), np.pad(y, pad)
        for axis in (1, 2, 3):
            if rng.random() < 0.5:
                x, y = np.flip(x, axis), np.flip(y, axis)
        xs.append(x)
        ys.append(y)
    return np.ascontiguousarray(np.stack(xs)), np.ascontiguousarray(np.stack(ys))


def _loss(logits: Any, target: Any) -> Any:
    import torch
    import torch.nn.functional as F

    prob = torch.sigmoid(logits)
    inter = (prob * target).sum()
    dice = 1 - (2 * inter + 1) / (prob.sum() + target.sum() + 1)
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    pt = torch.exp(-bce)
    focal = ((1 - pt) ** 2 * bce).mean()
    return dice + 10 * focal


def train_petct(*, output: Path, cases: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
                iterations: int, trained_on: str, channels: tuple[int, ...] = (16, 16, 32, 64,
                                                                               128),
                seed: int = 0, version: str = "1.0.0", average_share: float = 0.25,
                max_seconds: float | None = None, batch: int = 4) -> dict[str, Any]:
    """Train and write ``output`` (manifest.yaml, model.pt, training.json). ``max_seconds`` is
    a safety stop only; when it cuts training short, training.json and the manifest say so."""
    import torch
    import yaml

    from dicomnode.files import file_sha256
    from dicomnode.pipelines.nets.fusion_unet import MiddleFusionUNet

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = MiddleFusionUNet(channels)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=iterations, eta_min=1e-4)
    average: dict[str, torch.Tensor] = {}
    averaged = 0
    start_average = int(iterations * (1 - average_share))
    losses = []
    t0 = time.perf_counter()
    done = 0
    for step in range(iterations):
        if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
            break
        x, y = _batch(cases, rng, batch)
        loss = _loss(net(torch.from_numpy(x)), torch.from_numpy(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(loss.item())
        done = step + 1
        if step >= start_average:
            averaged += 1
            for k, v in net.state_dict().items():
                if v.dtype.is_floating_point:
                    average[k] = v.detach().clone() if k not in average else \
                        average[k] + (v.detach() - average[k]) / averaged
    state = net.state_dict()
    state.update(average)  # running statistics of non-float buffers stay the last ones
    output.mkdir(parents=True, exist_ok=True)
    torch.save(state, output / "model.pt")
    cut = done < iterations
    stats = {"iterations": done, "iterations_planned": iterations, "cut_by_time_limit": cut,
             "seconds": round(time.perf_counter() - t0, 1), "averaged_steps": averaged,
             "loss_first_50": float(np.mean(losses[:50])) if losses else None,
             "loss_last_50": float(np.mean(losses[-50:])) if losses else None,
             "cases": len(cases), "patch": PATCH, "batch": batch, "channels": list(channels),
             "seed": seed}
    manifest = {
        "name": output.name, "version": version, "task": "petct-lesions",
        "network": {"class": "dicomnode.pipelines.nets.fusion_unet:MiddleFusionUNet",
                    "params": {"channels": list(channels)}},
        "modality": "PT", "roi_size": [PATCH] * 3, "overlap": 0.5,
        "spacing_mm": [4.0, 4.0, 4.0], "normalisation": {"kind": "none"},
        "weights": "model.pt", "sha256": file_sha256(output / "model.pt"),
        "trained_on": trained_on + (f" (training cut at {done} of {iterations} iterations "
                                    "by the time limit)" if cut else ""),
        "licence": "Apache-2.0 (weights trained by dicomnode's own command)"}
    (output / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    (output / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
    return stats
