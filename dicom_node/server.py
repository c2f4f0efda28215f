"""The DICOM listener: C-ECHO and C-STORE SCP with durable storage, access control and TLS.

:class:`DicomNode` owns the store, the index, the stability monitor and the audit trail
of one data directory, and runs a pynetdicom association server:

* pynetdicom negotiates each association (A-ASSOCIATE) and handles release, abort,
  timers and any service other than C-STORE and C-ECHO. The data phase (P-DATA-TF with
  C-STORE and C-ECHO) is read and answered by :mod:`dicom_node.fastpath`: each dataset
  goes from the socket straight into a temporary file in ``instances/.incoming`` (same
  file system as the final place), hashed on the way, checked
  (:func:`dicom_node.ingest.inspect_received`), flushed (fdatasync), renamed into place,
  its directory fsync'd and indexed before 0x0000 goes back. Memory does not grow with
  PDU, instance or series size. An association that sends another request, or has
  handlers bound to PDU/DIMSE events, is served by pynetdicom alone, whose chunked
  receive (``STORE_RECV_CHUNKED_DATASET``) gives the same files, checks and statuses.
* The handler never raises: each failure is a named :class:`~dicom_node.status.Status`
  with a reason in the log and the audit trail.
* Called AE title, calling AE allow-list and peer-address allow-list are checked at
  association time (A-ASSOCIATE-RJ, permanent, service-user, "called/calling AE title
  not recognised"). Maximum associations, ACSE/DIMSE/network timeouts come from
  :class:`~dicom_node.settings.NodeSettings`; accepted sockets get ``TCP_NODELAY`` and
  kernel receive/send timeouts, so a sender stalled even inside a PDU is aborted and its
  partial file removed.
* DICOM TLS: server certificate and key, optional client-certificate verification; the
  TLS handshake runs in the connection's own thread under the network timeout.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import queue
import select
import signal
import socket
import ssl
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable

from pynetdicom import AE, _config, evt
from pynetdicom import __version__ as _pynetdicom_version
from pynetdicom import dimse_messages as _dimse_messages
from pynetdicom.acse import ACSE
from pynetdicom.dul import DULServiceProvider
from pynetdicom.pdu import A_ABORT_RQ
from pynetdicom.transport import AssociationSocket, ThreadedAssociationServer
from pynetdicom.utils import make_target

from dicom_node import storage
from dicom_node.audit import AssociationTally, AuditTrail
from dicom_node.errors import InstanceRejected, NodeConfigurationError
from dicom_node.index import InstanceIndex
from dicom_node.fastpath import FastDataPhase, IncomingInstance
from dicom_node.ingest import AcceptResult, accept_instance, inspect_received, reconcile_store, write_failure_status
from dicom_node.records import ReceivedInstance
from dicom_node.settings import NodeSettings, StabilitySettings
from dicom_node.sop_classes import STORAGE_SOP_CLASSES, TRANSFER_SYNTAXES, VERIFICATION_SOP_CLASS
from dicom_node.stability import StabilityMonitor
from dicom_node.status import Status
from dicom_node.storage import InstanceStore

LOG = logging.getLogger(__name__)

INDEX_FILE = "index.sqlite"

# -- chunked receive into the node's incoming directory ------------------------------------
_ORIGINAL_NTF = _dimse_messages.NamedTemporaryFile
_patch_lock = threading.Lock()


def _incoming_named_temporary_file(*args: Any, **kwargs: Any) -> Any:
    """pynetdicom creates the chunked-receive file with NamedTemporaryFile; put it in the
    receiving node's incoming directory (same file system as the store) so the final
    rename is atomic and no copy is needed. Other AEs in the process are unaffected."""
    thread = threading.current_thread()
    assoc = getattr(thread, "assoc", None)
    ae = getattr(assoc, "ae", None)
    incoming = getattr(ae, "dentfuse_incoming_dir", None)
    if incoming is not None and "dir" not in kwargs:
        kwargs["dir"] = str(incoming)
        kwargs.setdefault("prefix", "rx-")
    return _ORIGINAL_NTF(*args, **kwargs)


def _install_chunked_receive() -> None:
    with _patch_lock:
        _config.STORE_RECV_CHUNKED_DATASET = True
        _dimse_messages.NamedTemporaryFile = _incoming_named_temporary_file  # type: ignore[assignment]


# -- access control at association time ----------------------------------------------------
class _NodeACSE(ACSE):
    """ACSE that checks the called AE title, the calling AE allow-list and the peer
    address allow-list before pynetdicom's own negotiation, and audits rejections."""

    node: "DicomNode"

    def _negotiate_as_acceptor(self) -> None:  # noqa: D401 - pynetdicom hook
        node = self.node
        rq = self.requestor.primitive
        calling = str(getattr(rq, "calling_ae_title", "") or "").strip()
        called = str(getattr(rq, "called_ae_title", "") or "").strip()
        address = str(self.assoc.requestor.address)
        reason = ""
        rsd: tuple[int, int, int] | None = None
        if called != node.settings.ae_title.strip():
            reason, rsd = f"called AE title {called!r} not recognised", (0x01, 0x01, 0x07)
        elif node.allowed_calling and calling not in node.allowed_calling:
            reason, rsd = f"calling AE title {calling!r} not in the allow-list", (0x01, 0x01, 0x03)
        elif not node.peer_allowed(address):
            reason, rsd = f"peer address {address} not in the allow-list", (0x01, 0x01, 0x03)
        if rsd is not None:
            LOG.warning("rejecting association from %s (%s): %s", calling, address, reason)
            node._audit_safe("association_rejected", "serious_failure", peer_ae_title=calling,
                             peer_address=address, detail={"reason": reason, "called_ae_title": called})
            self.requestor.ae_title = calling
            self.send_reject(*rsd)
            evt.trigger(self.assoc, evt.EVT_REJECTED, {})
            self.assoc.kill()
            return
        super()._negotiate_as_acceptor()


# -- sooner wake-ups for our associations ---------------------------------------------------
# pynetdicom's two reactors poll: the DUL thread sleeps 1 ms whenever it finds nothing to
# do (so an incoming PDU or an outgoing response waits up to 1 ms), and the association
# thread sleeps 1 ms before each look at the DIMSE message queue (so a complete request
# waits up to 1 ms for its handler). For our associations only, both waits become
# event-driven: the DUL thread waits in select() on its socket and a wake-up socket that
# send_pdu()/kill_dul() poke, and the association thread's non-blocking look at the
# message queue becomes a short blocking get. Both still time out (so timers, kill flags
# and pauses are honoured within a few ms), and idle associations wake less often than
# before (every 20 ms / 5 ms instead of every 1 ms), so nothing spins.
_DUL_IDLE_WAIT_S = 0.02
_MSG_QUEUE_WAIT_S = 0.005


class _NodeDUL(DULServiceProvider):
    """pynetdicom's DUL reactor with an event-driven idle wait (see above). The loop is
    pynetdicom 3.0's ``run_reactor`` with only its idle ``time.sleep`` replaced."""

    _wake_r: socket.socket | None = None
    _wake_w: socket.socket | None = None
    _fast: FastDataPhase | None = None
    _sock_readable = False  # set by _idle_wait when the peer's socket has data; used once

    def _transport_event(self) -> bool:
        """pynetdicom's ``_is_transport_event``, except that once the association is
        established (Sta6) the data phase is read by :class:`FastDataPhase`."""
        fast = self._fast
        readable, self._sock_readable = self._sock_readable, False
        if fast is not None and self.state_machine.current_state == "Sta6":
            use = fast.usable()
            if use is None:  # accepted, not yet marked established: leave the PDU in the socket
                time.sleep(0.0002)
                return False
            if use:
                # the idle wait's select just saw data (saves a second select per PDU)
                if readable or (self.socket is not None and self.socket.ready):
                    return fast.pump()
                return False
        return self._is_transport_event()

    def _prepare_wake(self) -> None:
        try:
            self._wake_r, self._wake_w = socket.socketpair()
            self._wake_r.setblocking(False)
            self._wake_w.setblocking(False)
        except OSError:  # no wake-up socket: plain polling, as stock pynetdicom
            self._wake_r = self._wake_w = None

    def _wake(self) -> None:
        w = self._wake_w
        if w is not None:
            try:
                w.send(b"\0")
            except OSError:  # closed, or already full of pending wake-ups: fine
                pass

    def send_pdu(self, primitive: Any) -> None:
        super().send_pdu(primitive)
        self._wake()

    def kill_dul(self) -> None:
        super().kill_dul()
        self._wake()

    def _idle_wait(self, socket_woke_last: bool) -> bool:
        """Wait until the peer sends data, the user queues a primitive, or the timeout.
        Returns whether the peer's socket was what woke us."""
        sock = getattr(self.socket, "socket", None)
        wake_r = self._wake_r
        if isinstance(sock, ssl.SSLSocket) and not socket_woke_last:
            try:
                if sock.pending():  # decrypted bytes wait in the TLS layer, not the socket
                    self._sock_readable = True
                    return True
            except (OSError, ValueError):
                pass
        if wake_r is None or sock is None or socket_woke_last:
            # no wake-up socket, no connection, or the socket was readable last time and
            # nothing came of it: sleep like stock pynetdicom rather than spin
            time.sleep(self._run_loop_delay)
            return False
        try:
            ready, _, _ = select.select([sock, wake_r], [], [], _DUL_IDLE_WAIT_S)
        except (OSError, ValueError):
            time.sleep(self._run_loop_delay)
            return False
        if wake_r in ready:
            try:
                while wake_r.recv(4096):
                    pass
            except OSError:
                pass
        self._sock_readable = sock in ready
        return sock in ready and wake_r not in ready

    def run_reactor(self) -> None:
        self._prepare_wake()
        try:
            self._run_reactor_event_driven()
        finally:
            fast = self._fast
            if fast is not None:  # normally done by the connection-close handler already
                try:
                    partial = fast.close_partial()
                    if partial is not None:
                        fast.store.discard(partial)
                        LOG.warning("association ended inside a dataset; partial file discarded")
                except Exception:  # noqa: BLE001
                    LOG.exception("cannot discard the partial file of an ended association")
            r, w = self._wake_r, self._wake_w
            self._wake_r = self._wake_w = None
            for s_ in (w, r):
                if s_ is not None:
                    s_.close()

    def _run_reactor_event_driven(self) -> None:
        self._idle_timer.start()
        sleep = False
        socket_woke = False
        while True:
            if not self.assoc._dul_ready.is_set():
                self.assoc._dul_ready.set()
                sleep = True
            if sleep:
                socket_woke = self._idle_wait(socket_woke)
            if self._kill_thread:
                break
            if self.artim_timer.expired:
                self.event_queue.put("Evt18")
            try:
                if self._process_recv_primitive():
                    pass
                elif self._transport_event():
                    self._idle_timer.restart()
                    socket_woke = False
            except Exception as exc:  # noqa: BLE001 - as pynetdicom: abort the association
                LOG.error("Exception in DUL.run(), aborting association")
                LOG.exception(exc)
                abort_pdu = A_ABORT_RQ()
                abort_pdu.source = 0x02
                abort_pdu.reason_diagnostic = 0x00
                self.socket.send(abort_pdu.encode())
                self.assoc.is_aborted = True
                self.assoc.is_established = False
                self.assoc._kill = True
                self._kill_thread = True
                return
            try:
                event = self.event_queue.get(block=False)
            except queue.Empty:
                sleep = True
                continue
            self.state_machine.do_action(event)
            sleep = False
            socket_woke = False


_RECV_INITIAL = 1 << 22  # first buffer; grows (doubling) only as the peer's bytes arrive


class _NodeAssociationSocket(AssociationSocket):
    """pynetdicom's socket wrapper with ``recv`` reading straight into a buffer
    (``recv_into``), where stock pynetdicom reads 4096 bytes per ``recv`` call and appends
    each piece: ~130 system calls and copies for a 512 KB PDU. Same contract: blocks until
    ``nr_bytes`` are read; returns what was read if the peer closes the connection;
    socket errors and timeouts propagate as before. Memory follows the bytes actually
    received, not a declared length (a sender announcing a 4 GB PDU gets a 4 MB buffer)."""

    def recv(self, nr_bytes: int) -> bytearray:
        sock: Any = self.socket
        buf = bytearray(min(nr_bytes, _RECV_INITIAL))
        nr_read = 0
        while nr_read < nr_bytes:
            if nr_read == len(buf):
                buf.extend(bytes(min(len(buf), nr_bytes - len(buf))))
            with memoryview(buf) as view:
                got = sock.recv_into(view[nr_read:], len(buf) - nr_read)
            if not got:
                break
            nr_read += got
        if nr_read < len(buf):
            del buf[nr_read:]
        return buf


def _waiting_get_msg(dimse: Any) -> Callable[..., Any]:
    """The association reactor's non-blocking ``get_msg`` turned into a short blocking
    get on the same queue (blocking calls keep pynetdicom's behaviour)."""
    original = dimse.get_msg
    msg_queue = dimse.msg_queue

    def get_msg(block: bool = False) -> Any:
        if block:
            return original(block=True)
        try:
            return msg_queue.get(block=True, timeout=_MSG_QUEUE_WAIT_S)
        except queue.Empty:
            return None, None

    return get_msg


# Our reactor, socket and fast data phase replace private parts of pynetdicom, written and
# tested against pynetdicom 3.0.x. Under any other version the associations run stock
# pynetdicom (slower, same behaviour on the wire); pyproject.toml pins 3.0.x.
PYNETDICOM_TESTED = "3.0."
_OWN_INTERNALS = _pynetdicom_version.startswith(PYNETDICOM_TESTED)
if not _OWN_INTERNALS:
    LOG.warning("pynetdicom %s is not the tested %sx: the listener uses stock pynetdicom's receive path",
                _pynetdicom_version, PYNETDICOM_TESTED)


def _speed_up_reactors(assoc: Any, node: "DicomNode | None" = None) -> None:
    """Install the event-driven waits on one of our associations (before it starts) and,
    with ``node``, the fast data phase (:mod:`dicom_node.fastpath`). Nothing under an
    untested pynetdicom version."""
    if not _OWN_INTERNALS:
        return
    dul = assoc.dul
    if type(dul) is DULServiceProvider and not dul.is_alive():
        dul.__class__ = _NodeDUL
        # pynetdicom bound the thread's target to its own run_reactor in __init__
        dul._target = make_target(dul.run_reactor)
        if node is not None and FAST_DATA_PHASE:
            dul._fast = FastDataPhase(
                dul, node.store, on_store=lambda inc: _store_fast(inc, assoc, node),
                on_echo=lambda: _handle_echo(None, node),  # type: ignore[arg-type]
                handlers_ok=_only_node_handlers)
    if type(dul.socket) is AssociationSocket:
        dul.socket.__class__ = _NodeAssociationSocket
    dimse = assoc.dimse
    if getattr(dimse, "msg_queue", None) is not None:
        dimse.get_msg = _waiting_get_msg(dimse)


# The data phase of our associations is read and answered by dicom_node.fastpath (C-STORE,
# C-ECHO); pynetdicom keeps association set-up, release, abort and every other service.
# False: everything through pynetdicom (diagnosis: bench/ingest.py --receivers stock).
FAST_DATA_PHASE = True

# Events the fast data phase does not fire: an association with a handler bound to one of
# them (beyond the node's own) stays on pynetdicom's path.
_EVENTS_NOT_FIRED = (evt.EVT_DATA_RECV, evt.EVT_DATA_SENT, evt.EVT_PDU_RECV, evt.EVT_PDU_SENT,
                     evt.EVT_DIMSE_RECV, evt.EVT_DIMSE_SENT)


def _only_node_handlers(assoc: Any) -> bool:
    """True when the association has no handlers the fast data phase would skip:
    nothing bound to the events it does not fire (pynetdicom's own debug-logging
    handlers aside), and the node's own C-STORE and C-ECHO handlers."""
    try:
        for e in _EVENTS_NOT_FIRED:
            if any(getattr(h, "__module__", "") != "pynetdicom._handlers" for h, _args in assoc.get_handlers(e)):
                return False
        store = assoc.get_handlers(evt.EVT_C_STORE)
        echo = assoc.get_handlers(evt.EVT_C_ECHO)
    except Exception:  # noqa: BLE001 - unknown pynetdicom: stay on its path
        return False
    return (isinstance(store, tuple) and store[:1] == (_handle_store,)
            and isinstance(echo, tuple) and echo[:1] == (_handle_echo,))


# -- the association server ----------------------------------------------------------------
def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    return struct.pack("ll", whole, int((seconds - whole) * 1e6))


class _NodeServer(ThreadedAssociationServer):
    """TCP_NODELAY, kernel socket timeouts, TLS handshake off the accept thread."""

    daemon_threads = True
    node: "DicomNode"

    def get_request(self) -> tuple[socket.socket, Any]:
        assert self.socket is not None
        sock, address = self.socket.accept()
        try:
            sock.setblocking(True)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            timeout = self.node.settings.network_timeout_s
            if timeout and timeout > 0:
                if self.ssl_context is not None:
                    # Python's ssl retries forever on a kernel timeout (EAGAIN on a
                    # blocking socket), so TLS sockets use Python-level timeouts.
                    sock.settimeout(timeout)
                else:
                    # Kernel timeouts (no Python-level poll per recv): a read or write that
                    # makes no progress for network_timeout_s fails; the association aborts.
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, _timeval(timeout))
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, _timeval(timeout))
        except OSError as exc:
            LOG.warning("cannot set socket options for %s: %s", address, exc)
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        return sock, address

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        if isinstance(request, ssl.SSLSocket):
            try:
                request.do_handshake()
            except (ssl.SSLError, OSError) as exc:
                address = str(client_address[0]) if client_address else "?"
                LOG.warning("TLS handshake with %s failed: %s", address, exc)
                self.node._audit_safe("association_rejected", "serious_failure", peer_address=address,
                                      detail={"reason": f"TLS handshake failed: {exc}"})
                self.shutdown_request(request)
                return
        super().process_request_thread(request, client_address)

    def handle_error(self, request: Any, client_address: Any) -> None:
        LOG.exception("error while serving %s", client_address)


class _NodeAE(AE):
    dentfuse_incoming_dir: Path | None = None


# -- the node --------------------------------------------------------------------------------
class DicomNode:
    """A durable C-ECHO/C-STORE SCP over one data directory.

    Parameters
    ----------
    settings:
        AE title, bind address, port (0 = ephemeral), allow-lists, limits, timeouts,
        duplicate policy, TLS files.
    stability:
        Quiet period and check interval of the stability monitor.
    data_dir:
        Where ``instances/`` and ``index.sqlite`` live (created if missing).
    on_received:
        Called with each new :class:`ReceivedInstance` after it is durable and indexed
        (from a thread serving the association, before its response is sent; exceptions
        are logged and ignored). Not called for identical re-sends or kept-first
        duplicates.
    clock:
        Seconds since the epoch for the index, stability and audit (tests inject a fake).
    ssl_context:
        A ready server-side context; by default one is built from the TLS settings.
    """

    def __init__(self, settings: NodeSettings, stability: StabilitySettings, data_dir: Path,
                 on_received: Callable[[ReceivedInstance], None] | None = None,
                 clock: Callable[[], float] = time.time,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.settings = settings
        self.stability_settings = stability
        self.data_dir = Path(data_dir).expanduser().absolute()
        self.on_received = on_received
        self.clock = clock
        try:
            self.data_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise NodeConfigurationError(f"cannot create data directory {self.data_dir}: {exc}") from exc
        self._store = InstanceStore(self.data_dir)
        db = self.data_dir / INDEX_FILE
        self._index = InstanceIndex(db, clock=clock)
        self._stability = StabilityMonitor(db, stability, clock=clock)
        self._audit = AuditTrail(db, clock=clock)
        self.allowed_calling = frozenset(a.strip() for a in settings.allowed_calling_ae_titles)
        self._networks = _parse_networks(settings.allowed_peer_addresses)
        self._ssl_context = ssl_context if ssl_context is not None else build_ssl_context(settings)
        self._ae: _NodeAE | None = None
        self._server: _NodeServer | None = None
        self._thread: threading.Thread | None = None
        self._port = 0

    # -- public properties ---------------------------------------------------------------
    @property
    def store(self) -> InstanceStore:
        return self._store

    @property
    def index(self) -> InstanceIndex:
        return self._index

    @property
    def stability_monitor(self) -> StabilityMonitor:
        return self._stability

    @property
    def audit(self) -> AuditTrail:
        return self._audit

    @property
    def port(self) -> int:
        """The bound port (after :meth:`start`)."""
        return self._port

    @property
    def is_running(self) -> bool:
        return self._server is not None

    # -- lifecycle -----------------------------------------------------------------------
    def start(self) -> int:
        """Reconcile the store, start the stability monitor and the listener.

        Returns
        -------
        int
            The bound TCP port (useful with ``settings.port == 0``).

        Raises
        ------
        NodeConfigurationError
            The address cannot be bound.
        """
        if self._server is not None:
            return self._port
        report = reconcile_store(self._store, self._index)
        if report.reindexed or report.removed_unreferenced or report.missing_rows_removed or report.quarantined:
            self._audit_safe("store_reconciled", "minor_failure", detail={
                "temp_files_removed": report.temp_files_removed, "reindexed": len(report.reindexed),
                "removed_unreferenced": len(report.removed_unreferenced),
                "quarantined": len(report.quarantined),
                "missing_rows_removed": report.missing_rows_removed[:100]})
        _install_chunked_receive()
        ae = _NodeAE(ae_title=self.settings.ae_title)
        ae.dentfuse_incoming_dir = self._store.incoming_dir
        s = self.settings
        ae.maximum_associations = max(1, int(s.max_associations))
        ae.acse_timeout = s.acse_timeout_s
        ae.dimse_timeout = s.dimse_timeout_s
        ae.network_timeout = s.network_timeout_s
        ae.maximum_pdu_size = int(s.maximum_pdu_size)
        ae.require_called_aet = True
        ae.require_calling_aet = list(self.allowed_calling)
        ae.add_supported_context(VERIFICATION_SOP_CLASS, TRANSFER_SYNTAXES[:2])
        for sop_class in STORAGE_SOP_CLASSES:
            ae.add_supported_context(sop_class, list(TRANSFER_SYNTAXES))
        handlers = [
            (evt.EVT_C_ECHO, _handle_echo, [self]),
            (evt.EVT_C_STORE, _handle_store, [self]),
            (evt.EVT_CONN_OPEN, _handle_conn_open, [self]),
            (evt.EVT_CONN_CLOSE, _handle_conn_close, [self]),
        ]
        try:
            server = ae.make_server((s.bind_address, int(s.port)), ae_title=s.ae_title,
                                    ssl_context=self._ssl_context, evt_handlers=handlers,
                                    server_class=_NodeServer)
        except OSError as exc:
            raise NodeConfigurationError(
                f"cannot listen on {s.bind_address}:{s.port}: {exc}; choose another port or "
                "stop the program using it"
            ) from exc
        server.node = self
        ae._servers.append(server)
        self._ae, self._server = ae, server
        self._port = int(server.server_address[1])
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.2},
                                        name=f"dentfuse-listener:{self._port}", daemon=True)
        self._thread.start()
        self._stability.start()
        self._audit_safe("node_started", local_ae_title=s.ae_title,
                         detail={"port": self._port, "tls": self._ssl_context is not None})
        LOG.info("listening as %s on %s:%d%s", s.ae_title, s.bind_address, self._port,
                 " (TLS)" if self._ssl_context else "")
        return self._port

    def stop(self) -> None:
        """Stop accepting, abort running associations, stop the monitor; idempotent."""
        server, ae = self._server, self._ae
        self._server = None
        if server is not None and ae is not None:
            try:
                server.shutdown()
            except Exception:  # noqa: BLE001
                LOG.exception("error shutting down the listener")
            for assoc in list(server.active_associations):
                try:
                    assoc.abort()
                except Exception:  # noqa: BLE001
                    pass
            deadline = time.monotonic() + 10
            for assoc in list(server.active_associations):
                assoc.join(timeout=max(0.0, deadline - time.monotonic()))
            if self._thread is not None:
                self._thread.join(timeout=5)
            self._audit_safe("node_stopped", local_ae_title=self.settings.ae_title,
                             detail={"port": self._port})
        self._stability.stop()

    def close(self) -> None:
        """Stop and close the databases."""
        self.stop()
        self._stability.close()
        self._audit.close()
        self._index.close()

    def __enter__(self) -> "DicomNode":
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers used by the handlers ------------------------------------------------------
    def peer_allowed(self, address: str) -> bool:
        if not self._networks:
            return True
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self._networks)

    def _audit_safe(self, event_type: str, outcome: str = "success", **kw: Any) -> None:
        try:
            self._audit.record(event_type, outcome, **kw)
        except Exception:  # noqa: BLE001 - auditing must not break the listener
            LOG.exception("cannot write audit event %s", event_type)


def _parse_networks(entries: tuple[str, ...]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    nets = []
    for entry in entries:
        try:
            nets.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError as exc:
            raise NodeConfigurationError(
                f"allowed_peer_addresses entry {entry!r} is not an IP address or network: {exc}"
            ) from exc
    return nets


def build_ssl_context(settings: NodeSettings) -> ssl.SSLContext | None:
    """A server-side TLS context from the settings, or None when TLS is not configured.

    Raises
    ------
    NodeConfigurationError
        Only one of certificate/key is given, or a file cannot be loaded.
    """
    if not settings.tls_certificate and not settings.tls_private_key:
        return None
    if not (settings.tls_certificate and settings.tls_private_key):
        raise NodeConfigurationError("node.tls_certificate and node.tls_private_key must be given together")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(settings.tls_certificate, settings.tls_private_key)
        if settings.tls_ca_certificates:
            ctx.load_verify_locations(settings.tls_ca_certificates)
    except (OSError, ssl.SSLError) as exc:
        raise NodeConfigurationError(
            f"cannot load TLS certificate/key ({settings.tls_certificate}, {settings.tls_private_key}): {exc}"
        ) from exc
    if settings.tls_require_client_certificate:
        if not settings.tls_ca_certificates:
            raise NodeConfigurationError(
                "node.tls_require_client_certificate needs node.tls_ca_certificates (the CA bundle "
                "that signed the clients' certificates)")
        ctx.verify_mode = ssl.CERT_REQUIRED
    elif settings.tls_ca_certificates:
        ctx.verify_mode = ssl.CERT_OPTIONAL  # a presented client certificate must verify
    return ctx


# -- event handlers (bound with the node as argument; they never raise) -------------------------
def _peer(assoc: Any) -> tuple[str, str]:
    try:
        return str(assoc.requestor.ae_title).strip(), str(assoc.requestor.address)
    except Exception:  # noqa: BLE001
        return "", ""


def _handle_conn_open(event: evt.Event, node: DicomNode) -> None:
    try:
        calling, address = _peer(event.assoc)
        event.assoc.acse.__class__ = _NodeACSE
        event.assoc.acse.node = node
        _speed_up_reactors(event.assoc, node)
        event.assoc.dentfuse_tally = AssociationTally(node.settings.ae_title, calling, address)
    except Exception:  # noqa: BLE001
        LOG.exception("cannot prepare association")


def _handle_conn_close(event: evt.Event, node: DicomNode) -> None:
    assoc = event.assoc
    try:
        msg = getattr(getattr(assoc, "dimse", None), "message", None)
        partial = getattr(msg, "_data_set_path", None) if msg is not None else None
        if partial is not None:
            fh = getattr(msg, "_data_set_file", None)
            if fh is not None:
                try:
                    fh.close()
                except Exception:  # noqa: BLE001
                    pass
        fast = getattr(getattr(assoc, "dul", None), "_fast", None)
        fast_partial = fast.close_partial() if fast is not None else None
        if fast_partial is not None:
            node.store.discard(fast_partial)
            partial = partial or fast_partial
        if partial is not None:
            node.store.discard(Path(partial))
            LOG.warning("association with %s ended inside a dataset; partial file discarded",
                        _peer(assoc)[0] or "?")
            node._audit_safe("store_failed", "serious_failure", local_ae_title=node.settings.ae_title,
                             peer_ae_title=_peer(assoc)[0], peer_address=_peer(assoc)[1],
                             detail={"reason": "association ended before the dataset was complete"})
        tally = getattr(assoc, "dentfuse_tally", None)
        if tally is not None:
            tally.peer_ae_title = _peer(assoc)[0] or tally.peer_ae_title
            tally.flush(node.audit)
    except Exception:  # noqa: BLE001
        LOG.exception("error while closing an association")


def _handle_echo(event: evt.Event, node: DicomNode) -> int:
    return int(Status.SUCCESS)


def _handle_store(event: evt.Event, node: DicomNode) -> int:
    """C-STORE: stream-received file -> checks -> durable store + index -> status."""
    req = event.request
    sop_instance = str(getattr(req, "AffectedSOPInstanceUID", "") or "")[:80]
    tmp: Path | None = None

    def accept() -> AcceptResult:
        nonlocal tmp
        context_sop_class = str(event.context.abstract_syntax)
        tmp = _received_file(event, node)
        if tmp is not None and tmp.parent != node.store.incoming_dir:
            tmp = _copy_into_incoming(tmp, node.store)
        return accept_instance(
            tmp, node.store, node.index, _peer(event.assoc)[0], node.settings.duplicate_policy,
            expected_sop_class_uid=context_sop_class,
            expected_sop_instance_uid=str(req.AffectedSOPInstanceUID),
        )

    try:
        return _store_outcome(event.assoc, node, sop_instance, accept)
    finally:
        if tmp is not None:  # moved into place on success; otherwise it goes now
            node.store.discard(tmp)


def _store_fast(inc: IncomingInstance, assoc: Any, node: DicomNode) -> int:
    """C-STORE received by the fast data phase: the dataset is in ``inc.path`` (File Meta
    written by us, sha256 computed on arrival). Same checks, durability and statuses as
    :func:`_handle_store`: checks -> fdatasync -> rename -> directory fsync -> index."""

    def accept() -> AcceptResult:
        if inc.write_error is not None:
            raise InstanceRejected(write_failure_status(inc.write_error),
                                   f"cannot write the received dataset: {inc.write_error}")
        # The disk is already writing the dataset (the fast path started writeback as it
        # arrived); the flush waits until the header is checked and the index consulted.
        header = inspect_received(inc.path, inc.transfer_syntax, inc.dataset_offset, inc.sha256,
                                  expected_sop_class_uid=inc.abstract_syntax,
                                  expected_sop_instance_uid=inc.sop_instance_uid,
                                  head=inc.head, size=inc.size)

        def flush() -> None:
            try:
                storage.sync_fd(inc.fd)
                inc.close()
            except OSError as exc:
                raise InstanceRejected(write_failure_status(exc),
                                       f"cannot flush the received dataset to disk: {exc}") from exc

        return accept_instance(inc.path, node.store, node.index, _peer(assoc)[0],
                               node.settings.duplicate_policy, header=header, synced=True,
                               before_commit=flush)

    status = int(Status.PROCESSING_FAILURE)
    try:
        status = _store_outcome(assoc, node, inc.sop_instance_uid[:80], accept)
        return status
    finally:
        try:
            inc.close()
        except OSError:
            pass
        if status != Status.SUCCESS:  # on success it was moved into place (or, a duplicate, removed)
            node.store.discard(inc.path)


def _store_outcome(assoc: Any, node: DicomNode, sop_instance: str, accept: Callable[[], AcceptResult]) -> int:
    """Run ``accept`` and turn its outcome into the DIMSE status, with the log, audit,
    association tally and ``on_received`` call; never raises."""
    calling, address = _peer(assoc)
    try:
        try:
            result = accept()
        except InstanceRejected as exc:
            LOG.warning("C-STORE %s from %s (%s) refused: %s", sop_instance, calling, address, exc)
            tally = getattr(assoc, "dentfuse_tally", None)
            failure = {"sop_instance_uid": sop_instance, "status": f"0x{int(exc.status):04X}",
                       "status_name": exc.status.name, "reason": exc.reason}
            if tally is not None:
                tally.failed("", failure)
            node._audit_safe("store_failed", "minor_failure", local_ae_title=node.settings.ae_title,
                             peer_ae_title=calling, peer_address=address, detail=failure)
            return int(exc.status)
        rec = result.instance
        tally = getattr(assoc, "dentfuse_tally", None)
        if tally is not None:
            tally.ok(rec.study_instance_uid, rec.patient_key)
        if result.is_new and node.on_received is not None:
            try:
                node.on_received(rec)
            except Exception:  # noqa: BLE001 - a consumer's bug must not fail the store
                LOG.exception("on_received callback failed for %s", rec.sop_instance_uid)
        return int(Status.SUCCESS)
    except Exception as exc:  # noqa: BLE001 - the handler never raises
        LOG.exception("unexpected error storing %s from %s", sop_instance, calling)
        node._audit_safe("store_failed", "minor_failure", local_ae_title=node.settings.ae_title,
                         peer_ae_title=calling, peer_address=address,
                         detail={"sop_instance_uid": sop_instance, "status": "0x0110",
                                 "reason": f"internal error: {type(exc).__name__}"})
        return int(Status.PROCESSING_FAILURE)


def _received_file(event: evt.Event, node: DicomNode) -> Path:
    """The Part 10 file of the received dataset (chunked receive), or a new one written
    from the in-memory dataset when chunked receive is off."""
    try:
        path = event.dataset_path
    except AttributeError:
        path = None
    if path is not None:
        fh = getattr(event.request, "_dataset_file", None)
        if fh is not None:
            fh.flush()
        return Path(path)
    tmp, out = node.store.new_temp_file()
    with out:
        out.write(event.encoded_dataset(include_meta=True))
        out.flush()
        os.fsync(out.fileno())
    return tmp


def _copy_into_incoming(src: Path, store: InstanceStore) -> Path:
    tmp, out = store.new_temp_file()
    with out, open(src, "rb") as fh:
        while chunk := fh.read(1 << 20):
            out.write(chunk)
        out.flush()
        os.fsync(out.fileno())
    return tmp


# -- running until a signal ------------------------------------------------------------------
def serve_forever(node: DicomNode, stop_event: threading.Event | None = None,
                  install_signal_handlers: bool = True,
                  on_started: Callable[[DicomNode], None] | None = None) -> int:
    """Start ``node`` and block until SIGINT/SIGTERM (or ``stop_event``); stop cleanly.

    Returns
    -------
    int
        0 after a clean shutdown.
    """
    stop = stop_event or threading.Event()
    previous: dict[int, Any] = {}
    if install_signal_handlers and threading.current_thread() is threading.main_thread():
        def _on_signal(signum: int, _frame: Any) -> None:
            LOG.info("received signal %d; shutting down", signum)
            stop.set()

        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, _on_signal)
    try:
        node.start()
        if on_started is not None:
            on_started(node)
        while not stop.wait(0.5):
            pass
    finally:
        node.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


__all__ = ["DicomNode", "build_ssl_context", "serve_forever", "INDEX_FILE"]
