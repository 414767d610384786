"""Property-based fuzzing (hypothesis) of the whole C-STORE path: header parsing, the
integrity checks and filing, over a real association to a running node.

Each example starts from a valid CT slice and applies up to four random edits at the byte
level: an element's value replaced by arbitrary bytes under its own or another VR, with its
true length or a lying one; an element deleted; a private element of any size added; elements
out of order; the body truncated; a byte flipped. Whatever the input, the node must answer
with a status (0x0000 stored, or a refusal 0xA900 / 0xC000: never 0xA700, which would make a
sender retry a bad file forever, and never no answer), record a receipt for each 0x0000 and
an ``instance.failed`` event with that status for each refusal, file only whole instances,
and keep running. The examples are derandomised, so CI runs the same ones every time.

What it found, now refused with tests of their own: an image whose BitsStored, HighBit or
PixelRepresentation is missing (pixels that cannot be read unambiguously), a Study / Series
UID of non-ASCII bytes; and a CT slice without RescaleIntercept is stored but refused by the
pipelines (tests/test_write.py). What it keeps storing on purpose: elements out of tag order
(PS3.5 7.1 wants ascending order; pydicom reads them), private elements of any size,
an empty or missing Type 1 value outside the pixel description (the pipelines' geometry checks
refuse those series with the reason), flips inside text or pixel values.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.datadict import dictionary_VR
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_data_element
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from sqlalchemy import func, select

from bench.chaos import CT
from dicomnode.audit.models import EventLog, Instance, InstanceReceipt
from dicomnode.demo.sample import write_phantom_ct
from dicomnode.files import file_sha256
from tests.fuzz_corpus import _file

pytestmark = pytest.mark.slow  # some 250 C-STOREs with database checks between them

KEYWORDS = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
            "SamplesPerPixel", "PhotometricInterpretation", "SOPInstanceUID", "SOPClassUID",
            "SeriesInstanceUID", "StudyInstanceUID", "ImagePositionPatient",
            "ImageOrientationPatient", "PixelSpacing", "SliceThickness", "RescaleSlope",
            "RescaleIntercept", "InstanceNumber", "Modality", "SpecificCharacterSet",
            "PixelData", "NumberOfFrames", "FrameOfReferenceUID", "WindowCenter")
VRS = ("US", "SS", "UL", "FD", "DS", "IS", "CS", "UI", "LO", "PN", "OB", "OW", "SQ", "UN", "UT")
LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"}
ALLOWED = {0x0000, 0xA900, 0xC000}
VALUES = st.one_of(
    st.binary(max_size=48),
    st.sampled_from([b"", b"NaN", b"-Inf", b"1e999", b"0", b"-1", b"65536", b"1\\x", b"\\\\",
                     b"\x00\x00", b"\xff\xff\xff\xff", b"1.2.3.", b"a" * 65, b"0" * 4096]),
    st.integers(0, 2**32 - 1).map(lambda n: struct.pack("<I", n)),
    st.integers(0, 2**16 - 1).map(lambda n: struct.pack("<H", n)),
)
EDITS = st.one_of(
    st.tuples(st.just("set"), st.sampled_from(KEYWORDS), st.one_of(st.none(),
              st.sampled_from(VRS)), VALUES, st.sampled_from([0, 0, 0, 1, -1, 2**15, -2]),
              ),
    st.tuples(st.just("delete"), st.sampled_from(KEYWORDS)),
    st.tuples(st.just("private"), st.integers(0, 300_000), st.sampled_from(["LO", "OB", "UN"])),
    st.tuples(st.just("swap"), st.integers(0, 60), st.integers(0, 60)),
    st.tuples(st.just("truncate"), st.floats(0.0, 1.0)),
    st.tuples(st.just("flip"), st.floats(0.0, 1.0), st.integers(0, 255)),
)


def _element(tag: int, vr: str, value: bytes, lie: int = 0) -> bytes:
    """One explicit VR little endian element, its length field off by ``lie``."""
    length = len(value) + lie
    head = struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr.encode()
    if vr in LONG_VRS:
        return head + b"\0\0" + struct.pack("<I", length % 2**32) + value
    return head + struct.pack("<H", length % 2**16) + value


def _blobs(ds: pydicom.Dataset) -> dict[int, bytes]:
    """Each top-level element of ``ds`` encoded on its own."""
    out = {}
    for elem in ds:
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_data_element(fp, elem)
        out[int(elem.tag)] = fp.getvalue()
    return out


def mutated(base: pydicom.Dataset, edits: list[tuple[Any, ...]], uid: str) -> bytes:
    """The base slice under a fresh SOP Instance UID with ``edits`` applied; a Part 10 file
    whose file meta is intact (so that it reaches the node as a C-STORE)."""
    base.SOPInstanceUID = uid
    blobs = _blobs(base)
    order = sorted(blobs)
    body_edits = []
    for edit in edits:
        kind = edit[0]
        if kind == "set":
            _, keyword, vr, value, lie = edit
            tag = int(Tag(keyword))
            blobs[tag] = _element(tag, vr or dictionary_VR(tag), value, lie)
            order = sorted(set(order) | {tag})
        elif kind == "delete":
            tag = int(Tag(edit[1]))
            blobs.pop(tag, None)
            order = [t for t in order if t != tag]
        elif kind == "private":
            _, size, vr = edit
            blobs[0x00090010] = _element(0x00090010, "LO", b"FUZZ")
            blobs[0x00091001] = _element(0x00091001, vr, b"\x5a" * (size + size % 2))
            order = sorted(set(order) | {0x00090010, 0x00091001})
        elif kind == "swap":
            i, j = edit[1] % len(order), edit[2] % len(order)
            order[i], order[j] = order[j], order[i]
        else:
            body_edits.append(edit)
    body = b"".join(blobs[t] for t in order)
    for edit in body_edits:
        if edit[0] == "truncate":
            body = body[: int(len(body) * edit[1])]
        elif body:
            at = min(len(body) - 1, int(len(body) * edit[1]))
            body = body[:at] + bytes([edit[2]]) + body[at + 1:]
    return _file(body, sop_instance=uid, syntax=ExplicitVRLittleEndian)


def test_any_edit_of_a_valid_slice_is_stored_whole_or_refused_with_an_event(
        make_node, db_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode.app import open_database

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # the bytes as they are
    (base_file,) = write_phantom_ct(tmp_path / "base", slices=1, size=16)
    node = make_node(db_url=db_url)
    _engine, factory = open_database(node.settings, upgrade=False)
    ae = AE(ae_title="FUZZER")
    ae.add_requested_context(CT, [ExplicitVRLittleEndian])
    state: dict[str, Any] = {"assoc": None, "answers": []}
    folder = tmp_path / "examples"
    folder.mkdir()

    def counts() -> tuple[int, int]:
        with factory() as s:
            return (s.scalar(select(func.count(InstanceReceipt.id))) or 0,
                    s.scalar(select(func.count(EventLog.id)).where(
                        EventLog.event_type == "instance.failed")) or 0)

    @settings(max_examples=250, deadline=None, derandomize=True, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(edits=st.lists(EDITS, min_size=1, max_size=4))
    def one_example(edits: list[tuple[Any, ...]]) -> None:
        uid = generate_uid()
        path = folder / "example.dcm"
        path.write_bytes(mutated(pydicom.dcmread(base_file), edits, uid))
        if state["assoc"] is None or not state["assoc"].is_established:
            state["assoc"] = ae.associate("127.0.0.1", node.port, ae_title="DICOMNODE")
            assert state["assoc"].is_established
        before = counts()
        rsp = state["assoc"].send_c_store(path)
        assert "Status" in rsp, f"no answer to {edits}"  # the node answered, not aborted
        status = int(rsp.Status)
        assert status in ALLOWED, f"0x{status:04X} for {edits}"
        receipts, failures = counts()
        if status == 0:
            assert (receipts, failures) == (before[0] + 1, before[1]), edits
        else:
            assert (receipts, failures) == (before[0], before[1] + 1), edits
            with factory() as s:
                event = s.execute(select(EventLog).where(EventLog.event_type == "instance.failed")
                                  .order_by(EventLog.id.desc()).limit(1)).scalar_one()
            assert event.detail["dimse_status"] == status
        assert node.proc is not None and node.proc.poll() is None, f"node died on {edits}"
        state["answers"].append(status)

    one_example()
    if state["assoc"] is not None and state["assoc"].is_established:
        state["assoc"].release()
    with factory() as s:  # only whole instances were filed
        rows = s.execute(select(Instance)).scalars().all()
    for row in rows:
        assert file_sha256(node.settings.spool_dir / row.path) == row.sha256
    answers = state["answers"]
    stored, refused = answers.count(0), len(answers) - answers.count(0)
    assert stored and refused  # the edits reach both outcomes: the property is exercised
    print(f"C-STORE property: {len(answers)} edited slices, {stored} stored whole, {refused} "
          f"refused with an event ({ {f'0x{a:04X}': answers.count(a) for a in set(answers)} })")
