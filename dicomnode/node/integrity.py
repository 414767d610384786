"""Cheap checks on a received data set, before it is filed: damaged data gets a failure status
with its reason instead of 0x0000. No pixel data is decoded.

Each check closes a way damaged data was found to pass (tests/test_fuzz.py keeps the corpus).
"""

from __future__ import annotations

import math
import struct
from typing import cast

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments
from pydicom.multival import MultiValue

from dicomnode.dicom.raw import plain_number_vr, raw_us

__all__ = ["MAX_SEQUENCE_ITEMS", "encoding_problem", "integrity_problem", "parse_cost_problem"]

NATIVE = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2",
          "1.2.840.10008.1.2.1.99"}
EOI_SYNTAXES = {
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
    "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
}
RLE = "1.2.840.10008.1.2.5"
IMPLICIT, EXPLICIT = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_VRS = {vr.encode() for vr in ["AE", "AS", "AT", "CS", "DA", "DS", "DT", "FD", "FL", "IS", "LO", "LT", "OB", "OD", "OF", "OL", "OV", "OW", "PN", "SH", "SL", "SQ", "SS", "ST", "SV", "TM", "UC", "UI", "UL", "UN", "UR", "US", "UT", "UV"]}
# image storage classes whose IODs require pixel data (CT, MR, PET, NM, CR, DX, MG, US, XA, SC,
# and their enhanced forms)
IMAGE_CLASSES = {"1.2.840.10008.5.1.4.1.1." + s for s in (
    "2", "2.1", "4", "4.1", "128", "130", "20", "1", "1.1", "1.2", "6.1", "12.1", "7")}

# A data set with more sequence items than this is refused before it is parsed: 200k empty
# items cost pydicom 12-17 s of CPU. Real objects stay far below (a large RT structure set
# has some 10^4 contour items).
MAX_SEQUENCE_ITEMS = 100_000
_ITEM_LE = b"\xfe\xff\x00\xe0"


def parse_cost_problem(encoded: bytes) -> str | None:
    """Refuse, from the raw bytes, a data set that would cost too much to parse.

    An item takes at least 8 bytes (its tag and length), so a data set of at most
    ``8 * MAX_SEQUENCE_ITEMS`` bytes cannot hold too many and is not scanned (counting over a
    512 x 512 CT image cost 0.6 ms per instance, with the interpreter lock held).
    """
    if len(encoded) <= 8 * MAX_SEQUENCE_ITEMS:
        return None
    items = encoded.count(_ITEM_LE)
    if items > MAX_SEQUENCE_ITEMS:
        return f"{items} sequence items (more than {MAX_SEQUENCE_ITEMS}): not parsed"
    return None


_NUMBER_VRS = ("IS", "DS")


def _might_be_number(tag: int, elem: object) -> bool:
    """Whether an element (raw or not) can turn into IS / DS or a sequence when pydicom reads
    it; elements that cannot are never converted (converting every element was most of the
    time these checks took)."""
    vr = getattr(elem, "VR", None)
    if vr is not None and vr != "UN":
        return vr in _NUMBER_VRS or vr == "SQ"
    if tag & 0x10000:  # private, implicit or UN: only pydicom's reading knows
        return True
    try:
        known = dictionary_VR(tag)
    except KeyError:  # not in the dictionary: read it as pydicom would
        return True
    return known in ("IS", "DS", "SQ") or " or " in known


def _number_problem(ds: Dataset) -> str | None:
    for tag in list(ds.keys()):
        if tag == 0x7FE00010:
            continue
        raw = ds.get_item(tag)
        if not _might_be_number(tag, raw) or plain_number_vr(tag, raw):
            continue
        elem = ds[tag]
        if elem.VR == "SQ":
            for item in elem.value or ():
                problem = _number_problem(item)
                if problem:
                    return problem
            continue
        if elem.VR not in _NUMBER_VRS:
            continue
        values = elem.value if isinstance(elem.value, MultiValue | list) else [elem.value]
        where = f"{elem.keyword or 'element'} {elem.tag}"
        for value in values:
            if isinstance(value, str) and value.strip():  # pydicom kept it as text: not a number
                return f"invalid {elem.VR} value {value[:16]!r} in {where}"
            if isinstance(value, float) and not math.isfinite(value):  # "NaN", "Inf", 1e999
                return f"{elem.VR} value that is not a finite number in {where}"
            if elem.VR == "IS" and isinstance(value, float) and not value.is_integer():
                return f"IS value {value} is not an integer in {where}"
    return None


def encoding_problem(encoded: bytes, transfer_syntax: str) -> str | None:
    """A body in explicit VR under an implicit VR syntax, or the reverse (pydicom would guess
    and read it, but the file would be stored under a syntax that does not describe it)."""
    if transfer_syntax not in (IMPLICIT, EXPLICIT) or len(encoded) < 8:
        return None
    looks_explicit = encoded[4:6] in _VRS
    if transfer_syntax == EXPLICIT and not looks_explicit:
        return "the data set is not in explicit VR, as its transfer syntax says"
    if transfer_syntax == IMPLICIT and looks_explicit:
        return "the data set is in explicit VR, not the implicit VR its transfer syntax says"
    return None


# Type 1 in the Image Pixel module (PS3.3 C.7.6.3): without any one of them the pixels cannot
# be read unambiguously (a missing PixelRepresentation turns negative HU into large positive
# values), so such an instance is refused rather than stored and misread later.
PIXEL_DESCRIPTION = ("Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                     "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation")


# the US elements of PIXEL_DESCRIPTION, in the order _pixel_description returns them
_PIXEL_US = tuple(cast(int, tag_for_keyword(k)) for k in (
    "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "SamplesPerPixel"))
_PHOTOMETRIC = cast(int, tag_for_keyword("PhotometricInterpretation"))


def _pixel_description(ds: Dataset) -> tuple[int, ...] | str:
    """Rows, Columns, BitsAllocated, BitsStored, HighBit, PixelRepresentation and
    SamplesPerPixel, or the reason they cannot be had."""
    fast = [raw_us(ds, tag) for tag in _PIXEL_US]
    photometric = ds.get_item(_PHOTOMETRIC)
    if None not in fast and isinstance(photometric, RawDataElement) \
            and (photometric.value or b"").rstrip(b" \0"):
        return tuple(v for v in fast if v is not None)
    missing = [k for k in PIXEL_DESCRIPTION if ds.get(k) in (None, "")]
    if missing:
        return f"pixel data without {', '.join(missing)}"
    try:
        return (int(ds.Rows), int(ds.Columns), int(ds.BitsAllocated), int(ds.BitsStored),
                int(ds.HighBit), int(ds.PixelRepresentation), int(ds.SamplesPerPixel))
    except (AttributeError, TypeError, ValueError):
        return "pixel data with a pixel description that is not a number"


def _pixel_module_problem(description: tuple[int, ...]) -> str | None:
    rows, columns, bits, stored, high, representation, samples = description
    if rows <= 0 or columns <= 0 or bits not in (1, 8, 16, 32, 64):
        return f"pixel data with Rows {rows}, Columns {columns}, BitsAllocated {bits}"
    if not 0 < stored <= bits or not stored - 1 <= high < bits:
        return f"BitsStored {stored} / HighBit {high} do not fit BitsAllocated {bits}"
    if samples not in (1, 3, 4) or representation not in (0, 1):
        return f"SamplesPerPixel {samples} / PixelRepresentation {representation}"
    return None


def _rle_problem(fragment: bytes) -> str | None:
    """A frame of RLE Lossless: a 64-byte header of segment count and offsets (PS3.5 G.3)."""
    if len(fragment) < 64:
        return "RLE frame shorter than its 64-byte header (truncated)"
    count, *offsets = struct.unpack("<16L", fragment[:64])
    if not 1 <= count <= 15:
        return f"RLE header claims {count} segments"
    used = offsets[:count]
    if used[0] != 64 or any(b <= a for a, b in zip(used, used[1:], strict=False)) \
            or used[-1] >= len(fragment):
        return "RLE segment offsets point past the frame (truncated)"
    return None


def integrity_problem(ds: Dataset, transfer_syntax: str) -> str | None:
    """``None`` when the data set looks whole, else the reason it does not.

    * a top-level element shorter than its declared length (a truncated stream);
    * an IS / DS value (any of several values) that is not a number;
    * an image (Rows present) without pixel data: a file cut before, or inside, the pixel data
      element's header;
    * Rows, Columns or BitsAllocated zero; native pixel data shorter than they claim;
    * an encapsulated JPEG / JPEG-LS / JPEG 2000 stream without its end-of-image marker;
      an RLE frame whose header points past its end.
    """
    for tag in list(ds.keys()):
        raw = ds.get_item(tag)
        if isinstance(raw, RawDataElement) and raw.length != 0xFFFFFFFF and raw.value is not None \
                and len(raw.value) < raw.length:
            return f"truncated: element {raw.tag} has {len(raw.value)} of {raw.length} bytes"
    problem = _number_problem(ds)
    if problem:
        return problem
    if "PixelData" not in ds:
        if ("Rows" in ds or str(ds.get("SOPClassUID", "")) in IMAGE_CLASSES) and not any(
                k in ds for k in ("FloatPixelData", "DoubleFloatPixelData",
                                  "PixelDataProviderURL")):
            return "an image without pixel data (cut before or inside the pixel data element)"
        return None
    description = _pixel_description(ds)
    if isinstance(description, str):
        return description
    problem = _pixel_module_problem(description)
    if problem:
        return problem
    rows, columns, bits, *_, samples = description
    if transfer_syntax in EOI_SYNTAXES or transfer_syntax == RLE:
        try:
            fragments = list(generate_fragments(ds.PixelData))
        except (ValueError, struct.error) as exc:
            return f"encapsulated pixel data cannot be split into fragments: {exc}"
        if not fragments:
            return "encapsulated pixel data without a fragment"
        if transfer_syntax == RLE:
            return _rle_problem(fragments[0]) or _rle_problem(fragments[-1])
        if b"\xff\xd9" not in fragments[-1][-4:]:  # EOI, maybe padded
            return "encapsulated pixel data ends without an end-of-image marker (truncated)"
    elif transfer_syntax in NATIVE:
        try:
            frames = int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            return "NumberOfFrames is not a number"
        raw = ds.get_item(0x7FE00010)  # its bytes, without pydicom's conversion
        pixels = raw.value if isinstance(raw, RawDataElement) \
            and raw.length != 0xFFFFFFFF and raw.value is not None else ds.PixelData
        expected = (rows * columns * samples * frames * bits + 7) // 8
        if len(pixels) < expected:
            return f"pixel data has {len(pixels)} of {expected} bytes (truncated)"
    return None
