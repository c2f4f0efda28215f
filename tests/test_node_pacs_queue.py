"""The persistent forwarding queue (dicom_node.forward) against in-process SCPs and dcmtk
``storescp``: idempotence, backoff and dead letters with a fake clock, failure statuses,
restart, the background thread, transfer syntaxes, the audit trail, ``dentfuse node``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pydicom
import pytest
from click.testing import CliRunner
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGLSLossless
from pynetdicom import AE, evt

from conftest import dcmtk, free_port
from dicom_node.audit import AuditTrail
from dicom_node.forward import ForwardError, ForwardQueue, audit_sent_to, queue_counts
from dicom_node.settings import PacsDestination, PacsSettings
from orthanc import dataset_bytes, make_series

CT = "1.2.840.10008.5.1.4.1.1.2"


def wait_for(predicate, timeout_s: float = 10.0, interval_s: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def wait_port(port: int, timeout_s: float = 10.0) -> None:
    import socket

    def up() -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", port)) == 0

    assert wait_for(up, timeout_s), f"nothing listens on {port}"


class FakeSCP:
    """A pynetdicom C-STORE SCP on loopback answering with scripted statuses."""

    def __init__(self, ae_title: str = "FAKEPACS", syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian),
                 statuses: list[int] | None = None) -> None:
        self.ae_title = ae_title
        self.statuses = list(statuses or [])
        self.received: list[tuple[str, str]] = []  # (sop uid, transfer syntax)
        self.lock = threading.Lock()
        ae = AE(ae_title)
        ae.add_supported_context(CT, list(syntaxes))
        self.server = ae.start_server(("127.0.0.1", 0), block=False,
                                      evt_handlers=[(evt.EVT_C_STORE, self._handle)])
        self.port = self.server.server_address[1]

    def _handle(self, event: evt.Event) -> int:
        with self.lock:
            status = self.statuses.pop(0) if self.statuses else 0x0000
            if status == 0x0000:
                self.received.append((str(event.request.AffectedSOPInstanceUID),
                                      str(event.context.transfer_syntax)))
        return status

    def destination(self, name: str = "pacs") -> PacsDestination:
        return PacsDestination(name, self.ae_title, "127.0.0.1", self.port)

    def close(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server = None


@pytest.fixture
def series(tmp_path: Path) -> list[Path]:
    return make_series(tmp_path / "series", n=3, seed=11)


def settings(*dests: PacsDestination, attempts: int = 3, backoff: float = 10.0, backoff_max: float = 25.0
             ) -> PacsSettings:
    return PacsSettings(destinations=tuple(dests), forward_max_attempts=attempts,
                        forward_backoff_s=backoff, forward_backoff_max_s=backoff_max)


def test_enqueue_is_idempotent_per_instance_and_destination(tmp_path: Path, series: list[Path]) -> None:
    a = PacsDestination("a", "A", "127.0.0.1", free_port())
    b = PacsDestination("b", "B", "127.0.0.1", free_port())
    with ForwardQueue(tmp_path / "data", settings(a, b), "DENTFUSE") as q:
        first = q.enqueue(series[0], "a", now=1000.0)
        assert q.enqueue(series[0], "a", now=1001.0) == first
        assert q.enqueue(series[0], "b", now=1000.0) != first
        copy = tmp_path / "copy.dcm"
        shutil.copy(series[0], copy)
        assert q.enqueue(copy, "a", now=1002.0) == first  # same SOP instance, same job
        assert q.counts()["pending"] == 2
        with pytest.raises(ForwardError, match="unknown PACS destination 'nowhere'.*configured: a, b"):
            q.enqueue(series[0], "nowhere")
        junk = tmp_path / "junk.dcm"
        junk.write_bytes(b"not dicom at all")
        with pytest.raises(ForwardError, match="junk.dcm"):
            q.enqueue(junk, "a")
        job = q.job(first)
        assert job.sop_instance_uid == str(pydicom.dcmread(series[0]).SOPInstanceUID)
        assert job.transfer_syntax_uid == ExplicitVRLittleEndian
        assert job.patient_key == "DF-0001"


def test_backoff_then_dead_letter_then_retry_dead(tmp_path: Path, series: list[Path]) -> None:
    down = PacsDestination("down", "NOBODY", "127.0.0.1", free_port())  # nothing listens
    q = ForwardQueue(tmp_path / "data", settings(down, attempts=3, backoff=10, backoff_max=15), "DENTFUSE")
    try:
        q.enqueue(series[0], "down", now=0.0)
        r = q.run_once(now=0.0)
        assert (r.attempted, r.delivered, r.retrying, r.dead) == (1, 0, 1, 0)
        job = q.jobs()[0]
        assert job.attempts == 1 and job.next_attempt_at == pytest.approx(10.0)
        assert "cannot connect" in job.last_error or "no association" in job.last_error
        assert q.run_once(now=9.9).attempted == 0  # not due yet
        assert q.run_once(now=10.0).retrying == 1
        assert q.jobs()[0].next_attempt_at == pytest.approx(10.0 + 15.0)  # 20 s capped at 15 s
        r = q.run_once(now=25.0)
        assert r.dead == 1
        dead = q.jobs(state="dead")
        assert len(dead) == 1 and dead[0].attempts == 3 and dead[0].last_error
        assert q.run_once(now=10_000.0).attempted == 0  # dead jobs are not retried...
        assert q.counts(now=10_000.0) == {"pending": 0, "done": 0, "dead": 1, "due": 0, "total": 1}
        assert queue_counts(tmp_path / "data")["dead"] == 1
        assert q.retry_dead("down", now=10_000.0) == 1  # ...until someone revives them
        assert q.jobs()[0].state == "pending" and q.jobs()[0].attempts == 0
    finally:
        q.close()


def test_failure_status_is_retried_and_audited(tmp_path: Path, series: list[Path]) -> None:
    scp = FakeSCP(statuses=[0xA700])  # out of resources once, then success
    (tmp_path / "data").mkdir()
    trail = AuditTrail(tmp_path / "data" / "index.sqlite")
    q = ForwardQueue(tmp_path / "data", settings(scp.destination(), backoff=1), "DENTFUSE",
                     on_sent=audit_sent_to(trail))
    try:
        ids = q.enqueue_many(series, "pacs", now=0.0)
        r = q.run_once(now=0.0)
        assert (r.delivered, r.retrying) == (2, 1)
        failed = [j for j in q.jobs() if j.state == "pending"]
        assert len(failed) == 1 and failed[0].last_status == 0xA700 and "0xA700" in failed[0].last_error
        r = q.run_once(now=1.0)
        assert r.delivered == 1
        assert all(q.job(i).state == "done" for i in ids)
        assert sorted(u for u, _ in scp.received) == sorted(q.job(i).sop_instance_uid for i in ids)
        sent = trail.events("instances_sent")
        assert [(e.outcome, e.instance_count, e.detail["failed"]) for e in sent] == [
            ("minor_failure", 2, 1), ("success", 1, 0)]
        assert sent[0].peer_ae_title == "FAKEPACS" and sent[0].patient_key == "DF-0001"
        assert "PatientName" not in json.dumps([e.to_dict() for e in sent])
    finally:
        q.close()
        trail.close()
        scp.close()


def test_transfer_syntax_as_stored_or_refused(tmp_path: Path) -> None:
    implicit = make_series(tmp_path / "implicit", n=1, seed=21, transfer_syntax_uid=ImplicitVRLittleEndian)
    jpegls = make_series(tmp_path / "jls", n=1, seed=22)
    ds = pydicom.dcmread(jpegls[0])
    ds.compress(JPEGLSLossless)
    ds.save_as(jpegls[0], enforce_file_format=True)
    # A peer that takes only Explicit VR LE: the implicit file is converted, the JPEG-LS one
    # cannot be sent as stored and goes dead at once with a message saying why.
    explicit_only = FakeSCP(syntaxes=[ExplicitVRLittleEndian])
    both = FakeSCP(ae_title="JLSPACS", syntaxes=[JPEGLSLossless, ExplicitVRLittleEndian])
    q = ForwardQueue(tmp_path / "data", settings(explicit_only.destination("x"), both.destination("j")),
                     "DENTFUSE")
    try:
        q.enqueue(implicit[0], "x", now=0.0)
        dead_id = q.enqueue(jpegls[0], "x", now=0.0)
        q.enqueue(jpegls[0], "j", now=0.0)
        r = q.run_once(now=0.0)
        assert (r.delivered, r.dead) == (2, 1)
        dead = q.job(dead_id)
        assert dead.state == "dead" and "JPEG-LS Lossless" in dead.last_error and dead.attempts == 1
        assert explicit_only.received == [(str(pydicom.dcmread(implicit[0]).SOPInstanceUID), ExplicitVRLittleEndian)]
        assert both.received == [(str(ds.SOPInstanceUID), JPEGLSLossless)]
    finally:
        q.close()
        explicit_only.close()
        both.close()


def test_restart_resumes_and_delivers_to_dcmtk_storescp(tmp_path: Path, series: list[Path]) -> None:
    storescp = dcmtk("storescp")
    port = free_port()
    dest = PacsDestination("scp", "STORESCP", "127.0.0.1", port)
    cfg = settings(dest, attempts=5, backoff=30, backoff_max=60)
    q = ForwardQueue(tmp_path / "data", cfg, "DENTFUSE")
    q.enqueue_many(series, "scp", now=0.0)
    assert q.run_once(now=0.0).retrying == 3  # storescp is not running yet
    q.close()

    out = tmp_path / "storescp"
    out.mkdir()
    proc = subprocess.Popen([storescp, "--aetitle", "STORESCP", "--output-directory", str(out), str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_port(port)
        q2 = ForwardQueue(tmp_path / "data", cfg, "DENTFUSE")  # a restarted process
        try:
            assert q2.run_once(now=29.0).attempted == 0
            r = q2.run_once(now=30.0)
            assert r.delivered == 3, q2.jobs()
            assert q2.counts()["done"] == 3
        finally:
            q2.close()
        assert wait_for(lambda: len(list(out.iterdir())) == 3)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    received = {str(pydicom.dcmread(p).SOPInstanceUID): dataset_bytes(p.read_bytes()) for p in out.iterdir()}
    for p in series:
        assert received[str(pydicom.dcmread(p).SOPInstanceUID)] == dataset_bytes(p.read_bytes())


def test_background_thread_delivers_soon_after_enqueue(tmp_path: Path, series: list[Path]) -> None:
    scp = FakeSCP()
    q = ForwardQueue(tmp_path / "data", settings(scp.destination()), "DENTFUSE")
    try:
        q.start(poll_interval_s=30.0)  # enqueue wakes it: no waiting for the poll
        q.enqueue_many(series, "pacs")
        assert wait_for(lambda: q.counts()["done"] == 3, timeout_s=10)
        assert len(scp.received) == 3
    finally:
        q.close()
        scp.close()


def test_cli_forward_and_ls(tmp_path: Path, series: list[Path]) -> None:
    from dicom_node.index import InstanceIndex
    from dicom_node.ingest import ingest_file
    from dicom_node.storage import InstanceStore
    from pipeline.cli import main

    scp = FakeSCP()
    data = tmp_path / "data"
    store, index = InstanceStore(data), InstanceIndex(data / "index.sqlite")
    for p in series:
        ingest_file(p, store, index)
    series_uid = index.series()[0].series_instance_uid
    index.close()
    config = tmp_path / "dentfuse.toml"
    config.write_text(
        f'[[pacs.destinations]]\nname = "pacs"\nae_title = "{scp.ae_title}"\nhost = "127.0.0.1"\nport = {scp.port}\n'
    )
    runner = CliRunner()
    env = {k: None for k in os.environ if k.startswith("DENTFUSE_")}
    try:
        res = runner.invoke(main, ["node", "ls", "--data-dir", str(data), "--config", str(config), "--json"], env=env)
        assert res.exit_code == 0, res.output
        rows = json.loads(res.output)
        assert [(r["series_instance_uid"], r["kind"], r["modality"], r["instance_count"]) for r in rows] == [
            (series_uid, "volume", "CT", 3)]
        res = runner.invoke(main, ["node", "ls", "--level", "patients", "--data-dir", str(data),
                                   "--config", str(config)], env=env)
        assert res.exit_code == 0 and "DF-0001" in res.output
        res = runner.invoke(main, ["node", "forward", "pacs", "--series", series_uid, "--data-dir", str(data),
                                   "--config", str(config), "--json"], env=env)
        assert res.exit_code == 0, res.output
        out = json.loads(res.output)
        assert out["queued"] == 3 and out["delivered"] == 3 and out["undelivered"] == []
        assert len(scp.received) == 3
        res = runner.invoke(main, ["node", "forward", "elsewhere", str(series[0]), "--data-dir", str(data),
                                   "--config", str(config)], env=env)
        assert res.exit_code == 2 and "unknown destination 'elsewhere'" in res.output
        res = runner.invoke(main, ["node", "queue", "--state", "done", "--json", "--data-dir", str(data),
                                   "--config", str(config)], env=env)
        assert res.exit_code == 0, res.output
        listed = json.loads(res.output)
        assert listed["counts"]["done"] == 3 and len(listed["jobs"]) == 3
        # the PACS goes away: the job stays pending with its error, visible in `node queue`
        scp.close()
        extra = make_series(tmp_path / "extra", n=1, seed=12)
        res = runner.invoke(main, ["node", "forward", "pacs", str(extra[0]), "--data-dir", str(data),
                                   "--config", str(config)], env=env)
        assert res.exit_code == 1 and "pending after 1 attempt" in res.output
        res = runner.invoke(main, ["node", "queue", "--data-dir", str(data), "--config", str(config)], env=env)
        assert res.exit_code == 0 and "pending 1" in res.output and "no association" in res.output
        more = make_series(tmp_path / "more", n=1, seed=13)
        res = runner.invoke(main, ["node", "forward", "pacs", str(more[0]), "--no-run", "--json", "--data-dir",
                                   str(data), "--config", str(config)], env=env)
        assert res.exit_code == 0 and json.loads(res.output)["counts"]["pending"] == 2
    finally:
        scp.close()


def _pki(tmp_path: Path) -> dict[str, Path]:
    """A throwaway CA with a server certificate for 127.0.0.1 and a client certificate."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = dt.datetime.now(dt.timezone.utc)
    out: dict[str, Path] = {}

    def save(name: str, key, cert) -> None:
        out[f"{name}_key"] = tmp_path / f"{name}.key"
        out[f"{name}_key"].write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                         serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
        out[f"{name}_crt"] = tmp_path / f"{name}.crt"
        out[f"{name}_crt"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def build(subject: str, issuer, key, signing_key, ca: bool, san=None):
        b = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(hours=2))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(signing_key, hashes.SHA256())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pacs test CA")])
    save("ca", ca_key, build("pacs test CA", ca_name, ca_key, ca_key, True))
    for name, san in (("server", [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), ("client", None)):
        key = ec.generate_private_key(ec.SECP256R1())
        save(name, key, build(f"pacs test {name}", ca_name, key, ca_key, False, san))
    return out


def test_forward_over_tls_to_a_dicom_node(tmp_path: Path, series: list[Path]) -> None:
    from dicom_node.scu import client_tls_context
    from dicom_node.server import DicomNode
    from dicom_node.settings import NodeSettings, StabilitySettings

    pki = _pki(tmp_path)
    node = DicomNode(NodeSettings(ae_title="REMOTE", port=0, tls_certificate=str(pki["server_crt"]),
                                  tls_private_key=str(pki["server_key"]),
                                  tls_ca_certificates=str(pki["ca_crt"]), tls_require_client_certificate=True),
                     StabilitySettings(), tmp_path / "remote")
    port = node.start()
    try:
        dest = PacsDestination("remote", "REMOTE", "127.0.0.1", port, tls=True)
        cfg = settings(dest, backoff=1)
        with ForwardQueue(tmp_path / "plain", cfg, "DENTFUSE") as q0:  # no TLS context configured
            q0.enqueue(series[0], "remote", now=0.0)
            assert q0.run_once(now=0.0).retrying == 1
            assert "requires TLS but no TLS client context" in (q0.jobs()[0].last_error or "")
        no_client_cert = client_tls_context(str(pki["ca_crt"]))
        with ForwardQueue(tmp_path / "nocert", cfg, "DENTFUSE", tls=no_client_cert) as q1:
            q1.enqueue(series[0], "remote", now=0.0)
            assert q1.run_once(now=0.0).retrying == 1  # the node wants a client certificate
        tls = client_tls_context(str(pki["ca_crt"]), str(pki["client_crt"]), str(pki["client_key"]))
        with ForwardQueue(tmp_path / "data", cfg, "DENTFUSE", tls=tls) as q:
            q.enqueue_many(series, "remote", now=0.0)
            assert q.run_once(now=0.0).delivered == 3
        for p in series:
            rec = node.index.get(str(pydicom.dcmread(p).SOPInstanceUID))
            assert rec is not None and rec.calling_ae_title == "DENTFUSE"
            assert dataset_bytes(Path(rec.path).read_bytes()) == dataset_bytes(p.read_bytes())
    finally:
        node.close()
