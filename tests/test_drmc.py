"""DRMC: the properties the paper's design implies, checked on a small configuration."""

from __future__ import annotations

import torch

from dicomnode.pipelines.drmc import DRMC, DRMCConfig, charbonnier

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

    from dicomnode.pipelines.pet_denoise import draw_patch, train

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
                                   "hidden": 4}, trained_on="a unit test", version="0.0.1")
    assert stats["iterations"] > 0 and stats["lesion_fraction"] == 0.5
    manifest = yaml.safe_load((tmp_path / "m" / "manifest.yaml").read_text())
    assert manifest["version"] == "0.0.1" and manifest["trained_on"] == "a unit test"
    assert json.loads((tmp_path / "m" / "training.json").read_text())["pairs"] == 1
