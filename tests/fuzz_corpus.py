"""A deterministic corpus of malformed C-STORE inputs, built from one valid CT slice.

Each entry is a whole Part 10 file (so that it can be offered over DICOM with its SOP class and
transfer syntax) whose data set is damaged one way. Families: truncations (everywhere, and
around the pixel data element header), impossible image claims, bad numbers, missing and bad
UIDs, undefined lengths, deep sequences, damaged encapsulated pixel data (RLE), oversized
private elements, a body encoded in another transfer syntax than it claims, a SOP class that
differs from the one offered, seeded random byte flips, and a data set too costly to parse.
"""

from __future__ import annotations

import copy
import hashlib
import io
import random
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, RLELossless

CT = "1.2.840.10008.5.1.4.1.1.2"
PREAMBLE = b"\0" * 128 + b"DICM"


def _meta_bytes(sop_class: str, sop_instance: str, syntax: str) -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = syntax
    meta.ImplementationClassUID = "1.2.826.0.1.3680043.10.999.1"
    buf = io.BytesIO()
    pydicom.filewriter.write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue()


def _body(ds: Dataset, syntax: str = ExplicitVRLittleEndian) -> bytes:
    buf = io.BytesIO()
    fp = pydicom.filebase.DicomFileLike(buf)
    fp.is_little_endian = True
    fp.is_implicit_VR = syntax == ImplicitVRLittleEndian
    pydicom.filewriter.write_dataset(fp, ds)
    return buf.getvalue()


def _file(body: bytes, *, sop_class: str = CT, sop_instance: str = "1.2.3",
          syntax: str = ExplicitVRLittleEndian) -> bytes:
    return PREAMBLE + _meta_bytes(sop_class, sop_instance, syntax) + body


def _edited(base: Dataset, edit: Callable[[Dataset], None]) -> Dataset:
    ds = copy.deepcopy(base)
    edit(ds)
    return ds


def corpus(base_file: Path) -> Iterator[tuple[str, bytes]]:
    """(name, Part 10 bytes) for every malformed input."""
    base = pydicom.dcmread(base_file)
    uid = str(base.SOPInstanceUID)
    body = _body(base)

    def whole(ds: Dataset, **kw: str) -> bytes:
        return _file(_body(ds), sop_instance=str(ds.get("SOPInstanceUID", uid) or uid), **kw)

    # truncations: 40 cut points over the body, and every byte around the pixel data header
    for i in range(40):
        cut = 1 + i * (len(body) - 2) // 40
        yield f"truncated-at-{cut}", _file(body[:cut], sop_instance=uid)
    pixel_at = body.rfind(b"\xe0\x7f\x10\x00")
    for delta in range(-4, 13):
        yield f"cut-pixel-header{delta:+d}", _file(body[:pixel_at + delta], sop_instance=uid)

    # impossible image claims
    claims: list[tuple[str, str, object]] = [
        ("Rows", "US", 0), ("Rows", "US", 65535), ("Columns", "US", 0), ("Columns", "US", 65535),
        ("BitsAllocated", "US", 0), ("BitsAllocated", "US", 1), ("BitsAllocated", "US", 7),
        ("BitsAllocated", "US", 64), ("SamplesPerPixel", "US", 0), ("SamplesPerPixel", "US", 3),
        ("NumberOfFrames", "IS", "1000"), ("NumberOfFrames", "IS", "x"),
        ("BitsStored", "US", 40), ("HighBit", "US", 99), ("PixelRepresentation", "US", 7),
    ]
    for keyword, vr, value in claims:
        def claim(ds: Dataset, k: str = keyword, v: object = value, r: str = vr) -> None:
            ds.add_new(pydicom.datadict.tag_for_keyword(k), r, None)  # type: ignore[arg-type]
            ds[k]._value = v  # as given: pydicom would refuse some of these values
        yield f"claim-{keyword}-{value}", whole(_edited(base, claim))
    # the pixel description incomplete (found by tests/test_store_properties.py)
    for keyword in ("BitsStored", "HighBit", "PixelRepresentation", "SamplesPerPixel",
                    "PhotometricInterpretation"):
        def drop(ds: Dataset, k: str = keyword) -> None:
            del ds[k]
        yield f"pixel-description-no-{keyword}", whole(_edited(base, drop))

    # numbers that are not numbers (one or several values)
    for keyword in ("SliceThickness", "RescaleSlope", "RescaleIntercept", "WindowCenter",
                    "ImagePositionPatient", "PixelSpacing", "SliceLocation"):
        for bad in ("abc", "1\\x", "1e999", "--1", "NaN", "Inf"):
            def number(ds: Dataset, k: str = keyword, b: str = bad) -> None:
                if k not in ds:
                    ds.add_new(pydicom.datadict.tag_for_keyword(k), "DS", None)  # type: ignore[arg-type]
                elem = ds[k]
                elem._value = b if elem.VM <= 1 else ["0", b, "0"][: max(2, elem.VM)]
            yield f"number-{keyword}-{bad}", whole(_edited(base, number))
    for keyword in ("InstanceNumber", "SeriesNumber", "AcquisitionNumber"):
        for bad in ("1A", "2.5", "x"):
            def integer(ds: Dataset, k: str = keyword, b: str = bad) -> None:
                ds.add_new(pydicom.datadict.tag_for_keyword(k), "IS", None)  # type: ignore[arg-type]
                ds[k]._value = b
            yield f"integer-{keyword}-{bad}", whole(_edited(base, integer))

    # UIDs: missing, empty, too long, not a UID
    for keyword in ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "SOPClassUID"):
        for name, value in (("missing", None), ("empty", ""), ("long", "1." + "2" * 70),
                            ("letters", "1.2.abc"), ("path", "../../etc/passwd"),
                            ("binary", "1.2.\x91\x01")):
            def uid_edit(ds: Dataset, k: str = keyword, v: str | None = value) -> None:
                if v is None:
                    del ds[k]
                else:
                    ds[k]._value = v
            yield f"uid-{keyword}-{name}", _file(_body(_edited(base, uid_edit)), sop_instance=uid)

    # undefined lengths where none may be, and an unterminated sequence
    for keyword in ("PatientName", "StudyDescription", "Rows", "ImageType", "PixelSpacing"):
        tag = pydicom.datadict.tag_for_keyword(keyword)
        at = body.find(struct.pack("<HH", tag >> 16, tag & 0xFFFF))  # type: ignore[operator]
        if at < 0:
            continue
        mangled = body[:at + 6] + b"\xff\xff" + body[at + 8:]  # 16-bit length 0xFFFF
        yield f"undefined-length-{keyword}", _file(mangled, sop_instance=uid)
        yield f"vr-garbage-{keyword}", _file(body[:at + 4] + b"\x00\x01" + body[at + 6:],
                                             sop_instance=uid)
    for depth in (1, 5):
        seq = b"".join([b"\x08\x00\x15\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"]
                       * depth)
        yield f"unterminated-sequence-{depth}", _file(body[:pixel_at] + seq, sop_instance=uid)

    # deep sequences (valid encoding, absurd nesting), built as bytes: pydicom's own writer
    # exhausts memory on a few hundred levels
    opening = b"\x08\x00\x40\x11SQ\x00\x00\xff\xff\xff\xff\xfe\xff\x00\xe0\xff\xff\xff\xff"
    closing = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00\xfe\xff\xdd\xe0\x00\x00\x00\x00"
    for depth in (10, 100, 150, 1000, 5000):
        nested = opening * depth + closing * depth
        yield f"deep-sequence-{depth}", _file(body[:pixel_at] + nested + body[pixel_at:],
                                              sop_instance=uid)

    # encapsulated (RLE) pixel data, damaged
    rle = copy.deepcopy(base)
    rle.compress(RLELossless)
    rle_body = _body(rle)
    rle_pixels = rle_body.rfind(b"\xe0\x7f\x10\x00")
    for cut in (8, 16, 30, 60, 90, 120, 200, 300, len(rle_body) - rle_pixels - 8):
        yield f"rle-truncated-{cut}", _file(rle_body[:rle_pixels + cut], sop_instance=uid,
                                            syntax=RLELossless)
    for name, header in (("zero-segments", struct.pack("<16L", 0, *[0] * 15)),
                         ("16-segments", struct.pack("<16L", 16, *[64] * 15)),
                         ("offset-past-end", struct.pack("<16L", 2, 64, 10**6, *[0] * 13)),
                         ("offsets-backwards", struct.pack("<16L", 2, 300, 64, *[0] * 13))):
        frame_at = rle_body.find(b"\xfe\xff\x00\xe0", rle_body.find(b"\xfe\xff\x00\xe0",
                                                                      rle_pixels) + 8) + 8
        yield f"rle-header-{name}", _file(rle_body[:frame_at] + header + rle_body[frame_at + 64:],
                                          sop_instance=uid, syntax=RLELossless)
    yield "rle-no-delimiter", _file(rle_body[:-8], sop_instance=uid, syntax=RLELossless)
    yield "rle-native-body", _file(body, sop_instance=uid, syntax=RLELossless)
    yield "native-rle-body", _file(rle_body, sop_instance=uid)

    # oversized private elements and a private creator missing
    for size in (1 << 16, 1 << 20, 8 << 20):
        def private(ds: Dataset, n: int = size) -> None:
            block = ds.private_block(0x0011, "FUZZ CREATOR", create=True)
            block.add_new(0x01, "OB", b"\x01" * n)
        yield f"private-{size}", whole(_edited(base, private))
    yield "private-no-creator", whole(_edited(base, lambda ds: ds.add_new(0x00111001, "LO", "x")))

    # a body in another transfer syntax than the one it claims
    implicit = _body(base, ImplicitVRLittleEndian)
    yield "implicit-body-claims-explicit", _file(implicit, sop_instance=uid)
    yield "explicit-body-claims-implicit", _file(body, sop_instance=uid,
                                                 syntax=ImplicitVRLittleEndian)
    yield "explicit-body-claims-big-endian", _file(body, sop_instance=uid,
                                                   syntax="1.2.840.10008.1.2.2")
    yield "plain-body-claims-deflate", _file(body, sop_instance=uid,
                                             syntax="1.2.840.10008.1.2.1.99")

    # a data set whose SOP class is not the one offered
    for other in ("1.2.840.10008.5.1.4.1.1.4", "1.2.840.10008.5.1.4.1.1.128",
                  "1.2.840.10008.5.1.4.1.1.7"):
        yield f"sop-class-{other}", _file(body, sop_class=other, sop_instance=uid)

    # seeded random byte flips in the header part of the body
    rng = random.Random(20261206)
    for i in range(70):
        mutated = bytearray(body)
        for _ in range(rng.randint(1, 4)):
            mutated[rng.randrange(0, pixel_at)] = rng.randrange(256)
        yield f"flip-{i}", _file(bytes(mutated), sop_instance=uid)

    # too costly to parse: 200k empty items in one sequence
    items = b"\xfe\xff\x00\xe0\x00\x00\x00\x00" * 200_000
    seq = b"\x08\x00\x15\x11SQ\x00\x00" + struct.pack("<L", len(items)) + items
    yield "200k-empty-items", _file(body[:pixel_at] + seq + body[pixel_at:], sop_instance=uid)


def distinct(entries: Iterator[tuple[str, bytes]]) -> list[tuple[str, bytes]]:
    """Drop byte-identical entries (keeps the first name)."""
    seen: set[str] = set()
    out = []
    for name, data in entries:
        digest = hashlib.sha256(data).hexdigest()
        if digest not in seen:
            seen.add(digest)
            out.append((name, data))
    return out
