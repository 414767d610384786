"""The whole loop with Orthanc as the PACS: results come back, once, even through outages."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import highdicom as hd
import pydicom
import pytest
from sqlalchemy import select

from dicomnode.audit.models import Delivery, DeliveryStatus, EventLog, Job, JobStatus, Output
from dicomnode.demo.localpacs import Orthanc
from dicomnode.demo.sample import write_phantom_ct
from tests.conftest import ROOT, free_port, storescu, wait_for
from tests.test_receive import LIDC_UID

pytestmark = [pytest.mark.data, pytest.mark.slow]  # reads ../shared/data; Orthanc round trips


def node_config(pacs: Orthanc, **dest: object) -> dict:
    return dict(
        rules=[{"name": "ct", "match": {"Modality": {"equals": "CT"}},
                "pipelines": ["ct-tissue"], "destinations": ["pacs"]}],
        destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                               "port": pacs.dicom_port, **dest}},
        executor={"workers": 1, "poll_interval_s": 0.2},
        push={"backoff_initial_s": 0.5, "backoff_max_s": 2, "max_attempts": 30},
        schedule={"delivery_sweep_s": 0.3},
        output={"previews": False},
    )


def deliveries(node: object) -> list[Delivery]:
    with node.session() as s:  # type: ignore[attr-defined]
        return s.execute(select(Delivery).order_by(Delivery.id)).scalars().all()


def test_lidc_seg_arrives_in_orthanc_same_study(make_node, orthanc_factory, lidc_copy) -> None:
    pacs = orthanc_factory().start()
    node = make_node(**node_config(pacs))
    assert storescu(lidc_copy, node.port).returncode == 0
    done = wait_for(lambda: (d := deliveries(node)) and all(
        x.status == DeliveryStatus.DELIVERED for x in d) and d, timeout=180, interval=0.5)
    study_uid = pydicom.dcmread(next(lidc_copy.iterdir()), stop_before_pixels=True
                                ).StudyInstanceUID
    series = pacs.series_in_study(study_uid)
    segs = [s for s in series if s["modality"] == "SEG"]
    assert len(segs) == 1 and segs[0]["instances"] == 1
    instance_id = pacs.get(f"/series/{segs[0]['id']}")["Instances"][0]
    import urllib.request

    with urllib.request.urlopen(
            f"http://127.0.0.1:{pacs.http_port}/instances/{instance_id}/file") as r:
        raw = r.read()
    seg_path = node.workdir / "from-orthanc.dcm"
    seg_path.write_bytes(raw)
    seg = hd.seg.segread(seg_path)
    refs = {r.ReferencedSOPInstanceUID for s in seg.ReferencedSeriesSequence
            for r in s.ReferencedInstanceSequence}
    ct_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID
               for f in lidc_copy.iterdir()}
    assert refs and refs <= ct_uids
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == LIDC_UID
    # the audit trail links every output instance to its delivery
    with node.session() as s:
        outputs = s.execute(select(Output)).scalars().all()
        assert {o.sop_instance_uid for o in outputs} == {seg.SOPInstanceUID}
        assert {d.output_id for d in done} == {o.id for o in outputs}
        assert all(d.last_association_id and d.last_dimse_status == 0 for d in done)
        job = s.execute(select(Job)).scalar_one()
        assert job.status == JobStatus.SUCCEEDED
    assert node.stop() == 0


def test_pacs_down_then_up_delivers_once(make_node, orthanc_factory, tmp_path: Path) -> None:
    sample = tmp_path / "phantom"
    write_phantom_ct(sample, slices=40, size=128)
    pacs = orthanc_factory()  # configured but not started: the PACS is down
    node = make_node(**node_config(pacs))
    assert storescu(sample, node.port).returncode == 0
    wait_for(lambda: (d := deliveries(node)) and all(x.attempts >= 2 for x in d), timeout=120)
    assert all(d.status == DeliveryStatus.RETRY for d in deliveries(node))
    pacs.start()
    wait_for(lambda: (d := deliveries(node)) and all(
        x.status == DeliveryStatus.DELIVERED for x in d), timeout=60)
    final = deliveries(node)
    assert all(d.attempts >= 3 for d in final)  # attempts are recorded
    study = pydicom.dcmread(next(sample.iterdir()), stop_before_pixels=True).StudyInstanceUID
    segs = [s for s in pacs.series_in_study(study) if s["modality"] == "SEG"]
    assert len(segs) == 1 and segs[0]["instances"] == 1  # arrived once
    # a re-run of the job would reuse the same UIDs: the PACS would replace, not duplicate
    with node.session() as s:
        uid = s.execute(select(Output.sop_instance_uid)).scalar_one()
    assert pacs.get(f"/series/{segs[0]['id']}/instances")[0]["MainDicomTags"][
        "SOPInstanceUID"] == uid
    assert node.stop() == 0


def test_refused_sop_class_dead_letter_then_retry(make_node, orthanc_factory, tmp_path: Path
                                                  ) -> None:
    sample = tmp_path / "phantom"
    write_phantom_ct(sample, slices=40, size=128)
    port = free_port()
    # Orthanc 1.10 does not know the LABELMAP SEG class and refuses it at negotiation
    pacs = orthanc_factory(dicom_port=port).start()
    node = make_node(**node_config(pacs, seg_type="LABELMAP"))
    assert storescu(sample, node.port).returncode == 0
    dead = wait_for(lambda: (d := deliveries(node)) and all(
        x.status == DeliveryStatus.DEAD for x in d) and d, timeout=120)
    assert dead[0].attempts == 1 and dead[0].last_dimse_status == 0x0122
    with node.session() as s:
        alerts = s.execute(select(EventLog).where(EventLog.event_type == "delivery.dead")
                           ).scalars().all()
    assert alerts and alerts[0].detail["alert"] is True and alerts[0].outcome == 8
    status = subprocess.run([sys.executable, "-m", "dicomnode.cli", "status", "--config",
                             str(node.config_path)], capture_output=True, text=True, cwd=ROOT)
    assert "dead letter" in status.stdout
    # fix the PACS, then resend the dead letters
    pacs.stop()
    pacs.accept_unknown_sop_classes = True
    pacs.start()
    r = subprocess.run([sys.executable, "-m", "dicomnode.cli", "retry", "--config",
                        str(node.config_path)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0 and "1 deliveries re-queued" in r.stdout
    wait_for(lambda: all(x.status == DeliveryStatus.DELIVERED for x in deliveries(node)),
             timeout=60)
    study = pydicom.dcmread(next(sample.iterdir()), stop_before_pixels=True).StudyInstanceUID
    segs = [s for s in pacs.series_in_study(study) if s["modality"] == "SEG"]
    assert len(segs) == 1
    assert node.stop() == 0


def test_compressed_output_falls_back_to_uncompressed(make_node, orthanc_factory,
                                                      tmp_path: Path) -> None:
    """A LABELMAP SEG is written RLE-compressed; a PACS that takes only uncompressed syntaxes
    gets it decompressed instead of a refusal."""
    sample = tmp_path / "phantom"
    write_phantom_ct(sample, slices=40, size=128)
    pacs = orthanc_factory(accept_unknown_sop_classes=True,
                           transfer_syntaxes=("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")).start()
    node = make_node(**node_config(pacs, seg_type="LABELMAP"))
    assert storescu(sample, node.port).returncode == 0
    done = wait_for(lambda: (d := deliveries(node)) and all(
        x.status in (DeliveryStatus.DELIVERED, DeliveryStatus.DEAD) for x in d) and d,
        timeout=120)
    assert [d.status for d in done] == [DeliveryStatus.DELIVERED], done[0].last_error
    with node.session() as s:
        out = s.execute(select(Output)).scalar_one()
    written = pydicom.dcmread(node.settings.output_dir / out.path, stop_before_pixels=True)
    assert written.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.5"  # RLE on our side
    study = written.StudyInstanceUID
    (seg,) = [s for s in pacs.series_in_study(study) if s["modality"] == "SEG"]
    instance = pacs.get(f"/series/{seg['id']}/instances")[0]["ID"]
    meta = pacs.get(f"/instances/{instance}/metadata?expand")
    assert meta["TransferSyntax"] in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1")
    assert node.stop() == 0
