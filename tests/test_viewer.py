"""The results in a real viewer: OHIF reading Orthanc's DICOMweb, driven by headless Chromium.

A real CT and a real PET go through the node (ct-tissue, ct2pet, pet-denoise) and the results are
delivered to Orthanc as they would be to a site's PACS. OHIF then opens them the way a radiologist
would, and each screenshot is checked on its pixels: the SEG colours over the CT, the synthetic PET
in colour over the CT, and two PET viewports side by side. The screenshots land in
``$DICOMNODE_SCREENSHOTS`` (``make screenshots`` points it at docs/img) or in the test's tmp dir.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from sqlalchemy import select

from dicomnode.audit.models import Delivery, DeliveryStatus, Job, JobStatus
from dicomnode.demo.localpacs import DICOMWEB_PLUGIN, Orthanc
from tests.conftest import DATA, LIDC, ROOT, NodeProcess, free_port, require, storescu, wait_for

pytestmark = [pytest.mark.data, pytest.mark.slow, pytest.mark.viewer]

OHIF_DIST = ROOT / ".cache" / "ohif" / "dist"
PET = DATA / "pet" / "philips-gemini-ctac"
VIEWPORT = {"width": 1400, "height": 900}


def _node_config(workdir: Path, pacs: Orthanc) -> dict[str, Any]:
    return {
        "var_dir": str(workdir / "var"),
        "node": {"port": free_port()},
        "database": {"url": None},
        "completion": {"quiet_period_s": 2, "max_wait_s": 600},
        "rules": [
            {"name": "ct", "match": {"Modality": {"equals": "CT"}},
             "pipelines": ["ct-tissue", "ct2pet"], "destinations": ["pacs"]},
            {"name": "pet", "match": {"Modality": {"equals": "PT"}},
             "pipelines": ["pet-denoise"], "destinations": ["pacs"]},
        ],
        "destinations": {"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                  "port": pacs.dicom_port}},
        "executor": {"workers": 1, "poll_interval_s": 0.2},
        "schedule": {"delivery_sweep_s": 0.3},
        "http": {"port": None},
    }


def _series_of(folder: Path) -> tuple[str, str]:
    first = next(p for p in sorted(folder.iterdir()) if p.is_file() and p.suffix != ".xml")
    ds = pydicom.dcmread(first, stop_before_pixels=True)
    return str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)


def build_results(workdir: Path) -> dict[str, Any]:
    """Orthanc (with DICOMweb) holding a CT, a low-dose PET and the node's results for both."""
    workdir.mkdir(parents=True, exist_ok=True)
    lowdose = workdir / "lowdose"
    subprocess.run([sys.executable, "-m", "dicomnode.cli", "simulate", "lowdose", "--input",
                    str(PET), "--drf", "10", "--output", str(lowdose)], check=True,
                   capture_output=True)
    ct = workdir / "ct"
    ct.mkdir(exist_ok=True)
    for f in sorted(LIDC.glob("*.dcm")):
        (ct / f.name).write_bytes(f.read_bytes())
    pacs = Orthanc(workdir / "orthanc", dicom_port=free_port(), http_port=free_port(),
                   peers=("DICOMNODE", "MODALITY"), dicomweb=True).start()
    (workdir / "node").mkdir(exist_ok=True)
    node = NodeProcess(workdir / "node", _node_config(workdir / "node", pacs)).start()
    try:
        for folder in (ct, lowdose):  # the PACS has the inputs, as at a site
            assert storescu(folder, pacs.dicom_port, called="ORTHANC").returncode == 0
            assert storescu(folder, node.port).returncode == 0

        def delivered() -> bool:
            with node.session() as s:
                jobs = s.execute(select(Job)).scalars().all()
                rows = s.execute(select(Delivery)).scalars().all()
            failed = [j for j in jobs if j.status in (JobStatus.FAILED, JobStatus.DEAD)]
            assert not failed, [(j.pipeline, j.status, j.error_code) for j in failed]
            return (len(jobs) == 3 and all(j.status == JobStatus.SUCCEEDED for j in jobs)
                    and bool(rows) and all(d.status == DeliveryStatus.DELIVERED for d in rows))

        wait_for(delivered, timeout=900, interval=1.0)
    finally:
        node.stop()
    ct_study, ct_series = _series_of(ct)
    pet_study, pet_series = _series_of(lowdose)
    series = {s["description"]: s for s in pacs.series_in_study(ct_study)
              + pacs.series_in_study(pet_study)}
    return {"pacs": pacs, "ct_study": ct_study, "ct_series": ct_series,
            "pet_study": pet_study, "pet_series": pet_series, "series": series}


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    require(LIDC)
    require(PET)
    require(DICOMWEB_PLUGIN)
    require(OHIF_DIST / "index.html")  # `make viewer` unpacks the OHIF build there
    out = build_results(tmp_path_factory.mktemp("viewer"))
    yield out
    out["pacs"].stop()


@pytest.fixture(scope="module")
def browser(results: dict[str, Any]) -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    from dicomnode.demo.viewer import LocalViewer

    viewer = LocalViewer(OHIF_DIST, results["pacs"].http_port, free_port()).start()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path="/usr/bin/chromium",
                                     args=["--no-sandbox", "--use-gl=swiftshader",
                                           "--enable-unsafe-swiftshader"])
        yield viewer, chromium
        chromium.close()
    viewer.stop()


def shot_dir(tmp_path: Path) -> Path:
    out = Path(os.environ.get("DICOMNODE_SCREENSHOTS", tmp_path))
    out.mkdir(parents=True, exist_ok=True)
    return out


def open_viewer(browser: Any, path: str) -> Any:
    viewer, chromium = browser
    page = chromium.new_page(viewport=VIEWPORT)
    page.goto(viewer.url(path))
    page.wait_for_selector("canvas", timeout=60_000)
    skip = page.get_by_text("Skip all")
    if skip.count():
        skip.first.click()
    return page


def _pixels(locator: Any) -> np.ndarray:
    """The rendered pixels of one element (a viewport), as RGB int16."""
    return np.asarray(Image.open(io.BytesIO(locator.screenshot())).convert("RGB")).astype(np.int16)


def coloured_fraction(rgb: np.ndarray) -> float:
    """Share of pixels that are clearly coloured (a grey CT or PET has none)."""
    return float(((rgb.max(axis=2) - rgb.min(axis=2)) > 25).mean())


def roughness(rgb: np.ndarray) -> float:
    """Mean absolute Laplacian of the grey levels where the image is not background."""
    grey = rgb.mean(axis=2)
    lap = np.abs(4 * grey[1:-1, 1:-1] - grey[:-2, 1:-1] - grey[2:, 1:-1]
                 - grey[1:-1, :-2] - grey[1:-1, 2:])
    inside = grey[1:-1, 1:-1] > 40
    return float(lap[inside].mean())


def scroll(page: Any, viewport: Any, steps: int) -> None:
    viewport.hover()
    for _ in range(steps):
        page.mouse.wheel(0, 100)
        time.sleep(0.03)


def settle(page: Any, seconds: float = 4.0) -> None:
    page.mouse.move(5, VIEWPORT["height"] - 5)  # no hover highlight in the picture
    time.sleep(seconds)


def test_seg_overlays_the_ct_in_ohif(results: dict[str, Any], browser: Any,
                                     tmp_path: Path) -> None:
    page = open_viewer(browser, f"/viewer?StudyInstanceUIDs={results['ct_study']}")
    viewport = page.locator(".cornerstone-viewport-element").first
    scroll(page, viewport, 60)
    settle(page)
    bare = coloured_fraction(_pixels(viewport))
    thumbs = page.locator("[data-cy^='study-browser-thumbnail']")
    thumbs.filter(has_text="AI CT tissue segmentation").first.dblclick()
    page.get_by_text("Yes", exact=True).click(timeout=60_000)  # "open this Segmentation?"
    time.sleep(8)
    viewport = page.locator(".cornerstone-viewport-element").first
    scroll(page, viewport, 60)
    page.locator('[data-cy="panelSegmentation-btn"]').first.click()
    settle(page, 6)
    overlaid = coloured_fraction(_pixels(viewport))
    page.screenshot(path=str(shot_dir(tmp_path) / "ohif-ct-tissue-seg.png"))
    text = page.inner_text("body")
    page.close()
    assert bare < 0.03, bare  # the CT alone is grey (the viewport icons are all that is blue)
    assert overlaid > 0.15, overlaid  # the tissue segments cover the body in colour
    assert "AI CT tissue segmentation" in text


def test_synthetic_pet_is_fused_on_the_ct_in_ohif(results: dict[str, Any], browser: Any,
                                                  tmp_path: Path) -> None:
    page = open_viewer(browser, f"/tmtv?StudyInstanceUIDs={results['ct_study']}")
    time.sleep(20)  # the PET/CT mode builds volumes of both series
    settle(page)
    viewports = page.locator(".cornerstone-viewport-element")
    assert viewports.count() >= 9  # CT, PET, fusion in three planes, and the PET MIP
    colours = [coloured_fraction(_pixels(viewports.nth(i))) for i in range(viewports.count())]
    page.screenshot(path=str(shot_dir(tmp_path) / "ohif-ct2pet-fusion.png"))
    text = page.inner_text("body")
    page.close()
    # the first six are the grey CT and PET rows; the fusion row (6-8) carries the colour map
    assert max(colours[:6]) < 0.05, colours
    assert min(colours[6:9]) > 0.20, colours
    assert "AI SYNTHETIC" in text


def test_enhanced_pet_beside_its_input_in_ohif(results: dict[str, Any], browser: Any,
                                               tmp_path: Path) -> None:
    page = open_viewer(browser, f"/viewer?StudyInstanceUIDs={results['pet_study']}")
    page.locator('[data-cy="Layout"]').first.click()
    page.locator('[data-cy="Layout-1-0"]').first.click()  # two viewports
    time.sleep(6)
    viewports = page.locator(".cornerstone-viewport-element")
    assert viewports.count() == 2
    for i in range(2):
        scroll(page, viewports.nth(i), 45)  # the middle of the 90 slices
    settle(page)
    text = [page.locator(".viewport-wrapper").nth(i).inner_text() for i in range(2)]
    rough = [roughness(_pixels(viewports.nth(i))) for i in range(2)]
    page.screenshot(path=str(shot_dir(tmp_path) / "ohif-pet-denoise.png"))
    page.close()
    enhanced = next(i for i, t in enumerate(text) if "AI PET enhanced" in t)
    low = next(i for i, t in enumerate(text) if "SIMULATED 1/10 dose" in t)
    assert "45" in text[enhanced] and "45" in text[low], text  # both on slice 45 of 90
    # the enhanced series is visibly less noisy than its input, as rendered
    assert rough[enhanced] < 0.7 * rough[low], rough
