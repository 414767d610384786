"""DRMC: the properties the paper's design implies, checked on a small configuration."""

from __future__ import annotations

import pytest
import torch

from dicomnode.pipelines.nets.drmc import DRMC, DRMCConfig, charbonnier

SMALL = DRMCConfig(channels=8, experts=3, blocks=2, heads=2, hidden=4)


def test_routing_weights_are_non_negative_and_per_sample() -> None:
    torch.manual_seed(0)
    net = DRMC(SMALL)
    x = torch.rand(3, 1, 8, 8, 8)
    x[1] *= 5  # a different "centre": different statistics
    net(x)
    weights = net.routing_weights()
    assert len(weights) == 2 * SMALL.blocks  # one attention and one FFN bank per block
    for w in weights:
        assert w.shape == (3, SMALL.experts) and (w >= 0).all()
    assert not torch.allclose(weights[0][0], weights[0][1])  # routing depends on the input


def test_zero_last_layer_gives_identity() -> None:
    net = DRMC(SMALL)
    with torch.no_grad():
        net.tail.weight.zero_()
        net.tail.bias.zero_()
    x = torch.rand(2, 1, 8, 8, 8)
    assert torch.equal(net(x), x)


def test_charbonnier_of_equal_images_is_eps() -> None:
    x = torch.rand(2, 1, 4, 4, 4)
    assert torch.isclose(charbonnier(x, x), torch.tensor(1e-3))
    assert charbonnier(x, x + 1) > 0.99


def test_hidden_state_is_carried_across_layers() -> None:
    net = DRMC(SMALL)
    seen = []
    for blk in net.blocks:
        for bank in (blk.att, blk.ffn):
            bank.register_forward_hook(lambda _m, inp, _out: seen.append(inp[1]))
    net(torch.rand(1, 1, 8, 8, 8))
    assert torch.equal(seen[0], net.hidden0.expand(1, -1, -1, -1, -1))
    assert not torch.equal(seen[1], seen[0])  # the FFN bank gets the attention bank's H


def test_short_training_lowers_the_loss() -> None:
    torch.manual_seed(0)
    net = DRMC(SMALL)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    clean = torch.rand(4, 1, 12, 12, 12)
    noisy = clean + 0.2 * torch.randn_like(clean)
    losses = []
    for _ in range(60):
        loss = charbonnier(net(noisy), clean)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert sum(losses[-10:]) / 10 < 0.8 * sum(losses[:10]) / 10


def test_lesion_patches_hold_a_lesion_and_training_writes_a_model(tmp_path) -> None:
    import json

    import numpy as np
    import yaml

    from dicomnode.research.train_pet_denoise import draw_patch, train

    rng = np.random.default_rng(0)
    lesions = np.zeros((40, 40, 40), np.uint16)
    lesions[30:33, 5:8, 20:23] = 1
    where = np.argwhere(lesions > 0)
    for _ in range(200):
        sl = draw_patch(rng, lesions.shape, 16, where)
        assert lesions[sl].any() and all(s.stop - s.start == 16 for s in sl)
    uniform = [lesions[draw_patch(rng, lesions.shape, 16)].any() for _ in range(200)]
    assert sum(uniform) < 100  # uniform patches mostly miss a small lesion
    full = rng.uniform(0.5, 1.5, (40, 40, 40)).astype(np.float32)
    full[lesions > 0] = 8.0
    low = full + rng.normal(0, 0.5, full.shape).astype(np.float32)
    stats = train(output=tmp_path / "m", pairs=[(low, full, lesions)], seconds=3, patch=16,
                  batch=2, params={"channels": 8, "experts": 2, "blocks": 1, "heads": 2,
                                   "hidden": 4}, trained_on="a unit test", version="0.0.1",
                  spacing_mm=2.0)
    assert stats["iterations"] > 0 and stats["lesion_fraction"] == 0.5
    manifest = yaml.safe_load((tmp_path / "m" / "manifest.yaml").read_text())
    assert manifest["version"] == "0.0.1" and manifest["trained_on"] == "a unit test"
    assert manifest["spacing_mm"] == [2.0, 2.0, 2.0]  # what the pipeline chooses models by
    # the training input's activity level, inside the range written (what input_scale reads)
    from dicomnode.pipelines.pet_denoise import activity_level
    low_level, high_level = manifest["input_level"]
    assert low_level <= activity_level(low) <= high_level and high_level - low_level < 0.002
    assert json.loads((tmp_path / "m" / "training.json").read_text())["pairs"] == 1


def _validation_pair(seed: int = 0):
    """A 48^3 SUV pair: smooth background, two small hot lesions, one lesion too large to fit
    a scored window; the low dose is the full dose plus noise."""
    import numpy as np

    rng = np.random.default_rng(seed)
    full = rng.uniform(0.8, 1.2, (48, 48, 48)).astype(np.float32)
    lesions = np.zeros(full.shape, np.uint16)
    lesions[20:23, 20:23, 20:23] = 1
    lesions[10:13, 30:33, 12:15] = 2
    lesions[2:46, 2:46, 40:46] = 3  # 44 voxels across: no 24^3 window holds it whole
    for label, suv in ((1, 6.0), (2, 4.0)):
        full[lesions == label] = suv
    low = (full + rng.normal(0, 0.3, full.shape)).astype(np.float32)
    return low, full, lesions


def test_validation_windows_and_scores_as_bench_defines_them() -> None:
    """Windows: the uniform ones per pair plus one per whole lesion that fits; the scores of
    an identity network are the low-dose input's PSNR and SUVmax biases, computed here by
    hand."""
    import numpy as np

    from dicomnode.research.train_pet_denoise import validation_scores, validation_windows

    low, full, lesions = _validation_pair()
    windows = validation_windows([(low, full, lesions)], random_per_pair=5, size=24, margin=8)
    assert [w.lesion is None for w in windows] == [True] * 5 + [False] * 2
    scores = validation_scores(torch.nn.Identity(), windows)
    m = 8
    err = sum(float(((np.clip(w.low[m:-m, m:-m, m:-m], 0, None) - w.full) ** 2).sum())
              for w in windows[:5])
    expected = 10 * np.log10(float(full.max()) ** 2 / (err / (5 * 24 ** 3)))
    assert abs(scores["psnr"] - expected) < 1e-6
    bias = [(low[lesions == k].max() - full[lesions == k].max()) / full[lesions == k].max()
            for k in (1, 2)]
    assert scores["lesions"] == 2 and scores["b_max"] > 0
    assert abs(scores["b_max"] - np.mean(np.abs(bias))) < 1e-6
    assert abs(scores["b_max_signed"] - np.mean(bias)) < 1e-6


@pytest.mark.slow
def test_training_writes_the_checkpoint_chosen_on_validation(tmp_path) -> None:
    """With validation pairs, training scores the start, every few seconds and the end, and
    writes the checkpoint with the best PSNR among those with no higher lesion B_max than the
    start: the written weights score exactly as the kept checkpoint."""
    import json

    from dicomnode.pipelines.models import load_entry, load_network
    from dicomnode.research.train_pet_denoise import train, validation_scores, validation_windows

    small = {"channels": 8, "experts": 2, "blocks": 1, "heads": 2, "hidden": 4}
    pairs = [_validation_pair(0)]
    windows = validation_windows([_validation_pair(1)], random_per_pair=3)
    train(output=tmp_path / "start", pairs=pairs, seconds=2, patch=16, batch=2, params=small,
          trained_on="a unit test")
    seen: list[dict] = []
    stats = train(output=tmp_path / "m", pairs=pairs, seconds=6, patch=16, batch=2,
                  params=small, trained_on="a unit test", init=tmp_path / "start",
                  validation=windows, validate_every=1.0, on_checkpoint=seen.append)
    points = stats["checkpoints"]
    assert seen == points  # reported as they are scored
    assert points[0]["iteration"] == 0 and points[-1]["iteration"] == stats["iterations"]
    assert len(points) >= 3
    eligible = [p for p in points if p["b_max"] <= points[0]["b_max"]]
    assert stats["kept"] == max(eligible, key=lambda p: p["psnr"])
    written = load_network(load_entry(tmp_path / "m"), device="cpu")
    again = validation_scores(written.network, windows)
    assert abs(again["psnr"] - stats["kept"]["psnr"]) < 1e-4
    assert abs(again["b_max"] - stats["kept"]["b_max"]) < 1e-4
    assert json.loads((tmp_path / "m" / "training.json").read_text())["kept"] == stats["kept"]


@pytest.mark.slow
def test_train_pet_denoise_cli_refuses_bad_validation_before_simulating(tmp_path) -> None:
    """Validation phantoms that are training or benchmark phantoms, validation pairs without
    site training pairs, or both kinds at once are refused naming the option, before any
    data is simulated or written."""
    import subprocess
    import sys

    def train(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicomnode.cli", "train", "pet-denoise",
                               "--output", str(tmp_path / "m"), *args],
                              capture_output=True, text=True, timeout=120)

    r = train("--cases", "6", "--validation-cases", "2", "--validation-seed", "4")
    assert r.returncode == 2 and "--validation-seed" in r.stderr and "[4, 5]" in r.stderr
    r = train("--validation-cases", "1", "--validation-seed", "1002")
    assert r.returncode == 2 and "[1002]" in r.stderr
    r = train("--validation-pairs", "a:b")
    assert r.returncode == 2 and "--validation-pairs" in r.stderr
    r = train("--pairs", "a:b", "--validation-pairs", "a:b")
    assert r.returncode == 2 and "also in --pairs" in r.stderr
    r = train("--pairs", "a:b", "--validation-cases", "2")
    assert r.returncode == 2 and "--validation-cases" in r.stderr
    r = train("--scale-augment", "2", "0.5")
    assert r.returncode == 2 and "--scale-augment" in r.stderr
    r = train("--count-scale", "16", "1")
    assert r.returncode == 2 and "--count-scale" in r.stderr
    r = train("--pairs", "a:b", "--count-scale", "1", "16")
    assert r.returncode == 2 and "--count-scale" in r.stderr
    r = train("--with-twin")  # mixes the twin with a site's pairs: none given
    assert r.returncode == 2 and "--with-twin" in r.stderr
    r = train("--select", "b_max")  # SUVmax bias is scored on validation data
    assert r.returncode == 2 and "--select" in r.stderr
    r = train("--psnr-slack", "0.3", "--validation-cases", "1")
    assert r.returncode == 2 and "--psnr-slack" in r.stderr
    r = train("--lr", "0")
    assert r.returncode == 2 and "--lr" in r.stderr
    assert not (tmp_path / "m").exists()


@pytest.mark.slow
def test_training_that_beats_nothing_hands_back_the_start_and_says_so(tmp_path) -> None:
    """With the optimiser unable to move the weights (lr 0) no checkpoint beats the start:
    the start's weights are written bit for bit, and the manifest's trained_on is the start's,
    saying the further training did not change them. Weights fine-tuned from a start say
    what the start was trained on as well."""
    import hashlib

    import yaml

    from dicomnode.research.train_pet_denoise import train, validation_windows

    small = {"channels": 8, "experts": 2, "blocks": 1, "heads": 2, "hidden": 4}
    pairs = [_validation_pair(0)]
    train(output=tmp_path / "start", pairs=pairs, seconds=2, patch=16, batch=2, params=small,
          trained_on="the first data", version="0.1.0")
    fainter = [(lo * 0.5, fu * 0.5, les) for lo, fu, les in pairs]  # a lower activity level
    stats = train(output=tmp_path / "m", pairs=fainter, seconds=3, patch=16, batch=2,
                  params=small, trained_on="the second data", init=tmp_path / "start",
                  lr=0.0, validation=validation_windows([_validation_pair(1)],
                                                        random_per_pair=3),
                  validate_every=1.0)
    assert stats["kept"]["iteration"] == 0 and stats["iterations"] > 0
    digest = [hashlib.sha256((tmp_path / d / "model.pt").read_bytes()).hexdigest()
              for d in ("start", "m")]
    assert digest[0] == digest[1]
    trained_on = yaml.safe_load((tmp_path / "m" / "manifest.yaml").read_text())["trained_on"]
    assert trained_on.startswith("the first data (weights of start 0.1.0, unchanged")
    assert "the second data did not beat them" in trained_on
    assert "fine-tuned" not in trained_on
    start_level = yaml.safe_load((tmp_path / "start" / "manifest.yaml").read_text())[
        "input_level"]
    assert yaml.safe_load((tmp_path / "m" / "manifest.yaml").read_text())["input_level"] == (
        start_level)  # what the unchanged weights had seen, not widened by the new data
    # weights that did change: the manifest names both the new data and the start's
    train(output=tmp_path / "tuned", pairs=pairs, seconds=1, patch=16, batch=2, params=small,
          trained_on="the second data", init=tmp_path / "start")
    tuned = yaml.safe_load((tmp_path / "tuned" / "manifest.yaml").read_text())["trained_on"]
    assert tuned == "the second data; fine-tuned from start 0.1.0 (trained on the first data)"


def test_cached_pairs_simulate_once_then_read_back(tmp_path) -> None:
    """The training and validation caches: simulated and saved the first time, read back
    (arrays, lesion labels or None, description) without simulating the second."""
    import numpy as np

    from dicomnode.research.training import cached_pairs

    low, full, lesions = _validation_pair()
    calls: list[int] = []

    def simulate():
        calls.append(1)
        return [(low, full, lesions), (low, full, None)], "two pairs"

    first = cached_pairs(tmp_path / "p.npz", simulate)
    again = cached_pairs(tmp_path / "p.npz", simulate)
    assert len(calls) == 1 and first[1] == again[1] == "two pairs"
    assert np.array_equal(again[0][0][2], lesions) and again[0][1][2] is None
    assert np.array_equal(again[0][1][0], low)
    cached_pairs(None, simulate)
    assert len(calls) == 2 and not (tmp_path / "None").exists()


def test_model_chosen_by_voxel_size_nearest_by_ratio(tmp_path) -> None:
    """Without a model named by the rule, pet-denoise takes the model trained on the voxel
    size nearest (by ratio, on the cube root of the voxel volume) to the series'."""
    from dicomnode.pipelines.models import LoadedModel, Manifest, ModelEntry
    from dicomnode.pipelines.pet_denoise import choose_model, voxel_mm

    def model(name: str, mm: float | None) -> LoadedModel:
        manifest = Manifest(name=name, version="1", task="pet-denoise", trained_on="test",
                            spacing_mm=None if mm is None else (mm, mm, mm))
        return LoadedModel(entry=ModelEntry(path=tmp_path, layout="manifest", manifest=manifest,
                                            weights=tmp_path, verified=True),
                           network=None, device="cpu")

    two, four, unknown = model("two", 2.0), model("four", 4.0), model("unknown", None)
    assert voxel_mm((4.0, 2.0, 2.0)) == pytest.approx(2.5198, abs=1e-4)
    for spacing, expected in (((2.0, 2.0, 2.0), "two"), ((2.78, 1.95, 1.95), "two"),
                              ((4.25, 2.0, 2.0), "two"),  # 2.57 mm: 1.29x of 2, 1.56x below 4
                              ((3.27, 3.0, 3.0), "four"),  # 3.08 mm: 1.30x below 4, 1.54x of 2
                              ((4.0, 4.0, 4.0), "four"), ((5.0, 5.0, 5.0), "four"),
                              ((1.0, 1.0, 1.0), "two")):
        assert choose_model([unknown, four, two], spacing).entry.manifest.name == expected
        assert choose_model([two, four], spacing).entry.manifest.name == expected
    assert choose_model([unknown, four], (2.0, 2.0, 2.0)).entry.manifest.name == "four"
    assert choose_model([unknown], (2.0, 2.0, 2.0)).entry.manifest.name == "unknown"


def test_input_outside_the_training_activity_range_is_scaled_into_it_and_back(tmp_path) -> None:
    """A series whose activity level lies outside the model's ``input_level`` goes through
    the network scaled to the nearer end of the range, and comes back in its own units; one
    inside it, or a model without the range, is not scaled."""
    import numpy as np
    from pydantic import ValidationError

    from dicomnode.pipelines.models import LoadedModel, Manifest, ModelEntry
    from dicomnode.pipelines.pet_denoise import activity_level, denoise, input_scale

    net = DRMC(SMALL)
    with torch.no_grad():  # the identity: what comes out is what went in
        net.tail.weight.zero_()
        net.tail.bias.zero_()

    def model(level: tuple[float, float] | None) -> LoadedModel:
        manifest = Manifest(name="m", version="1", task="pet-denoise", trained_on="test",
                            input_level=level)
        return LoadedModel(entry=ModelEntry(path=tmp_path, layout="manifest", manifest=manifest,
                                            weights=tmp_path, verified=True),
                           network=net.eval(), device="cpu")

    rng = np.random.default_rng(0)
    phantom = np.zeros((24, 24, 24), np.float32)
    phantom[4:20, 4:20, 4:20] = rng.uniform(0.9, 1.1, (16, 16, 16))
    inside = activity_level(phantom)  # the object's rim (smoothed above 5 %) counts too
    assert 0.85 < inside < 1.0
    trained = model((0.8, 1.2))
    faint, bright = phantom * 0.4, phantom * 3.0
    scale, level = input_scale(trained, faint)
    assert level == pytest.approx(0.4 * inside, rel=1e-5) and scale * level == pytest.approx(0.8)
    scale_bright, _ = input_scale(trained, bright)
    assert scale_bright * activity_level(bright) == pytest.approx(1.2)
    assert input_scale(trained, phantom)[0] == 1.0
    assert input_scale(model(None), faint)[0] == 1.0
    assert input_scale(trained, np.zeros_like(phantom))[0] == 1.0
    out = denoise(trained, faint, roi=16, scale=scale)
    np.testing.assert_allclose(out, faint, rtol=1e-5, atol=1e-6)  # back in the input's units
    with pytest.raises(ValidationError, match="input_level"):
        Manifest(name="m", version="1", trained_on="test", input_level=(0.0, 1.0))


def test_models_input_level_writes_the_range_of_a_models_own_training_data(tmp_path) -> None:
    """``models input-level`` gives a model trained before the range was recorded the range
    ``train`` would have written, from its training data rebuilt (here: the cache), widened to
    the start's with --start; the weights and sha256 stay, the version is the one asked for.
    Data that is not what the manifest says the model was trained on is refused, unwritten."""
    import hashlib
    import subprocess
    import sys

    import yaml

    from dicomnode.research.train_pet_denoise import train
    from dicomnode.research.training import save_pairs

    small = {"channels": 8, "experts": 2, "blocks": 1, "heads": 2, "hidden": 4}
    low, full, lesions = _validation_pair(0)
    pairs = [(low, full, lesions), (low * 0.5, full * 0.5, lesions)]
    train(output=tmp_path / "m", pairs=pairs, seconds=1, patch=16, batch=2, params=small,
          trained_on="the first data, seed 0", version="0.1.0")
    manifest_path = tmp_path / "m" / "manifest.yaml"
    written = yaml.safe_load(manifest_path.read_text())
    legacy = {k: v for k, v in written.items() if k != "input_level"}  # as 1.2.0 shipped
    manifest_path.write_text(yaml.safe_dump(legacy, sort_keys=False))
    save_pairs(tmp_path / "first.npz", pairs, "the first data")
    save_pairs(tmp_path / "other.npz", pairs[:1], "other data")

    def input_level(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "dicomnode.cli", "models", "input-level",
                               *args], capture_output=True, text=True, timeout=120)

    r = input_level(str(tmp_path / "m"), "--data-cache", str(tmp_path / "other.npz"))
    assert r.returncode == 1 and "not trained on these data" in r.stderr
    assert yaml.safe_load(manifest_path.read_text()) == legacy
    r = input_level(str(tmp_path / "m"), "--data-cache", str(tmp_path / "first.npz"),
                    "--version", "0.1.1")
    assert r.returncode == 0, r.stderr
    now = yaml.safe_load(manifest_path.read_text())
    assert now["input_level"] == written["input_level"]  # what training writes today
    assert now["input_level"][0] < 0.6 < 1.0 < now["input_level"][1]  # both pairs' levels
    assert now["version"] == "0.1.1"
    assert {k: v for k, v in now.items() if k not in ("input_level", "version")} == {
        k: v for k, v in legacy.items() if k != "version"}
    assert now["sha256"] == hashlib.sha256((tmp_path / "m" / "model.pt").read_bytes()
                                           ).hexdigest()
    # a fine-tune measured on only the faint pair keeps what its start had seen
    train(output=tmp_path / "t", pairs=pairs[1:], seconds=1, patch=16, batch=2, params=small,
          trained_on="the first data, fine-tuned", version="0.2.0")
    save_pairs(tmp_path / "faint.npz", pairs[1:], "the first data")
    r = input_level(str(tmp_path / "t"), "--data-cache", str(tmp_path / "faint.npz"),
                    "--start", str(tmp_path / "m"))
    assert r.returncode == 0, r.stderr
    assert yaml.safe_load((tmp_path / "t" / "manifest.yaml").read_text())["input_level"] == (
        now["input_level"])


def test_scale_augmentation_trains_on_scaled_patches_and_says_so(tmp_path) -> None:
    """--scale-augment: patch pairs are multiplied by factors from the range (the loss of the
    same untrained network on the same patches grows with them), the manifest's input_level
    is the data's range times the factors', and trained_on says so. Without it, nothing of
    either. A bad range is refused."""
    import yaml

    from dicomnode.pipelines.pet_denoise import activity_level
    from dicomnode.research.train_pet_denoise import train

    small = {"channels": 8, "experts": 2, "blocks": 1, "heads": 2, "hidden": 4}
    pairs = [_validation_pair(0)]
    level = activity_level(pairs[0][0])
    common = {"pairs": pairs, "seconds": 1, "patch": 16, "batch": 2, "params": small,
              "lr": 0.0, "trained_on": "the data"}
    plain = train(output=tmp_path / "plain", **common)
    four = train(output=tmp_path / "four", scale_augment=(4.0, 4.0), **common)
    assert 2.5 < four["loss_first"] / plain["loss_first"] < 6  # the same patches, x4
    assert four["scale_augment"] == [4.0, 4.0] and plain["scale_augment"] is None
    wide = train(output=tmp_path / "wide", scale_augment=(0.5, 2.0), **common)
    manifest = yaml.safe_load((tmp_path / "wide" / "manifest.yaml").read_text())
    assert manifest["input_level"] == pytest.approx([level * 0.5, level * 2.0], abs=1e-3)
    assert manifest["trained_on"] == ("the data, intensities scaled x0.5-2 (log-uniform per "
                                      "patch)")
    assert wide["iterations"] > 0
    plain_manifest = yaml.safe_load((tmp_path / "plain" / "manifest.yaml").read_text())
    assert plain_manifest["trained_on"] == "the data"
    with pytest.raises(ValueError, match="scale_augment"):
        train(output=tmp_path / "bad", scale_augment=(2.0, 1.0), **common)


def test_lesion_peak_loss_is_the_relative_error_of_each_lesions_maximum() -> None:
    """Per lesion label per patch: sqrt(((max pred - max target) / max target)^2 + eps^2),
    averaged; eps for a prediction that keeps every maximum (whatever else it changes);
    only the maximum voxel gets a gradient; no lesion, no loss."""
    from dicomnode.research.train_pet_denoise import lesion_peak_loss

    target = torch.ones(2, 1, 8, 8, 8)
    labels = torch.zeros(2, 1, 8, 8, 8, dtype=torch.int64)
    labels[0, 0, 1:3, 1:3, 1:3] = 1
    labels[0, 0, 5:7, 5:7, 5:7] = 2
    labels[1, 0, 2:4, 2:4, 2:4] = 1
    target[0, 0, 1, 1, 1], target[0, 0, 5, 5, 5], target[1, 0, 2, 2, 2] = 5.0, 4.0, 2.0
    same_peaks = target.clone()
    same_peaks[0, 0, 2, 2, 2] = 0.0  # a lesion voxel below its maximum: not counted
    same_peaks[0, 0, 0, 0, 0] = 9.0  # outside every lesion: not counted
    assert abs(lesion_peak_loss(same_peaks, target, labels).item() - 1e-3) < 1e-7
    pred = target.clone().requires_grad_(True)
    low = pred * torch.where(labels > 0, 0.8, 1.0)  # every lesion 20 % low
    loss = lesion_peak_loss(low, target, labels)
    assert abs(loss.item() - (0.2 ** 2 + 1e-6) ** 0.5) < 1e-6
    loss.backward()
    assert int((pred.grad != 0).sum()) == 3  # one voxel per lesion: its maximum
    assert pred.grad[0, 0, 1, 1, 1] < 0  # raising a low maximum lowers the loss
    none = torch.zeros_like(labels)
    assert lesion_peak_loss(pred, target, none).item() == 0.0


def test_keep_checkpoint_by_psnr_or_by_suvmax_bias() -> None:
    """psnr: the best PSNR that does not raise B_max over the start; b_max: the lowest B_max
    within the PSNR slack of the start (from scratch: of the best PSNR); the untrained start
    is never kept from scratch."""
    from dicomnode.research.train_pet_denoise import keep_checkpoint

    points = [{"psnr": 45.0, "b_max": 0.15}, {"psnr": 45.6, "b_max": 0.16},
              {"psnr": 45.3, "b_max": 0.14}, {"psnr": 44.8, "b_max": 0.11},
              {"psnr": 44.2, "b_max": 0.09}]
    assert keep_checkpoint(points, from_init=True) == 2
    assert keep_checkpoint(points, from_init=True, select="b_max") == 2
    assert keep_checkpoint(points, from_init=True, select="b_max", psnr_slack=0.3) == 3
    assert keep_checkpoint(points, from_init=True, select="b_max", psnr_slack=1.0) == 4
    assert keep_checkpoint(points, from_init=False) == 1
    assert keep_checkpoint(points, from_init=False, select="b_max", psnr_slack=0.5) == 2
    assert keep_checkpoint(points[:1], from_init=False) is None
    worse = [{"psnr": 45.0, "b_max": 0.15}, {"psnr": 44.0, "b_max": 0.2}]
    assert keep_checkpoint(worse, from_init=True) == 0  # the start handed back
    with pytest.raises(ValueError, match="select"):
        keep_checkpoint(points, from_init=True, select="ssim")


@pytest.mark.slow
def test_peak_weighted_training_keeps_the_lowest_suvmax_bias_checkpoint(tmp_path) -> None:
    """--peak-weight with --select b_max: the loss has the SUVmax term (training says so),
    and the written checkpoint is keep_checkpoint's choice; b_max without lesion windows
    is refused."""
    from dicomnode.research.train_pet_denoise import keep_checkpoint, train, validation_windows

    small = {"channels": 8, "experts": 2, "blocks": 1, "heads": 2, "hidden": 4}
    pairs = [_validation_pair(0)]
    train(output=tmp_path / "start", pairs=pairs, seconds=2, patch=16, batch=2, params=small,
          trained_on="a unit test")
    windows = validation_windows([_validation_pair(1)], random_per_pair=3)
    stats = train(output=tmp_path / "m", pairs=pairs, seconds=5, patch=16, batch=2,
                  params=small, trained_on="a unit test", init=tmp_path / "start",
                  validation=windows, validate_every=1.0, peak_weight=0.5, select="b_max",
                  psnr_slack=1.0)
    points = stats["checkpoints"]
    assert stats["peak_weight"] == 0.5 and len(points) >= 3
    k = keep_checkpoint(points, from_init=True, select="b_max", psnr_slack=1.0)
    assert k is not None and stats["kept"] == points[k]
    assert points[k]["psnr"] >= points[0]["psnr"] - 1.0
    assert points[k]["b_max"] == min(p["b_max"] for p in points
                                     if p["psnr"] >= points[0]["psnr"] - 1.0)
    with pytest.raises(ValueError, match="lesions"):
        train(output=tmp_path / "n", pairs=pairs, seconds=1, patch=16, batch=2, params=small,
              trained_on="a unit test", select="b_max",
              validation=[w for w in windows if w.lesion is None])
