"""Checking and accepting one instance: the path shared by the network listener and
``dentfuse import``.

:func:`inspect_instance` reads only what it must from a Part 10 file (file meta, the
top-level element headers, the few attributes we index) and checks that the dataset is
structurally complete (no element runs past the end of the file), that the SOP class and
instance match what the sender announced, and that every UID is valid before it is used
in a path. :func:`accept_instance` then stores the file durably, indexes it and applies
the duplicate policy. :func:`ingest_file` imports an existing file through the same checks.
:func:`reconcile_store` repairs the store/index after a crash (run at start-up).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

from pydicom.dataset import Dataset
from pydicom.filereader import data_element_generator, read_preamble, _read_file_meta_info
from pydicom.tag import Tag

from dicom_node.errors import (
    InstanceRejected,
    InvalidUIDError,
    NodeIndexError,
    StorageError,
)
from dicom_node.index import InstanceIndex, iso_utc
from dicom_node.records import ReceivedInstance
from dicom_node.sop_classes import DEFLATED_TRANSFER_SYNTAX, TRANSFER_SYNTAXES, kind_of
from dicom_node.status import Status
from dicom_node.storage import InstanceStore, is_disk_full
from dicom_node.uids import check_uid

LOG = logging.getLogger(__name__)

DEFER_SIZE = 1024  # element values above this are skipped, not read
MAX_INFLATED_BYTES = 4 << 30  # a deflated dataset may not inflate beyond 4 GiB
_IMPLICIT = "1.2.840.10008.1.2"

# The VR each wanted attribute has in the data dictionary (a value whose raw bytes are
# plain ASCII, see _decode_plain_ascii, is decoded without pydicom's value machinery).
_WANTED_VR = {
    Tag(0x0008, 0x0016): "UI", Tag(0x0008, 0x0018): "UI", Tag(0x0020, 0x000D): "UI",
    Tag(0x0020, 0x000E): "UI", Tag(0x0010, 0x0020): "LO", Tag(0x0010, 0x0021): "LO",
    Tag(0x0008, 0x0060): "CS", Tag(0x0008, 0x0005): "CS",
}
# printable ASCII without backslash (value separator) and tilde (differs in JIS X 0201),
# then only padding: such bytes decode to the same text in every DICOM character set
# without code extensions (ESC is excluded too), and hold a single value
_PLAIN_ASCII = re.compile(rb"[\x20-\x5b\x5d-\x7d]*[\x00 ]*")

_WANTED = {
    Tag(0x0008, 0x0016): "SOPClassUID",
    Tag(0x0008, 0x0018): "SOPInstanceUID",
    Tag(0x0020, 0x000D): "StudyInstanceUID",
    Tag(0x0020, 0x000E): "SeriesInstanceUID",
    Tag(0x0010, 0x0020): "PatientID",
    Tag(0x0010, 0x0021): "IssuerOfPatientID",
    Tag(0x0008, 0x0060): "Modality",
    Tag(0x0008, 0x0005): "SpecificCharacterSet",
}


@dataclass(frozen=True)
class InstanceHeader:
    """What the node needs to know about an instance (no patient names)."""

    sop_class_uid: str
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str
    modality: str
    transfer_syntax_uid: str
    dataset_offset: int  # where the dataset starts (after the File Meta group)
    size_bytes: int  # file size
    sha256: str  # of the dataset bytes as received (File Meta excluded)

    @property
    def patient_key(self) -> str:
        pid, issuer = self.patient_id, self.issuer_of_patient_id
        return f"{pid}^{issuer}" if issuer else pid


@dataclass(frozen=True)
class AcceptResult:
    """The outcome of :func:`accept_instance`.

    ``outcome`` is one of ``stored``, ``duplicate_identical``, ``duplicate_kept_first``,
    ``duplicate_replaced``; ``instance`` is the record now in the index; ``is_new`` says
    whether the index changed (a consumer should be told).
    """

    instance: ReceivedInstance
    outcome: str

    @property
    def is_new(self) -> bool:
        return self.outcome in ("stored", "duplicate_replaced")


def inspect_instance(
    path: Path,
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
) -> InstanceHeader:
    """Read and check the header of a Part 10 file without loading pixel data.

    Parameters
    ----------
    path:
        A file with preamble, ``DICM`` and File Meta Information.
    expected_sop_class_uid:
        The abstract syntax of the presentation context it arrived on (None: any).
    expected_sop_instance_uid:
        The Affected SOP Instance UID of the C-STORE request (None: not checked).

    Returns
    -------
    InstanceHeader

    Raises
    ------
    InstanceRejected
        With the DIMSE status to answer and a reason (never raises anything else for
        bad input; OS errors reading the file become ``PROCESSING_FAILURE``).
    """
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            try:
                read_preamble(fh, False)
                meta = _read_file_meta_info(fh)
            except Exception as exc:  # noqa: BLE001 - any decoding failure is the sender's
                raise InstanceRejected(Status.CANNOT_UNDERSTAND,
                                       f"unreadable File Meta Information ({type(exc).__name__}: {exc})")
            offset = fh.tell()
            ts = str(meta.get("TransferSyntaxUID", "") or "")
            _check_transfer_syntax(ts)
            attrs = _scan_dataset(fh, size, ts)
            # Same handle, no second open: the file was just written, so this reads the
            # page cache once, in large blocks.
            fh.seek(offset)
            sha = _sha256_of(fh)
    except InstanceRejected:
        raise
    except OSError as exc:
        status = Status.OUT_OF_RESOURCES if is_disk_full(exc) else Status.PROCESSING_FAILURE
        raise InstanceRejected(status, f"cannot read the received file: {exc}") from exc
    return _checked_header(attrs, ts, offset, size, sha, expected_sop_class_uid, expected_sop_instance_uid)


def inspect_received(
    path: Path,
    transfer_syntax_uid: str,
    dataset_offset: int,
    sha256: str,
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
    *,
    head: bytes | bytearray | None = None,
    size: int | None = None,
) -> InstanceHeader:
    """:func:`inspect_instance` for a file the listener has just written itself: the File
    Meta Information is its own (``dataset_offset`` is where the dataset starts) and the
    dataset's sha256 was computed while the bytes arrived, so only the dataset is walked.
    ``head`` (the dataset's first bytes, kept while receiving) and ``size`` (the file's)
    spare reading the file in the common case.

    Raises
    ------
    InstanceRejected
        As :func:`inspect_instance`, with the same statuses for the same faults.
    """
    _check_transfer_syntax(transfer_syntax_uid)
    if head is not None and size is not None and transfer_syntax_uid != DEFLATED_TRANSFER_SYNTAX:
        attrs_or_none = _scan_received_head(path, head, dataset_offset, size, transfer_syntax_uid == _IMPLICIT)
        if attrs_or_none is not None:
            return _checked_header(attrs_or_none, transfer_syntax_uid, dataset_offset, size, sha256,
                                   expected_sop_class_uid, expected_sop_instance_uid)
    try:
        with open(path, "rb") as fh:
            size = os.fstat(fh.fileno()).st_size
            fh.seek(dataset_offset)
            attrs = _scan_dataset(fh, size, transfer_syntax_uid)
    except InstanceRejected:
        raise
    except OSError as exc:
        status = Status.OUT_OF_RESOURCES if is_disk_full(exc) else Status.PROCESSING_FAILURE
        raise InstanceRejected(status, f"cannot read the received file: {exc}") from exc
    return _checked_header(attrs, transfer_syntax_uid, dataset_offset, size, sha256,
                           expected_sop_class_uid, expected_sop_instance_uid)


def _scan_received_head(path: Path, head: bytes | bytearray, offset: int, size: int,
                        implicit: bool) -> dict[str, str] | None:
    """:func:`_scan_simple` over the in-memory head of a received dataset; the file is
    opened only for element headers beyond it. None: the full walk must decide."""
    fh: BinaryIO | None = None

    def read_at(pos: int, n: int) -> bytes:
        nonlocal fh
        if fh is None:
            fh = open(path, "rb")
        fh.seek(pos)
        return fh.read(n)

    try:
        return _scan_simple_buffer(head, offset, size, implicit, read_at)
    except OSError:
        return None
    finally:
        if fh is not None:
            fh.close()


def _check_transfer_syntax(ts: str) -> None:
    if not ts:
        raise InstanceRejected(Status.CANNOT_UNDERSTAND_MISSING_ATTRIBUTE,
                               "File Meta Information has no TransferSyntaxUID")
    if ts not in TRANSFER_SYNTAXES:
        raise InstanceRejected(Status.CANNOT_UNDERSTAND,
                               f"transfer syntax {ts[:64]} is not accepted")


def _checked_header(attrs: dict[str, str], ts: str, offset: int, size: int, sha: str,
                    expected_sop_class_uid: str | None,
                    expected_sop_instance_uid: str | None) -> InstanceHeader:
    """The header from the scanned attributes, after the checks every instance passes."""

    def required(name: str) -> str:
        value = attrs.get(name, "")
        if not value:
            raise InstanceRejected(Status.CANNOT_UNDERSTAND_MISSING_ATTRIBUTE, f"{name} is missing or empty")
        return value

    sop_class = required("SOPClassUID")
    sop_inst = required("SOPInstanceUID")
    study = required("StudyInstanceUID")
    series = required("SeriesInstanceUID")
    patient_id = required("PatientID")
    try:
        for name, value in (("SOPClassUID", sop_class), ("SOPInstanceUID", sop_inst),
                            ("StudyInstanceUID", study), ("SeriesInstanceUID", series)):
            check_uid(value, name)
    except InvalidUIDError as exc:
        raise InstanceRejected(Status.CANNOT_UNDERSTAND_INVALID_UID, str(exc)) from None
    if expected_sop_class_uid is not None and sop_class != expected_sop_class_uid:
        raise InstanceRejected(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            f"dataset SOPClassUID {sop_class} differs from the negotiated context {expected_sop_class_uid}",
        )
    if expected_sop_instance_uid is not None and sop_inst != expected_sop_instance_uid:
        raise InstanceRejected(
            Status.SOP_INSTANCE_UID_MISMATCH,
            f"dataset SOPInstanceUID {sop_inst} differs from the C-STORE request's "
            f"{str(expected_sop_instance_uid)[:64]}",
        )
    if "^" in patient_id or "\\" in patient_id or len(patient_id) > 64:
        raise InstanceRejected(Status.CANNOT_UNDERSTAND, "PatientID contains '^' or '\\' or is too long")
    return InstanceHeader(
        sop_class_uid=sop_class, sop_instance_uid=sop_inst, study_instance_uid=study,
        series_instance_uid=series, patient_id=patient_id,
        issuer_of_patient_id=attrs.get("IssuerOfPatientID", ""),
        modality=attrs.get("Modality", "") or "OT", transfer_syntax_uid=ts,
        dataset_offset=offset, size_bytes=size, sha256=sha,
    )


def _scan_dataset(fh: BinaryIO, size: int, ts: str) -> dict[str, str]:
    """Walk the top-level elements; check nothing runs past the end; decode a few values."""
    if ts == DEFLATED_TRANSFER_SYNTAX:
        with tempfile.SpooledTemporaryFile(max_size=64 << 20) as inflated:
            n = _inflate(fh, inflated)
            inflated.seek(0)
            return _scan_plain(inflated, n, implicit=False)  # type: ignore[arg-type]
    return _scan_plain(fh, size, implicit=(ts == _IMPLICIT))


def _inflate(src: BinaryIO, dst: BinaryIO) -> int:
    d = zlib.decompressobj(-zlib.MAX_WBITS)
    total = 0
    try:
        while chunk := src.read(1 << 20):
            buf = d.decompress(chunk)
            while True:
                total += len(buf)
                if total > MAX_INFLATED_BYTES:
                    raise InstanceRejected(Status.OUT_OF_RESOURCES,
                                           "deflated dataset inflates beyond 4 GiB")
                dst.write(buf)
                if not d.unconsumed_tail:
                    break
                buf = d.decompress(d.unconsumed_tail)
        tail = d.flush()
    except zlib.error as exc:
        raise InstanceRejected(Status.CANNOT_UNDERSTAND_TRUNCATED, f"deflated dataset is corrupt: {exc}")
    dst.write(tail)
    total += len(tail)
    if not d.eof:
        raise InstanceRejected(Status.CANNOT_UNDERSTAND_TRUNCATED, "deflated dataset is truncated")
    return total


# Explicit VR Little Endian: VRs with a 4-byte length (after 2 reserved bytes), and the
# others (2-byte length). Anything else sends the walk to pydicom.
_LONG_VRS = frozenset((b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                       b"UT", b"UV"))
_SHORT_VRS = frozenset((b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
                        b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"))
_WANTED_BY_INT = {int(tag): (name, _WANTED_VR[tag].encode("ascii")) for tag, name in _WANTED.items()}
_HEAD_BYTES = 1 << 16


def _scan_simple(fh: BinaryIO, size: int, implicit: bool) -> dict[str, str] | None:
    """The common case of :func:`_scan_plain` without pydicom: top-level elements of
    defined length, in ascending order, exactly filling the file, the wanted values plain
    ASCII with their dictionary VR. Returns None at anything else (undefined lengths,
    sequences' delimiters, unknown VRs, truncation, stray bytes, odd values), and
    pydicom's walk decides, with its error messages and statuses."""
    start = fh.tell()

    def read_at(pos: int, n: int) -> bytes:
        fh.seek(pos)
        return fh.read(n)

    return _scan_simple_buffer(fh.read(_HEAD_BYTES), start, size, implicit, read_at)


def _scan_simple_buffer(head: bytes | bytearray, start: int, size: int, implicit: bool,
                        read_at: Callable[[int, int], bytes]) -> dict[str, str] | None:
    """:func:`_scan_simple` with the first bytes of the dataset (from file offset
    ``start``) in ``head`` and ``read_at(pos, n)`` for anything beyond them."""
    if _strict_reading():
        return None
    head_end = start + len(head)
    unpack_from = struct.unpack_from
    attrs: dict[str, str] = {}
    pos, last_tag = start, -1
    header_len = 8
    while pos < size:
        if size - pos < 8:
            return None  # stray bytes: pydicom says how many
        if pos + 12 <= head_end:
            raw, rel = head, pos - start
        else:
            raw, rel = read_at(pos, 12), 0
            if len(raw) < 8:
                return None
        group, elem = unpack_from("<HH", raw, rel)
        tag = group << 16 | elem
        if tag <= last_tag or group in (0x0002, 0xFFFE):
            return None
        last_tag = tag
        if implicit:
            vr = None
            (length,) = unpack_from("<I", raw, rel + 4)
            header_len = 8
        else:
            vr = bytes(raw[rel + 4:rel + 6])
            if vr in _SHORT_VRS:
                (length,) = unpack_from("<H", raw, rel + 6)
                header_len = 8
            elif vr in _LONG_VRS:
                if len(raw) - rel < 12:
                    return None
                (length,) = unpack_from("<I", raw, rel + 8)
                header_len = 12
            else:
                return None
        if length == 0xFFFFFFFF or pos + header_len + length > size:
            return None
        value_at = pos + header_len
        pos = value_at + length
        wanted = _WANTED_BY_INT.get(tag)
        if wanted is None:
            continue
        name, want_vr = wanted
        if (vr is not None and vr != want_vr) or length > DEFER_SIZE:
            return None
        if pos <= head_end:
            value = bytes(head[value_at - start:pos - start])
        else:
            value = read_at(value_at, length)
            if len(value) != length:
                return None
        if _PLAIN_ASCII.fullmatch(value) is None:
            return None
        attrs[name] = value.decode("ascii").rstrip("\0 ").strip()
    return attrs


def _scan_plain(fh: BinaryIO, size: int, implicit: bool) -> dict[str, str]:
    start = fh.tell()
    simple = _scan_simple(fh, size, implicit)
    if simple is not None:
        return simple
    fh.seek(start)
    return _scan_plain_pydicom(fh, size, implicit)


def _scan_plain_pydicom(fh: BinaryIO, size: int, implicit: bool) -> dict[str, str]:
    """The walk by pydicom's element generator: the reference for every case."""
    start = fh.tell()
    attrs: dict[str, str] = {}
    ds = Dataset()
    end = start
    last_tag = -1
    try:
        for elem in data_element_generator(fh, implicit, True, defer_size=DEFER_SIZE):
            end = fh.tell()
            tag = int(elem.tag)
            if end > size:
                raise InstanceRejected(
                    Status.CANNOT_UNDERSTAND_TRUNCATED,
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) declares {getattr(elem, 'length', '?')} bytes, "
                    f"{end - size} more than were received",
                )
            if tag <= last_tag:
                raise InstanceRejected(
                    Status.CANNOT_UNDERSTAND,
                    f"element ({tag >> 16:04X},{tag & 0xFFFF:04X}) out of order or repeated",
                )
            last_tag = tag
            if tag in _WANTED and getattr(elem, "value", None) is not None:
                ds[tag] = elem  # type: ignore[assignment]
    except InstanceRejected:
        raise
    except EOFError as exc:  # e.g. encapsulated pixel data without its delimiter
        raise InstanceRejected(Status.CANNOT_UNDERSTAND_TRUNCATED, f"dataset is truncated ({str(exc)[:200]})")
    except Exception as exc:  # noqa: BLE001 - malformed input from the network
        raise InstanceRejected(Status.CANNOT_UNDERSTAND,
                               f"dataset cannot be parsed ({type(exc).__name__}: {str(exc)[:200]})")
    if end != size:
        raise InstanceRejected(Status.CANNOT_UNDERSTAND_TRUNCATED,
                               f"dataset ends inside an element header ({size - end} stray bytes)")
    for tag, name in _WANTED.items():
        if tag not in ds:
            continue
        fast = _decode_plain_ascii(ds, tag)
        if fast is not None:
            attrs[name] = fast
            continue
        try:
            value = ds[tag].value
        except Exception as exc:  # noqa: BLE001
            raise InstanceRejected(Status.CANNOT_UNDERSTAND, f"{name} cannot be decoded ({exc})")
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            value = "\\".join(str(v) for v in value)
        attrs[name] = str(value).strip() if value is not None else ""
    return attrs


def _decode_plain_ascii(ds: Dataset, tag: int) -> str | None:
    """The stripped text of a wanted element whose raw value is plain ASCII with the
    expected VR: what pydicom's conversion (decode, rstrip NULs and spaces) followed by
    ``str.strip()`` gives, without its per-value machinery; None when the raw value needs
    pydicom (other VR, multi-valued, non-ASCII, code extensions, strict validation)."""
    raw = ds.get_item(tag)
    vr = getattr(raw, "VR", None)
    value = getattr(raw, "value", None)
    if not isinstance(value, bytes) or vr not in (None, _WANTED_VR[tag]):
        return None
    if _strict_reading() or _PLAIN_ASCII.fullmatch(value) is None:
        return None
    return value.decode("ascii").rstrip("\0 ").strip()


def _strict_reading() -> bool:
    from pydicom import config as _pconfig

    return _pconfig.settings.reading_validation_mode == _pconfig.RAISE


_HASH_BLOCK = 1 << 20


def _sha256_of(fh: BinaryIO) -> str:
    """sha256 of ``fh`` from its position to the end (one reused buffer, no copies)."""
    h = hashlib.sha256()
    buf = bytearray(_HASH_BLOCK)
    view = memoryview(buf)
    readinto = getattr(fh, "readinto", None)
    if readinto is None:  # pragma: no cover - every file object we open has readinto
        while chunk := fh.read(_HASH_BLOCK):
            h.update(chunk)
        return h.hexdigest()
    while n := readinto(buf):
        h.update(view[:n])
    return h.hexdigest()


def _sha256_from(path: Path, offset: int) -> str:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return _sha256_of(fh)


def accept_instance(
    tmp_path: Path,
    store: InstanceStore,
    index: InstanceIndex,
    calling_ae_title: str,
    duplicate_policy: str = "keep_first",
    expected_sop_class_uid: str | None = None,
    expected_sop_instance_uid: str | None = None,
    *,
    header: InstanceHeader | None = None,
    synced: bool = False,
    before_commit: Callable[[], None] | None = None,
) -> AcceptResult:
    """Check a complete temporary file, store it durably and index it.

    The temporary file must be in ``store.incoming_dir`` (same file system as the final
    place). On success it has been moved (or, for a duplicate, discarded); on failure it
    is left for the caller to discard.

    ``header``: the file was already checked (:func:`inspect_received`); ``synced``: its
    data are flushed to disk by the caller, so the commit does not sync it again (it still
    renames atomically and fsyncs the directory); ``before_commit`` is called right before
    the file is moved into place, after the index was consulted (the caller flushes the
    file there, so the disk writes while the index is read); an exception from it
    refuses the instance.

    Raises
    ------
    InstanceRejected
        The instance is refused; ``status`` says how (``OUT_OF_RESOURCES`` for a full
        disk, ``PROCESSING_FAILURE`` for other local errors).
    """
    if header is None:
        header = inspect_instance(tmp_path, expected_sop_class_uid, expected_sop_instance_uid)
    received_s = index.clock()
    try:
        with index.uid_lock(header.sop_instance_uid):
            existing = index.get(header.sop_instance_uid)
            if existing is None:
                final = store.final_path(header.study_instance_uid, header.series_instance_uid,
                                         header.sop_instance_uid)
                # A file without a row here was never acknowledged: safe to replace.
                if before_commit is not None:
                    before_commit()
                store.commit(tmp_path, final, overwrite=True, synced=synced)
                rec = _record(header, final, calling_ae_title, received_s)
                try:
                    index.add(rec, header.patient_id, header.issuer_of_patient_id, received_s)
                except NodeIndexError:
                    store.remove(final)
                    raise
                return AcceptResult(rec, "stored")
            if existing.sha256 == header.sha256:
                store.discard(tmp_path)
                LOG.info("instance %s received again with identical content from %s",
                         header.sop_instance_uid, calling_ae_title)
                return AcceptResult(existing, "duplicate_identical")
            if duplicate_policy != "keep_newest":
                store.discard(tmp_path)
                index.record_duplicate(header.sop_instance_uid, existing.sha256, header.sha256,
                                       duplicate_policy, "kept_first", calling_ae_title)
                LOG.warning("instance %s received again with different content from %s; kept the "
                            "first copy (duplicate_policy=%s)", header.sop_instance_uid,
                            calling_ae_title, duplicate_policy)
                return AcceptResult(existing, "duplicate_kept_first")
            final = store.final_path(header.study_instance_uid, header.series_instance_uid,
                                     header.sop_instance_uid, variant=header.sha256[:16])
            if str(final) == existing.path:  # cannot happen with different hashes
                raise InstanceRejected(Status.PROCESSING_FAILURE, "replacement path collision")
            if before_commit is not None:
                before_commit()
            store.commit(tmp_path, final, overwrite=True, synced=synced)
            rec = _record(header, final, calling_ae_title, received_s)
            try:
                index.replace(rec, existing, header.patient_id, header.issuer_of_patient_id,
                              duplicate_policy)
            except NodeIndexError:
                store.remove(final)
                raise
            store.remove(Path(existing.path))
            LOG.warning("instance %s received again with different content from %s; replaced "
                        "(duplicate_policy=keep_newest)", header.sop_instance_uid, calling_ae_title)
            return AcceptResult(rec, "duplicate_replaced")
    except InstanceRejected:
        raise
    except (StorageError, NodeIndexError, OSError) as exc:
        raise InstanceRejected(write_failure_status(exc), f"cannot store {header.sop_instance_uid}: {exc}") from exc


def write_failure_status(exc: BaseException) -> Status:
    """The C-STORE status for a failure to write or store an instance: 0xA701 when the
    disk (or quota) is full, else 0xA700."""
    return Status.OUT_OF_RESOURCES_DISK_FULL if is_disk_full(exc) else Status.OUT_OF_RESOURCES


def _record(h: InstanceHeader, final: Path, calling_ae_title: str, received_s: float) -> ReceivedInstance:
    return ReceivedInstance(
        sop_class_uid=h.sop_class_uid, sop_instance_uid=h.sop_instance_uid,
        series_instance_uid=h.series_instance_uid, study_instance_uid=h.study_instance_uid,
        patient_key=h.patient_key, modality=h.modality, kind=kind_of(h.sop_class_uid),
        path=str(final), sha256=h.sha256, size_bytes=h.size_bytes,
        transfer_syntax_uid=h.transfer_syntax_uid, calling_ae_title=calling_ae_title,
        received_at=iso_utc(received_s),
    )


def ingest_file(path: Path, store: InstanceStore, index: InstanceIndex,
                calling_ae_title: str = "IMPORT", duplicate_policy: str = "keep_first") -> ReceivedInstance:
    """Import an existing Part 10 file through the same checks as a network C-STORE.

    The file is copied byte for byte into the store (the original is left alone).

    Returns
    -------
    ReceivedInstance
        The indexed record (for a duplicate: the record the index holds now).

    Raises
    ------
    InstanceRejected
        The file is not an acceptable instance (the message names the file and why).
    """
    path = Path(path)
    tmp, fh = store.new_temp_file()
    try:
        with fh, open(path, "rb") as src:
            shutil.copyfileobj(src, fh, 1 << 20)
            fh.flush()
            os.fsync(fh.fileno())
        try:
            result = accept_instance(tmp, store, index, calling_ae_title, duplicate_policy)
        except InstanceRejected as exc:
            raise InstanceRejected(exc.status, f"{path}: {exc.reason}") from None
        return result.instance
    except OSError as exc:
        raise InstanceRejected(Status.PROCESSING_FAILURE, f"cannot import {path}: {exc}") from exc
    finally:
        store.discard(tmp)


@dataclass
class ReconcileReport:
    temp_files_removed: int = 0
    reindexed: list[str] = field(default_factory=list)  # SOP UIDs
    removed_unreferenced: list[str] = field(default_factory=list)  # paths
    quarantined: list[str] = field(default_factory=list)  # paths of unreadable files
    missing_rows_removed: list[str] = field(default_factory=list)  # SOP UIDs


def reconcile_store(store: InstanceStore, index: InstanceIndex) -> ReconcileReport:
    """Bring disk and index into agreement after a crash. Run before receiving.

    * temporary files are removed;
    * a committed file without an index row is re-indexed when it passes the checks
      and its SOP UID has no row; when another file is indexed for that UID (an
      interrupted keep_newest), the unreferenced file is removed; a file that fails the
      checks is moved to ``instances/.quarantine``;
    * an index row whose file is gone is removed (logged).
    """
    report = ReconcileReport(temp_files_removed=store.clean_temp_files())
    indexed = index.all_paths()
    on_disk: set[str] = set()
    for path in store.iter_instance_files():
        on_disk.add(str(path))
        if str(path) in indexed:
            continue
        try:
            header = inspect_instance(path)
        except InstanceRejected as exc:
            qdir = store.root / ".quarantine"
            qdir.mkdir(exist_ok=True)
            target = qdir / path.name
            os.replace(path, target)
            report.quarantined.append(str(path))
            LOG.error("reconcile: %s fails the checks (%s); moved to %s", path, exc.reason, target)
            continue
        existing = index.get(header.sop_instance_uid)
        if existing is None:
            rec = _record(header, path, "RECOVERED", path.stat().st_mtime)
            index.add(rec, header.patient_id, header.issuer_of_patient_id, path.stat().st_mtime)
            report.reindexed.append(header.sop_instance_uid)
            LOG.warning("reconcile: re-indexed %s found on disk without an index row", path)
        else:
            store.remove(path)
            report.removed_unreferenced.append(str(path))
            LOG.warning("reconcile: removed %s (not the indexed copy of %s)", path,
                        header.sop_instance_uid)
    for p, sop in indexed.items():
        if p not in on_disk and not Path(p).exists():
            index.remove(sop)
            report.missing_rows_removed.append(sop)
            LOG.error("reconcile: instance %s is indexed but its file %s is missing; row removed",
                      sop, p)
    return report
