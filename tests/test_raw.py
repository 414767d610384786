"""The receive path's raw-element reads (dicomnode/dicom/raw.py) agree with pydicom's own.

Each helper answers only where the raw bytes are plainly what pydicom would read, and says
"ask pydicom" otherwise; these tests hold the answers against pydicom's reading of the same
bytes, and the whole header and integrity check against the pydicom-only path on the fuzz
corpus and on the real scanner data.
"""

from __future__ import annotations

import contextlib
import io
import math
import struct
from collections.abc import Iterator
from pathlib import Path

import pydicom
import pytest
from pydicom.filereader import read_dataset

import dicomnode.node.header as header_mod
import dicomnode.node.integrity as integrity_mod
from dicomnode.demo.sample import write_phantom_ct
from dicomnode.dicom.raw import plain_number_vr, raw_int, raw_numbers, raw_text, raw_us
from dicomnode.node.header import InstanceHeader
from dicomnode.node.integrity import integrity_problem
from tests.conftest import DATA
from tests.fuzz_corpus import corpus, distinct

EXPLICIT = "1.2.840.10008.1.2.1"


def _raw_dataset(tag: int, vr: str, value: bytes, *, implicit: bool = False) -> pydicom.Dataset:
    """A data set of one element as pydicom reads it off the wire: still raw."""
    if len(value) % 2:
        value += b" " if vr != "UI" else b"\0"
    group, elem = tag >> 16, tag & 0xFFFF
    if implicit:
        data = struct.pack("<HHL", group, elem, len(value)) + value
    else:
        data = struct.pack("<HH2sH", group, elem, vr.encode(), len(value)) + value
    return read_dataset(io.BytesIO(data), implicit, True)


NUMBERS = [b"1", b"-125.5", b"+3.25", b" 0.5", b".5", b"5.", b"1e5", b"-1.5E-07", b"1e99",
           b"1e999", b"-1e400", b"NaN", b"inf", b"Infinity", b"", b" ", b"1\\2\\3",
           b"1\\\\3", b"1.5\0", b"1,5", b"0x10", b"1.5.5", b"--1", b"12345678901234567",
           b"99999999999999999999", b"1 2", b"\\", b"1e", b"e5", b"\xc31"]


@pytest.mark.parametrize("value", NUMBERS)
@pytest.mark.parametrize("vr,tag", [("DS", 0x00180050), ("IS", 0x00200013)])
@pytest.mark.parametrize("implicit", [False, True])
def test_a_plain_number_is_one_pydicom_reads_as_that_finite_number(
        value: bytes, vr: str, tag: int, implicit: bool) -> None:
    ds = _raw_dataset(tag, vr, value, implicit=implicit)
    claimed = plain_number_vr(tag, ds.get_item(tag))
    numbers = raw_numbers(ds, tag)
    single_int = raw_int(ds, tag)
    try:
        read = ds[tag].value
    except Exception:  # noqa: BLE001 - pydicom refuses it: the helpers must too
        read = None
    values = list(read) if isinstance(read, pydicom.multival.MultiValue) else [read]
    if claimed is None:
        assert numbers is None and single_int is None
        return
    assert claimed == vr
    assert all(isinstance(v, int | float) and not isinstance(v, str) and math.isfinite(v)
               for v in values), values
    if vr == "IS":
        assert all(float(v).is_integer() for v in values)
    assert numbers == [float(v) for v in values]
    if len(values) == 1 and vr == "IS":
        assert single_int == int(values[0])


@pytest.mark.parametrize("value", [b"1.2.840.10008.5.1.4.1.1.2", b"1.2.3\0", b"1.2.3 ",
                                   b" 1.2.3", b"1.2\\3.4", b"1.2\x003", b"1.2.\xff", b""])
def test_a_raw_uid_reads_as_pydicom_reads_it(value: bytes) -> None:
    ds = _raw_dataset(0x00080018, "UI", value)
    text = raw_text(ds, 0x00080018)
    if text is not None:
        assert text == str(ds.SOPInstanceUID)
    else:
        assert b"\\" in value or not value.isascii()


@pytest.mark.parametrize("value", [b"CT", b"PT", b"OT ", b"CT\0", b"C T", b"CT  ", b"",
                                   b"CT\\PT"])
def test_a_raw_code_string_reads_as_pydicom_reads_it(value: bytes) -> None:
    ds = _raw_dataset(0x00080060, "CS", value)
    text = raw_text(ds, 0x00080060)
    if text is not None:
        assert text == ds.Modality
    else:
        assert b"\\" in value


@pytest.mark.parametrize("value,expected", [(b"\x00\x02", 512), (b"\x10\x00", 16),
                                            (b"\x01\x00\x02\x00", None)])
def test_a_raw_us_reads_as_pydicom_reads_it(value: bytes, expected: int | None) -> None:
    ds = _raw_dataset(0x00280010, "US", value)
    assert raw_us(ds, 0x00280010) == expected
    if expected is not None:
        assert ds.Rows == expected


@contextlib.contextmanager
def _pydicom_only() -> Iterator[None]:
    """The header and integrity checks with every raw read answering "ask pydicom": the
    path they took before the raw reads existed."""
    none = staticmethod(lambda *_: None)
    saved = {(m, n): getattr(m, n) for m, names in (
        (integrity_mod, ("plain_number_vr", "raw_us")),
        (header_mod, ("raw_int", "raw_numbers", "raw_text"))) for n in names}
    try:
        for (module, name) in saved:
            setattr(module, name, none.__func__)
        yield
    finally:
        for (module, name), value in saved.items():
            setattr(module, name, value)


def _outcome(data: bytes) -> tuple[object, ...]:
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        syntax = str(ds.file_meta.get("TransferSyntaxUID", EXPLICIT))
        problem = integrity_problem(ds, syntax)
        if problem:
            return ("refused", problem)
        return ("header", InstanceHeader.from_dataset(ds))
    except Exception as exc:  # noqa: BLE001 - the same failure either way
        return ("error", type(exc).__name__, str(exc))


def _inputs(tmp_path: Path) -> list[tuple[str, bytes]]:
    (base,) = write_phantom_ct(tmp_path / "base", slices=1, size=16)
    entries = distinct(corpus(base))
    real = sorted(p for p in DATA.rglob("*") if p.is_file() and p.suffix in ("", ".dcm"))
    entries += [(str(p.relative_to(DATA)), p.read_bytes()) for p in real[::4]]
    return entries


def test_header_and_checks_decide_as_pydicom_alone_would(tmp_path: Path) -> None:
    entries = _inputs(tmp_path)
    assert len(entries) > 250
    differ = []
    for name, data in entries:
        fast = _outcome(data)
        with _pydicom_only():
            slow = _outcome(data)
        if fast != slow:
            differ.append((name, fast, slow))
    assert not differ, differ[:3]


def test_a_plain_ct_slice_is_read_raw(tmp_path: Path) -> None:
    """The comparison above means something: on an ordinary CT slice the raw reads answer."""
    (path,) = write_phantom_ct(tmp_path, slices=1, size=16)
    ds = pydicom.dcmread(path)
    assert raw_text(ds, 0x00080018) == str(pydicom.dcmread(path).SOPInstanceUID)
    assert plain_number_vr(0x00200032, ds.get_item(0x00200032)) == "DS"
    assert raw_numbers(ds, 0x00200037) is not None
    assert raw_us(ds, 0x00280010) == 16
