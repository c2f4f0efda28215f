"""The data phase of the node's associations, read and answered without pynetdicom's
per-PDU machinery.

pynetdicom negotiates the association (A-ASSOCIATE), and handles release, abort, timers
and anything unusual. Once an association is established, the DUL reactor of our
associations (:class:`dicom_node.server._NodeDUL`) hands each incoming PDU to
:meth:`FastDataPhase.pump` instead of pynetdicom's reader:

* P-DATA-TF PDUs are parsed here: PDU header, PDV item headers, command fragments
  (collected, at most 64 KiB) and dataset fragments, which go straight from the socket
  (``recv_into`` a reused 1 MiB buffer) into the temporary file, hashed (sha256) on the
  way, with disk writeback started every 256 KiB (:func:`dicom_node.storage.start_writeback`).
  A dataset is never assembled in memory; memory does not depend on PDU, instance or
  series size.
* C-STORE-RQ and C-ECHO-RQ are answered here: the C-STORE-RSP / C-ECHO-RSP command set
  (Implicit VR Little Endian, group length) is encoded and sent as P-DATA-TF with
  ``sendall``, fragmented to the peer's maximum PDU length. The store decision itself
  (checks, fdatasync, rename, directory fsync, index, audit) is the node's, passed in as
  ``on_store``, the same code the pynetdicom handler uses.
* Any other PDU (A-RELEASE-RQ, A-ABORT, an unexpected A-ASSOCIATE-RQ, unknown types) is
  read whole and handed to pynetdicom exactly as its own reader would (``_decode_pdu``,
  event queue), so its state machine does what it always does.
* Any other DIMSE request (C-FIND, C-MOVE, C-GET, N-*, C-CANCEL), a request pynetdicom
  would treat specially (no dataset on a C-STORE, a dataset on a C-ECHO, an unknown
  context, an SOP class of another service, a command we cannot parse) is handed to
  pynetdicom as one P-DATA-TF holding the whole command (plus the rest of its PDU), and
  the association stays with pynetdicom from then on.
* A malformed P-DATA-TF (PDV items that overrun the PDU, a dataset fragment without a
  request, a context switch inside a message) is an invalid PDU: event 19, pynetdicom
  sends the A-ABORT. A closed or timed-out socket is event 17, as in pynetdicom; the
  partial instance is removed when the connection closes (:attr:`partial_path`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.service_class import StorageServiceClass, VerificationServiceClass
from pynetdicom.sop_class import uid_to_service_class

from dicom_node.storage import InstanceStore, start_writeback

LOG = logging.getLogger(__name__)

C_STORE_RQ, C_STORE_RSP = 0x0001, 0x8001
C_ECHO_RQ, C_ECHO_RSP = 0x0030, 0x8030
NO_DATASET = 0x0101
MAX_COMMAND_BYTES = 1 << 16  # a command set is a few hundred bytes
_CHUNK = 1 << 20  # socket read buffer
_WRITEBACK_STEP = 1 << 18  # start disk writeback after every 256 KiB written
HEAD_BYTES = 1 << 16  # dataset bytes kept in memory for the header checks
ESTABLISH_WAIT_S = 2.0  # longest wait for pynetdicom to mark an accepted association established

# Diagnosis hook (bench/ingest.py --timeline): called with a phase name; None in service.
TRACE: Callable[[str], None] | None = None


class _PeerGone(Exception):
    """The connection closed, failed or timed out (pynetdicom's event 17)."""


class _InvalidPDU(Exception):
    """The peer sent a PDU that breaks the protocol (pynetdicom's event 19: A-ABORT)."""


@dataclass
class IncomingInstance:
    """One C-STORE request whose dataset is being written to ``path``."""

    context_id: int
    message_id: int
    sop_class_uid: str  # Affected SOP Class UID of the request
    sop_instance_uid: str  # Affected SOP Instance UID of the request
    abstract_syntax: str  # of the presentation context
    transfer_syntax: str  # of the presentation context: the dataset's encoding
    path: Path
    fd: int  # -1 once closed (or when the file could not be written)
    dataset_offset: int = 0  # file bytes before the dataset (preamble and File Meta)
    size: int = 0  # file bytes written
    write_error: OSError | None = None  # writing failed; the rest of the dataset is drained
    head: bytearray = field(default_factory=bytearray)  # the dataset's first HEAD_BYTES bytes
    _sha: Any = field(default_factory=hashlib.sha256)
    _writeback_from: int = 0

    @property
    def sha256(self) -> str:
        """sha256 of the dataset bytes as received (File Meta excluded)."""
        return self._sha.hexdigest()

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)


# -- encoding ----------------------------------------------------------------------------------
def _pad_ui(value: bytes) -> bytes:
    return value + b"\0" if len(value) % 2 else value


def encode_file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str) -> bytes:
    """Preamble, ``DICM`` and the File Meta Information group (Explicit VR Little Endian)
    as pynetdicom's chunked receive writes it (``create_file_meta`` +
    ``write_file_meta_info``), for UIDs given as ASCII text."""

    def short(elem: int, vr: bytes, value: bytes) -> bytes:
        return struct.pack("<HH2sH", 0x0002, elem, vr, len(value)) + value

    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    if len(version) % 2:
        version += b" "
    body = b"".join((
        struct.pack("<HH2sHI", 0x0002, 0x0001, b"OB", 0, 2), b"\x00\x01",
        short(0x0002, b"UI", _pad_ui(sop_class_uid.encode("ascii"))),
        short(0x0003, b"UI", _pad_ui(sop_instance_uid.encode("ascii"))),
        short(0x0010, b"UI", _pad_ui(transfer_syntax_uid.encode("ascii"))),
        short(0x0012, b"UI", _pad_ui(str(PYNETDICOM_IMPLEMENTATION_UID).encode("ascii"))),
        short(0x0013, b"SH", version),
    ))
    return b"\0" * 128 + b"DICM" + struct.pack("<HH2sHI", 0x0002, 0x0000, b"UL", 4, len(body)) + body


def _command_element(elem: int, value: bytes) -> bytes:
    return struct.pack("<HHI", 0x0000, elem, len(value)) + value


def encode_response(command_field: int, message_id: int, status: int, sop_class_uid: str,
                    sop_instance_uid: str | None = None) -> bytes:
    """A C-STORE-RSP / C-ECHO-RSP command set (Implicit VR Little Endian, with its group
    length), the elements pynetdicom sends for a status-only response."""
    parts = [
        _command_element(0x0002, _pad_ui(sop_class_uid.encode("ascii"))),
        _command_element(0x0100, struct.pack("<H", command_field)),
        _command_element(0x0120, struct.pack("<H", message_id)),
        _command_element(0x0800, struct.pack("<H", NO_DATASET)),
        _command_element(0x0900, struct.pack("<H", status)),
    ]
    if sop_instance_uid is not None:
        parts.append(_command_element(0x1000, _pad_ui(sop_instance_uid.encode("ascii"))))
    body = b"".join(parts)
    return _command_element(0x0000, struct.pack("<I", len(body))) + body


def p_data_tf(context_id: int, command: bytes, max_pdu_length: int | None) -> bytes:
    """``command`` as P-DATA-TF PDUs (one PDV each) within the peer's maximum PDU length
    (0 or None: unlimited)."""
    step = len(command) if not max_pdu_length else max(1, int(max_pdu_length) - 6)
    out = bytearray()
    for start in range(0, len(command), step):
        frag = command[start:start + step]
        mch = 0x03 if start + step >= len(command) else 0x01
        out += struct.pack(">BBIIBB", 0x04, 0x00, 6 + len(frag), 2 + len(frag), context_id, mch)
        out += frag
    return bytes(out)


def parse_command(raw: bytes) -> dict[int, bytes] | None:
    """Elements of a command set (group 0000, Implicit VR Little Endian) by element
    number; None when it is not one."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(raw)
    while pos < end:
        if end - pos < 8:
            return None
        group, elem, length = struct.unpack_from("<HHI", raw, pos)
        pos += 8
        if group != 0x0000 or length > end - pos or elem in out:
            return None
        out[elem] = raw[pos:pos + length]
        pos += length
    return out


def _us(value: bytes | None) -> int | None:
    return int.from_bytes(value, "little") if value is not None and len(value) == 2 else None


def _uid_text(value: bytes | None) -> str | None:
    """A UI value as text (trailing NUL/space padding removed); None when absent, empty,
    multi-valued or not printable ASCII (pynetdicom decides about those)."""
    if value is None:
        return None
    value = value.rstrip(b"\0 ")
    if _UID_TEXT.fullmatch(value) is None:
        return None
    return value.decode("ascii")


_UID_TEXT = re.compile(rb"[\x21-\x5b\x5d-\x7e]+")  # printable ASCII but space and backslash
_SERVICE_CLASS: dict[str, type] = {}


def _service_class(sop_class_uid: str) -> type:
    cls = _SERVICE_CLASS.get(sop_class_uid)
    if cls is None:
        cls = _SERVICE_CLASS[sop_class_uid] = uid_to_service_class(sop_class_uid)
    return cls


# -- the data phase ----------------------------------------------------------------------------
class FastDataPhase:
    """Reads and answers the P-DATA of one association (see the module docstring).

    Parameters
    ----------
    dul:
        The association's DUL service provider (its reactor calls :meth:`pump`).
    store:
        Where temporary files are created.
    on_store:
        Decides a complete C-STORE (checks, durable store, index, audit) and returns
        the DIMSE status; must not raise. Owns the temporary file from then on.
    on_echo:
        Returns the C-ECHO status.
    handlers_ok:
        Called once the association is established: False keeps it on pynetdicom's path
        (e.g. someone bound handlers for PDU or DIMSE events this path does not fire).
    """

    def __init__(self, dul: Any, store: InstanceStore, on_store: Callable[[IncomingInstance], int],
                 on_echo: Callable[[], int], handlers_ok: Callable[[Any], bool]) -> None:
        self.dul = dul
        self.assoc = dul.assoc
        self.store = store
        self.on_store = on_store
        self.on_echo = on_echo
        self.handlers_ok = handlers_ok
        self.enabled: bool | None = None  # None: not decided yet
        self._unestablished_since: float | None = None
        self.incoming: IncomingInstance | None = None
        self._command = bytearray()
        self._buf: bytearray | None = None
        # the next C-STORE's temporary file, created while the peer prepares it (creating a
        # file right after the fsyncs of the previous one costs a few tenths of a ms)
        self._spare: tuple[Path, int] | None = None
        self.stats = {"c_store": 0, "c_echo": 0}  # requests decided and answered here

    @property
    def partial_path(self) -> Path | None:
        """The temporary file of a dataset still being received (None between messages)."""
        inc = self.incoming
        return inc.path if inc is not None else None

    def close_partial(self) -> Path | None:
        """Close the file of a dataset still being received; returns its path (the caller
        removes it) or None. Also removes the prepared temporary file, if any."""
        self.drop_spare()
        inc, self.incoming = self.incoming, None
        if inc is None:
            return None
        try:
            inc.close()
        except OSError:
            pass
        return inc.path

    def usable(self) -> bool | None:
        """Whether this association's data phase runs here (decided once established).

        None: not decided yet. The A-ASSOCIATE-AC is out (Sta6) but pynetdicom's
        association thread has not marked the association established; a sender may already
        have sent its first P-DATA. Reading it with pynetdicom would leave a half-assembled
        message there and the whole association on the slow path, so the caller waits
        (briefly; after ``ESTABLISH_WAIT_S`` the association goes to pynetdicom's path).
        """
        if self.enabled is None:
            assoc = self.assoc
            if not assoc.is_established:
                now = time.monotonic()
                if self._unestablished_since is None:
                    self._unestablished_since = now
                if now - self._unestablished_since < ESTABLISH_WAIT_S:
                    return None
                self.enabled = False
                LOG.warning("association with %s was not marked established %.1f s after its acceptance; "
                            "it stays on pynetdicom's receive path",
                            getattr(assoc.requestor, "ae_title", "?"), ESTABLISH_WAIT_S)
                return False
            dimse = getattr(assoc, "dimse", None)
            self.enabled = bool(getattr(dimse, "message", None) is None and self.handlers_ok(assoc))
            if not self.enabled:
                LOG.debug("association with %s stays on pynetdicom's receive path",
                          getattr(assoc.requestor, "ae_title", "?"))
        return self.enabled

    def _prepare_spare(self) -> None:
        if self._spare is None:
            try:
                self._spare = self.store.new_temp_fd()
            except OSError:  # tried again when needed; the error is reported then
                self._spare = None

    def drop_spare(self) -> None:
        """Close and remove the prepared temporary file (association ending)."""
        spare, self._spare = self._spare, None
        if spare is not None:
            try:
                os.close(spare[1])
            except OSError:
                pass
            self.store.discard(spare[0])

    def _temp_file(self) -> tuple[Path, int]:
        spare, self._spare = self._spare, None
        return spare if spare is not None else self.store.new_temp_fd()

    # -- one PDU -------------------------------------------------------------------------
    def pump(self) -> bool:
        """Read one PDU from the peer and act on it. Returns True (an event happened, as
        pynetdicom's ``_is_transport_event``)."""
        try:
            self._read_pdu()
        except _PeerGone as exc:
            LOG.warning("connection from %s closed or timed out: %s",
                        getattr(self.assoc.requestor, "ae_title", "?"), exc)
            self.dul.event_queue.put("Evt17")
        except _InvalidPDU as exc:
            LOG.error("invalid P-DATA-TF from %s: %s; aborting the association",
                      getattr(self.assoc.requestor, "ae_title", "?"), exc)
            self.dul.event_queue.put("Evt19")
        return True

    def _socket(self) -> Any:
        sock = getattr(self.dul.socket, "socket", None)
        if sock is None:
            raise _PeerGone("socket closed")
        return sock

    def _recv_exact(self, n: int) -> bytearray:
        sock = self._socket()
        out = bytearray(n)
        got = 0
        with memoryview(out) as view:
            while got < n:
                try:
                    k = sock.recv_into(view[got:], n - got)
                except OSError as exc:
                    raise _PeerGone(f"{type(exc).__name__}: {exc}") from None
                if not k:
                    raise _PeerGone(f"connection closed after {got} of {n} bytes")
                got += k
        return out

    def _read_pdu(self) -> None:
        head = self._recv_exact(6)
        pdu_type = head[0]
        pdu_length = int.from_bytes(head[2:6], "big")
        if pdu_type != 0x04:
            self._hand_over(bytes(head), pdu_type, pdu_length)
            return
        remaining = pdu_length
        while remaining:
            if remaining < 6:
                raise _InvalidPDU(f"{remaining} bytes left in the PDU, less than a PDV item header")
            item = self._recv_exact(6)
            item_length = int.from_bytes(item[0:4], "big")
            context_id, control = item[4], item[5]
            if item_length < 2 or item_length > remaining - 4:
                raise _InvalidPDU(f"PDV item length {item_length} does not fit the PDU ({remaining - 4} bytes left)")
            remaining -= 4 + item_length
            n = item_length - 2
            if control & 0x01:  # command fragment
                if self.incoming is not None:
                    raise _InvalidPDU("a command fragment arrived before the dataset was complete")
                if len(self._command) + n > MAX_COMMAND_BYTES:
                    raise _InvalidPDU(f"command set longer than {MAX_COMMAND_BYTES} bytes")
                self._command += self._recv_exact(n)
                if control & 0x02:
                    raw = bytes(self._command)
                    self._command.clear()
                    if not self._on_command(context_id, raw):
                        rest = bytes(self._recv_exact(remaining)) if remaining else b""
                        self._fall_back(context_id, raw, rest)
                        return
            else:  # dataset fragment
                inc = self.incoming
                if inc is None:
                    raise _InvalidPDU("a dataset fragment arrived without a C-STORE request")
                if context_id != inc.context_id:
                    raise _InvalidPDU(f"dataset fragment on context {context_id}, request on {inc.context_id}")
                self._stream(inc, n, last=bool(control & 0x02))
                if control & 0x02:
                    self.incoming = None
                    self._complete(inc)

    def _hand_over(self, head: bytes, pdu_type: int, pdu_length: int) -> None:
        """Give a PDU that is not P-DATA-TF to pynetdicom (its ``_read_pdu_data``)."""
        self.drop_spare()  # release or abort: no temporary file outlives the answer
        dul = self.dul
        if pdu_type not in (0x01, 0x02, 0x03, 0x05, 0x06, 0x07):
            LOG.error("unknown PDU type 0x%02X received", pdu_type)
            dul.event_queue.put("Evt19")
            return
        try:
            body = dul.socket.recv(pdu_length) if pdu_length else b""
        except OSError as exc:
            raise _PeerGone(f"{type(exc).__name__}: {exc}") from None
        if len(body) != pdu_length:
            raise _PeerGone(f"PDU shorter than announced ({len(body)} of {pdu_length} bytes)")
        self._decode_for_pynetdicom(bytearray(head) + body)

    def _fall_back(self, context_id: int, command: bytes, rest: bytes) -> None:
        """Hand a request this path does not serve to pynetdicom, and the association
        with it."""
        self.enabled = False
        self.drop_spare()
        LOG.info("association with %s: request on context %d handled by pynetdicom from now on",
                 getattr(self.assoc.requestor, "ae_title", "?"), context_id)
        item = struct.pack(">IBB", 2 + len(command), context_id, 0x03) + command
        self._decode_for_pynetdicom(bytearray(struct.pack(">BBI", 0x04, 0x00, len(item) + len(rest)) + item + rest))

    def _decode_for_pynetdicom(self, raw: bytearray) -> None:
        dul = self.dul
        try:
            pdu, event = dul._decode_pdu(raw)
        except Exception as exc:  # noqa: BLE001 - as pynetdicom: an invalid PDU
            LOG.error("unable to decode the received PDU: %s", exc)
            dul.event_queue.put("Evt19")
            return
        dul.event_queue.put(event)
        dul._recv_pdu.put(pdu)

    # -- DIMSE -------------------------------------------------------------------------------
    def _on_command(self, context_id: int, raw: bytes) -> bool:
        """Start serving a complete command set; False: pynetdicom should serve it."""
        cmd = parse_command(raw)
        if cmd is None:
            return False
        command_field, message_id = _us(cmd.get(0x0100)), _us(cmd.get(0x0110))
        dataset_type = _us(cmd.get(0x0800))
        sop_class = _uid_text(cmd.get(0x0002))
        cx = self.assoc._accepted_cx.get(context_id)
        if None in (command_field, message_id, dataset_type, sop_class) or cx is None:
            return False
        assert sop_class is not None and message_id is not None
        if command_field == C_ECHO_RQ:
            if dataset_type != NO_DATASET or _service_class(sop_class) is not VerificationServiceClass:
                return False
            status = self.on_echo()
            self.stats["c_echo"] += 1  # before the answer: a peer that got it may read the count
            self._send(context_id, encode_response(C_ECHO_RSP, message_id, status, sop_class))
            return True
        if command_field != C_STORE_RQ or dataset_type == NO_DATASET:
            return False
        sop_instance = _uid_text(cmd.get(0x1000))
        if sop_instance is None or _us(cmd.get(0x0700)) not in (0, 1, 2):
            return False
        if _service_class(sop_class) is not StorageServiceClass:
            return False
        if TRACE is not None:
            TRACE("command")
        ts = str(cx.transfer_syntax[0])
        meta = encode_file_meta(sop_class, sop_instance, ts)
        try:
            path, fd = self._temp_file()
            error: OSError | None = None
        except OSError as exc:
            path, fd, error = self.store.incoming_dir / "(not created)", -1, exc
        inc = IncomingInstance(context_id, message_id, sop_class, sop_instance, str(cx.abstract_syntax),
                               ts, path, fd, dataset_offset=len(meta), write_error=error)
        self.incoming = inc
        self._write(inc, meta)
        return True

    def _stream(self, inc: IncomingInstance, n: int, last: bool = False) -> None:
        """Copy ``n`` dataset bytes from the socket to the file, hashing them (``last``:
        they end the dataset)."""
        if self._buf is None:
            self._buf = bytearray(_CHUNK)
        sock = self._socket()
        timer = self.dul._idle_timer
        sha = inc._sha
        with memoryview(self._buf) as view:
            while n:
                try:
                    got = sock.recv_into(view, min(n, _CHUNK))
                except OSError as exc:
                    raise _PeerGone(f"{type(exc).__name__}: {exc}") from None
                if not got:
                    raise _PeerGone("connection closed inside a dataset")
                n -= got
                chunk = view[:got]
                sha.update(chunk)
                if len(inc.head) < HEAD_BYTES:
                    inc.head += chunk[:HEAD_BYTES - len(inc.head)]
                self._write(inc, chunk, writeback=not last or n >= _WRITEBACK_STEP)
                chunk.release()
                timer.restart()  # a slow but steady sender is not idle

    def _write(self, inc: IncomingInstance, data: Any, writeback: bool = True) -> None:
        inc.size += len(data)
        if inc.fd < 0:
            return  # draining after a write error
        try:
            with memoryview(data) as mv:
                while mv:
                    written = os.write(inc.fd, mv)
                    mv = mv[written:]
        except OSError as exc:
            inc.write_error = exc
            inc.close()
            self.store.discard(inc.path)
            LOG.error("cannot write the dataset of %s to %s: %s", inc.sop_instance_uid, inc.path, exc)
            return
        if writeback and inc.size - inc._writeback_from >= _WRITEBACK_STEP:
            start_writeback(inc.fd, inc._writeback_from, inc.size - inc._writeback_from)
            inc._writeback_from = inc.size

    def _complete(self, inc: IncomingInstance) -> None:
        if TRACE is not None:
            TRACE("dataset_complete")
        if inc.fd >= 0 and inc.size > inc._writeback_from:  # the tail, while the checks run
            start_writeback(inc.fd, inc._writeback_from, inc.size - inc._writeback_from)
            inc._writeback_from = inc.size
        # The network timeout measures the peer's silence, not our work: this thread stores
        # while pynetdicom's association thread watches the idle timer, so the timer is held
        # (restarted and stopped: it cannot expire) until the answer is out. A store slowed
        # past the timeout by a disk stall otherwise aborted the association unanswered.
        timer = self.dul._idle_timer
        timer.restart()
        timer.stop()
        try:
            try:
                status = self.on_store(inc)
            finally:
                try:
                    inc.close()
                except OSError:
                    pass
            if TRACE is not None:
                TRACE("stored")
            # counted before the answer goes out: whoever has the answer sees the count
            self.stats["c_store"] += 1
            self._send(inc.context_id, encode_response(C_STORE_RSP, inc.message_id, status, inc.sop_class_uid,
                                                       inc.sop_instance_uid))
        finally:
            timer.restart()
        if TRACE is not None:
            TRACE("response_sent")
        self._prepare_spare()

    def _send(self, context_id: int, command: bytes) -> None:
        max_length = getattr(self.assoc.requestor, "maximum_length", 0)
        try:
            self._socket().sendall(p_data_tf(context_id, command, max_length))
        except OSError as exc:
            raise _PeerGone(f"{type(exc).__name__}: {exc}") from None


__all__ = ["FastDataPhase", "IncomingInstance", "encode_file_meta", "encode_response", "p_data_tf",
           "parse_command"]
