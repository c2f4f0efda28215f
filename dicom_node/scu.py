"""What our SCU roles share: opening associations to PACS destinations, reading a stored
file's identity without its pixels, presentation contexts for sending it as stored, and
reading DIMSE statuses.

Used by :mod:`dicom_node.forward` (C-STORE) and :mod:`dicom_node.qr` (C-FIND, C-MOVE,
C-GET). Sockets of our associations get ``TCP_NODELAY``: on loopback and fast LANs Nagle's
algorithm otherwise holds back the small PDUs at the end of each message.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

from pydicom import dcmread
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, _config, build_context
from pynetdicom.association import Association
from pynetdicom.presentation import PresentationContext

from dicom_node.errors import DicomNodeError
from dicom_node.settings import PacsDestination

log = logging.getLogger(__name__)

UNCOMPRESSED_SYNTAXES: tuple[str, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
MAX_CONTEXTS = 128  # DICOM PS3.8: at most 128 presentation contexts per association


class PacsError(DicomNodeError):
    """A PACS operation failed; the message names the peer and what to check."""


class PeerUnavailableError(PacsError):
    """The peer could not be reached or rejected the association (transient: retry later)."""


class PeerRefusedError(PacsError):
    """The peer answered but refused the request (needs a configuration change, not a retry)."""


class FileUnusableError(PacsError):
    """A local file cannot be sent (missing, not DICOM, no SOP UIDs)."""


@dataclass(frozen=True)
class Timeouts:
    """Network timeouts of our SCU associations, in seconds."""

    acse_s: float = 30.0
    dimse_s: float = 60.0
    network_s: float = 60.0


@dataclass(frozen=True)
class FileIdentity:
    """What must be known about a stored file to send it, read from its header only."""

    path: str
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    study_instance_uid: str
    series_instance_uid: str
    patient_key: str
    size_bytes: int


def read_identity(path: Path | str) -> FileIdentity:
    """Read SOP class/instance, transfer syntax and study/series of a DICOM file.

    Raises
    ------
    FileUnusableError
        The file is missing, is not a DICOM Part 10 file, or lacks its SOP UIDs.
    """
    p = Path(path)
    try:
        ds = dcmread(p, stop_before_pixels=True, specific_tags=[
            "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID",
            "PatientID", "IssuerOfPatientID",
        ])
        size = p.stat().st_size
    except FileNotFoundError:
        raise FileUnusableError(f"{p}: file does not exist; it cannot be sent (was it removed from the store?)") from None
    except Exception as exc:  # pydicom raises many types for damaged files
        raise FileUnusableError(f"{p}: not a readable DICOM file ({exc}); send a DICOM Part 10 file") from None
    meta = getattr(ds, "file_meta", None)
    ts = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    sop_class = ds.get("SOPClassUID") or (getattr(meta, "MediaStorageSOPClassUID", None) if meta else None)
    sop_inst = ds.get("SOPInstanceUID") or (getattr(meta, "MediaStorageSOPInstanceUID", None) if meta else None)
    if not ts or not sop_class or not sop_inst:
        raise FileUnusableError(
            f"{p}: missing File Meta Transfer Syntax UID or SOP Class/Instance UID; "
            "only DICOM Part 10 files with a file meta group can be forwarded"
        )
    pid = str(ds.get("PatientID", "") or "")
    issuer = str(ds.get("IssuerOfPatientID", "") or "")
    return FileIdentity(
        path=str(p),
        sop_class_uid=str(sop_class),
        sop_instance_uid=str(sop_inst),
        transfer_syntax_uid=str(ts),
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        patient_key=f"{pid}^{issuer}" if issuer else pid,
        size_bytes=size,
    )


def storage_contexts(files: Sequence[FileIdentity]) -> list[PresentationContext]:
    """Presentation contexts to send ``files`` as stored.

    One context per (SOP class, stored transfer syntax); for uncompressed files the
    context also offers Explicit and Implicit VR Little Endian so a peer that only takes
    one of them still gets the instance. Raises :class:`PacsError` beyond 128 contexts.
    """
    seen: dict[tuple[str, str], PresentationContext] = {}
    for f in files:
        key = (f.sop_class_uid, f.transfer_syntax_uid)
        if key in seen:
            continue
        if f.transfer_syntax_uid in UNCOMPRESSED_SYNTAXES:
            syntaxes = [f.transfer_syntax_uid] + [t for t in UNCOMPRESSED_SYNTAXES if t != f.transfer_syntax_uid]
        else:
            syntaxes = [f.transfer_syntax_uid]
        seen[key] = build_context(f.sop_class_uid, syntaxes)
    if len(seen) > MAX_CONTEXTS:
        raise PacsError(
            f"{len(seen)} distinct (SOP class, transfer syntax) pairs exceed the 128 presentation "
            "contexts of one association; send them in smaller batches"
        )
    return list(seen.values())


def set_nodelay(assoc: Association) -> None:
    """Disable Nagle's algorithm on an established association's socket."""
    sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
    if sock is None:
        return
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    except OSError as exc:  # pragma: no cover - e.g. a socket closed under us
        log.debug("cannot set TCP_NODELAY: %s", exc)


def client_tls_context(ca_certificates: str = "", certificate: str = "", private_key: str = "") -> ssl.SSLContext:
    """A TLS client context verifying the peer with ``ca_certificates`` (system store if
    empty), presenting ``certificate``/``private_key`` when given."""
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=ca_certificates or None)
    if certificate:
        ctx.load_cert_chain(certificate, private_key or None)
    return ctx


def open_association(
    calling_ae_title: str,
    destination: PacsDestination,
    contexts: Sequence[PresentationContext],
    *,
    timeouts: Timeouts = Timeouts(),
    tls: ssl.SSLContext | None = None,
    evt_handlers: list[Any] | None = None,
    ext_neg: list[Any] | None = None,
    maximum_pdu_size: int = 0,
) -> Association:
    """Open an association to ``destination`` proposing ``contexts``.

    Raises
    ------
    PeerUnavailableError
        Connection refused, timed out, aborted or the association rejected.
    PacsError
        ``destination.tls`` is set and no TLS context was given.
    """
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = timeouts.acse_s
    ae.dimse_timeout = timeouts.dimse_s
    ae.network_timeout = timeouts.network_s
    ae.maximum_pdu_size = maximum_pdu_size
    ae.requested_contexts = list(contexts)
    tls_args = None
    if destination.tls:
        if tls is None:
            raise PacsError(
                f"destination {destination.name} requires TLS but no TLS client context was configured; "
                "set node.tls_ca_certificates (and a client certificate if the PACS asks for one)"
            )
        tls_args = (tls, destination.host)
    kwargs: dict[str, Any] = {"ae_title": destination.ae_title, "tls_args": tls_args}
    if evt_handlers:
        kwargs["evt_handlers"] = evt_handlers
    if ext_neg:
        kwargs["ext_neg"] = ext_neg
    try:
        assoc = ae.associate(destination.host, destination.port, **kwargs)
    except (OSError, ValueError) as exc:
        raise PeerUnavailableError(
            f"cannot connect to {describe(destination)}: {exc}; check host and port"
        ) from None
    if not assoc.is_established:
        if assoc.is_rejected:
            raise PeerUnavailableError(
                f"{describe(destination)} rejected the association from {calling_ae_title!r} "
                f"({_rejection_reason(assoc)}); "
                f"check that the PACS knows AE title {calling_ae_title!r} and is called {destination.ae_title!r}"
            )
        raise PeerUnavailableError(
            f"no association with {describe(destination)} (connection refused, aborted or timed out); "
            "is the PACS running and reachable?"
        )
    set_nodelay(assoc)
    return assoc


@contextmanager
def association(*args: Any, **kwargs: Any) -> Iterator[Association]:
    """:func:`open_association` as a context manager that releases (or aborts) on exit."""
    assoc = open_association(*args, **kwargs)
    try:
        yield assoc
    finally:
        close(assoc)


def close(assoc: Association) -> None:
    try:
        if assoc.is_established:
            assoc.release()
    except Exception:  # pragma: no cover - a peer that vanished while releasing
        assoc.abort()


def describe(destination: PacsDestination) -> str:
    return f"PACS {destination.name} ({destination.ae_title}@{destination.host}:{destination.port})"


def _rejection_reason(assoc: Association) -> str:
    prim = getattr(getattr(assoc, "acceptor", None), "primitive", None)
    try:
        return f"{prim.result_str}, {prim.source_str}: {prim.reason_str}"
    except Exception:  # noqa: BLE001 - no A-ASSOCIATE-RJ details available
        return "no reason given"


def status_category(status: int) -> str:
    """``success``, ``warning``, ``pending``, ``cancel`` or ``failure`` for a DIMSE status."""
    if status == 0x0000:
        return "success"
    if status in (0x0001, 0x0107, 0x0116) or 0xB000 <= status <= 0xBFFF:
        return "warning"
    if status in (0xFF00, 0xFF01):
        return "pending"
    if status == 0xFE00:
        return "cancel"
    return "failure"


_SEND_LOCK = threading.Lock()


def send_file(assoc: Association, ident: FileIdentity, msg_id: int = 1) -> int:
    """Send one stored file by C-STORE on ``assoc``; return the response status.

    When the peer accepted the file's own transfer syntax the bytes are streamed from
    disk unchanged (no decode, bounded memory); when it accepted only another
    uncompressed syntax the dataset is read and re-encoded. Returns -1 when the DIMSE
    response never came (the association is then aborted by pynetdicom).

    Raises
    ------
    PeerRefusedError
        No accepted presentation context can carry this file.
    """
    accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == ident.sop_class_uid]
    exact = any(cx.transfer_syntax[0] == ident.transfer_syntax_uid for cx in accepted)
    convertible = ident.transfer_syntax_uid in UNCOMPRESSED_SYNTAXES and any(
        cx.transfer_syntax[0] in UNCOMPRESSED_SYNTAXES for cx in accepted
    )
    if not exact and not convertible:
        offered = sorted({str(cx.transfer_syntax[0]) for cx in accepted}) or ["none"]
        raise PeerRefusedError(
            f"{ident.path}: the peer accepts SOP class {ident.sop_class_uid} with transfer syntax(es) "
            f"{', '.join(offered)}, not {UID(ident.transfer_syntax_uid).name}; "
            "configure the PACS to accept it (we send instances as stored)"
        )
    if exact:
        # pynetdicom streams a file from disk only with this module-level switch.
        with _SEND_LOCK:
            previous = _config.STORE_SEND_CHUNKED_DATASET
            _config.STORE_SEND_CHUNKED_DATASET = True
            try:
                status = assoc.send_c_store(Path(ident.path), msg_id=msg_id)
            finally:
                _config.STORE_SEND_CHUNKED_DATASET = previous
    else:
        ds = dcmread(ident.path)
        status = assoc.send_c_store(ds, msg_id=msg_id)
    if "Status" not in status:
        return -1
    return int(status.Status)

