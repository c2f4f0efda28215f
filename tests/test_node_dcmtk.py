"""Interoperability of the listener with dcmtk: echoscu, storescu (series, every accepted
transfer syntax, byte-exact), DICOM TLS, and access control at association time."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    generate_uid,
)
from pynetdicom import AE

from dicom_node.server import DicomNode
from dicom_node.settings import NodeSettings, StabilitySettings
from node_support import (
    UID_ROOT,
    ct_dataset,
    dataset_sha256,
    dcmtk,
    dcmtk_env,
    make_ct_series,
    make_pki,
    sop_uid_of,
    temp_files,
)

VERIFICATION = "1.2.840.10008.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"


@pytest.fixture
def start_node(tmp_path):
    nodes: list[DicomNode] = []

    def _start(data_dir: Path | None = None, **kw) -> DicomNode:
        node = DicomNode(NodeSettings(port=0, **kw), StabilitySettings(check_interval_s=0.1),
                         data_dir or tmp_path / "data")
        node.start()
        nodes.append(node)
        return node

    yield _start
    for n in nodes:
        n.close()


def run(cmd: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=dcmtk_env())


def test_echoscu(start_node):
    echoscu = dcmtk("echoscu")
    node = start_node()
    r = run([echoscu, "-aet", "CBCT1", "-aec", "DENTFUSE", "127.0.0.1", str(node.port)])
    assert r.returncode == 0, r.stderr


def test_storescu_whole_series_is_stored_byte_exact_and_indexed(start_node, tmp_path):
    storescu = dcmtk("storescu")
    src = make_ct_series(tmp_path / "series", 24, seed=11, rows=96, cols=96)
    received = []
    node = start_node()
    node.on_received = received.append
    r = run([storescu, "-aet", "CBCT1", "-aec", "DENTFUSE", "+sd", "127.0.0.1", str(node.port),
             str(tmp_path / "series")])
    assert r.returncode == 0, r.stderr
    assert node.index.count() == 24 and len(received) == 24
    by_uid = {rec.sop_instance_uid: rec for rec in node.index.instances()}
    for p in src:
        rec = by_uid[sop_uid_of(p)]
        assert dataset_sha256(Path(rec.path)) == dataset_sha256(p) == rec.sha256
        assert rec.calling_ae_title == "CBCT1"
    (series,) = node.index.series()
    assert series.instance_count == 24 and series.kind == "volume" and series.modality == "CT"
    assert temp_files(node.data_dir) == []
    (audit,) = node.audit.events("instances_received")
    assert (audit.peer_ae_title, audit.instance_count, audit.outcome) == ("CBCT1", 24, "success")
    assert audit.study_instance_uid == series.study_instance_uid


def _compressed_corpus(tmp_path: Path) -> list[tuple[Path, str, str]]:
    """(file, storescu proposal flag, transfer syntax) for each accepted syntax."""
    dcmcjpeg, dcmcjpls, dcmcrle = dcmtk("dcmcjpeg"), dcmtk("dcmcjpls"), dcmtk("dcmcrle")
    rng = np.random.default_rng(21)
    study, series = generate_uid(UID_ROOT), generate_uid(UID_ROOT)
    out = tmp_path / "codecs"
    out.mkdir()

    def src(i: int, bits: int = 16) -> Path:
        ds = ct_dataset(rng, "DF-CODEC", study, series, i, bits=bits)
        p = out / f"raw{i}.dcm"
        ds.save_as(p, enforce_file_format=True)
        return p

    corpus: list[tuple[Path, str, str]] = []
    for i, (tool, args, flag, ts) in enumerate([
        (dcmcjpeg, ["+e1"], "-xs", "1.2.840.10008.1.2.4.70"),
        (dcmcjpeg, ["+eb"], "-xy", "1.2.840.10008.1.2.4.50"),
        (dcmcjpls, ["+el"], "-xt", "1.2.840.10008.1.2.4.80"),
        (dcmcjpls, ["+en"], "-xu", "1.2.840.10008.1.2.4.81"),
        (dcmcrle, [], "-xr", "1.2.840.10008.1.2.5"),
    ]):
        dst = out / f"c{i}.dcm"
        r = run([tool, *args, str(src(i, bits=8 if ts.endswith(".50") else 16)), str(dst)])
        assert r.returncode == 0, r.stderr
        corpus.append((dst, flag, ts))
    for i, (ts, flag) in enumerate([(JPEG2000Lossless, "-xv"), (JPEG2000, "-xw")], start=10):
        ds = dcmread(src(i))
        ds.compress(ts, **({"j2k_cr": [10]} if ts == JPEG2000 else {}))
        dst = out / f"c{i}.dcm"
        ds.save_as(dst, enforce_file_format=True)
        corpus.append((dst, flag, str(ts)))
    ds = dcmread(src(20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(out / "c20.dcm", enforce_file_format=True)
    corpus.append((out / "c20.dcm", "-xd", DeflatedExplicitVRLittleEndian))
    ds = dcmread(src(21))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2"
    ds.save_as(out / "c21.dcm", enforce_file_format=True)
    corpus.append((out / "c21.dcm", "-xi", "1.2.840.10008.1.2"))
    return corpus


def test_storescu_every_transfer_syntax_is_stored_as_received(start_node, tmp_path):
    storescu = dcmtk("storescu")
    corpus = _compressed_corpus(tmp_path)
    assert {ts for _, _, ts in corpus} >= {
        "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.4.50",
        "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81",
        "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.5"}
    node = start_node()
    for path, flag, ts in corpus:
        r = run([storescu, flag, "-aec", "DENTFUSE", "127.0.0.1", str(node.port), str(path)])
        assert r.returncode == 0, (path.name, ts, r.stderr)
        rec = node.index.get(sop_uid_of(path))
        assert rec is not None, (path.name, ts)
        assert rec.transfer_syntax_uid == ts, path.name
        assert dataset_sha256(Path(rec.path)) == dataset_sha256(path), f"{ts} not byte-exact"
    assert node.index.count() == len(corpus)


def test_tls_with_client_certificates(start_node, tmp_path):
    storescu, echoscu = dcmtk("storescu"), dcmtk("echoscu")
    pki = make_pki(tmp_path)
    node = start_node(tls_certificate=str(pki["server_crt"]), tls_private_key=str(pki["server_key"]),
                      tls_ca_certificates=str(pki["ca_crt"]), tls_require_client_certificate=True)
    src = make_ct_series(tmp_path / "tls_series", 5, seed=31)
    tls_client = ["+tls", str(pki["client_key"]), str(pki["client_crt"]), "+cf", str(pki["ca_crt"])]
    r = run([storescu, *tls_client, "-aec", "DENTFUSE", "+sd", "127.0.0.1", str(node.port),
             str(tmp_path / "tls_series")])
    assert r.returncode == 0, r.stderr
    for p in src:
        rec = node.index.get(sop_uid_of(p))
        assert rec is not None and dataset_sha256(Path(rec.path)) == dataset_sha256(p)
    # no client certificate: the handshake fails, nothing is stored, the node keeps serving
    (tmp_path / "one").mkdir()
    one = make_ct_series(tmp_path / "one", 1, seed=32)
    r = run([storescu, "+tla", "+cf", str(pki["ca_crt"]), "-aec", "DENTFUSE", "127.0.0.1",
             str(node.port), str(one[0])])
    assert r.returncode != 0
    # plain TCP against the TLS port fails too
    r = run([echoscu, "-to", "5", "-aec", "DENTFUSE", "127.0.0.1", str(node.port)])
    assert r.returncode != 0
    assert node.index.get(sop_uid_of(one[0])) is None
    r = run([echoscu, *tls_client, "-aec", "DENTFUSE", "127.0.0.1", str(node.port)])
    assert r.returncode == 0, r.stderr
    rejected = node.audit.events("association_rejected")
    assert rejected and all("TLS handshake failed" in e.detail["reason"] for e in rejected)
    # a client that connects and never speaks TLS does not block anyone and is dropped
    silent = start_node(data_dir=tmp_path / "silent", tls_certificate=str(pki["server_crt"]),
                        tls_private_key=str(pki["server_key"]), network_timeout_s=1.0)
    with socket.create_connection(("127.0.0.1", silent.port)) as mute:
        r = run([echoscu, "+tla", "+cf", str(pki["ca_crt"]), "-aec", "DENTFUSE", "127.0.0.1",
                 str(silent.port)])
        assert r.returncode == 0, r.stderr
        mute.settimeout(10)
        t0 = time.monotonic()
        assert mute.recv(1) == b""  # closed by the node after its network timeout
        assert time.monotonic() - t0 < 8
    # client certificates optional: an anonymous TLS client is served
    optional = start_node(data_dir=tmp_path / "optional", tls_certificate=str(pki["server_crt"]),
                          tls_private_key=str(pki["server_key"]), tls_ca_certificates=str(pki["ca_crt"]))
    r = run([storescu, "+tla", "+cf", str(pki["ca_crt"]), "-aec", "DENTFUSE", "127.0.0.1",
             str(optional.port), str(one[0])])
    assert r.returncode == 0, r.stderr
    assert optional.index.get(sop_uid_of(one[0])) is not None


def _associate(port: int, called: str = "DENTFUSE", calling: str = "SCU"):
    ae = AE(ae_title=calling)
    ae.add_requested_context(VERIFICATION)
    ae.acse_timeout = 10
    return ae.associate("127.0.0.1", port, ae_title=called)


def _rejection(assoc) -> tuple[int, int, int]:
    assert assoc.is_rejected, "association should have been rejected"
    p = assoc.acceptor.primitive
    return (p.result, p.result_source, p.diagnostic)


def test_access_control_rejects_with_the_proper_reasons(start_node):
    echoscu = dcmtk("echoscu")
    node = start_node(allowed_calling_ae_titles=("CBCT1", "IOS1"))
    # called AE title not recognised: rejected-permanent, service-user, reason 7
    assert _rejection(_associate(node.port, called="SOMEONE")) == (1, 1, 7)
    # calling AE title not recognised: reason 3
    assert _rejection(_associate(node.port, calling="INTRUDER")) == (1, 1, 3)
    ok = _associate(node.port, calling="CBCT1")
    assert ok.is_established and ok.send_c_echo().Status == 0
    ok.release()
    r = run([echoscu, "-aet", "INTRUDER", "-aec", "DENTFUSE", "127.0.0.1", str(node.port)])
    assert r.returncode != 0 and "Rejected" in (r.stdout + r.stderr)
    r = run([echoscu, "-aet", "IOS1", "-aec", "DENTFUSE", "127.0.0.1", str(node.port)])
    assert r.returncode == 0, r.stderr
    reasons = [e.detail["reason"] for e in node.audit.events("association_rejected")]
    assert any("called AE title 'SOMEONE'" in x for x in reasons)
    assert sum("calling AE title 'INTRUDER'" in x for x in reasons) == 2


def test_peer_address_allow_list(start_node, tmp_path):
    node = start_node(allowed_peer_addresses=("10.0.0.0/8",))
    assert _rejection(_associate(node.port)) == (1, 1, 3)
    (ev,) = node.audit.events("association_rejected")
    assert "peer address 127.0.0.1" in ev.detail["reason"]
    node2 = start_node(data_dir=tmp_path / "d2", allowed_peer_addresses=("127.0.0.0/8",))
    a = _associate(node2.port)
    assert a.is_established
    a.release()


def test_maximum_associations(start_node):
    node = start_node(max_associations=1)
    first = _associate(node.port)
    assert first.is_established
    # transient rejection, service-provider (presentation), local limit exceeded
    assert _rejection(_associate(node.port)) == (2, 3, 2)
    first.release()
    again = None
    for _ in range(50):  # the first association's thread ends asynchronously
        again = _associate(node.port)
        if again.is_established:
            break
        threading.Event().wait(0.05)
    assert again is not None and again.is_established
    again.release()


def test_storescu_small_set_cbct_scan_and_pano_are_indexed_by_kind(small_set, tmp_path):
    """The synthetic clinic: a CBCT series, an Encapsulated STL scan and a panoramic DX."""
    storescu, dcmsend = dcmtk("storescu"), dcmtk("dcmsend")
    from test_volumes.groundtruth import GroundTruth

    gt = GroundTruth.load(small_set)
    cbct_dir = gt.series_dir("p1_cbct_a")
    scan = small_set / "p1_scan" / "upper.dcm"
    pano = sorted((small_set / "p1_pano").glob("*.dcm"))
    node = DicomNode(NodeSettings(port=0), StabilitySettings(quiet_period_s=0.5, check_interval_s=0.1),
                     tmp_path / "clinic")
    node.start()
    try:
        t0 = time.monotonic()
        r = run([storescu, "-aet", "CLINIC", "-aec", "DENTFUSE", "+sd", "127.0.0.1", str(node.port), str(cbct_dir)])
        assert r.returncode == 0, r.stderr
        cbct_s = time.monotonic() - t0
        # storescu does not propose Encapsulated STL by default; dcmsend proposes what it finds
        r = run([dcmsend, "-aet", "CLINIC", "-aec", "DENTFUSE", "127.0.0.1", str(node.port), str(scan),
                 *map(str, pano)])
        assert r.returncode == 0, r.stderr
        cbct_files = sorted(cbct_dir.glob("*.dcm"))
        kinds = {s.kind: s for s in node.index.series()}
        assert set(kinds) == {"volume", "surface", "2d"}
        assert kinds["volume"].instance_count == len(cbct_files) and kinds["volume"].modality == "CT"
        assert kinds["surface"].instance_count == 1 and kinds["2d"].instance_count == len(pano)
        assert {p.patient_id for p in node.index.patients()} == {"DF-0001"}
        for p in cbct_files + [scan] + pano:
            rec = node.index.get(sop_uid_of(p))
            assert dataset_sha256(Path(rec.path)) == dataset_sha256(p)
        deadline = time.monotonic() + 20
        while len(node.stability_monitor.pending_events()) < 3 and time.monotonic() < deadline:
            time.sleep(0.1)
        events = node.stability_monitor.pending_events()
        assert sorted(e.kind for e in events) == ["2d", "surface", "volume"]
        assert {e.instance_count for e in events if e.kind == "volume"} == {len(cbct_files)}
        size_mb = sum(p.stat().st_size for p in cbct_files) / 1e6
        print(f"p1_cbct_a via storescu: {len(cbct_files)} instances, {size_mb:.1f} MB in {cbct_s:.2f} s")
    finally:
        node.close()
