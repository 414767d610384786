"""The header fields the receive path files an instance under, read from its data set."""

from __future__ import annotations

import math
from dataclasses import dataclass

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset

from dicomnode.dicom.raw import raw_int, raw_numbers, raw_text

__all__ = ["InstanceHeader", "InvalidInstance"]


class InvalidInstance(ValueError):
    """A dataset this node cannot file: the message says which attribute and why."""


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return tag


def _float_list(ds: Dataset, keyword: str, n: int) -> list[float] | None:
    out = raw_numbers(ds, _TAGS[keyword])  # plain numbers read without pydicom's conversion
    if out is None:
        value = ds.get(keyword)
        if value is None:
            return None
        try:
            out = [float(v) for v in value]
        except (TypeError, ValueError):
            return None
    if not all(math.isfinite(v) for v in out):
        # NaN / Inf geometry: refused the same on every database (PostgreSQL's JSON has no NaN)
        raise InvalidInstance(f"{keyword} holds a value that is not a finite number")
    return out if len(out) == n else None


def _int_or_none(ds: Dataset, keyword: str) -> int | None:
    plain = raw_int(ds, _TAGS[keyword]) if keyword in _TAGS else None
    if plain is not None:
        return plain
    value = ds.get(keyword)
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


_TAGS = {keyword: _tag(keyword) for keyword in (
    "SOPInstanceUID", "SOPClassUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality",
    "InstanceNumber", "ImagesInAcquisition", "ImagePositionPatient", "ImageOrientationPatient")}


@dataclass(frozen=True, kw_only=True)
class InstanceHeader:
    """What the spool and the completion check need from one instance's header."""

    sop_instance_uid: str
    sop_class_uid: str
    series_instance_uid: str
    study_instance_uid: str
    modality: str | None
    patient_id: str | None
    instance_number: int | None
    position: list[float] | None
    orientation: list[float] | None
    expected_count: int | None

    @classmethod
    def from_dataset(cls, ds: Dataset) -> InstanceHeader:
        """Read the header fields; raises :class:`InvalidInstance` when a required UID is absent."""
        values: dict[str, str] = {}
        for keyword in (
            "SOPInstanceUID",
            "SOPClassUID",
            "SeriesInstanceUID",
            "StudyInstanceUID",
        ):
            text = raw_text(ds, _TAGS[keyword])  # as pydicom reads it, without validation
            value = (str(ds.get(keyword, "") or "") if text is None else text).strip()
            if not value:
                raise InvalidInstance(f"{keyword} is missing or empty")
            if len(value) > 64:
                raise InvalidInstance(f"{keyword} is longer than 64 characters")
            if not (value.isascii() and value.isprintable()):
                raise InvalidInstance(f"{keyword} holds bytes that no UID can hold")
            values[keyword] = value
        expected = _int_or_none(ds, "ImagesInAcquisition")
        modality = raw_text(ds, _TAGS["Modality"])
        if modality is None:
            modality = ds.get("Modality")
        if modality == "PT":
            expected = _int_or_none(ds, "NumberOfSlices") or expected
        return cls(
            sop_instance_uid=values["SOPInstanceUID"],
            sop_class_uid=values["SOPClassUID"],
            series_instance_uid=values["SeriesInstanceUID"],
            study_instance_uid=values["StudyInstanceUID"],
            modality=str(modality or "") or None,
            patient_id=str(ds.get("PatientID", "") or "") or None,
            instance_number=_int_or_none(ds, "InstanceNumber"),
            position=_float_list(ds, "ImagePositionPatient", 3),
            orientation=_float_list(ds, "ImageOrientationPatient", 6),
            expected_count=expected,
        )
