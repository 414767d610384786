"""A TID 1500 measurement report (Comprehensive 3D SR) of PET lesions, built with highdicom.

One TID 1411 group per lesion (its segment in the SEG, volume, SUVmax, SUVmean, SUVpeak) and
one TID 1501 group for the study (metabolic tumour volume, total lesion glycolysis). Units are
UCUM; the algorithm (pipeline and version) is named in every group. The report references the
SEG, and through the evidence list the PET and CT series it was made from.
"""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from dicomnode.dicom.write.common import (
    MANUFACTURER,
    MODEL_NAME,
    OutputIdentity,
    contributing_equipment,
    fit,
)

__all__ = ["LesionMeasures", "build_lesion_report", "SUVBW", "ML", "GRAM"]

SUVBW = Code("126401", "DCM", "SUVbw")
SUVBW_UNIT = codes.UCUM.StandardizedUptakeValueBodyWeight  # g/ml{SUVbw}
ML = Code("ml", "UCUM", "milliliter")
GRAM = Code("g", "UCUM", "gram")  # TLG: SUVbw (g/ml) x ml
FDG_AVID = codes.SCT.Neoplasm


@dataclass(frozen=True, kw_only=True)
class LesionMeasures:
    """One lesion: its segment number in the SEG and what was measured on the PET."""

    segment_number: int
    volume_ml: float
    suv_max: float
    suv_mean: float
    suv_peak: float


def _algorithm(identity: OutputIdentity) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(
        name=(identity.model_name or identity.pipeline)[:64],
        version=(identity.model_version or identity.pipeline_version)[:64])


def _suv(value: float, derivation: Code) -> hd.sr.Measurement:
    return hd.sr.Measurement(name=SUVBW, value=round(float(value), 4), unit=SUVBW_UNIT,
                             derivation=derivation)


def _referenced_segment(seg: Dataset, number: int) -> hd.sr.ReferencedSegment:
    """The SR's reference to one segment of ``seg``, with its frames and source images.

    A SEG with a single segment keeps its Segment Identification in the shared functional
    groups, where ``ReferencedSegment.from_segmentation`` (highdicom 0.28) does not look: it
    fails on every study with exactly one lesion. Then every frame's source image is that
    segment's (no frame numbers: the segment number identifies it, as from_segmentation does).
    """
    shared = seg.SharedFunctionalGroupsSequence[0]
    if "SegmentIdentificationSequence" not in shared:
        return hd.sr.ReferencedSegment.from_segmentation(seg, number)
    sources: dict[str, hd.sr.SourceImageForSegmentation] = {}
    for frame in seg.PerFrameFunctionalGroupsSequence:
        for derivation in frame.get("DerivationImageSequence", []):
            for src in derivation.get("SourceImageSequence", []):
                sources.setdefault(str(src.ReferencedSOPInstanceUID),
                                   hd.sr.SourceImageForSegmentation(
                                       str(src.ReferencedSOPClassUID),
                                       str(src.ReferencedSOPInstanceUID)))
    return hd.sr.ReferencedSegment(
        sop_class_uid=str(seg.SOPClassUID), sop_instance_uid=str(seg.SOPInstanceUID),
        segment_number=number, source_images=list(sources.values()))


def build_lesion_report(*, seg: Dataset | None, pet_datasets: list[Dataset],
                        ct_datasets: list[Dataset], lesions: list[LesionMeasures],
                        identity: OutputIdentity, method: str) -> hd.sr.Comprehensive3DSR:
    """The report of ``lesions`` (segments of ``seg``), with the study's MTV and TLG.

    ``method`` says how the lesions were delineated (e.g. "SUV >= 2.5"); it goes into every
    group's tracking identifier text and the series description. No lesions: no SEG, and
    the report says MTV 0 and TLG 0.
    """
    algorithm = _algorithm(identity)
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=hd.UID(), name=f"dicomnode {identity.pipeline}"[:64],
            manufacturer_name=MANUFACTURER, model_name=MODEL_NAME))
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for lesion in lesions:
        assert seg is not None, "lesions are segments of a SEG"
        groups.append(hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
            tracking_identifier=hd.sr.TrackingIdentifier(
                uid=hd.UID(), identifier=f"Lesion {lesion.segment_number}"),
            referenced_segment=_referenced_segment(seg, lesion.segment_number),
            finding_type=FDG_AVID, algorithm_id=algorithm,
            measurements=[
                hd.sr.Measurement(name=codes.SCT.Volume, value=round(lesion.volume_ml, 4),
                                  unit=ML, algorithm_id=algorithm),
                _suv(lesion.suv_max, codes.SCT.Maximum),
                _suv(lesion.suv_mean, codes.SCT.Mean),
                _suv(lesion.suv_peak, codes.DCM.PeakValueWithinROI),
            ]))
    mtv = sum(lesion.volume_ml for lesion in lesions)
    tlg = sum(lesion.volume_ml * lesion.suv_mean for lesion in lesions)
    groups.append(hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=hd.UID(),
                                                     identifier=f"Study totals ({method})"[:64]),
        algorithm_id=algorithm,
        measurements=[
            hd.sr.Measurement(name=codes.DCM.MetabolicVolume, value=round(mtv, 4), unit=ML,
                              algorithm_id=algorithm),
            hd.sr.Measurement(name=codes.DCM.TotalLesionGlycolysis, value=round(tlg, 4),
                              unit=GRAM, algorithm_id=algorithm),
        ]))
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=observer),
        procedure_reported=codes.LN.PETWholeBody, imaging_measurements=groups)
    sr = hd.sr.Comprehensive3DSR(
        evidence=[*([seg] if seg is not None else []), *pet_datasets, *ct_datasets], content=report,
        series_instance_uid=identity.series_instance_uid, series_number=identity.series_number,
        sop_instance_uid=identity.sop_instance_uid(0), instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=MODEL_NAME,
        software_versions=list(identity.software_versions),  # type: ignore[arg-type]
        device_serial_number="0", is_complete=True, is_final=False, is_verified=False,
        series_description=fit(identity.series_description, 64))
    # the same provenance as the SEG and the image writers: model, version, weights sha256
    sr.ContributingEquipmentSequence = contributing_equipment(identity)  # type: ignore[assignment]
    return sr
