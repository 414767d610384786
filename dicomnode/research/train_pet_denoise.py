"""Training the ``pet-denoise`` DRMC network (``dicomnode train pet-denoise``).

Patches drawn from (low-dose, full-dose, lesion labels) pairs, Charbonnier loss with an
optional lesion SUVmax term, checkpoints scored on validation windows and kept by one rule
(:func:`keep_checkpoint`). Inference lives in :mod:`dicomnode.pipelines.pet_denoise`.
"""

from __future__ import annotations

import copy
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.files import file_sha256
from dicomnode.pipelines.pet_denoise import SCALE, activity_level


def training_input_level(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
                         start: tuple[float, float] | None = None,
                         scale: tuple[float, float] = (1.0, 1.0)
                         ) -> tuple[tuple[float, float], list[float]]:
    """The manifest's ``input_level`` for weights trained on ``pairs`` (low-dose first): the
    range of the low-dose images' ``activity_level`` (empty images left out) times the
    range of the intensity ``scale`` applied in training, rounded outwards to 3 decimals and
    widened to ``start``, the range of the weights it continued from; and the levels.
    ValueError when no low-dose image has activity."""
    levels = [lv for lv in (activity_level(lo) for lo, *_ in pairs) if lv > 0]
    if not levels:
        raise ValueError("no training pair has a positive low-dose image")
    low, high = min(levels) * scale[0], max(levels) * scale[1]
    if start is not None:
        low, high = min(low, start[0]), max(high, start[1])
    return (math.floor(low * 1000) / 1000, math.ceil(high * 1000) / 1000), levels


def draw_patch(rng: np.random.Generator, shape: tuple[int, ...], patch: int,
               lesion_voxels: np.ndarray | None = None) -> tuple[slice, ...]:
    """A training patch: anywhere, or centred (give or take a quarter patch) on one of
    ``lesion_voxels`` (N x 3 indices), so that it always holds that voxel."""
    if lesion_voxels is None:
        c = [int(rng.integers(0, s - patch + 1)) for s in shape]
    else:
        centre = lesion_voxels[int(rng.integers(len(lesion_voxels)))] \
            + rng.integers(-(patch // 4), patch // 4 + 1, size=3)
        c = [int(np.clip(m - patch // 2, 0, s - patch)) for m, s in zip(centre, shape,
                                                                         strict=True)]
    return tuple(slice(a, a + patch) for a in c)


@dataclass(frozen=True)
class ValidationWindow:
    """A window of a validation pair: the network sees ``low`` (SUV, ``margin`` voxels more on
    every side than it is scored on) and is scored on its centre against ``full``; ``lesion``
    (a mask of the centre) for a window centred on one whole lesion, else None."""

    pair: int
    low: np.ndarray
    full: np.ndarray
    data_range: float
    margin: int
    lesion: np.ndarray | None = None


def validation_windows(pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]], *,
                       random_per_pair: int = 16, size: int = 24, margin: int = 8,
                       seed: int = 0, min_lesion_voxels: int = 16) -> list[ValidationWindow]:
    """Fixed windows to score training checkpoints on (``validation_scores``).

    Per pair: ``random_per_pair`` windows drawn uniformly (the PSNR, pooled over them, stands
    in for bench/pet's whole-volume PSNR at a few seconds a checkpoint instead of minutes),
    plus one window centred on every lesion of at least ``min_lesion_voxels`` voxels that fits
    whole in ``size``^3 (SUVmax bias, as bench/pet). A scored window is ``size``^3 voxels;
    the network sees ``margin`` more on every side, as in the sliding-window inference.
    """
    rng = np.random.default_rng(seed)
    out: list[ValidationWindow] = []
    seen = size + 2 * margin
    for k, (lo, fu, les) in enumerate(pairs):
        if min(lo.shape) < seen:
            continue
        top = float(fu.max())

        def window(start: list[int], lesion: np.ndarray | None = None,
                   lo: np.ndarray = lo, fu: np.ndarray = fu, top: float = top,
                   k: int = k) -> ValidationWindow:
            outer = tuple(slice(a, a + seen) for a in start)
            inner = tuple(slice(a + margin, a + margin + size) for a in start)
            return ValidationWindow(k, lo[outer].copy(), fu[inner].copy(), top, margin, lesion)

        for _ in range(random_per_pair):
            out.append(window([int(rng.integers(0, s - seen + 1)) for s in lo.shape]))
        if les is None:
            continue
        for label in range(1, int(les.max()) + 1):
            where = np.argwhere(les == label)
            if len(where) < min_lesion_voxels:
                continue
            centre = np.round(where.mean(axis=0)).astype(int)
            start = [int(np.clip(c - seen // 2, 0, s - seen)) for c, s in zip(centre, lo.shape,
                                                                                strict=True)]
            inner = tuple(slice(a + margin, a + margin + size) for a in start)
            mask = les[inner] == label
            if int(mask.sum()) == len(where):  # the whole lesion is scored
                out.append(window(start, mask))
    if not out:
        raise ValueError(f"no validation pair is at least {seen} voxels in every direction")
    return out


def validation_scores(net: Any, windows: list[ValidationWindow]) -> dict[str, float]:
    """``net`` (SUV / 10 in and out) on ``windows``: PSNR per pair over its uniform windows
    (data range: the pair's full-dose maximum), averaged over pairs; lesion B_max (mean
    |SUVmax_pred - SUVmax_ref| / SUVmax_ref) and its signed mean over the lesion windows."""
    import torch

    sq: dict[int, list[float]] = {}
    top: dict[int, float] = {}
    bias: list[float] = []
    was_training = net.training
    net.eval()
    with torch.inference_mode():
        for w in windows:
            x = torch.from_numpy(np.ascontiguousarray(w.low / SCALE, dtype=np.float32))
            pred = net(x[None, None])[0, 0].numpy() * SCALE
            m = w.margin
            pred = np.clip(pred[m:-m, m:-m, m:-m] if m else pred, 0, None)
            if w.lesion is None:
                acc = sq.setdefault(w.pair, [0.0, 0.0])
                acc[0] += float(((pred - w.full) ** 2).sum())
                acc[1] += pred.size
                top[w.pair] = w.data_range
            else:
                ref = float(w.full[w.lesion].max())
                bias.append((float(pred[w.lesion].max()) - ref) / ref)
    net.train(was_training)
    psnrs = [10 * np.log10(top[k] ** 2 / (e / n)) for k, (e, n) in sq.items()]
    return {"psnr": float(np.mean(psnrs)) if psnrs else float("nan"),
            "b_max": float(np.mean(np.abs(bias))) if bias else float("nan"),
            "b_max_signed": float(np.mean(bias)) if bias else float("nan"),
            "lesions": len(bias)}


def lesion_peak_loss(pred: Any, target: Any, labels: Any, eps: float = 1e-3) -> Any:
    """The SUVmax term of ``peak_weight`` in ``train``: for every lesion label in every patch
    of the batch, the Charbonnier of the relative error of the lesion's maximum,
    sqrt(((max pred - max target) / max target)^2 + eps^2), averaged over the lesions (the
    training form of DRMC's B_max); 0 (with a gradient of 0) when no patch holds a lesion.
    ``labels``: integer lesion labels of the patch voxels (0 outside lesions), pred's shape."""
    import torch

    terms = []
    for b in range(pred.shape[0]):
        for label in torch.unique(labels[b]).tolist():
            if label == 0:
                continue
            inside = labels[b] == label
            peak = target[b][inside].max()
            terms.append(torch.sqrt(((pred[b][inside].max() - peak) / peak) ** 2 + eps * eps))
    return torch.stack(terms).mean() if terms else pred.sum() * 0.0


def keep_checkpoint(points: list[dict[str, Any]], *, from_init: bool,
                    select: str = "psnr", psnr_slack: float = 0.0) -> int | None:
    """Which of the validation ``points`` (the first is the start) ``train`` writes: its index,
    or None for none (from scratch, the untrained start is never a candidate).

    ``select="psnr"``: the highest PSNR among the points whose lesion B_max is no higher than
    the start's (with ``from_init``; from scratch, among all but the start).
    ``select="b_max"``: the lowest lesion B_max among the points whose PSNR is at most
    ``psnr_slack`` dB below the start's (from scratch: below the best PSNR seen), for a
    fine-tune that trades a little PSNR for SUVmax (``peak_weight``)."""
    if select not in ("psnr", "b_max"):
        raise ValueError(f"select must be 'psnr' or 'b_max', not {select!r}")
    candidates = list(range(len(points)) if from_init else range(1, len(points)))
    if not candidates:
        return None
    if select == "psnr":
        start = points[0]["b_max"]
        fine = [i for i in candidates
                if not from_init or not points[i]["b_max"] > start]  # NaN: no lesions
        return max(fine, key=lambda i: points[i]["psnr"]) if fine else None
    floor = (points[0]["psnr"] if from_init else max(points[i]["psnr"] for i in candidates)) \
        - psnr_slack
    fine = [i for i in candidates if points[i]["psnr"] >= floor]
    return min(fine, key=lambda i: (points[i]["b_max"], -points[i]["psnr"])) if fine else None


def train(
    *, output: Path, pairs: list[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    seconds: float, patch: int = 16, batch: int = 8, params: dict[str, Any] | None = None,
    trained_on: str, version: str = "1.0.0", seed: int = 0, lr: float = 1e-4,
    lesion_fraction: float = 0.5, lesion_weight: float = 1.0, init: Path | None = None,
    validation: list[ValidationWindow] | None = None, validate_every: float = 180.0,
    on_checkpoint: Callable[[dict[str, Any]], None] | None = None,
    spacing_mm: float | None = None, scale_augment: tuple[float, float] | None = None,
    peak_weight: float = 0.0, select: str = "psnr", psnr_slack: float = 0.0,
) -> dict[str, Any]:
    """Train DRMC on (low, full, lesion labels or None) SUV pairs and write ``output``
    (manifest + weights).

    Patches are drawn uniformly, except that a ``lesion_fraction`` of them is centred (with
    a random shift of up to a quarter patch) on a lesion voxel where the pair has lesion
    labels: lesions are a tiny share of the voxels, and a network trained on uniform patches
    learns to smooth them away (the first shipped model did: lesion SUVmean bias 0.36).
    ``lesion_weight`` > 1 weighs lesion voxels that much more in the Charbonnier loss.
    ``init``: a model directory of the same configuration to continue from (fine-tuning).

    ``validation`` (``validation_windows`` of pairs not trained on): the weights are scored
    (``validation_scores``) at the start, every ``validate_every`` seconds and at the end, and
    the checkpoint written is the one with the highest validation PSNR among those whose
    lesion B_max is no higher than the starting weights' (with ``init``; from scratch, among
    all but the untrained start; when that is the start, the manifest's ``trained_on`` is the
    starting model's, saying so). Without it, the last iterate is written. Validation time
    counts in ``seconds``. ``on_checkpoint`` is called with each checkpoint's scores.
    ``spacing_mm``: the (isotropic) voxel size of all the training pairs, written to the
    manifest, where the pipeline's choice of model by voxel size reads it. The manifest's
    ``input_level`` is the range of the low-dose inputs' ``activity_level`` (with ``init``,
    widened to the start's).

    ``peak_weight`` > 0 adds that times ``lesion_peak_loss`` (each lesion's maximum in the
    patch against the full-dose one's) to the loss: a Charbonnier fit to a noisy target
    predicts its typical value, so lesion maxima come out below the full-dose image's, which
    DRMC's B_max counts (docs/research/pet-experiments.md). ``select`` and ``psnr_slack``:
    which validation checkpoint is written (``keep_checkpoint``).

    ``scale_augment`` (low, high): every patch pair is multiplied by its own factor drawn
    log-uniform from that range, so that the network meets each anatomy at other activity
    levels (a scanner's SUVs can sit at half the twin's: README, "Why Philips is worse");
    ``input_level`` and ``trained_on`` say so.
    """

    import torch
    import yaml

    from dicomnode.pipelines.nets.drmc import DRMCConfig, charbonnier, drmc_from_params

    params = params or {"channels": 16, "experts": 3, "blocks": 2, "heads": 4, "hidden": 8}
    if scale_augment is not None and not 0 < scale_augment[0] <= scale_augment[1]:
        raise ValueError(f"scale_augment must be (low, high) with 0 < low <= high, not "
                         f"{scale_augment}")
    log_scale = None if scale_augment is None else np.log(np.asarray(scale_augment))
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = drmc_from_params(**params)
    before: dict[str, Any] = {}
    if init is not None:
        net.load_state_dict(torch.load(init / "model.pt", map_location="cpu", weights_only=True))
        before = yaml.safe_load((init / "manifest.yaml").read_text())
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    usable = [(lo, fu, les, None if les is None or not les.any() else np.argwhere(les > 0))
              for lo, fu, les in pairs if min(lo.shape) >= patch]
    if not usable:
        raise ValueError(f"no training pair is at least {patch} voxels in every direction")
    with_lesions = [u for u in usable if u[3] is not None]
    # the activity levels the weights will have seen: the training inputs', and the start's
    input_level: tuple[float, float] | None
    input_level, levels = training_input_level(
        [(lo, fu, les) for lo, fu, les, _ in usable], before.get("input_level"),
        scale_augment or (1.0, 1.0))
    keep_checkpoint([], from_init=init is not None, select=select)  # refuses a bad select
    if select == "b_max" and not any(w.lesion is not None for w in validation or []):
        raise ValueError("select='b_max' needs validation windows with lesions")
    t0, losses, it = time.perf_counter(), [], 0
    checkpoints: list[dict[str, Any]] = []
    states: list[dict[str, Any]] = []  # every checkpoint's weights (100 kB each shipped)
    best: dict[str, Any] | None = None
    validation_s = 0.0

    def check() -> None:
        nonlocal best, validation_s
        tv = time.perf_counter()
        scores = validation_scores(net, validation or [])
        validation_s += time.perf_counter() - tv
        point = {"iteration": it, "seconds": round(time.perf_counter() - t0, 1), **scores}
        checkpoints.append(point)
        states.append(copy.deepcopy(net.state_dict()))
        if on_checkpoint is not None:
            on_checkpoint(point)
        kept = keep_checkpoint(checkpoints, from_init=init is not None, select=select,
                               psnr_slack=psnr_slack)
        best = None if kept is None else {"point": checkpoints[kept], "state": states[kept]}

    next_check = 0.0
    while time.perf_counter() - t0 < seconds:
        if validation and time.perf_counter() - t0 >= next_check:
            check()
            next_check = time.perf_counter() - t0 + validate_every
        xs, ys, ls = [], [], []
        for _ in range(batch):
            on_lesion = bool(with_lesions) and rng.random() < lesion_fraction
            lo, fu, les, where = (with_lesions if on_lesion else usable)[
                int(rng.integers(len(with_lesions if on_lesion else usable)))]
            sl = draw_patch(rng, lo.shape, patch, where if on_lesion else None)
            k = 1.0 if log_scale is None else float(np.exp(rng.uniform(*log_scale)))
            xs.append(lo[sl] * (k / SCALE))
            ys.append(fu[sl] * (k / SCALE))
            ls.append(les[sl].astype(np.int64) if les is not None
                      else np.zeros((patch,) * 3, np.int64))
        x = torch.from_numpy(np.stack(xs)[:, None].astype(np.float32))
        y = torch.from_numpy(np.stack(ys)[:, None].astype(np.float32))
        lab = torch.from_numpy(np.stack(ls)[:, None])  # lesion labels: the weights and peaks
        pred = net(x)
        loss = charbonnier(pred, y, weight=None if lesion_weight == 1.0 else
                           torch.where(lab > 0, lesion_weight, 1.0))
        if peak_weight > 0:
            loss = loss + peak_weight * lesion_peak_loss(pred, y, lab)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        it += 1
    if validation:
        check()
        if best is not None:
            net.load_state_dict(best["state"])
    if scale_augment is not None:
        trained_on = (f"{trained_on}, intensities scaled x{scale_augment[0]:g}-"
                      f"{scale_augment[1]:g} (log-uniform per patch)")
    unchanged = bool(before) and best is not None and best["point"]["iteration"] == 0
    if unchanged:
        # the starting weights: the manifest says what trained those, and their range
        input_level = before.get("input_level")
        trained_on = (f"{before['trained_on']} (weights of {before['name']} "
                      f"{before['version']}, unchanged: {it} iterations more on "
                      f"{trained_on} did not beat them on validation)")
    elif before:  # what the starting weights had learned is part of the model
        trained_on = (f"{trained_on}; fine-tuned from {before['name']} {before['version']} "
                      f"(trained on {before['trained_on']})")
    output.mkdir(parents=True, exist_ok=True)
    weights = output / "model.pt"
    torch.save(net.state_dict(), weights)
    sha = file_sha256(weights)
    manifest = {
        "name": output.name, "version": version, "task": "pet-denoise",
        "network": {"class": "dicomnode.pipelines.nets.drmc:drmc_from_params",
                    "params": DRMCConfig(**params).as_dict()},
        "modality": "PT", "roi_size": [32, 32, 32], "overlap": 0.5,
        **({"spacing_mm": [spacing_mm] * 3} if spacing_mm else {}),
        "normalisation": {"kind": "none"},
        **({"input_level": list(input_level)} if input_level else {}),
        "weights": "model.pt", "sha256": sha, "trained_on": trained_on,
        "licence": "Apache-2.0 (weights trained by dicomnode's own command)",
    }
    (output / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    stats: dict[str, Any] = {
        "iterations": it, "seconds": time.perf_counter() - t0, "patch": patch, "batch": batch,
        "lesion_fraction": lesion_fraction if with_lesions else 0.0,
        "lesion_weight": lesion_weight, "lr": lr, "initialised_from": str(init) if init else None,
        "peak_weight": peak_weight, "select": select, "psnr_slack": psnr_slack,
        "pairs": len(usable), "input_levels": [round(lv, 4) for lv in levels],
        "scale_augment": list(scale_augment) if scale_augment else None,
        "loss_first": float(np.mean(losses[:20])), "loss_last": float(np.mean(losses[-20:]))}
    if validation:
        stats.update({"validation_windows": len(validation), "validation_seconds": validation_s,
                      "checkpoints": checkpoints,
                      "kept": best["point"] if best is not None else None})
    (output / "training.json").write_text(json.dumps(stats, indent=2))
    return stats
