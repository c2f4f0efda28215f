"""Store, index, duplicates, reconciliation, stability (fake clock) and audit, without sockets."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread

from dicom_node.audit import AuditTrail
from dicom_node.errors import InstanceRejected, InvalidUIDError, StorageError
from dicom_node.index import InstanceIndex
from dicom_node.ingest import ingest_file, inspect_instance, reconcile_store
from dicom_node.settings import StabilitySettings
from dicom_node.sop_classes import STORAGE_SOP_CLASSES, kind_of
from dicom_node.stability import StabilityMonitor
from dicom_node.status import Status
from dicom_node.storage import InstanceStore
from dicom_node.uids import check_uid, is_valid_uid
from node_support import ct_dataset, dataset_sha256, make_ct_series, stored_files, temp_files


class FakeClock:
    def __init__(self, t: float = 1_800_000_000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


def _node_parts(tmp_path: Path, clock=None):
    data = tmp_path / "data"
    store = InstanceStore(data)
    index = InstanceIndex(data / "index.sqlite", clock=clock or FakeClock())
    return data, store, index


@pytest.mark.parametrize("uid", ["1.2.3", "0", "1.0.2", "2.25.123456789012345678901234567890", "1" * 64])
def test_valid_uids(uid):
    assert is_valid_uid(uid) and check_uid(uid) == uid


@pytest.mark.parametrize("uid", ["", "1.2.03", "1..2", ".1.2", "1.2.", "../../etc", "1.2.3/../x",
                                 "1.2.3\x00", "1.2.a", " 1.2", "1" * 65, "01.2", None, 123])
def test_invalid_uids_are_refused(uid):
    assert not is_valid_uid(uid)
    with pytest.raises(InvalidUIDError, match="UID"):
        check_uid(uid, "SeriesInstanceUID")


def test_store_paths_validate_uids(tmp_path):
    store = InstanceStore(tmp_path)
    assert store.final_path("1.2", "1.3", "1.4") == tmp_path / "instances" / "1.2" / "1.3" / "1.4.dcm"
    with pytest.raises(InvalidUIDError):
        store.final_path("1.2", "../..", "1.4")
    with pytest.raises(StorageError, match="outside"):
        store.commit(tmp_path / "x", tmp_path / "elsewhere.dcm")


def test_sop_class_table_covers_the_issue():
    for uid, kind in [("1.2.840.10008.5.1.4.1.1.2", "volume"), ("1.2.840.10008.5.1.4.1.1.2.2", "volume"),
                      ("1.2.840.10008.5.1.4.1.1.13.1.2", "volume"), ("1.2.840.10008.5.1.4.1.1.104.3", "surface"),
                      ("1.2.840.10008.5.1.4.1.1.104.4", "surface"), ("1.2.840.10008.5.1.4.1.1.104.5", "surface"),
                      ("1.2.840.10008.5.1.4.1.1.66.1", "registration"), ("1.2.840.10008.5.1.4.1.1.66.4", "segmentation"),
                      ("1.2.840.10008.5.1.4.1.1.1.3", "2d"), ("1.2.840.10008.5.1.4.1.1.1.1.1", "2d"),
                      ("1.2.840.10008.5.1.4.1.1.7", "2d"), ("1.2.840.10008.5.1.4.1.1.1", "2d")]:
        assert uid in STORAGE_SOP_CLASSES and kind_of(uid) == kind


def test_ingest_indexes_and_stores_byte_exact(tmp_path):
    src = make_ct_series(tmp_path / "src", 3, seed=1)
    data, store, index = _node_parts(tmp_path)
    recs = [ingest_file(p, store, index) for p in src]
    assert index.count() == 3
    for p, rec in zip(src, recs):
        assert Path(rec.path).read_bytes() == p.read_bytes()
        assert rec.sha256 == dataset_sha256(p)
        assert rec.kind == "volume" and rec.modality == "CT" and rec.patient_key == "DF-TEST"
        assert rec.calling_ae_title == "IMPORT"
    (series,) = index.series()
    assert series.instance_count == 3 and series.size_bytes == sum(p.stat().st_size for p in src)
    (study,) = index.studies()
    assert study.series_count == 1 and study.instance_count == 3
    (patient,) = index.patients()
    assert patient.patient_id == "DF-TEST" and patient.instance_count == 3 and patient.study_count == 1
    assert temp_files(data) == []


def _variant(path: Path, out: Path) -> Path:
    """Same SOP Instance UID, different pixel bytes."""
    ds = dcmread(path)
    arr = bytearray(ds.PixelData)
    arr[0] ^= 0xFF
    ds.PixelData = bytes(arr)
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.mark.parametrize("policy", ["keep_first", "keep_newest"])
def test_duplicates_follow_the_policy(tmp_path, policy):
    (first,) = make_ct_series(tmp_path / "src", 1, seed=2)
    second = _variant(first, tmp_path / "second.dcm")
    data, store, index = _node_parts(tmp_path)
    r1 = ingest_file(first, store, index, duplicate_policy=policy)
    r_same = ingest_file(first, store, index, duplicate_policy=policy)
    assert r_same == r1 and index.count() == 1 and index.duplicates() == []
    r2 = ingest_file(second, store, index, duplicate_policy=policy)
    assert index.count() == 1  # never two rows for one UID
    (dup,) = index.duplicates(r1.sop_instance_uid)
    files = stored_files(data)
    assert len(files) == 1
    if policy == "keep_first":
        assert r2 == r1 and dup.action == "kept_first"
        assert files[0].read_bytes() == first.read_bytes()
        assert dup.kept_sha256 == r1.sha256 and dup.other_sha256 == dataset_sha256(second)
    else:
        assert r2.sha256 == dataset_sha256(second) and dup.action == "replaced"
        assert files[0].read_bytes() == second.read_bytes() and Path(r2.path) == files[0]
        assert index.get(r1.sop_instance_uid).sha256 == r2.sha256


def test_ingest_refuses_bad_files_and_names_them(tmp_path):
    (good,) = make_ct_series(tmp_path / "src", 1, seed=3)
    data, store, index = _node_parts(tmp_path)
    trunc = tmp_path / "trunc.dcm"
    trunc.write_bytes(good.read_bytes()[:-100])
    with pytest.raises(InstanceRejected, match="trunc.dcm.*more than were received") as ei:
        ingest_file(trunc, store, index)
    assert ei.value.status == Status.CANNOT_UNDERSTAND_TRUNCATED
    ds = dcmread(good)
    del ds.PatientID
    ds.save_as(tmp_path / "nopid.dcm", enforce_file_format=True)
    with pytest.raises(InstanceRejected, match="PatientID is missing") as ei:
        ingest_file(tmp_path / "nopid.dcm", store, index)
    assert ei.value.status == Status.CANNOT_UNDERSTAND_MISSING_ATTRIBUTE
    ds = dcmread(good)
    ds.SeriesInstanceUID = "1.2.3/../../x"
    ds.save_as(tmp_path / "badseries.dcm", enforce_file_format=True)
    with pytest.raises(InstanceRejected, match="SeriesInstanceUID") as ei:
        ingest_file(tmp_path / "badseries.dcm", store, index)
    assert ei.value.status == Status.CANNOT_UNDERSTAND_INVALID_UID
    (tmp_path / "notdicom.dcm").write_bytes(b"hello" * 100)
    with pytest.raises(InstanceRejected, match="File Meta"):
        ingest_file(tmp_path / "notdicom.dcm", store, index)
    with pytest.raises(InstanceRejected, match="differs from the negotiated context"):
        inspect_instance(good, expected_sop_class_uid="1.2.840.10008.5.1.4.1.1.4")
    assert index.count() == 0 and stored_files(data) == [] and temp_files(data) == []


def test_reconcile_after_crash(tmp_path):
    src = make_ct_series(tmp_path / "src", 4, seed=4)
    data, store, index = _node_parts(tmp_path)
    recs = [ingest_file(p, store, index) for p in src[:2]]
    # a file renamed into place whose index row was never committed (crash in between)
    h = inspect_instance(src[2])
    orphan = store.final_path(h.study_instance_uid, h.series_instance_uid, h.sop_instance_uid)
    shutil.copy(src[2], orphan)
    # an interrupted keep_newest: a variant file nobody references
    stray = store.final_path(recs[0].study_instance_uid, recs[0].series_instance_uid,
                             recs[0].sop_instance_uid, variant="ab" * 8)
    _variant(src[0], stray)
    # temporary files from an interrupted receive
    (store.incoming_dir / "rx-abc.dcm").write_bytes(b"partial")
    (orphan.parent / "x.dcm.partial").write_bytes(b"partial")
    # an indexed file that vanished
    os.unlink(recs[1].path)
    report = reconcile_store(store, index)
    assert report.temp_files_removed == 2
    assert report.reindexed == [h.sop_instance_uid]
    assert report.removed_unreferenced == [str(stray)]
    assert report.missing_rows_removed == [recs[1].sop_instance_uid]
    assert index.get(h.sop_instance_uid).sha256 == dataset_sha256(src[2])
    assert index.get(recs[1].sop_instance_uid) is None
    assert sorted(str(p) for p in stored_files(data)) == sorted([recs[0].path, str(orphan)])
    assert temp_files(data) == []
    assert index.series()[0].instance_count == 2


def test_stability_with_fake_clock(tmp_path):
    clock = FakeClock()
    data, store, index = _node_parts(tmp_path, clock)
    db = data / "index.sqlite"
    mon = StabilityMonitor(db, StabilitySettings(quiet_period_s=60), clock=clock)
    seen = []
    mon.subscribe(seen.append)
    mon.subscribe(lambda ev: 1 / 0)  # a failing listener is isolated
    rng = np.random.default_rng(5)
    src = tmp_path / "src"
    src.mkdir()
    paths = []
    for i in range(3):
        ds = ct_dataset(rng, "DF-0001", "1.2.826.0.1.3680043.10.1090.1", "1.2.826.0.1.3680043.10.1090.2", i)
        paths.append(src / f"{i}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    ingest_file(paths[0], store, index)
    clock.advance(30)
    ingest_file(paths[1], store, index)
    clock.advance(59)
    assert mon.check() == [] and mon.pending_events() == []  # 59 s after the last instance
    clock.advance(1)
    (ev,) = mon.check()
    assert ev.instance_count == 2 and ev.kind == "volume" and ev.patient_key == "DF-0001"
    assert seen == [ev] and mon.is_stable(ev.series_instance_uid)
    clock.advance(600)
    assert mon.check() == []  # announced once per content generation
    # a late instance re-opens the series
    ingest_file(paths[2], store, index)
    assert not mon.is_stable(ev.series_instance_uid)
    clock.advance(30)
    assert mon.check() == []
    clock.advance(30)
    (ev2,) = mon.check()
    assert ev2.instance_count == 3 and ev2.event_id > ev.event_id
    # at least once: unacknowledged events survive a restart of the monitor
    assert mon.ack(ev.event_id) and not mon.ack(ev.event_id)
    mon.close()
    mon2 = StabilityMonitor(db, StabilitySettings(quiet_period_s=60), clock=clock)
    assert [e.event_id for e in mon2.pending_events()] == [ev2.event_id]
    assert mon2.check() == []
    assert mon2.ack(ev2.event_id) and mon2.pending_events() == []
    mon2.close()


def test_stability_events_persist_when_announced_before_a_crash(tmp_path):
    clock = FakeClock()
    data, store, index = _node_parts(tmp_path, clock)
    (p,) = make_ct_series(tmp_path / "src", 1, seed=6)
    ingest_file(p, store, index)
    clock.advance(61)
    mon = StabilityMonitor(data / "index.sqlite", StabilitySettings(quiet_period_s=60), clock=clock)
    (ev,) = mon.check()
    del mon  # no close, no ack: as if the process died after announcing
    mon2 = StabilityMonitor(data / "index.sqlite", StabilitySettings(quiet_period_s=60), clock=clock)
    assert mon2.pending_events() == [ev]
    mon2.close()


def test_audit_trail_has_no_patient_names(tmp_path):
    trail = AuditTrail(tmp_path / "a.sqlite")
    trail.record_transfer("received", local_ae_title="DENTFUSE", peer_ae_title="CBCT1",
                          peer_address="127.0.0.1", study_instance_uid="1.2.3", patient_key="DF-0001",
                          succeeded=10, failed=1, failures=[{"reason": "truncated"}])
    trail.record_transfer("sent", local_ae_title="DENTFUSE", peer_ae_title="PACS",
                          peer_address="10.0.0.2", study_instance_uid="1.2.3", patient_key="DF-0001",
                          succeeded=2)
    rx, tx = trail.events()
    assert (rx.event_type, rx.outcome, rx.instance_count, rx.detail["failed"]) == (
        "instances_received", "minor_failure", 10, 1)
    assert (tx.event_type, tx.outcome, tx.peer_ae_title) == ("instances_sent", "success", "PACS")
    assert trail.events("instances_sent") == [tx]
    with pytest.raises(ValueError, match="direction"):
        trail.record_transfer("lost", local_ae_title="", peer_ae_title="", peer_address="",
                              study_instance_uid="", patient_key="", succeeded=0)
    assert "TEST^PATIENT" not in (tmp_path / "a.sqlite").read_bytes().decode("latin-1")


def test_relative_data_dir_gives_absolute_paths(tmp_path, monkeypatch):
    (p,) = make_ct_series(tmp_path / "src", 1, seed=8)
    monkeypatch.chdir(tmp_path)
    store = InstanceStore(Path("rel"))
    index = InstanceIndex(Path("rel") / "index.sqlite")
    rec = ingest_file(p, store, index)
    assert Path(rec.path).is_absolute() and Path(rec.path).is_file()
    assert Path(rec.path).is_relative_to(tmp_path / "rel" / "instances")
