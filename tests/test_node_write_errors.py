"""Write, flush and directory-sync failures of the listener's fast data phase, over a real
association: each refuses that instance with the write-failure status (0xA701 disk full,
else 0xA700), leaves no file and no index row behind, and the next C-STORE on the same
association is stored (and a retry of the refused one succeeds)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node import fastpath, storage
from dicom_node.server import DicomNode
from dicom_node.status import Status
from node_support import (dataset_sha256, make_ct_series, running_node, scu_associate, sop_uid_of, stored_files,
                          temp_files)


@pytest.fixture
def node(tmp_path):
    yield from running_node(tmp_path, network_timeout_s=2.0)


def _incoming(fd: int) -> bool:
    """True when ``fd`` is a temporary file of the listener (instances/.incoming)."""
    try:
        return f"{os.sep}.incoming{os.sep}" in os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return False


def _series(tmp_path: Path, seed: int) -> list[Path]:
    # 256 x 256 x 2 bytes: each dataset arrives in several PDVs and several writes
    return make_ct_series(tmp_path / "src", 2, seed=seed, rows=256, cols=256)


def _no_received_bytes_left(node: DicomNode) -> bool:
    """No stored file and no temporary file with content (between two C-STOREs the
    listener keeps one empty temporary file ready for the next dataset)."""
    return stored_files(node.data_dir) == [] and [t for t in temp_files(node.data_dir) if t.stat().st_size] == []


def _assert_stored_exactly(node: DicomNode, sources: list[Path]) -> None:
    assert node.index.count() == len(sources)
    assert temp_files(node.data_dir) == []
    files = stored_files(node.data_dir)
    assert sorted(dataset_sha256(f) for f in files) == sorted(dataset_sha256(s) for s in sources)
    for src in sources:
        rec = node.index.get(sop_uid_of(src))
        assert rec is not None and Path(rec.path).is_file() and rec.sha256 == dataset_sha256(src)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd to tell the files apart")
def test_disk_full_while_writing_the_dataset_answers_a701_and_the_association_goes_on(node, tmp_path, monkeypatch):
    p, q = _series(tmp_path, seed=301)
    real_write = os.write
    failed = []

    def write(fd, data):  # type: ignore[no-untyped-def]
        if not failed and len(data) > 4096 and _incoming(fd):  # a dataset write (the File Meta is smaller)
            failed.append(fd)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(fastpath.os, "write", write)
    assoc = scu_associate(node.port)
    try:
        assert assoc.send_c_store(dcmread(p)).Status == Status.OUT_OF_RESOURCES_DISK_FULL
        assert failed and _no_received_bytes_left(node)
        assert assoc.send_c_store(dcmread(q)).Status == Status.SUCCESS  # same association
        assert assoc.send_c_store(dcmread(p)).Status == Status.SUCCESS  # the sender's retry
    finally:
        assoc.release()
    _assert_stored_exactly(node, [p, q])
    (failure,) = node.audit.events("store_failed")
    assert failure.detail["status"] == "0xA701"


def test_failed_fdatasync_refuses_the_instance_with_a700_and_leaves_no_file(node, tmp_path, monkeypatch):
    p, q = _series(tmp_path, seed=302)
    real_sync = storage.sync_fd
    failed = []

    def sync_fd(fd: int) -> None:
        if not failed:
            failed.append(fd)
            raise OSError(errno.EIO, "Input/output error")
        real_sync(fd)

    monkeypatch.setattr(storage, "sync_fd", sync_fd)
    assoc = scu_associate(node.port)
    try:
        assert assoc.send_c_store(dcmread(p)).Status == Status.OUT_OF_RESOURCES
        assert failed and node.index.count() == 0 and _no_received_bytes_left(node)
        assert assoc.send_c_store(dcmread(q)).Status == Status.SUCCESS
        assert assoc.send_c_store(dcmread(p)).Status == Status.SUCCESS
    finally:
        assoc.release()
    _assert_stored_exactly(node, [p, q])


def test_failed_directory_fsync_after_the_rename_refuses_and_removes_the_file(node, tmp_path, monkeypatch):
    """The rename happened but could not be made durable: the instance is refused (0xA700),
    so it must not stay in the store either (a restart would otherwise index an instance
    the sender was told had failed)."""
    p, q = _series(tmp_path, seed=303)
    real_fsync_dir = storage.fsync_dir
    failed = []

    def fsync_dir(path: Path) -> None:
        # the series directory right after the rename (it holds the new .dcm); the
        # fsyncs of newly created parent directories pass
        if not failed and any(Path(path).glob("*.dcm")):
            failed.append(Path(path))
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(storage, "fsync_dir", fsync_dir)
    assoc = scu_associate(node.port)
    try:
        assert assoc.send_c_store(dcmread(p)).Status == Status.OUT_OF_RESOURCES
        assert failed, "the directory fsync after the rename was not reached"
        assert node.index.get(sop_uid_of(p)) is None and _no_received_bytes_left(node)
        assert assoc.send_c_store(dcmread(q)).Status == Status.SUCCESS
        assert assoc.send_c_store(dcmread(p)).Status == Status.SUCCESS
    finally:
        assoc.release()
    _assert_stored_exactly(node, [p, q])


def test_commit_whose_directory_cannot_be_synced_leaves_nothing_at_the_final_path(tmp_path, monkeypatch):
    from dicom_node.errors import StorageError

    store = storage.InstanceStore(tmp_path / "data")
    final = store.final_path("1.2.3", "1.2.3.4", "1.2.3.4.5")
    tmp, fh = store.new_temp_file()
    with fh:
        fh.write(b"complete instance bytes")
    real_fsync_dir = storage.fsync_dir

    def fsync_dir(path: Path) -> None:
        if Path(path) == final.parent and final.exists():  # after the rename, not for the new parents
            raise OSError(errno.EIO, "Input/output error")
        real_fsync_dir(path)

    monkeypatch.setattr(storage, "fsync_dir", fsync_dir)
    with pytest.raises(StorageError, match="Input/output error"):
        store.commit(tmp, final)
    assert not final.exists() and not tmp.exists()
    monkeypatch.undo()
    tmp2, fh2 = store.new_temp_file()
    with fh2:
        fh2.write(b"complete instance bytes")
    assert store.commit(tmp2, final) == final and final.read_bytes() == b"complete instance bytes"
