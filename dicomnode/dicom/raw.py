"""Values read straight from a data set's still-raw elements, where that is unambiguous.

pydicom reads an element lazily: the first access converts its raw bytes (value objects,
validation, regular expressions), which was most of the receive path's header time. For the
few elements the receive path reads from every instance (UIDs, IS / DS numbers, the US values
of the Image Pixel module), these helpers read the raw bytes directly when they are plainly
what pydicom would turn them into, and return None otherwise, so that the caller falls back to
pydicom and judges the value exactly as before. ``tests/test_raw.py`` checks each against
pydicom's own reading.
"""

from __future__ import annotations

import re

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset

__all__ = ["plain_number_vr", "raw_int", "raw_numbers", "raw_text", "raw_us"]

# IS / DS values that pydicom certainly reads as finite numbers (IS: as integers): digits with
# an optional sign, point and short exponent, space padding, several values split by "\".
# Empty values, NUL padding, long exponents, long integers and text are left to pydicom.
_DS = rb" *[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,2})? *"
_IS = rb" *[+-]?[0-9]{1,12} *"  # 12 digits at most: exact as a float, as pydicom reads it
_PLAIN = {vr: re.compile(rb"%s(?:\\%s)*" % (value, value))
          for vr, value in (("DS", _DS), ("IS", _IS))}


def _vr(tag: int, elem: RawDataElement) -> str | None:
    """The element's VR: explicit, or the dictionary's for a public implicit one."""
    if elem.VR is not None:
        return str(elem.VR)
    if tag & 0x10000:  # private: only its creator knows
        return None
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return None


def plain_number_vr(tag: int, elem: object) -> str | None:
    """``"IS"`` / ``"DS"`` when ``elem`` is still raw and every value in it is a plain number
    of that VR, else None."""
    if not isinstance(elem, RawDataElement) or not elem.value:
        return None
    vr = _vr(tag, elem)
    if vr not in _PLAIN or _PLAIN[vr].fullmatch(elem.value) is None:
        return None
    return vr


def raw_numbers(ds: Dataset, tag: int) -> list[float] | None:
    """The values of a still-raw, plain IS / DS element as floats (None: ask pydicom)."""
    elem = ds.get_item(tag)
    if plain_number_vr(tag, elem) is None:
        return None
    assert isinstance(elem, RawDataElement) and elem.value is not None
    return [float(v) for v in elem.value.split(b"\\")]


def raw_int(ds: Dataset, tag: int) -> int | None:
    """The value of a still-raw, plain, single-valued IS element (None: ask pydicom)."""
    elem = ds.get_item(tag)
    if plain_number_vr(tag, elem) != "IS":
        return None
    assert isinstance(elem, RawDataElement) and elem.value is not None
    return None if b"\\" in elem.value else int(elem.value)


def raw_text(ds: Dataset, tag: int) -> str | None:
    """A still-raw, single-valued UI or CS element as pydicom reads it (without trailing NULs
    and spaces; a UI without leading white space either); None: ask pydicom."""
    elem = ds.get_item(tag)
    if not isinstance(elem, RawDataElement) or elem.value is None:
        return None
    vr = _vr(tag, elem)
    raw = elem.value
    if vr not in ("UI", "CS") or b"\\" in raw or not raw.isascii():
        return None
    text = raw.decode("ascii").rstrip(" \0")  # pydicom's multi_string
    return text.strip() if vr == "UI" else text  # and pydicom's UID()


def raw_us(ds: Dataset, tag: int) -> int | None:
    """A still-raw, single US value (None: ask pydicom)."""
    elem = ds.get_item(tag)
    if not isinstance(elem, RawDataElement) or elem.value is None or len(elem.value) != 2 \
            or _vr(tag, elem) != "US":
        return None
    return int.from_bytes(elem.value, "little" if elem.is_little_endian else "big")
