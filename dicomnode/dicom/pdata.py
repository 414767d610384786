"""P-DATA-TF PDUs into DIMSE messages, C-STORE requests kept whole for the fast receive path.

pynetdicom turns every P-DATA-TF PDU into a PDU object, a P-DATA primitive, a state-machine
transition with its event, and a write into the DIMSE message's ``BytesIO``, copying each
fragment several times; a 512 KiB CT slice arrives in many PDUs. :class:`MessageAssembler`
does the same reassembly on the raw PDU bytes: it reads the PDV items' headers (PS3.8 9.3.5),
keeps a C-STORE request's data set fragments as views of the PDUs they arrived in, and joins
them once. Everything that is not a C-STORE request with a data set (C-ECHO, any other
message) is handed back as the raw PDUs, untouched, for pynetdicom to decode as it always
does; so is everything after anything it does not expect (PDVs of two messages in one PDU, a
context ID changing inside a message, a malformed PDV item): it then gives up for the rest of
the association, and pynetdicom's own checks answer the peer as before.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

__all__ = ["MessageAssembler", "Store", "c_store_rsp", "command_fields", "pdv_items"]

AFFECTED_SOP_CLASS, COMMAND_FIELD, MESSAGE_ID = 0x0002, 0x0100, 0x0110
COMMAND_DATA_SET_TYPE, AFFECTED_SOP_INSTANCE = 0x0800, 0x1000
C_STORE_RQ = b"\x01\x00"  # CommandField 0x0001, little endian
NO_DATA_SET = b"\x01\x01"  # CommandDataSetType 0x0101
_ITEM = struct.Struct(">LBB")  # PDV item: length, presentation context ID, message control header
_ELEMENT = struct.Struct("<HHL")  # implicit VR little endian: group, element, length


def pdv_items(body: memoryview) -> Iterator[tuple[int, int, memoryview]]:
    """(presentation context ID, message control header, fragment) of each PDV item in a
    P-DATA-TF PDU's variable field; raises ``ValueError`` on an item that does not fit."""
    offset, end = 0, len(body)
    while offset < end:
        if end - offset < _ITEM.size:
            raise ValueError("truncated PDV item")
        length, context_id, control = _ITEM.unpack_from(body, offset)
        if length < 2 or offset + 4 + length > end:
            raise ValueError(f"PDV item length {length} does not fit the PDU")
        yield context_id, control, body[offset + 6: offset + 4 + length]
        offset += 4 + length


def command_fields(command: bytes) -> dict[int, bytes]:
    """A command set's elements (group 0000, implicit VR little endian) by element number, as
    raw values; raises ``ValueError`` on anything else."""
    fields: dict[int, bytes] = {}
    offset, end = 0, len(command)
    while offset < end:
        if end - offset < _ELEMENT.size:
            raise ValueError("truncated command element")
        group, element, length = _ELEMENT.unpack_from(command, offset)
        offset += _ELEMENT.size
        if group != 0 or offset + length > end:
            raise ValueError("not a command set element")
        fields[element] = command[offset: offset + length]
        offset += length
    return fields


def c_store_rsp(context_id: int, request: dict[int, bytes], status: int) -> bytes:
    """The P-DATA-TF PDU of a C-STORE-RSP to ``request`` (its command fields): the elements
    pynetdicom's response carries (PS3.7 9.3.1.2), the request's UIDs echoed as they came."""
    elements = (
        (AFFECTED_SOP_CLASS, request[AFFECTED_SOP_CLASS]),
        (COMMAND_FIELD, b"\x01\x80"),  # 0x8001 C-STORE-RSP
        (0x0120, request[MESSAGE_ID]),  # MessageIDBeingRespondedTo
        (COMMAND_DATA_SET_TYPE, NO_DATA_SET),
        (0x0900, struct.pack("<H", status)),
        (AFFECTED_SOP_INSTANCE, request[AFFECTED_SOP_INSTANCE]),
    )
    body = b"".join(_ELEMENT.pack(0, element, len(value)) + value for element, value in elements)
    command = _ELEMENT.pack(0, 0x0000, 4) + struct.pack("<L", len(body)) + body
    return b"".join((struct.pack(">BBL", 0x04, 0, len(command) + 6),
                     _ITEM.pack(len(command) + 2, context_id, 0x03), command))


@dataclass(frozen=True)
class Store:
    """A whole C-STORE request: its context ID, command fields and data set, and the PDUs it
    came in (for pynetdicom, should it have to take the request after all)."""

    context_id: int
    fields: dict[int, bytes]
    data_set: bytes
    raw: list[bytearray]


@dataclass
class MessageAssembler:
    """Reassembles one association's P-DATA-TF PDUs.

    Parameters
    ----------
    wants
        Called with a C-STORE request's context ID and command fields; only requests it
        accepts are kept whole, the others are handed back to pynetdicom.
    """

    wants: Callable[[int, dict[int, bytes]], bool]
    off: bool = False  # gave up: everything goes to pynetdicom from now on
    _raw: list[bytearray] = field(default_factory=list)
    _command: list[bytes] = field(default_factory=list)
    _fields: dict[int, bytes] = field(default_factory=dict)
    _data: list[memoryview] = field(default_factory=list)
    _context_id: int | None = None
    _command_done: bool = False
    _store: bool = False
    _ended: bool = False

    @property
    def pending(self) -> bool:
        """Whether PDUs of an unfinished C-STORE request are held."""
        return bool(self._raw)

    def feed(self, pdu: bytearray) -> Store | list[bytearray] | None:
        """Take one whole P-DATA-TF PDU (its 6-byte header included).

        Returns a :class:`Store` when a C-STORE request is complete, ``None`` while one is
        still arriving, or the raw PDUs to hand to pynetdicom, in order (after which
        :attr:`off` may have become true).
        """
        if self.off:
            return [pdu]
        self._raw.append(pdu)
        try:
            for context_id, control, fragment in pdv_items(memoryview(pdu)[6:]):
                if not self._take(context_id, control, fragment):
                    return self.give_up()
        except ValueError:
            return self.give_up()
        if self._ended:
            raw, store = self._raw, self._store
            result: Store | list[bytearray] = (
                Store(self._context_id or 0, self._fields, b"".join(self._data), raw)
                if store else raw)
            self._reset()
            return result
        if self._command_done and not self._store:  # another message: pynetdicom's, as it comes
            raw, self._raw = self._raw, []
            return raw
        return None

    def give_up(self) -> list[bytearray]:
        """Stop for the rest of the association; returns the held PDUs for pynetdicom."""
        raw = self._raw
        self._reset()
        self.off = True
        return raw

    def _take(self, context_id: int, control: int, fragment: memoryview) -> bool:
        if self._ended:
            return False  # a second message in the same PDU
        if self._context_id is None:
            self._context_id = context_id
        elif context_id != self._context_id:
            return False
        if control & 0x01:  # command fragment
            if self._command_done:
                return False
            self._command.append(bytes(fragment))
            if control & 0x02:  # last one
                self._command_done = True
                fields = self._fields = command_fields(b"".join(self._command))
                has_data = fields.get(COMMAND_DATA_SET_TYPE) != NO_DATA_SET
                self._store = (has_data and fields.get(COMMAND_FIELD) == C_STORE_RQ
                               and len(fields.get(MESSAGE_ID, b"")) == 2
                               and bool(fields.get(AFFECTED_SOP_CLASS))
                               and bool(fields.get(AFFECTED_SOP_INSTANCE))
                               and self.wants(context_id, fields))
                self._ended = not has_data
            return True
        if not self._command_done:
            return False  # a data set before its command
        if self._store:
            self._data.append(fragment)
        self._ended = bool(control & 0x02)
        return True

    def _reset(self) -> None:
        self._raw, self._command, self._data, self._fields = [], [], [], {}
        self._context_id, self._command_done, self._store, self._ended = None, False, False, False
