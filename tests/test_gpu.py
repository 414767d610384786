"""The shipped PET model on a CUDA device gives what it gives on the CPU (bf16 autocast on CUDA,
so within a tolerance). Skipped, saying so, where no CUDA device is present."""

from __future__ import annotations

import numpy as np
import pytest

from dicomnode.pipelines.models import load_entry, load_network
from dicomnode.pipelines.pet_denoise import denoise
from tests.conftest import ROOT

pytestmark = pytest.mark.gpu


def test_pet_denoise_on_cuda_matches_the_cpu() -> None:
    entry = load_entry(ROOT / "models" / "pet-denoise-drmc")
    rng = np.random.default_rng(0)
    suv = np.zeros((48, 64, 64), np.float32)
    suv[8:40, 8:56, 8:56] = rng.gamma(4.0, 0.25, (32, 48, 48))  # noisy, mean SUV 1
    cpu = denoise(load_network(entry, device="cpu"), suv)
    gpu = denoise(load_network(entry, device="cuda"), suv)
    inside = suv > 0
    assert np.abs(gpu - cpu)[inside].mean() < 0.02 * cpu[inside].mean()
