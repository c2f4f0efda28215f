"""Spatial Registration objects: encoding per DESIGN.md, dciodvfy-clean, exact read-back."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

from conftest import require_peer
from fusion.errors import InputError
from fusion.reg_object import (
    SPATIAL_REGISTRATION_SOP_CLASS,
    InstanceRef,
    read_spatial_registration,
    read_spatial_registrations,
    refs_of_volume,
    write_spatial_registration,
)
from fusion.versions import software_versions
from test_volume_assembly import make_ct_datasets, rotation

STL = "1.2.840.10008.5.1.4.1.1.104.3"
CT = "1.2.840.10008.5.1.4.1.1.2"


def rigid(ax, ay, az, t) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = rotation(ax, ay, az)
    m[:3, 3] = t
    return m


def _source() -> Dataset:
    ds = Dataset()
    ds.PatientID, ds.IssuerOfPatientID, ds.PatientName = "DF-0001", "CLINIC", "DOE^JANE"
    ds.PatientBirthDate, ds.PatientSex = "19700101", "F"
    ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "1.2.3.100", "20260102", "101010", "7", "A1"
    return ds


def _write(tmp_path: Path, moving_class: str = CT, matrix=None) -> tuple[Path, np.ndarray]:
    m = rigid(0.21, -0.13, 0.05, (12.3456789, -7.25, 19.0)) if matrix is None else matrix
    out = write_spatial_registration(
        tmp_path / "reg.dcm",
        matrix_moving_to_fixed=m,
        fixed_frame_uid="1.2.3.10",
        moving_frame_uid="1.2.3.11",
        fixed_refs=[InstanceRef(CT, f"1.2.3.100.1.{i}", "1.2.3.100.1", "1.2.3.100") for i in range(3)],
        moving_refs=[(moving_class, "1.2.3.200.1.1", "1.2.3.200.1", "1.2.3.200")],
        patient_source=_source(),
        software_versions=software_versions(),
        content_creator_name="TECH^ONE",
    )
    assert Path(out.path).is_file() and out.kind == "registration" and len(out.sha256) == 64
    return Path(out.path), m


def test_reg_encoding_and_round_trip(tmp_path):
    path, m = _write(tmp_path)
    ds = pydicom.dcmread(path)
    assert ds.SOPClassUID == SPATIAL_REGISTRATION_SOP_CLASS and ds.Modality == "REG"
    assert ds.FrameOfReferenceUID == "1.2.3.10"  # REG's own frame = fixed (registered) frame
    assert ds.PatientID == "DF-0001" and ds.IssuerOfPatientID == "CLINIC" and ds.StudyInstanceUID == "1.2.3.100"
    items = ds.RegistrationSequence
    assert [i.FrameOfReferenceUID for i in items] == ["1.2.3.10", "1.2.3.11"]
    fixed_m = np.array(items[0].MatrixRegistrationSequence[0].MatrixSequence[0].FrameOfReferenceTransformationMatrix, float)
    np.testing.assert_array_equal(fixed_m.reshape(4, 4), np.eye(4))
    ms = items[1].MatrixRegistrationSequence[0].MatrixSequence[0]
    assert ms.FrameOfReferenceTransformationMatrixType == "RIGID"
    np.testing.assert_allclose(np.array(ms.FrameOfReferenceTransformationMatrix, float).reshape(4, 4), m, atol=1e-9)
    # fixed refs are in the REG's study, moving refs in another study
    assert ds.ReferencedSeriesSequence[0].SeriesInstanceUID == "1.2.3.100.1"
    assert len(ds.ReferencedSeriesSequence[0].ReferencedInstanceSequence) == 3
    other = ds.StudiesContainingOtherReferencedInstancesSequence[0]
    assert other.StudyInstanceUID == "1.2.3.200"
    t = read_spatial_registration(path)
    assert t.source_frame_uid == "1.2.3.11" and t.target_frame_uid == "1.2.3.10"
    np.testing.assert_allclose(np.array(t.matrix), m, atol=1e-9)
    # a point maps as documented: p_fixed = M p_moving
    p = np.array([1.0, 2.0, 3.0])
    np.testing.assert_allclose(t.apply(p), (m @ np.r_[p, 1])[:3], atol=1e-9)
    assert len(read_spatial_registrations(path)) == 2


def test_reg_with_encapsulated_stl_moving_ref(tmp_path):
    path, m = _write(tmp_path, moving_class=STL)
    ds = pydicom.dcmread(path)
    refs = ds.StudiesContainingOtherReferencedInstancesSequence[0].ReferencedSeriesSequence[0].ReferencedInstanceSequence
    assert refs[0].ReferencedSOPClassUID == STL
    np.testing.assert_allclose(np.array(read_spatial_registration(path).matrix), m, atol=1e-9)


@pytest.mark.parametrize("moving_class", [CT, STL])
def test_dciodvfy_reports_no_errors_on_reg(tmp_path, moving_class):
    exe = require_peer("dciodvfy")["dciodvfy"]
    path, _ = _write(tmp_path, moving_class)
    res = subprocess.run([exe, str(path)], capture_output=True, text=True, timeout=60)
    report = res.stdout + res.stderr
    errors = [ln for ln in report.splitlines() if ln.startswith("Error")]
    assert not errors, report


def test_reg_refuses_non_rigid_and_same_frame(tmp_path):
    scaled = np.diag([1.1, 1.0, 1.0, 1.0])
    with pytest.raises(InputError, match="not rigid|determinant"):
        _write(tmp_path, matrix=scaled)
    mirrored = np.diag([-1.0, 1.0, 1.0, 1.0])
    with pytest.raises(InputError, match="determinant"):
        _write(tmp_path, matrix=mirrored)
    with pytest.raises(InputError, match="share the frame"):
        write_spatial_registration(
            tmp_path / "x.dcm", matrix_moving_to_fixed=np.eye(4), fixed_frame_uid="1.2", moving_frame_uid="1.2",
            fixed_refs=[(CT, "1", "2", "3")], moving_refs=[(CT, "4", "5", "6")], patient_source=_source())


def test_refs_of_volume():
    from fusion.volume import assemble_volume

    dss = make_ct_datasets(np.zeros((3, 4, 5), np.uint16))
    vol = assemble_volume(dss)
    refs = refs_of_volume(vol)
    assert [r.sop_instance_uid for r in refs] == [d.SOPInstanceUID for d in dss]
    assert {r.series_instance_uid for r in refs} == {vol.series_instance_uid}


def test_read_rejects_other_objects(tmp_path):
    dss = make_ct_datasets(np.zeros((3, 4, 5), np.uint16))
    p = tmp_path / "ct.dcm"
    dss[0].save_as(p, enforce_file_format=True)
    with pytest.raises(InputError, match="not Spatial Registration"):
        read_spatial_registration(p)
