"""Talking to a real PACS: Orthanc (Debian package ``orthanc``) started on loopback.

Forwarding through the queue while Orthanc is down and after it comes back, dead letters,
C-FIND at study/series level (both information models), prior 3D series, C-MOVE into our
running DicomNode and C-GET into a store, byte-identical datasets, ``dentfuse node query``
and ``retrieve``.
"""

from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Iterator

import pydicom
import pytest
from click.testing import CliRunner

from conftest import free_port
from dicom_node.audit import AuditTrail
from dicom_node.forward import ForwardQueue, audit_sent_to
from dicom_node.index import InstanceIndex
from dicom_node.qr import PacsClient, RetrievedStoreHandler
from dicom_node.server import DicomNode
from dicom_node.settings import NodeSettings, PacsDestination, PacsSettings, StabilitySettings
from dicom_node.storage import InstanceStore
from orthanc import Modality, OrthancServer, dataset_bytes, make_series, orthanc_program

pytestmark = pytest.mark.peers

DX = "1.2.840.10008.5.1.4.1.1.1.1"
MR = "1.2.840.10008.5.1.4.1.1.4"


def wait_for(predicate, timeout_s: float = 20.0, interval_s: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_s)
    return predicate()


def uids(paths: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}


# -- a PACS holding two studies of DF-0001 and one of DF-0002, and our node as move target --
class World:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.node = DicomNode(NodeSettings(ae_title="DENTFUSE", port=0), StabilitySettings(),
                              root / "node")
        self.node_port = self.node.start()
        self.orthanc = OrthancServer(root / "orthanc", modalities=[
            Modality("dentfuse", "DENTFUSE", "127.0.0.1", self.node_port)])
        self.orthanc.start()
        self.prior_ct = make_series(root / "prior_ct", n=4, seed=1, study_date="20240105")
        self.pano = make_series(root / "pano", n=1, seed=2, modality="DX", sop_class_uid=DX,
                                study_date="20250301")
        study_b = pydicom.dcmread(self.pano[0]).StudyInstanceUID
        self.mr = make_series(root / "mr", n=3, seed=3, modality="MR", sop_class_uid=MR,
                              study_instance_uid=study_b, study_date="20250301")
        self.other_patient = make_series(root / "p2", n=2, seed=4, patient_id="DF-0002")
        # same PatientID issued by another hospital: a different person
        self.namesake = make_series(root / "namesake", n=2, seed=5, patient_id="DF-0001",
                                    issuer_of_patient_id="OTHERHOSP", study_date="20230101")
        self.orthanc.upload(self.prior_ct + self.pano + self.mr + self.other_patient + self.namesake)
        self.dest = PacsDestination("orthanc", self.orthanc.ae_title, "127.0.0.1", self.orthanc.dicom_port)

    def close(self) -> None:
        self.orthanc.stop()
        self.node.close()


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    orthanc_program()
    w = World(tmp_path_factory.mktemp("pacs"))
    try:
        yield w
    finally:
        w.close()


def test_forward_while_orthanc_is_down_then_up_with_the_queue_thread(tmp_path: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc")  # configured, not started: the PACS is down
    series = make_series(tmp_path / "out", n=5, seed=31)
    dest = PacsDestination("pacs", orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)
    cfg = PacsSettings(destinations=(dest,), forward_max_attempts=50, forward_backoff_s=0.2,
                       forward_backoff_max_s=0.4)
    (tmp_path / "data").mkdir()
    trail = AuditTrail(tmp_path / "data" / "index.sqlite")
    q = ForwardQueue(tmp_path / "data", cfg, "DENTFUSE", on_sent=audit_sent_to(trail))
    try:
        q.enqueue_many(series, "pacs")
        q.start(poll_interval_s=1.0)
        assert wait_for(lambda: all(j.attempts >= 2 for j in q.jobs()))
        assert q.counts()["pending"] == 5 and q.counts()["done"] == 0  # nothing dropped
        orthanc.start()
        assert wait_for(lambda: q.counts()["done"] == 5, timeout_s=20), q.jobs()
        q.stop()
        assert uids(series) <= orthanc.sop_instance_uids()
        assert len(orthanc.get("/instances")) == 5
        for p in series:  # Orthanc keeps what we sent, byte for byte
            sop = str(pydicom.dcmread(p).SOPInstanceUID)
            assert dataset_bytes(orthanc.instance_file(sop)) == dataset_bytes(p.read_bytes())
        sent = trail.events("instances_sent")
        assert sent[-1].outcome == "success" and sent[-1].instance_count == 5
        assert any(e.outcome == "serious_failure" for e in sent)  # the failed attempts are audited too
    finally:
        q.close()
        trail.close()
        orthanc.stop()


def test_dead_letter_after_budget_then_revived_by_a_restarted_queue(tmp_path: Path) -> None:
    orthanc = OrthancServer(tmp_path / "orthanc")
    series = make_series(tmp_path / "out", n=2, seed=32)
    dest = PacsDestination("pacs", orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)
    cfg = PacsSettings(destinations=(dest,), forward_max_attempts=2, forward_backoff_s=1.0,
                       forward_backoff_max_s=1.0)
    q = ForwardQueue(tmp_path / "data", cfg, "DENTFUSE")
    q.enqueue_many(series, "pacs", now=0.0)
    assert q.run_once(now=0.0).retrying == 2
    assert q.run_once(now=1.0).dead == 2
    assert all(j.state == "dead" and "PACS pacs" in (j.last_error or "") for j in q.jobs())
    q.close()
    with orthanc:
        q2 = ForwardQueue(tmp_path / "data", cfg, "DENTFUSE")  # restart: the dead letters are still there
        try:
            assert q2.counts()["dead"] == 2
            assert q2.run_once(now=100.0).attempted == 0
            assert q2.retry_dead(now=100.0) == 2
            assert q2.run_once(now=100.0).delivered == 2
        finally:
            q2.close()
        assert uids(series) <= orthanc.sop_instance_uids()


@pytest.mark.parametrize("model", ["study", "patient"])
def test_cfind_studies_series_and_priors(world: World, model: str) -> None:
    client = PacsClient("DENTFUSE", world.dest, model=model)
    assert [s.study_date for s in client.find_studies("DF-0001")] == ["20230101", "20240105", "20250301"]
    namesake = client.find_studies("DF-0001", issuer_of_patient_id="OTHERHOSP")
    assert [(s.study_date, s.issuer_of_patient_id) for s in namesake] == [("20230101", "OTHERHOSP")]
    studies = client.find_studies("DF-0001", issuer_of_patient_id="")  # the patient without issuer
    assert [s.study_date for s in studies] == ["20240105", "20250301"]
    assert studies[0].study_instance_uid == pydicom.dcmread(world.prior_ct[0]).StudyInstanceUID
    assert studies[0].number_of_instances == 4
    assert all(s.patient_id == "DF-0001" for s in studies)
    series_b = client.find_series(studies[1].study_instance_uid, patient_id="DF-0001")
    assert sorted((s.modality, s.number_of_instances) for s in series_b) == [("DX", 1), ("MR", 3)]
    priors = client.find_prior_3d_series("DF-0001")  # not the namesake's CT, not the panoramic
    assert sorted(s.modality for s in priors) == ["CT", "MR"]
    assert [s.modality for s in client.find_prior_3d_series("DF-0001", issuer_of_patient_id="OTHERHOSP")] == ["CT"]
    only_ct = client.find_prior_3d_series("DF-0001", exclude_study_uids=[studies[1].study_instance_uid])
    assert [s.modality for s in only_ct] == ["CT"]
    assert [s.patient_id for s in client.find_studies("DF-0002")] == ["DF-0002"]
    assert client.find_studies("NOBODY") == []


def test_cmove_series_into_our_running_node(world: World) -> None:
    client = PacsClient("DENTFUSE", world.dest)
    ds = pydicom.dcmread(world.prior_ct[0])
    res = client.move_series(ds.StudyInstanceUID, ds.SeriesInstanceUID, "DENTFUSE",
                             have_instance=lambda u: world.node.index.get(u) is not None)
    assert res.ok, res
    assert set(res.received) == uids(world.prior_ct) and res.completed == 4
    by_uid = {i.sop_instance_uid: i for i in world.node.index.instances(series_instance_uid=ds.SeriesInstanceUID)}
    assert set(by_uid) == uids(world.prior_ct)
    for p in world.prior_ct:  # the dataset as sent to Orthanc, as Orthanc holds it, as we stored it
        rec = by_uid[str(pydicom.dcmread(p).SOPInstanceUID)]
        assert rec.calling_ae_title == "ORTHANC" and rec.kind == "volume"
        ours = dataset_bytes(Path(rec.path).read_bytes())
        assert ours == dataset_bytes(p.read_bytes()) == dataset_bytes(world.orthanc.instance_file(rec.sop_instance_uid))
    # Orthanc does not know this move destination: reported, nothing received
    res = client.move_series(ds.StudyInstanceUID, ds.SeriesInstanceUID, "STRANGER", have_instance=lambda u: False)
    assert not res.ok and res.received == ()


def test_cget_series_into_a_store(world: World, tmp_path: Path) -> None:
    store = InstanceStore(tmp_path / "data")
    index = InstanceIndex(tmp_path / "data" / "index.sqlite")
    trail = AuditTrail(tmp_path / "data" / "index.sqlite")
    try:
        client = PacsClient("DENTFUSE", world.dest, model="patient")
        prior = [s for s in client.find_prior_3d_series("DF-0001") if s.modality == "MR"][0]
        handler = RetrievedStoreHandler(store, index, audit=trail)
        res = client.get_series(prior.study_instance_uid, prior.series_instance_uid, handler,
                                have_instance=lambda u: index.get(u) is not None, patient_id="DF-0001")
        assert res.ok and res.method == "C-GET"
        assert set(res.received) == uids(world.mr)
        for p in world.mr:
            rec = index.get(str(pydicom.dcmread(p).SOPInstanceUID))
            assert rec is not None and rec.kind == "volume" and rec.modality == "MR"
            assert dataset_bytes(Path(rec.path).read_bytes()) == dataset_bytes(p.read_bytes())
        rx = trail.events("instances_received")
        assert [(e.peer_ae_title, e.instance_count, e.outcome) for e in rx] == [("ORTHANC", 3, "success")]
        # again: identical duplicates are success, still one row per instance
        res2 = client.get_series(prior.study_instance_uid, prior.series_instance_uid, handler,
                                 have_instance=lambda u: index.get(u) is not None, patient_id="DF-0001")
        assert res2.ok and index.count() == 3
        assert not list(store.incoming_dir.iterdir())  # no temporary file left behind
    finally:
        trail.close()
        index.close()


def test_cli_query_and_retrieve(world: World, tmp_path: Path) -> None:
    from pipeline.cli import main

    runner = CliRunner()
    env = {k: None for k in os.environ if k.startswith("DENTFUSE_")}
    pacs = f"{world.orthanc.ae_title}@127.0.0.1:{world.orthanc.dicom_port}"
    data = tmp_path / "data"
    res = runner.invoke(main, ["node", "query", pacs, "--patient-id", "DF-0001", "--json", "--data-dir", str(data)],
                        env=env)
    assert res.exit_code == 0, res.output
    assert [(s["study_date"], s["issuer_of_patient_id"]) for s in json.loads(res.output)] == [
        ("20230101", "OTHERHOSP"), ("20240105", ""), ("20250301", "")]
    res = runner.invoke(main, ["node", "query", pacs, "--patient-id", "DF-0001^OTHERHOSP", "--json",
                               "--data-dir", str(data)], env=env)
    assert [s["study_date"] for s in json.loads(res.output)] == ["20230101"]
    res = runner.invoke(main, ["node", "query", pacs, "--patient-id", "DF-0001", "--priors", "--data-dir", str(data)],
                        env=env)
    assert res.exit_code == 0 and "CT" in res.output and "MR" in res.output and "DX" not in res.output
    res = runner.invoke(main, ["node", "retrieve", pacs, "--priors", "--patient-id", "DF-0001", "--method", "get",
                               "--json", "--data-dir", str(data)], env=env)
    assert res.exit_code == 0, res.output
    results = json.loads(res.output)
    assert sorted(len(r["received"]) for r in results) == [3, 4] and all(r["ok"] for r in results)
    res = runner.invoke(main, ["node", "ls", "--json", "--data-dir", str(data)], env=env)
    assert sorted((r["modality"], r["instance_count"]) for r in json.loads(res.output)) == [("CT", 4), ("MR", 3)]
    # C-MOVE to our running listener (the world's node, AE title DENTFUSE = node.ae_title)
    mr = pydicom.dcmread(world.mr[0])
    res = runner.invoke(main, ["node", "retrieve", pacs, "--study", mr.StudyInstanceUID, "--series",
                               mr.SeriesInstanceUID, "--method", "move", "--json", "--data-dir",
                               str(world.node.data_dir)], env=env)
    assert res.exit_code == 0, res.output
    assert set(json.loads(res.output)[0]["received"]) == uids(world.mr)
    assert all(world.node.index.get(u) is not None for u in uids(world.mr))
    res = runner.invoke(main, ["node", "query", f"X@127.0.0.1:{free_port()}", "--patient-id", "DF-0001",
                               "--data-dir", str(data)], env=env)
    assert res.exit_code == 1 and "is the PACS running" in res.output


def test_forward_pipeline_like_outputs_of_the_small_set(world: World, small_set: Path, tmp_path: Path) -> None:
    """An Encapsulated STL, a panoramic and CBCT slices of the committed synthetic set, and
    JPEG-LS and RLE files, reach Orthanc through the queue unchanged (sent as stored)."""
    files = [small_set / "p1_scan" / "upper.dcm"]
    files += sorted((small_set / "p1_pano").glob("*.dcm"))[:1]
    files += sorted((small_set / "p1_cbct_a").glob("*.dcm"))[:3]
    from pydicom.uid import JPEGLSLossless, RLELossless

    for i, syntax in enumerate((JPEGLSLossless, RLELossless)):  # compressed outputs go as stored
        path = make_series(tmp_path / f"compressed{i}", n=1, seed=40 + i)[0]
        ds = pydicom.dcmread(path)
        ds.compress(syntax)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    assert len(files) == 7
    cfg = PacsSettings(destinations=(world.dest,), forward_backoff_s=1.0)
    with ForwardQueue(tmp_path / "data", cfg, "DENTFUSE") as q:
        q.enqueue_many(files, "orthanc", now=0.0)
        report = q.run_once(now=0.0)
        assert report.delivered == 7, q.jobs()
    for p in files:
        sop = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
        held = world.orthanc.instance_file(sop)
        assert dataset_bytes(held) == dataset_bytes(p.read_bytes()), p.name
        assert pydicom.dcmread(io.BytesIO(held)).file_meta.TransferSyntaxUID == \
            pydicom.dcmread(p).file_meta.TransferSyntaxUID
