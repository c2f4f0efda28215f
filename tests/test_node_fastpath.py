"""The listener's fast data phase (dicom_node.fastpath): PDU framing edge cases, the
requests it hands to pynetdicom, aborts mid-dataset, and equality with the stock path."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import queue
import struct
import time
import types
from pathlib import Path

import numpy as np
import pytest
from pydicom import Dataset, dcmread
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom.dimse_messages import C_CANCEL_RQ, C_ECHO_RQ, C_FIND_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_CANCEL, C_ECHO, C_FIND, C_STORE
from pynetdicom.dsutils import create_file_meta, decode, write_file_meta_info
from pynetdicom.presentation import PresentationContext
from pynetdicom.timer import Timer

import dicom_node.server as server
from dicom_node import fastpath, storage
from dicom_node.fastpath import FastDataPhase, encode_file_meta, encode_response, p_data_tf, parse_command
from dicom_node.server import DicomNode
from dicom_node.settings import NodeSettings, StabilitySettings
from node_support import (
    CT,
    UID_ROOT,
    ct_dataset,
    dataset_body,
    dataset_offset,
    dataset_sha256,
    dcmtk,
    dcmtk_env,
    make_ct_series,
    running_node,
    scu_associate,
    stored_files,
    temp_files,
)

VERIFICATION = "1.2.840.10008.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"


# -- raw PDU helpers ---------------------------------------------------------------------------
def pdv(context_id: int, control: int, data: bytes) -> bytes:
    return struct.pack(">IBB", 2 + len(data), context_id, control) + data


def p_data(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BBI", 0x04, 0x00, len(body)) + body


def store_command(sop_instance: str, message_id: int = 7, sop_class: str = CT) -> bytes:
    """A C-STORE-RQ command set encoded by pynetdicom (not by the code under test)."""
    req = C_STORE()
    req.MessageID = message_id
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_instance
    req.Priority = 2
    req.DataSet = io.BytesIO(b"\0\0")
    return _command_bytes(C_STORE_RQ(), req)


def _command_bytes(msg, req) -> bytes:  # type: ignore[no-untyped-def]
    msg.primitive_to_message(req)
    out = b""
    for prim in msg.encode_msg(1, 1 << 20):
        for _cx, data in prim.presentation_data_value_list:
            if data[0] & 1:
                out += data[1:]
    return out


def ct_instance(seed: int, rows: int = 64, cols: int = 64):  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(seed)
    ds = ct_dataset(rng, "DF-FAST", generate_uid(UID_ROOT), generate_uid(UID_ROOT), 0, rows=rows, cols=cols)
    return ds, dataset_body(ds)


def context_id_of(assoc, abstract_syntax: str = CT, ts: str = ExplicitVRLittleEndian) -> int:  # type: ignore[no-untyped-def]
    return next(c.context_id for c in assoc.accepted_contexts
                if c.abstract_syntax == abstract_syntax and c.transfer_syntax[0] == ts)


def server_association(node: DicomNode, calling: str):  # type: ignore[no-untyped-def]
    assert node._server is not None
    (a,) = [a for a in node._server.active_associations if a.requestor.ae_title == calling]
    return a


@contextlib.contextmanager
def reactor_paused(assoc):  # type: ignore[no-untyped-def]
    """Keep the SCU's association reactor from taking our responses (as its send_* do)."""
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        yield
    finally:
        assoc._reactor_checkpoint.set()


def raw_request(assoc, data: bytes, chunk: int = 0):  # type: ignore[no-untyped-def]
    """Send raw PDU bytes (in pieces of ``chunk`` bytes) and return the response primitive."""
    sock = assoc.dul.socket.socket
    with reactor_paused(assoc):
        step = chunk or len(data)
        for i in range(0, len(data), step):
            sock.sendall(data[i:i + step])
        _cx, rsp = assoc.dimse.get_msg(block=True)
    return rsp


def wait_for(predicate, timeout_s: float = 10.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.02)
    return bool(predicate())


@pytest.fixture
def node(tmp_path):
    yield from running_node(tmp_path, network_timeout_s=2.0)


# -- encoders against pynetdicom's -------------------------------------------------------------
def test_file_meta_is_byte_identical_to_pynetdicoms_chunked_receive():
    for sop_class, sop_inst, ts in ((CT, "1.2.3.45", ExplicitVRLittleEndian),
                                    ("1.2.840.10008.5.1.4.1.1.104.3", "1.2.826.0.1.3680043.10.1090.1234567", ImplicitVRLittleEndian)):
        buf = io.BytesIO()
        buf.write(b"\x00" * 128 + b"DICM")
        write_file_meta_info(buf, create_file_meta(sop_class_uid=sop_class, sop_instance_uid=sop_inst, transfer_syntax=ts))
        assert encode_file_meta(sop_class, sop_inst, ts) == buf.getvalue()


def test_response_decodes_as_pynetdicoms_and_fragments_to_the_peers_maximum():
    cmd = encode_response(0x8001, 12, 0xA701, CT, "1.2.3.4.5")
    ds = decode(io.BytesIO(cmd), True, True)
    assert (ds.CommandField, ds.MessageIDBeingRespondedTo, ds.Status, ds.CommandDataSetType) == (0x8001, 12, 0xA701, 0x0101)
    assert (ds.AffectedSOPClassUID, ds.AffectedSOPInstanceUID) == (CT, "1.2.3.4.5")
    assert ds.CommandGroupLength == len(cmd) - 12
    assert parse_command(cmd) is not None
    one = p_data_tf(3, cmd, 0)
    assert one[:2] == b"\x04\x00" and struct.unpack(">I", one[2:6])[0] == len(one) - 6 and one[11] == 0x03
    pieces = p_data_tf(3, cmd, 64)
    got, pos, controls = b"", 0, []
    while pos < len(pieces):
        length = struct.unpack(">I", pieces[pos + 2:pos + 6])[0]
        assert length + 6 <= 64 + 6 and length <= 64
        item = pieces[pos + 6:pos + 6 + length]
        controls.append(item[5])
        got += item[6:]
        pos += 6 + length
    assert got == cmd and controls[-1] == 0x03 and set(controls[:-1]) == {0x01}


# -- the PDU reader against a socket that returns a few bytes per read --------------------------
class _TrickleSocket:
    """recv_into returns at most ``step`` bytes: every header and fragment is split."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step
        self.sent = bytearray()

    def recv_into(self, view, n: int) -> int:  # type: ignore[no-untyped-def]
        k = min(n, self.step, len(self.data) - self.pos)
        view[:k] = self.data[self.pos:self.pos + k]
        self.pos += k
        return k

    def sendall(self, data: bytes) -> None:
        self.sent += data


def _fake_dul(sock: _TrickleSocket, tmp_path: Path):  # type: ignore[no-untyped-def]
    cx = PresentationContext()
    cx.context_id, cx.abstract_syntax, cx.transfer_syntax = 1, CT, [ExplicitVRLittleEndian]
    assoc = types.SimpleNamespace(
        _accepted_cx={1: cx}, is_established=True, dimse=types.SimpleNamespace(message=None),
        requestor=types.SimpleNamespace(maximum_length=0, ae_title="TRICKLE"))
    return types.SimpleNamespace(
        assoc=assoc, socket=types.SimpleNamespace(socket=sock), event_queue=queue.Queue(),
        _recv_pdu=queue.Queue(), _idle_timer=Timer(30.0))


def _responses(sent: bytes) -> list:  # type: ignore[no-untyped-def]
    out, pos, cmd = [], 0, b""
    while pos < len(sent):
        length = struct.unpack(">I", sent[pos + 2:pos + 6])[0]
        item = sent[pos + 6:pos + 6 + length]
        cmd += item[6:]
        if item[5] & 2:
            out.append(decode(io.BytesIO(cmd), True, True))
            cmd = b""
        pos += 6 + length
    return out


@pytest.mark.parametrize("step", [1, 5, 7, 4096])
@pytest.mark.parametrize("layout", ["one_pdu", "many_small_pdus", "fragments_in_one_pdu"])
def test_reader_reassembles_any_framing_and_any_split(tmp_path, step, layout):
    ds, body = ct_instance(3, rows=16, cols=16)
    sop = str(ds.SOPInstanceUID)
    cmd = store_command(sop, message_id=9)
    if layout == "one_pdu":  # command and dataset in one P-DATA-TF
        raw = p_data(pdv(1, 0x03, cmd), pdv(1, 0x02, body))
    elif layout == "many_small_pdus":  # command in 2 PDUs, dataset in 100-byte PDUs
        raw = p_data(pdv(1, 0x01, cmd[:10])) + p_data(pdv(1, 0x03, cmd[10:]))
        chunks = [body[i:i + 100] for i in range(0, len(body), 100)]
        raw += b"".join(p_data(pdv(1, 0x02 if i == len(chunks) - 1 else 0x00, c)) for i, c in enumerate(chunks))
    else:  # many PDVs in one PDU
        chunks = [body[i:i + 333] for i in range(0, len(body), 333)]
        raw = p_data(pdv(1, 0x03, cmd), *(pdv(1, 0x02 if i == len(chunks) - 1 else 0x00, c)
                                          for i, c in enumerate(chunks)))
    raw += p_data(pdv(1, 0x03, _command_bytes(C_ECHO_RQ(), _echo_request(10))))
    sock = _TrickleSocket(raw, step)
    dul = _fake_dul(sock, tmp_path)
    store = storage.InstanceStore(tmp_path / "data")
    seen = []

    def on_store(inc):  # type: ignore[no-untyped-def]
        inc.close()
        data = inc.path.read_bytes()
        seen.append((inc.sop_instance_uid, inc.message_id, inc.context_id, data, inc.sha256))
        return 0xB000

    fast = FastDataPhase(dul, store, on_store=on_store, on_echo=lambda: 0, handlers_ok=lambda a: True)
    assert fast.usable()
    while sock.pos < len(raw):
        fast.pump()
        assert dul.event_queue.empty(), dul.event_queue.get()
    ((uid, msg_id, cx_id, data, sha),) = seen
    assert (uid, msg_id, cx_id) == (sop, 9, 1)
    assert data[dataset_offset_of(data):] == body
    assert sha == hashlib.sha256(body).hexdigest()
    rsp_store, rsp_echo = _responses(bytes(sock.sent))
    assert (rsp_store.CommandField, rsp_store.Status, rsp_store.MessageIDBeingRespondedTo) == (0x8001, 0xB000, 9)
    assert rsp_store.AffectedSOPInstanceUID == sop
    assert (rsp_echo.CommandField, rsp_echo.Status, rsp_echo.MessageIDBeingRespondedTo) == (0x8030, 0, 10)
    assert fast.stats == {"c_store": 1, "c_echo": 1}


def dataset_offset_of(data: bytes) -> int:
    (group_length,) = struct.unpack("<I", data[140:144])
    return 144 + group_length


def _echo_request(message_id: int) -> C_ECHO:
    req = C_ECHO()
    req.MessageID = message_id
    req.AffectedSOPClassUID = VERIFICATION
    return req


@pytest.mark.parametrize("raw", [
    p_data(pdv(1, 0x02, b"\x08\x00\x16\x00")),  # dataset without a request
    p_data(struct.pack(">IBB", 500, 1, 0x03) + b"x" * 10),  # PDV item overruns the PDU
    struct.pack(">BBI", 0x04, 0x00, 4) + b"\x00" * 4,  # PDU too short for a PDV item header
    p_data(pdv(1, 0x03, store_command("1.2.3.4")), pdv(2, 0x02, b"\x08\x00")),  # dataset on another context
])
def test_reader_turns_a_malformed_p_data_into_event_19(tmp_path, raw):
    sock = _TrickleSocket(raw, 7)
    dul = _fake_dul(sock, tmp_path)
    fast = FastDataPhase(dul, storage.InstanceStore(tmp_path / "data"), on_store=lambda inc: 0,
                         on_echo=lambda: 0, handlers_ok=lambda a: True)
    fast.pump()
    assert dul.event_queue.get_nowait() == "Evt19"
    assert not sock.sent
    # a started instance is left to the connection-close handler, which removes it
    assert [p for p in (tmp_path / "data" / "instances" / ".incoming").iterdir() if fast.partial_path != p] == []


def test_reader_drains_a_dataset_it_cannot_write_and_answers_out_of_resources(tmp_path, monkeypatch):
    ds, body = ct_instance(4, rows=32, cols=32)
    raw = p_data(pdv(1, 0x03, store_command(str(ds.SOPInstanceUID))), pdv(1, 0x00, body[:700])) + \
        p_data(pdv(1, 0x02, body[700:]))
    sock = _TrickleSocket(raw, 4096)
    dul = _fake_dul(sock, tmp_path)
    store = storage.InstanceStore(tmp_path / "data")
    real_write = fastpath.os.write
    calls = []

    def write(fd, data):  # type: ignore[no-untyped-def]
        calls.append(len(data))
        if len(calls) == 2:  # the file meta goes in, the dataset hits a full disk
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(fastpath.os, "write", write)
    results = []
    fast = FastDataPhase(dul, store, on_store=lambda inc: results.append(inc) or 0xA701,
                         on_echo=lambda: 0, handlers_ok=lambda a: True)
    while sock.pos < len(raw):
        fast.pump()
    monkeypatch.undo()
    (inc,) = results
    assert inc.write_error is not None and inc.write_error.errno == errno.ENOSPC
    assert fast.close_partial() is None  # as the connection-close handler does
    assert list((tmp_path / "data" / "instances" / ".incoming").iterdir()) == []
    (rsp,) = _responses(bytes(sock.sent))
    assert rsp.Status == 0xA701


# -- over the network ---------------------------------------------------------------------------
def test_storescu_series_goes_through_the_fast_path_byte_exact(node, tmp_path):
    """storescu's instances are served by the fast data phase (not silently by pynetdicom)
    and stored byte for byte as pynetdicom's chunked receive stored them."""
    import subprocess

    paths = make_ct_series(tmp_path / "src", 5, seed=21, rows=256, cols=256)
    calls = []
    real = server._store_fast

    def counting(inc, assoc, n):  # type: ignore[no-untyped-def]
        calls.append(inc.sop_instance_uid)
        return real(inc, assoc, n)

    server._store_fast = counting
    try:
        r = subprocess.run([dcmtk("storescu"), "-aec", "DENTFUSE", "127.0.0.1", str(node.port)] +
                           [str(p) for p in paths], capture_output=True, text=True, timeout=60, env=dcmtk_env())
    finally:
        server._store_fast = real
    assert r.returncode == 0, r.stderr
    assert len(calls) == 5
    assert node.index.count() == 5 and temp_files(node.data_dir) == []
    fast_files = {Path(r.path).name: Path(r.path).read_bytes() for r in node.index.instances()}
    # the same series through the stock pynetdicom path gives the same files
    server.FAST_DATA_PHASE = False
    try:
        stock = DicomNode(NodeSettings(port=0), StabilitySettings(), tmp_path / "stock")
        stock.start()
        try:
            r = subprocess.run([dcmtk("storescu"), "-aec", "DENTFUSE", "127.0.0.1", str(stock.port)] +
                               [str(p) for p in paths], capture_output=True, text=True, timeout=60, env=dcmtk_env())
            assert r.returncode == 0, r.stderr
            stock_files = {Path(r.path).name: Path(r.path).read_bytes() for r in stock.index.instances()}
            stock_rows = {r.sop_instance_uid: r.sha256 for r in stock.index.instances()}
        finally:
            stock.close()
    finally:
        server.FAST_DATA_PHASE = True
    assert fast_files == stock_files
    assert {r.sop_instance_uid: r.sha256 for r in node.index.instances()} == stock_rows
    for p in paths:
        assert node.index.get(str(dcmread(p, stop_before_pixels=True).SOPInstanceUID)).sha256 == dataset_sha256(p)


def test_many_small_pdus_and_command_with_dataset_in_one_pdu_over_the_network(node):
    assoc = scu_associate(node.port, calling="RAWPDU")
    try:
        cx = context_id_of(assoc)
        ds1, body1 = ct_instance(31)
        cmd1 = store_command(str(ds1.SOPInstanceUID), 1)
        pdus = [p_data(pdv(cx, 0x01, cmd1[:7])), p_data(pdv(cx, 0x03, cmd1[7:]))]
        chunks = [body1[i:i + 257] for i in range(0, len(body1), 257)]
        pdus += [p_data(pdv(cx, 0x02 if i == len(chunks) - 1 else 0x00, c)) for i, c in enumerate(chunks)]
        rsp = raw_request(assoc, b"".join(pdus), chunk=1000)  # cut across PDU and item boundaries
        assert rsp is not None and rsp.Status == 0
        ds2, body2 = ct_instance(32)
        rsp = raw_request(assoc, p_data(pdv(cx, 0x03, store_command(str(ds2.SOPInstanceUID), 2)), pdv(cx, 0x02, body2)))
        assert rsp is not None and rsp.Status == 0
        assert assoc.send_c_echo().Status == 0
        fast = server_association(node, "RAWPDU").dul._fast
        assert fast.enabled and fast.stats == {"c_store": 2, "c_echo": 1}
    finally:
        assoc.release()
    for ds, body in ((ds1, body1), (ds2, body2)):
        rec = node.index.get(str(ds.SOPInstanceUID))
        assert rec is not None
        stored = Path(rec.path).read_bytes()
        assert stored[dataset_offset(Path(rec.path)):] == body


def test_abort_mid_dataset_leaves_no_partial_file_and_others_are_served(node, tmp_path):
    assoc = scu_associate(node.port, calling="ABORTER")
    ds, body = ct_instance(41, rows=128, cols=128)
    cx = context_id_of(assoc)
    sock = assoc.dul.socket.socket
    sock.sendall(p_data(pdv(cx, 0x03, store_command(str(ds.SOPInstanceUID))), pdv(cx, 0x00, body[:5000])))
    assert wait_for(lambda: temp_files(node.data_dir) != [], 5), "the partial dataset should be on disk"
    assoc.abort()
    assert wait_for(lambda: not any(a.requestor.ae_title == "ABORTER" for a in node._server.active_associations)
                    and temp_files(node.data_dir) == [])
    assert node.index.get(str(ds.SOPInstanceUID)) is None and stored_files(node.data_dir) == []
    failures = [e for e in node.audit.events("store_failed") if e.peer_ae_title == "ABORTER"]
    assert failures and "before the dataset was complete" in failures[0].detail["reason"]
    other = scu_associate(node.port, calling="OTHER")
    (p,) = make_ct_series(tmp_path / "o", 1, seed=42)
    assert other.send_c_store(dcmread(p)).Status == 0
    other.release()


def test_malformed_p_data_aborts_that_association_only(node, tmp_path):
    assoc = scu_associate(node.port, calling="BROKEN")
    ds, body = ct_instance(43)
    cx = context_id_of(assoc)
    sock = assoc.dul.socket.socket
    sock.sendall(p_data(pdv(cx, 0x03, store_command(str(ds.SOPInstanceUID))), pdv(cx, 0x00, body[:300])))
    sock.sendall(p_data(struct.pack(">IBB", 1 << 20, cx, 0x00) + b"x" * 64))  # item longer than its PDU
    assert wait_for(lambda: assoc.is_aborted, 10), "the node should abort the association"
    assert wait_for(lambda: temp_files(node.data_dir) == [])
    assert node.index.count() == 0
    other = scu_associate(node.port, calling="OTHER")
    (p,) = make_ct_series(tmp_path / "o", 1, seed=44)
    assert other.send_c_store(dcmread(p)).Status == 0
    other.release()


def test_a_c_cancel_hands_the_association_to_pynetdicom_which_keeps_serving(node, tmp_path):
    """A request the fast path does not serve (here C-CANCEL, which pynetdicom files
    away without an answer) goes to pynetdicom whole; the association then stays with
    pynetdicom, whose C-STORE (chunked receive) and C-ECHO still work."""
    assoc = scu_associate(node.port, calling="CANCELLER")
    try:
        (p, q) = make_ct_series(tmp_path / "src", 2, seed=45)
        assert assoc.send_c_store(dcmread(p)).Status == 0  # fast path
        fast = server_association(node, "CANCELLER").dul._fast
        assert fast.enabled and fast.stats["c_store"] == 1
        req = C_CANCEL()
        req.MessageIDBeingRespondedTo = 1
        assoc.dul.socket.socket.sendall(p_data(pdv(context_id_of(assoc), 0x03, _command_bytes(C_CANCEL_RQ(), req))))
        assert wait_for(lambda: fast.enabled is False, 5)
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(dcmread(q)).Status == 0  # through pynetdicom now
        assert fast.stats == {"c_store": 1, "c_echo": 0}
    finally:
        assoc.release()
    assert node.index.count() == 2 and temp_files(node.data_dir) == []


@pytest.mark.parametrize("fast_data_phase", [True, False])
def test_a_c_find_on_a_storage_context_gets_pynetdicoms_answer(tmp_path, fast_data_phase, monkeypatch):
    """C-FIND is not a service of this node; sent on a storage context, pynetdicom
    aborts the association. The fast path hands the request over, so the answer is the
    same with and without it, and others are served."""
    monkeypatch.setattr(server, "FAST_DATA_PHASE", fast_data_phase)
    n = DicomNode(NodeSettings(port=0), StabilitySettings(), tmp_path / "data")
    n.start()
    try:
        assoc = scu_associate(n.port, calling="FINDER")
        req = C_FIND()
        req.MessageID = 5
        req.AffectedSOPClassUID = STUDY_ROOT_FIND
        req.Priority = 2
        ident = Dataset()
        ident.QueryRetrieveLevel = "STUDY"
        ident.StudyInstanceUID = ""
        ident_bytes = _identifier_bytes(ident)
        req.Identifier = io.BytesIO(ident_bytes)
        cx = context_id_of(assoc)
        rsp = raw_request(assoc, p_data(pdv(cx, 0x03, _command_bytes(C_FIND_RQ(), req)), pdv(cx, 0x02, ident_bytes)))
        assert rsp is None and wait_for(lambda: assoc.is_aborted, 5)
        other = scu_associate(n.port, calling="OTHER")
        (p,) = make_ct_series(tmp_path / "src", 1, seed=48)
        assert other.send_c_store(dcmread(p)).Status == 0
        other.release()
        assert n.index.count() == 1
    finally:
        n.close()


def _identifier_bytes(ident) -> bytes:  # type: ignore[no-untyped-def]
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ident)
    return buf.getvalue()


def test_small_peer_maximum_pdu_gets_a_fragmented_response(node, tmp_path):
    from pynetdicom import AE

    ae = AE(ae_title="SMALLPDU")
    ae.add_requested_context(CT, ExplicitVRLittleEndian)
    ae.maximum_pdu_size = 96  # our ~200-byte response must come in several PDUs
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    (p,) = make_ct_series(tmp_path / "src", 1, seed=46)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DENTFUSE")
    assert assoc.is_established
    try:
        assert assoc.send_c_store(dcmread(p)).Status == 0
        fast = server_association(node, "SMALLPDU").dul._fast
        assert fast.enabled and fast.stats["c_store"] == 1
    finally:
        assoc.release()
    assert node.index.count() == 1


def test_requests_are_counted_before_their_answer_goes_out(node, tmp_path, monkeypatch):
    """The fast path's counts are final when the peer has the answer. They were once
    updated after the answer was sent, and a test reading them as soon as its C-STORE
    was answered saw 0 (once in CI): here the node pauses after each answer it sends."""
    real_send = FastDataPhase._send

    def send_then_pause(self, context_id, command):
        real_send(self, context_id, command)
        time.sleep(0.3)

    monkeypatch.setattr(FastDataPhase, "_send", send_then_pause)
    assoc = scu_associate(node.port, calling="COUNTED")
    try:
        (p,) = make_ct_series(tmp_path / "src", 1, seed=49)
        assert assoc.send_c_store(dcmread(p)).Status == 0
        fast = server_association(node, "COUNTED").dul._fast
        assert fast.enabled and fast.stats == {"c_store": 1, "c_echo": 0}
        assert assoc.send_c_echo().Status == 0
        assert fast.stats == {"c_store": 1, "c_echo": 1}
    finally:
        assoc.release()


def test_handlers_bound_by_others_keep_the_stock_path(tmp_path):
    from pynetdicom import evt

    seen = []
    n = DicomNode(NodeSettings(port=0), StabilitySettings(), tmp_path / "data")
    n.start()
    try:
        assert n._server is not None
        n._server.bind(evt.EVT_PDU_RECV, lambda event: seen.append(type(event.pdu).__name__))
        assoc = scu_associate(n.port, calling="WATCHED")
        (p,) = make_ct_series(tmp_path / "src", 1, seed=47)
        assert assoc.send_c_store(dcmread(p)).Status == 0
        assert server_association(n, "WATCHED").dul._fast.enabled is False
        assoc.release()
        assert "P_DATA_TF" in seen and n.index.count() == 1
    finally:
        n.close()


def test_tls_associations_use_the_fast_path_without_stalls(tmp_path):
    """Over TLS the data phase runs here too. Many small PDUs arrive in one TLS record:
    the bytes already decrypted (invisible to select) are read at once, not after the
    reactor's 20 ms idle wait per PDU."""
    import ssl

    from node_support import make_pki

    pki = make_pki(tmp_path)
    n = DicomNode(NodeSettings(port=0, tls_certificate=str(pki["server_crt"]),
                               tls_private_key=str(pki["server_key"])), StabilitySettings(), tmp_path / "tls")
    n.start()
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_crt"]))
        assoc = scu_associate(n.port, calling="TLSFAST", tls_args=(ctx, "127.0.0.1"))
        (p,) = make_ct_series(tmp_path / "src", 1, seed=49)
        assert assoc.send_c_store(dcmread(p)).Status == 0
        ds, body = ct_instance(50)  # 8 KB in 40-byte PDUs: ~200 PDUs, ~12 per TLS record
        cx = context_id_of(assoc)
        chunks = [body[i:i + 40] for i in range(0, len(body), 40)]
        raw = p_data(pdv(cx, 0x03, store_command(str(ds.SOPInstanceUID), 3)))
        raw += b"".join(p_data(pdv(cx, 0x02 if i == len(chunks) - 1 else 0x00, c)) for i, c in enumerate(chunks))
        t0 = time.monotonic()
        rsp = raw_request(assoc, raw)
        elapsed = time.monotonic() - t0
        assert rsp is not None and rsp.Status == 0
        assert server_association(n, "TLSFAST").dul._fast.stats["c_store"] == 2
        assoc.release()
        rec = n.index.get(str(ds.SOPInstanceUID))
        assert rec is not None and Path(rec.path).read_bytes()[dataset_offset(Path(rec.path)):] == body
        assert elapsed < 1.5, f"{len(chunks)} PDUs took {elapsed:.2f} s"  # 20 ms each would be > 3.5 s
    finally:
        n.close()


def test_reader_serves_two_stores_in_one_pdu_split_anywhere(tmp_path):
    """The end of one message and a whole second one in the same PDU, read 3 bytes at a time."""
    (ds1, body1), (ds2, body2) = ct_instance(5, rows=8, cols=8), ct_instance(6, rows=8, cols=8)
    raw = p_data(pdv(1, 0x03, store_command(str(ds1.SOPInstanceUID), 1)), pdv(1, 0x00, body1[:50]))
    raw += p_data(pdv(1, 0x02, body1[50:]), pdv(1, 0x03, store_command(str(ds2.SOPInstanceUID), 2)),
                  pdv(1, 0x02, body2))
    sock = _TrickleSocket(raw, 3)
    dul = _fake_dul(sock, tmp_path)
    seen = []

    def on_store(inc):  # type: ignore[no-untyped-def]
        inc.close()
        data = inc.path.read_bytes()
        seen.append((inc.sop_instance_uid, data[dataset_offset_of(data):]))
        return 0

    fast = FastDataPhase(dul, storage.InstanceStore(tmp_path / "data"), on_store=on_store,
                         on_echo=lambda: 0, handlers_ok=lambda a: True)
    while sock.pos < len(raw):
        fast.pump()
    assert dul.event_queue.empty()
    assert seen == [(str(ds1.SOPInstanceUID), body1), (str(ds2.SOPInstanceUID), body2)]
    assert [(r.MessageIDBeingRespondedTo, r.Status) for r in _responses(bytes(sock.sent))] == [(1, 0), (2, 0)]


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("variant", ["plain", "sequence", "undefined_length_sequence", "latin1_patient_id",
                                     "trailing_elements", "truncated", "stray_bytes", "out_of_order"])
def test_header_walk_without_pydicom_agrees_with_pydicoms(tmp_path, implicit, variant):
    """The quick header walk (dicom_node.ingest._scan_simple) either returns what
    pydicom's walk returns, or None and leaves the decision (and the status) to it."""
    from pydicom.dataset import Dataset as Ds
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset
    from pydicom.sequence import Sequence

    from dicom_node import ingest
    from dicom_node.errors import InstanceRejected

    ds, _ = ct_instance(60, rows=8, cols=8)
    ds.file_meta = None
    if variant == "sequence" or variant == "undefined_length_sequence":
        item = Ds()
        item.CodeValue = "T-11170"
        ds.AnatomicRegionSequence = Sequence([item])
    if variant == "latin1_patient_id":
        ds.SpecificCharacterSet = "ISO_IR 100"
        ds.PatientID = "DF-J\xf6rg"
    if variant == "trailing_elements":
        ds.add_new(0x7FE10010, "OB", b"\x01\x02")
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    body = buf.getvalue()
    if variant == "undefined_length_sequence":  # the sequence and its item with undefined lengths
        body = _with_undefined_length_sequence(ds, implicit)
    if variant == "truncated":
        body = body[:-7]
    if variant == "stray_bytes":
        body += b"\x01\x02\x03"
    if variant == "out_of_order":
        first_len = 8 + struct.unpack("<I" if implicit else "<H", body[4:8] if implicit else body[6:8])[0]
        second_start = first_len
        hdr = body[second_start:second_start + 8]
        second_len = 8 + struct.unpack("<I" if implicit else "<H", hdr[4:8] if implicit else hdr[6:8])[0]
        body = body[second_start:second_start + second_len] + body[:first_len] + body[second_start + second_len:]
    path = tmp_path / "ds.bin"
    path.write_bytes(body)

    def pydicom_walk():  # type: ignore[no-untyped-def]
        with open(path, "rb") as fh:
            return ingest._scan_plain_pydicom(fh, len(body), implicit)

    with open(path, "rb") as fh:
        quick = ingest._scan_simple(fh, len(body), implicit)
    try:
        expected = pydicom_walk()
    except InstanceRejected as exc:
        assert quick is None, f"quick walk accepted what pydicom refuses ({exc})"
        with open(path, "rb") as fh:  # and the combined walk refuses it the same way
            with pytest.raises(InstanceRejected) as combined:
                ingest._scan_plain(fh, len(body), implicit)
        assert combined.value.status == exc.status
        return
    if quick is not None:
        assert quick == expected
    with open(path, "rb") as fh:
        assert ingest._scan_plain(fh, len(body), implicit) == expected
    if variant in ("plain", "sequence", "trailing_elements"):
        assert quick is not None  # the common case takes the quick walk
    if variant in ("undefined_length_sequence", "latin1_patient_id"):
        assert quick is None


def _with_undefined_length_sequence(ds, implicit: bool) -> bytes:  # type: ignore[no-untyped-def]
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    ds["AnatomicRegionSequence"].is_undefined_length = True
    for item in ds.AnatomicRegionSequence:
        item.is_undefined_length_sequence_item = True
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, ds)
    return buf.getvalue()


def test_under_an_untested_pynetdicom_the_node_runs_stock_pynetdicom(tmp_path, monkeypatch):
    """Our reactor, socket and data phase replace private parts of pynetdicom 3.0.x; under
    another version they are not installed and the node still stores and answers."""
    calls: list[str] = []
    real = server._store_fast
    monkeypatch.setattr(server, "_OWN_INTERNALS", False)
    monkeypatch.setattr(server, "_store_fast", lambda inc, assoc, n: calls.append("fast") or real(inc, assoc, n))
    n = DicomNode(NodeSettings(port=0), StabilitySettings(), tmp_path / "data")
    n.start()
    try:
        assoc = scu_associate(n.port, calling="STOCK")
        assert assoc.send_c_echo().Status == 0
        for p in make_ct_series(tmp_path / "src", 3, seed=49):
            assert assoc.send_c_store(dcmread(p)).Status == 0
        assoc.release()
        assert calls == [] and n.index.count() == 3 and temp_files(n.data_dir) == []
    finally:
        n.close()
    assert server.PYNETDICOM_TESTED == "3.0." and server._pynetdicom_version.startswith("3.0.")
