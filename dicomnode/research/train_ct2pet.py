"""Training the ``ct2pet`` district Pix2Pix models (``dicomnode train ct2pet``).

Inference lives in :mod:`dicomnode.pipelines.ct2pet`; the networks in
:mod:`dicomnode.pipelines.nets.pix2pix`.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicomnode.files import file_sha256
from dicomnode.pipelines.ct2pet import (
    DISTRICTS,
    PATCH,
    SUV_MAX,
    all_districts,
    check_districts,
    predict,
)
from dicomnode.pipelines.nets.pix2pix import Discriminator, Generator


def ema_update(average: nn.Module, model: nn.Module, decay: float) -> None:
    """``average <- decay * average + (1 - decay) * model``, parameter by parameter."""
    with torch.no_grad():
        for pa, pm in zip(average.parameters(), model.parameters(), strict=True):
            pa.mul_(decay).add_(pm.detach(), alpha=1 - decay)


def sample_patches(pairs: list[tuple[np.ndarray, np.ndarray]], rng: np.random.Generator, *,
                   batch: int, centres: list[np.ndarray] | None = None,
                   loss_masks: list[np.ndarray] | None = None, flips: bool = False
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One training batch of 32^3 (CT, PET, loss mask) patches, as :func:`train_pix2pix`
    describes: a random pair, a random corner or a random centre voxel, edge-padded where a
    volume is smaller than a patch, mirrored left-right with probability 1/2 when ``flips``.
    Without ``loss_masks`` the masks are all ones."""
    xs, ys, ws = [], [], []
    for _ in range(batch):
        i = int(rng.integers(len(pairs)))
        ct, pet = pairs[i]
        if centres is None:
            c = [int(rng.integers(0, max(1, s - PATCH + 1))) for s in ct.shape]
        else:
            m = centres[i][int(rng.integers(len(centres[i])))]
            c = [int(np.clip(v - PATCH // 2, 0, max(0, s - PATCH)))
                 for v, s in zip(m, ct.shape, strict=True)]
        sl = tuple(slice(a, a + PATCH) for a in c)
        pad = [(0, PATCH - n) for n in ct[sl].shape]
        xs.append(np.pad(ct[sl], pad, mode="edge"))
        ys.append(np.pad(pet[sl], pad, mode="edge"))
        ws.append(np.ones((PATCH,) * 3, np.float32) if loss_masks is None
                  else np.pad(loss_masks[i][sl], pad).astype(np.float32))
        if flips and rng.random() < 0.5:
            for arrays in (xs, ys, ws):
                arrays[-1] = arrays[-1][:, :, ::-1]
    return (np.ascontiguousarray(np.stack(xs)), np.ascontiguousarray(np.stack(ys)),
            np.ascontiguousarray(np.stack(ws)))


def train_pix2pix(pairs: list[tuple[np.ndarray, np.ndarray]], *, seconds: float, seed: int = 0,
                  width: int = 16, l1_weight: float = 100.0, batch: int = 4,
                  centres: list[np.ndarray] | None = None,
                  init: dict[str, Any] | None = None,
                  ema_decay: float = 0.0, iterations: int | None = None,
                  loss_masks: list[np.ndarray] | None = None,
                  flips: bool = False) -> tuple[Any, dict]:
    """Pix2Pix on (CT [0,1], SUV/20) pairs of 32^3 patches: Adam 2e-4, adversarial + L1.

    Patches are drawn anywhere in a pair, or, with ``centres`` (voxel indices, N x 3, per
    pair), around one of those voxels: a district model sees its district's anatomy with the
    true activity around it, and nothing of the other districts' insides.

    ``init``: ``{"generator": state, "discriminator": state or None}`` to continue from (the
    returned stats carry the discriminator's final state as ``"discriminator"``, not JSON).

    ``ema_decay`` > 0: the generator returned is an exponential moving average of the
    generator's weights over the iterations (decay ``min(ema_decay, (1 + i) / (10 + i))`` at
    iteration i), not its last iterate: an adversarial game leaves the last iterate wherever
    its oscillation stopped.

    ``iterations``: stop after that many iterations instead of after ``seconds`` (the same
    training on a slower or busier machine).

    ``loss_masks`` (per pair, boolean, the pair's grid): the L1 term counts only the voxels of
    the mask (the district whose voxels the model will be asked for); the discriminator still
    sees whole patches. With ``centres`` inside the masks every patch has some.

    ``flips``: each patch (CT, PET and loss mask alike) is mirrored left-right with
    probability 1/2, a body seen the other way round. Tried once on the leg model
    (docs/research/pet-experiments.md): worse, but within the spread between training seeds; off.
    """
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    gen, disc = Generator(width), Discriminator(width)
    if init is not None:
        gen.load_state_dict(init["generator"])
        if init.get("discriminator") is not None:
            disc.load_state_dict(init["discriminator"])
    og = torch.optim.Adam(gen.parameters(), lr=2e-4, betas=(0.5, 0.999))
    od = torch.optim.Adam(disc.parameters(), lr=2e-4, betas=(0.5, 0.999))
    bce = torch.nn.BCEWithLogitsLoss()
    ema = copy.deepcopy(gen) if ema_decay > 0 else None
    t0, it, l1s = time.perf_counter(), 0, []
    while (it < iterations if iterations is not None
           else time.perf_counter() - t0 < seconds):
        xs, ys, ws = sample_patches(pairs, rng, batch=batch, centres=centres,
                                    loss_masks=loss_masks, flips=flips)
        x = torch.from_numpy(xs[:, None])
        y = torch.from_numpy(ys[:, None])
        fake = gen(x)
        d_real, d_fake = disc(torch.cat([x, y], 1)), disc(torch.cat([x, fake.detach()], 1))
        loss_d = 0.5 * (bce(d_real, torch.ones_like(d_real)) + bce(d_fake, torch.zeros_like(d_fake)))
        od.zero_grad()
        loss_d.backward()
        od.step()
        d_fake = disc(torch.cat([x, fake], 1))
        if loss_masks is None:
            l1 = torch.mean(torch.abs(fake - y))
        else:
            wt = torch.from_numpy(ws[:, None])
            l1 = torch.sum(torch.abs(fake - y) * wt) / torch.clamp(wt.sum(), min=1.0)
        loss_g = bce(d_fake, torch.ones_like(d_fake)) + l1_weight * l1
        og.zero_grad()
        loss_g.backward()
        og.step()
        if ema is not None:
            ema_update(ema, gen, min(ema_decay, (1 + it) / (10 + it)))
        l1s.append(l1.item())
        it += 1
    return ema or gen, {"iterations": it, "seconds": time.perf_counter() - t0,
                        "ema_decay": ema_decay,
                        "l1_first": float(np.mean(l1s[:10])),
                        "l1_last": float(np.mean(l1s[-10:])),
                        "discriminator": copy.deepcopy(disc.state_dict())}


def validation_mae(generator: Any, cases: list[tuple[np.ndarray, np.ndarray, dict]],
                   district: str | None) -> float:
    """MAE in SUV of ``generator`` on ``cases`` (CT [0,1], SUV/20, district masks) over the
    voxels of ``district`` (None: of every district, the whole-body model's job), pooled."""
    err, n = 0.0, 0
    for ct, pet, masks in cases:
        region = masks[district] if district is not None else all_districts(masks)
        if region.any():
            pred = predict(generator, ct, region=region)
            err += float(np.abs(pred - pet * SUV_MAX)[region].sum())
            n += int(region.sum())
    if n == 0:
        raise ValueError(f"no validation case has voxels of {district or 'any district'}")
    return err / n


def train_ct2pet(*, output: Path, cases: list[tuple[np.ndarray, np.ndarray, dict]],
                 seconds: float, trained_on: str, seed: int = 0, version: str = "1.0.0",
                 pretrain_share: float = 0.0, ema_decay: float = 0.0,
                 init: Path | None = None, iterations: int | None = None,
                 loss_in_district: tuple[str, ...] = (), seeds_per_model: int = 1,
                 validation: list[tuple[np.ndarray, np.ndarray, dict]] | None = None,
                 validation_source: str = "") -> dict[str, Any]:
    """Train the whole-body model and one per district present; write the model directory.

    ``cases``: (CT [0,1], SUV/20, district masks) on the PET grid. Each model gets an equal
    share of ``seconds``, from scratch (the paper's setting), or ``iterations`` each when
    given (then ``seconds`` is not used): the same training on any machine.

    ``pretrain_share`` > 0: that share of ``seconds`` first trains a whole-body model that
    every district model starts from and is fine-tuned on its own district; the whole-body
    model is trained on for one share more, so that the baseline and every district model
    have had the same time. Measured (docs/research/pet-experiments.md, 1.3.0 candidate: 1500 s,
    share 0.33, on three held-out phantoms): worse than from scratch in head/neck and the
    arms, better in the trunk; so the default stays 0.

    ``init``: a ct2pet model directory to fine-tune (a site with few PET/CT pairs starts from
    the shipped models): each model starts from the generator of the same name there (the
    whole-body one for a district it lacks), with a new discriminator; ``trained_on`` then
    names it.

    ``loss_in_district``: districts whose model's L1 counts only the district's own voxels
    (those it is asked for at inference), not the rest of its 32^3 patches (``loss_masks``).
    Measured (README, docs/research/pet-experiments.md): far better for the arms, whose patches are
    mostly trunk, at two training seeds; worse for the trunk and, at one seed, the legs.

    ``seeds_per_model`` > 1: every model (the whole-body baseline too) is trained that many
    times, from training seeds ``s, s + 1, ...`` (``s`` the seed its single training uses),
    and the one with the lowest MAE on ``validation`` (cases like ``cases``, none of them
    training or test cases) over the voxels it is asked for (its district; the whole-body
    model: every district) is kept; each candidate gets ``iterations`` (or an equal share of
    ``seconds``). The results of one training seed differ by more than most of the choices
    above (docs/research/pet-experiments.md: legs 0.058-0.062 vs 0.075-0.078 SUV between two seeds).
    """
    import json

    import yaml

    check_districts(loss_in_district)
    if seeds_per_model < 1 or (seeds_per_model > 1 and not validation):
        raise ValueError("seeds_per_model > 1 chooses on validation cases: give some "
                         f"(seeds_per_model={seeds_per_model}, "
                         f"{len(validation or [])} validation cases)")
    states: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    present = [d for d in DISTRICTS if sum(int(m[d].sum()) for _, _, m in cases) > 2000]
    pre = seconds * pretrain_share
    share = (seconds - pre) / (1 + len(present)) / seeds_per_model
    # the whole-body model sees patches around any body voxel (every district), as the
    # district models see patches around their own: neither spends its time on air
    body_pairs = [(c, p) for c, p, _ in cases]
    body_centres = [np.argwhere(all_districts(m)) for _, _, m in cases]
    start: dict[str, Any] | None = None
    given: dict[str, Any] = {}
    if pre > 0 and (init is not None or iterations is not None):
        raise ValueError("whole-body pretraining (pretrain_share, a share of the time) excludes "
                         "fine-tuning a model directory (init) and an iteration budget "
                         "(iterations)")
    if init is not None:
        given = torch.load(init / "model.pt", map_location="cpu", weights_only=True)
        base = yaml.safe_load((init / "manifest.yaml").read_text())
        trained_on = (f"{trained_on}; fine-tuned from {base['name']} {base['version']} "
                      f"(trained on {base['trained_on']})")
        start = {"generator": given["whole_body"], "discriminator": None}
    if pre > 0:
        gen, pre_stats = train_pix2pix(body_pairs, seconds=pre, seed=seed, centres=body_centres,
                                       ema_decay=ema_decay)
        start = {"generator": copy.deepcopy(gen.state_dict()),
                 "discriminator": pre_stats.pop("discriminator")}
        stats["whole_body_pretraining"] = pre_stats

    def best_of_seeds(name: str, first_seed: int, **kwargs: Any) -> None:
        """Train ``name`` ``seeds_per_model`` times; keep the best on validation."""
        tried = []
        for k in range(seeds_per_model):
            gen, st = train_pix2pix(seconds=share, seed=first_seed + k, ema_decay=ema_decay,
                                    iterations=iterations, **kwargs)
            st.pop("discriminator")  # only the pretraining's is passed on
            st["seed"] = first_seed + k
            if validation:
                st["validation_mae_suv"] = validation_mae(
                    gen, validation, None if name == "whole_body" else name)
            tried.append(st)
            if k == 0 or st["validation_mae_suv"] < stats[name]["validation_mae_suv"]:
                stats[name], states[name] = st, copy.deepcopy(gen.state_dict())
        if seeds_per_model > 1:
            stats[name]["candidates"] = [
                {key: st[key] for key in ("seed", "validation_mae_suv", "l1_last")}
                for st in tried]
            stats[name]["validation"] = validation_source

    best_of_seeds("whole_body", seed if start is None else seed + 2, pairs=body_pairs,
                  centres=body_centres, init=start)
    for d in present:
        with_d = [(c, p, m[d]) for c, p, m in cases if m[d].any()]
        own = {"generator": given[d], "discriminator": None} if d in given else start
        best_of_seeds(d, seed + 1, pairs=[(c, p) for c, p, _ in with_d], init=own,
                      centres=[np.argwhere(m) for _, _, m in with_d],
                      loss_masks=([m for _, _, m in with_d]
                                  if d in loss_in_district else None))
        stats[d]["l1_over"] = "district voxels" if d in loss_in_district else "whole patches"
    for name, s in stats.items():
        if init is not None:
            s["initialised_from"] = f"{init} ({name if name in given else 'whole_body'})"
        elif start is not None and name != "whole_body_pretraining":
            s["initialised_from"] = "whole_body_pretraining"
    output.mkdir(parents=True, exist_ok=True)
    torch.save(states, output / "model.pt")
    sha = file_sha256(output / "model.pt")
    manifest = {"name": output.name, "version": version, "task": "ct2pet",
                "network": {"class": "dicomnode.pipelines.ct2pet:Generator",
                            "params": {"width": 16}, "districts": ["whole_body", *present]},
                "modality": "CT", "spacing_mm": [4.0, 4.0, 4.0], "roi_size": [32, 32, 32],
                "overlap": 0.5, "normalisation": {"kind": "window", "min": -1000, "max": 1000},
                "weights": "model.pt", "sha256": sha, "trained_on": trained_on,
                "licence": "Apache-2.0 (weights trained by dicomnode's own command)"}
    (output / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))
    (output / "training.json").write_text(json.dumps(stats, indent=2))
    return stats
