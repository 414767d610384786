"""The C-STORE fast path's byte handling (dicomnode/dicom/pdata.py): P-DATA-TF PDUs into whole
C-STORE requests, everything else back to pynetdicom untouched, and a C-STORE-RSP that is the
same bytes pynetdicom would send."""

from __future__ import annotations

import struct
from io import BytesIO

import pytest
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ, C_STORE_RSP
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.pdu import P_DATA_TF

from dicomnode.dicom.pdata import MessageAssembler, Store, c_store_rsp, command_fields

CT = "1.2.840.10008.5.1.4.1.1.2"


def _pdus(primitive: C_STORE | C_ECHO, message_cls: type, *, max_pdu: int, context_id: int = 1,
          data: bytes | None = None) -> list[bytearray]:
    """The P-DATA-TF PDUs pynetdicom itself sends for ``primitive``."""
    message = message_cls()
    message.primitive_to_message(primitive)
    message.context_id = context_id
    if data is not None:
        message.data_set = BytesIO(data)
    out = []
    for p_data in message.encode_msg(context_id, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(p_data)
        out.append(bytearray(pdu.encode()))
    return out


def _store_request(data: bytes, message_id: int = 7) -> C_STORE:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = CT
    request.AffectedSOPInstanceUID = "1.2.3.4.5"
    request.Priority = 2
    request.DataSet = BytesIO(data)
    return request


def test_a_store_split_over_many_pdus_comes_out_whole_with_its_command_fields() -> None:
    data = bytes(range(256)) * 400  # 100 KiB: many 16 KiB PDUs
    pdus = _pdus(_store_request(data), C_STORE_RQ, max_pdu=16384, context_id=3, data=data)
    assert len(pdus) > 5
    asm = MessageAssembler(lambda cid, fields: True)
    results = []
    for pdu in pdus:
        results.append(asm.feed(pdu))
        assert asm.pending == (len(results) < len(pdus))
    assert results[:-1] == [None] * (len(pdus) - 1)
    store = results[-1]
    assert isinstance(store, Store) and not asm.pending
    assert store.context_id == 3 and store.data_set == data and store.raw == pdus
    assert struct.unpack("<H", store.fields[0x0110])[0] == 7
    assert store.fields[0x1000].rstrip(b"\0") == b"1.2.3.4.5"


def test_other_messages_and_unwanted_stores_go_back_to_pynetdicom_as_they_came() -> None:
    echo = C_ECHO()
    echo.MessageID = 1
    echo.AffectedSOPClassUID = "1.2.840.10008.1.1"
    echo_pdus = _pdus(echo, C_ECHO_RQ, max_pdu=16384)
    asm = MessageAssembler(lambda cid, fields: cid != 5)
    assert [asm.feed(p) for p in echo_pdus] == [[p] for p in echo_pdus]
    data = b"\0" * 40000
    refused = _pdus(_store_request(data), C_STORE_RQ, max_pdu=16384, context_id=5, data=data)
    # not wanted (here: its context): each PDU handed on at once, the data set not kept
    assert [asm.feed(p) for p in refused] == [[p] for p in refused]
    assert not asm.off and not asm.pending
    wanted = _pdus(_store_request(data), C_STORE_RQ, max_pdu=16384, context_id=1, data=data)
    assert isinstance([asm.feed(p) for p in wanted][-1], Store)


@pytest.mark.parametrize("damage", ["two messages", "context changes", "bad item", "data first"])
def test_anything_unexpected_hands_every_held_pdu_to_pynetdicom_and_stops(damage: str) -> None:
    data = b"\1" * 40000
    pdus = _pdus(_store_request(data), C_STORE_RQ, max_pdu=16384, context_id=1, data=data)
    if damage == "two messages":  # the next request's command in the data set's last PDU
        extra = pdus[0][6:]
        last = pdus[-1]
        pdus[-1] = bytearray(last[:2] + struct.pack(">L", len(last) - 6 + len(extra))
                             + last[6:] + extra)
    elif damage == "context changes":
        pdus[2][10] = 9  # the first PDV item's presentation context ID
    elif damage == "bad item":
        pdus[2][6:10] = struct.pack(">L", 10**6)  # a PDV item longer than its PDU
    else:
        pdus = pdus[1:]  # a data set fragment before any command
    asm = MessageAssembler(lambda cid, fields: True)
    handed: list[bytearray] = []
    for pdu in pdus:
        result = asm.feed(pdu)
        assert not isinstance(result, Store)
        handed.extend(result or [])
    assert asm.off and handed == pdus  # all of them, in order, once


def test_a_command_set_that_is_not_one_is_refused() -> None:
    assert command_fields(struct.pack("<HHL", 0, 0x0100, 2) + b"\1\0") == {0x0100: b"\1\0"}
    with pytest.raises(ValueError):
        command_fields(struct.pack("<HHL", 8, 0x0020, 2) + b"CT")  # not group 0000
    with pytest.raises(ValueError):
        command_fields(struct.pack("<HHL", 0, 0x0100, 4) + b"\1\0")  # runs past the end


@pytest.mark.parametrize(("status", "uid"), [(0x0000, "1.2.3.4.5"), (0xA900, "1.2.3.4.56"),
                                              (0xC211, "1.2.3")])
def test_the_response_is_byte_for_byte_pynetdicoms(status: int, uid: str) -> None:
    request = _store_request(b"")
    request.AffectedSOPInstanceUID = uid
    request_pdus = _pdus(request, C_STORE_RQ, max_pdu=16384, context_id=7, data=b"\0\0")
    fields = command_fields(bytes(request_pdus[0][12:]))
    response = C_STORE()
    response.MessageIDBeingRespondedTo = 7
    response.AffectedSOPClassUID = CT
    response.AffectedSOPInstanceUID = uid
    response.Status = status
    (reference,) = _pdus(response, C_STORE_RSP, max_pdu=16384, context_id=7)
    assert c_store_rsp(7, fields, status) == bytes(reference)
