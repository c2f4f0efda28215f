"""The listener under hostile or heavy input: a malformed corpus, stalled senders,
concurrent senders, duplicates over the network."""

from __future__ import annotations

import io
import struct
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import FileMetaDataset
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, generate_uid
from pynetdicom import AE, _config

from dicom_node.server import DicomNode
from dicom_node.settings import NodeSettings, StabilitySettings
from dicom_node.status import Status
from node_support import (
    CT,
    MR,
    UID_ROOT,
    ct_dataset,
    dataset_body,
    dataset_offset,
    dataset_sha256,
    dcmtk,
    dcmtk_env,
    make_ct_series,
    make_pki,
    running_node,
    scu_associate,
    sop_uid_of,
    stall_store,
    stored_files,
    temp_files,
)



@pytest.fixture
def node(tmp_path):
    yield from running_node(tmp_path, network_timeout_s=1.0)


def _write_raw(path: Path, sop_class: str, sop_inst: str, body: bytes,
               ts: str = "1.2.840.10008.1.2.1") -> Path:
    """A Part 10 file whose dataset bytes are exactly ``body`` (sent verbatim)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_inst
    meta.TransferSyntaxUID = ts
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    from pydicom.filebase import DicomFileLike

    fl = DicomFileLike(buf)
    fl.is_little_endian, fl.is_implicit_VR = True, False
    write_file_meta_info(fl, meta, enforce_standard=False)
    path.write_bytes(buf.getvalue() + body)
    return path


def _corpus(tmp_path: Path) -> list[tuple[str, Path, set[int]]]:
    """(name, file, acceptable statuses) of malformed instances."""
    rng = np.random.default_rng(41)
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    out = tmp_path / "bad"
    out.mkdir()
    items: list[tuple[str, Path, set[int]]] = []

    def good(i: int):
        return ct_dataset(rng, "DF-FUZZ", study, series, i)

    def add(name: str, ds=None, body: bytes | None = None, sop_class: str = CT,
            sop_inst: str | None = None, statuses: set[int] = frozenset(), ts: str = "1.2.840.10008.1.2.1"):
        if body is None:
            body = dataset_body(ds)
        inst = sop_inst if sop_inst is not None else str(ds.SOPInstanceUID) if ds is not None else generate_uid(UID_ROOT)
        items.append((name, _write_raw(out / f"{name}.dcm", sop_class, inst, body, ts), set(statuses)))

    ds = good(0)
    add("truncated", ds, body=dataset_body(ds)[:-300], statuses={Status.CANNOT_UNDERSTAND_TRUNCATED})
    ds = good(1)
    add("truncated_in_header", ds, body=dataset_body(ds)[:-(64 * 64 * 2) - 5],
        statuses={Status.CANNOT_UNDERSTAND_TRUNCATED})
    ds = good(2)
    body = bytearray(dataset_body(ds))
    pix = body.rfind(b"\xe0\x7f\x10\x00OW")
    body[pix + 8:pix + 12] = struct.pack("<I", 0xFFFFFFF0)  # huge declared pixel data length
    add("huge_pixel_length", ds, body=bytes(body), statuses={Status.CANNOT_UNDERSTAND_TRUNCATED})
    ds = good(5)
    ds.compress("1.2.840.10008.1.2.5")  # RLE: encapsulated pixel data, undefined length
    add("truncated_encapsulated", ds, body=dataset_body(ds)[:-700], ts="1.2.840.10008.1.2.5",
        statuses={Status.CANNOT_UNDERSTAND_TRUNCATED})
    ds = good(3)
    add("huge_trailing_element", ds, body=dataset_body(ds) + b"\xfc\xff\xfc\xffOB\x00\x00" + struct.pack("<I", 0x7FFFFFF0) + b"xx",
        statuses={Status.CANNOT_UNDERSTAND_TRUNCATED, Status.CANNOT_UNDERSTAND})
    ds = good(4)
    ds.SOPClassUID = MR  # dataset says MR, context is CT
    add("wrong_sop_class_for_context", ds, sop_class=CT, statuses={Status.DATASET_DOES_NOT_MATCH_SOP_CLASS})
    for i, (attr, value) in enumerate([("SeriesInstanceUID", "../../etc"), ("SeriesInstanceUID", "1.2.3/../x"),
                                       ("StudyInstanceUID", "1." + "2" * 70), ("StudyInstanceUID", "1.02.3"),
                                       ("SeriesInstanceUID", "")]):
        ds = good(10 + i)
        setattr(ds, attr, value)
        add(f"bad_uid_{i}", ds, statuses={Status.CANNOT_UNDERSTAND_INVALID_UID,
                                          Status.CANNOT_UNDERSTAND_MISSING_ATTRIBUTE})
    ds = good(20)
    ds.SOPInstanceUID = "../../../tmp/owned"
    add("path_trick_sop_uid", ds, sop_inst="../../../tmp/owned",
        statuses={Status.CANNOT_UNDERSTAND_INVALID_UID})
    ds = good(21)
    add("sop_uid_differs_from_command", ds, sop_inst=generate_uid(UID_ROOT),
        statuses={Status.SOP_INSTANCE_UID_MISMATCH})
    for i, attr in enumerate(["SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID", "SOPClassUID"]):
        ds = good(30 + i)
        inst = str(ds.SOPInstanceUID)
        delattr(ds, attr)
        add(f"missing_{attr}", ds, sop_inst=inst, statuses={Status.CANNOT_UNDERSTAND_MISSING_ATTRIBUTE})
    add("random_bytes", body=bytes(rng.integers(0, 256, 5000, dtype=np.uint8)),
        statuses={Status.CANNOT_UNDERSTAND, Status.CANNOT_UNDERSTAND_TRUNCATED})
    add("random_deflated", body=bytes(rng.integers(0, 256, 5000, dtype=np.uint8)),
        ts="1.2.840.10008.1.2.1.99", statuses={Status.CANNOT_UNDERSTAND_TRUNCATED, Status.CANNOT_UNDERSTAND})
    add("empty_dataset", body=b"", statuses={Status.CANNOT_UNDERSTAND_MISSING_ATTRIBUTE})
    return items


def test_malformed_corpus_gets_failure_statuses_and_the_node_keeps_serving(node, tmp_path, monkeypatch):
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the bytes verbatim
    corpus = _corpus(tmp_path)
    good = make_ct_series(tmp_path / "good", len(corpus), seed=42)
    assoc = scu_associate(node.port)
    try:
        for (name, path, statuses), good_path in zip(corpus, good):
            rsp = assoc.send_c_store(path)
            assert rsp is not None and "Status" in rsp, f"{name}: no response"
            assert rsp.Status in statuses, f"{name}: status 0x{rsp.Status:04X}, expected {statuses}"
            assert assoc.send_c_echo().Status == 0, name
            rsp = assoc.send_c_store(good_path)
            assert rsp.Status == 0, f"good instance after {name}: 0x{rsp.Status:04X}"
    finally:
        assoc.release()
    # only the good instances exist, nothing escaped the store, no temporary files
    assert node.index.count() == len(good)
    assert sorted(r.sha256 for r in node.index.instances()) == sorted(dataset_sha256(p) for p in good)
    assert len(stored_files(node.data_dir)) == len(good)
    assert not (tmp_path / "tmp" / "owned.dcm").exists()
    assert temp_files(node.data_dir) == []
    failures = node.audit.events("store_failed")
    assert len(failures) == len(corpus)
    assert all(f.detail["reason"] and f.detail["status"].startswith("0x") for f in failures)
    rows = {e.study_instance_uid: e for e in node.audit.events("instances_received")}
    (good_study,) = {r.study_instance_uid for r in node.index.instances()}
    assert rows[good_study].instance_count == len(good) and rows[good_study].outcome == "success"
    # refused instances have no trusted study: one row counting them, with their reasons
    assert rows[""].outcome == "serious_failure" and rows[""].detail["failed"] == len(corpus)
    assert len(rows[""].detail["failures"]) == len(corpus)


def test_raw_sample_files_are_stored_byte_exact(tmp_path, monkeypatch):
    """pydicom's sample files sent verbatim (compressed, implicit VR, odd encodings such as
    OW encapsulated pixel data) land byte-identical. Several MR samples share one SOP
    Instance UID, so the node keeps the newest and each is checked right after its send."""
    from pydicom.data import get_testdata_file

    node = DicomNode(NodeSettings(port=0, duplicate_policy="keep_newest"), StabilitySettings(),
                     tmp_path / "samples")
    node.start()

    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)
    names = ["MR_small_RLE.dcm", "MR_small_jp2klossless.dcm", "MR_small_implicit.dcm", "CT_small.dcm",
             "SC_rgb_jpeg_dcmtk.dcm", "JPEG2000.dcm", "JPEG-lossy.dcm"]
    paths = [Path(p) for n in names if (p := get_testdata_file(n, download=False))]
    assert len(paths) >= 5
    ae = AE(ae_title="SAMPLES")
    for p in paths:
        m = dcmread(p, stop_before_pixels=True)
        ae.add_requested_context(m.SOPClassUID, m.file_meta.TransferSyntaxUID)
    assoc = ae.associate("127.0.0.1", node.port, ae_title="DENTFUSE")
    assert assoc.is_established
    try:
        for p in paths:
            rsp = assoc.send_c_store(p)
            assert rsp.Status == 0, p.name
            rec = node.index.get(sop_uid_of(p))
            sent = p.read_bytes()[dataset_offset(p):]
            stored = Path(rec.path).read_bytes()[dataset_offset(Path(rec.path)):]
            assert stored == sent, p.name
    finally:
        assoc.release()
        node.close()


@pytest.mark.parametrize("mid_pdu", [False, True])
def test_stalled_sender_is_timed_out_and_its_partial_instance_discarded(node, tmp_path, mid_pdu):
    rng = np.random.default_rng(51)
    ds = ct_dataset(rng, "DF-STALL", generate_uid(UID_ROOT), generate_uid(UID_ROOT), 0, rows=128, cols=128)
    assoc = stall_store(node.port, mid_pdu=mid_pdu, sop_uid=str(ds.SOPInstanceUID), body=dataset_body(ds))
    try:
        deadline = time.monotonic() + 5  # the partial dataset is streaming to disk
        while not temp_files(node.data_dir) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert temp_files(node.data_dir), "expected the partial instance in the incoming directory"
        # while it stalls, others are served
        other = scu_associate(node.port, calling="OTHER")
        (p,) = make_ct_series(tmp_path / "other", 1, seed=52)
        assert other.send_c_store(dcmread(p)).Status == 0
        other.release()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if not any(a.requestor.ae_title == "STALLER" for a in node._server.active_associations) and \
                    not temp_files(node.data_dir):
                break
            time.sleep(0.1)
        assert not any(a.requestor.ae_title == "STALLER" for a in node._server.active_associations)
        assert temp_files(node.data_dir) == []
        assert node.index.get(str(ds.SOPInstanceUID)) is None
        assert node.index.count() == 1
    finally:
        assoc.abort()


def test_concurrent_senders_lose_nothing_and_mix_nothing(node, tmp_path):
    storescu = dcmtk("storescu")
    n_threads, per_thread = 6, 12
    series = [make_ct_series(tmp_path / f"s{t}", per_thread, seed=100 + t, rows=80, cols=80,
                             patient_id=f"DF-L{t}") for t in range(n_threads)]
    cli_series = [make_ct_series(tmp_path / f"c{t}", per_thread, seed=200 + t, rows=80, cols=80,
                                 patient_id=f"DF-C{t}") for t in range(2)]

    def send(paths: list[Path]) -> list[int]:
        assoc = scu_associate(node.port, calling="LOAD")
        try:
            return [assoc.send_c_store(dcmread(p)).Status for p in paths]
        finally:
            assoc.release()

    procs = [subprocess.Popen([storescu, "-aec", "DENTFUSE", "+sd", "127.0.0.1", str(node.port),
                               str(tmp_path / f"c{t}")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=dcmtk_env())
             for t in range(2)]
    with ThreadPoolExecutor(n_threads) as pool:
        statuses = list(pool.map(send, series))
    for p in procs:
        _out, err = p.communicate(timeout=60)
        assert p.returncode == 0, err.decode()
    assert all(s == 0 for st in statuses for s in st)
    everything = [p for s in series + cli_series for p in s]
    assert node.index.count() == len(everything)
    for p in everything:
        rec = node.index.get(sop_uid_of(p))
        assert rec is not None
        stored = dcmread(rec.path, stop_before_pixels=True)
        src = dcmread(p, stop_before_pixels=True)
        assert Path(rec.path).name == f"{src.SOPInstanceUID}.dcm"
        assert (stored.SOPInstanceUID, stored.SeriesInstanceUID, stored.PatientID) == (
            src.SOPInstanceUID, src.SeriesInstanceUID, src.PatientID)
        assert dataset_sha256(Path(rec.path)) == dataset_sha256(p) == rec.sha256
    assert {s.instance_count for s in node.index.series()} == {per_thread}
    assert len(node.index.series()) == n_threads + 2
    assert temp_files(node.data_dir) == []


@pytest.mark.parametrize("policy", ["keep_first", "keep_newest"])
def test_duplicates_over_the_network(tmp_path, policy):
    n = DicomNode(NodeSettings(port=0, duplicate_policy=policy), StabilitySettings(), tmp_path / "d")
    n.start()
    try:
        (p,) = make_ct_series(tmp_path / "src", 1, seed=61)
        ds1 = dcmread(p)
        ds2 = dcmread(p)
        ds2.PixelData = bytes(reversed(ds2.PixelData))
        assoc = scu_associate(n.port)
        assert [assoc.send_c_store(d).Status for d in (ds1, ds1, ds2)] == [0, 0, 0]
        assoc.release()
        assert n.index.count() == 1
        (dup,) = n.index.duplicates()
        stored = dcmread(n.index.get(str(ds1.SOPInstanceUID)).path)
        expected = ds1 if policy == "keep_first" else ds2
        assert stored.PixelData == expected.PixelData
        assert dup.action == ("kept_first" if policy == "keep_first" else "replaced")
        assert len(stored_files(n.data_dir)) == 1
    finally:
        n.close()


def test_receive_memory_does_not_grow_with_series_size(node, tmp_path):
    """Chunked receive: the node's peak Python memory for a 4x longer series stays flat
    (it holds at most one PDU of one instance, never the series)."""
    import tracemalloc

    storescu = dcmtk("storescu")
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    short = make_ct_series(tmp_path / "short", 6, seed=91, rows=512, cols=512, study_uid=study, series_uid=series)
    long_ = make_ct_series(tmp_path / "long", 24, seed=92, rows=512, cols=512, study_uid=study,
                           series_uid=series, prefix="l")
    peaks = []
    tracemalloc.start()
    try:
        for d in (tmp_path / "short", tmp_path / "long"):
            tracemalloc.reset_peak()
            base = tracemalloc.get_traced_memory()[0]
            r = subprocess.run([storescu, "-aec", "DENTFUSE", "+sd", "127.0.0.1", str(node.port), str(d)],
                               capture_output=True, text=True, timeout=120, env=dcmtk_env())
            assert r.returncode == 0, r.stderr
            peaks.append(tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()
    assert node.index.count() == len(short) + len(long_)
    series_mb = sum(p.stat().st_size for p in long_) / 1e6
    print(f"peak traced memory: {peaks[0] / 1e6:.1f} MB for {len(short)} instances, "
          f"{peaks[1] / 1e6:.1f} MB for {len(long_)} ({series_mb:.0f} MB)")
    assert peaks[1] < peaks[0] * 1.5 + 2e6
    assert peaks[1] < series_mb * 1e6 / 4


def test_disk_full_is_out_of_resources_and_recoverable(node, tmp_path, monkeypatch):
    import errno

    from dicom_node.errors import StorageError

    (p, q) = make_ct_series(tmp_path / "src", 2, seed=95)

    def full(tmp, final, overwrite=False, synced=False):
        raise StorageError(f"cannot store {final.name}: no space") from OSError(errno.ENOSPC, "No space left")

    monkeypatch.setattr(node.store, "commit", full)
    assoc = scu_associate(node.port)
    try:
        assert assoc.send_c_store(dcmread(p)).Status == Status.OUT_OF_RESOURCES_DISK_FULL
        monkeypatch.undo()
        assert assoc.send_c_store(dcmread(p)).Status == 0  # the sender's retry succeeds
        assert assoc.send_c_store(dcmread(q)).Status == 0
    finally:
        assoc.release()
    assert node.index.count() == 2 and temp_files(node.data_dir) == []
    (failure,) = node.audit.events("store_failed")
    assert failure.detail["status"] == "0xA701" and "no space" in failure.detail["reason"]


def test_stalled_tls_sender_is_timed_out_too(tmp_path):
    """Over TLS the same: a sender silent inside a PDU is aborted, its partial file removed."""
    import ssl

    pki = make_pki(tmp_path)
    n = DicomNode(NodeSettings(port=0, network_timeout_s=1.0, tls_certificate=str(pki["server_crt"]),
                               tls_private_key=str(pki["server_key"])),
                  StabilitySettings(), tmp_path / "tlsdata")
    n.start()
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca_crt"]))
        rng = np.random.default_rng(53)
        ds = ct_dataset(rng, "DF-STALL", generate_uid(UID_ROOT), generate_uid(UID_ROOT), 0, rows=128, cols=128)
        assoc = stall_store(n.port, mid_pdu=True, sop_uid=str(ds.SOPInstanceUID), body=dataset_body(ds),
                            tls_args=(ctx, "127.0.0.1"))
        try:
            deadline = time.monotonic() + 15
            seen_partial = False
            while time.monotonic() < deadline:
                seen_partial = seen_partial or bool(temp_files(n.data_dir))
                if seen_partial and not temp_files(n.data_dir) and not any(
                        a.requestor.ae_title == "STALLER" for a in n._server.active_associations):
                    break
                time.sleep(0.05)
            assert seen_partial
            assert temp_files(n.data_dir) == []
            assert not any(a.requestor.ae_title == "STALLER" for a in n._server.active_associations)
            assert n.index.get(str(ds.SOPInstanceUID)) is None
        finally:
            assoc.abort()
        ok = scu_associate(n.port, tls_args=(ctx, "127.0.0.1"))
        assert ok.send_c_echo().Status == 0
        ok.release()
    finally:
        n.close()


def test_silent_connection_is_closed_after_the_acse_timeout(tmp_path):
    import socket as _socket

    n = DicomNode(NodeSettings(port=0, acse_timeout_s=1.0, network_timeout_s=1.0), StabilitySettings(),
                  tmp_path / "quiet")
    n.start()
    try:
        with _socket.create_connection(("127.0.0.1", n.port)) as mute:
            a = scu_associate(n.port)  # others are served meanwhile
            assert a.send_c_echo().Status == 0
            a.release()
            mute.settimeout(10)
            t0 = time.monotonic()
            assert mute.recv(1) == b""
            assert time.monotonic() - t0 < 8
    finally:
        n.close()


def test_a_store_slower_than_the_network_timeout_is_answered_and_the_association_goes_on(node, tmp_path, monkeypatch):
    """The network timeout (1 s here) measures the peer's silence, not our own work: a store
    that takes longer (a disk stall in the fsyncs or the audit write) is still answered and
    the association stays up. (The fast data phase stores on the DUL thread while the
    association thread watches the idle timer: it once aborted the association under a
    CI run's disk stall before the answer went out.)"""
    import dicom_node.server as server

    slow_once = {"left": 1}
    real = server.inspect_received

    def slow(*a, **k):  # type: ignore[no-untyped-def]
        if slow_once["left"]:
            slow_once["left"] -= 1
            time.sleep(2.0)
        return real(*a, **k)

    monkeypatch.setattr(server, "inspect_received", slow)
    series = make_ct_series(tmp_path / "s", 2, seed=8)
    assoc = scu_associate(node.port)
    try:
        rsp = assoc.send_c_store(series[0])
        assert rsp is not None and rsp.Status == 0
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0
        assert assoc.send_c_store(series[1]).Status == 0
    finally:
        assoc.release()
    assert node.index.count() == 2
