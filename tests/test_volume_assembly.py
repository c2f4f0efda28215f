"""Volumes from DICOM series: sorting, spacing, rescale, enhanced multi-frame, compressed
transfer syntaxes, geometry errors naming instances, SimpleITK round trips."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from fusion.errors import GeometryError, InputError
from fusion.volume import (
    assemble_volume,
    load_series,
    volume_from_sitk,
    volume_to_sitk,
)

CT = "1.2.840.10008.5.1.4.1.1.2"


def rotation(ax: float, ay: float, az: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = np.cos(ax), np.sin(ax), np.cos(ay), np.sin(ay), np.cos(az), np.sin(az)
    rx = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return rz @ ry @ rx


def make_ct_datasets(
    stored: np.ndarray,
    *,
    spacing=(0.5, 0.4, 0.6),  # column, row, slice spacing (mm)
    origin=(-10.0, -20.0, 30.0),
    direction: np.ndarray | None = None,
    slope: float = 1.0,
    intercept: float = -1000.0,
    patient_id: str = "DF-TEST",
    for_uid: str | None = None,
    study_uid: str | None = None,
    series_uid: str | None = None,
    modality: str = "CT",
) -> list[Dataset]:
    """Single-frame CT datasets of ``stored`` (z, y, x uint16) on the given grid."""
    direction = np.eye(3) if direction is None else np.asarray(direction, float)
    for_uid = for_uid or generate_uid()
    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    out = []
    for k in range(stored.shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CT
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = CT
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.Modality = modality
        ds.PatientID = patient_id
        ds.PatientName = "TEST^VOLUME"
        ds.PatientBirthDate = "19800101"
        ds.PatientSex = "F"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.FrameOfReferenceUID = for_uid
        ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = "20260101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesNumber = 1
        ds.InstanceNumber = k + 1
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImageOrientationPatient = [f"{v:.10g}" for v in list(direction[:, 0]) + list(direction[:, 1])]
        pos = np.asarray(origin) + direction[:, 2] * spacing[2] * k
        ds.ImagePositionPatient = [f"{v:.10g}" for v in pos]
        ds.PixelSpacing = [spacing[1], spacing[0]]
        ds.SliceThickness = 99.0  # deliberately wrong: spacing must come from positions
        ds.Rows, ds.Columns = stored.shape[1], stored.shape[2]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope = f"{slope:g}"
        ds.RescaleIntercept = f"{intercept:g}"
        ds.RescaleType = "HU"
        ds.KVP = "90"
        ds.PixelData = np.ascontiguousarray(stored[k].astype(np.uint16)).tobytes()
        out.append(ds)
    return out


def write_series(datasets: list[Dataset], folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for n, ds in enumerate(datasets):
        ds.save_as(folder / f"IM{n:04d}.dcm", enforce_file_format=True)
    return folder


@pytest.fixture(scope="module")
def stored() -> np.ndarray:
    rng = np.random.default_rng(3)
    return rng.integers(0, 3000, size=(12, 20, 24), dtype=np.uint16)


def test_sorted_by_normal_spacing_from_positions_and_rescale(stored, tmp_path):
    d = rotation(0.2, -0.1, 0.3)
    dss = make_ct_datasets(stored, direction=d, slope=1.0, intercept=-1000)
    shuffled = [dss[i] for i in np.random.default_rng(0).permutation(len(dss))]
    vol = assemble_volume(write_series(shuffled, tmp_path / "s").glob("*.dcm"))
    assert vol.voxels.shape == (12, 20, 24)
    assert vol.voxels.dtype == np.int16
    np.testing.assert_array_equal(vol.voxels, stored.astype(np.int32) - 1000)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.4, 0.6), atol=1e-6)
    np.testing.assert_allclose(vol.direction, d, atol=1e-8)
    np.testing.assert_allclose(vol.origin, (-10, -20, 30), atol=1e-6)
    assert np.linalg.det(vol.direction) == pytest.approx(1.0)
    assert vol.sop_instance_uids == tuple(ds.SOPInstanceUID for ds in dss)
    # slices listed in reverse order along the normal still give the same volume
    vol2 = assemble_volume(list(reversed(dss)))
    np.testing.assert_array_equal(vol2.voxels, vol.voxels)
    assert vol2.content_sha256 == vol.content_sha256
    # point mapping: voxel (i, j, k) -> origin + D diag(s) ijk
    p = vol.index_to_lps(np.array([[3, 4, 5]]))[0]
    np.testing.assert_allclose(p, np.asarray((-10, -20, 30)) + d @ (np.array([3, 4, 5]) * (0.5, 0.4, 0.6)))
    np.testing.assert_allclose(vol.lps_to_index(p[None])[0], (3, 4, 5), atol=1e-9)


def test_float_rescale_and_content_hash_ignores_uids(stored):
    a = assemble_volume(make_ct_datasets(stored, slope=0.5, intercept=-1024.25))
    assert a.voxels.dtype == np.float32
    np.testing.assert_allclose(a.voxels, stored * 0.5 - 1024.25, rtol=1e-6)
    b = assemble_volume(make_ct_datasets(stored, slope=0.5, intercept=-1024.25))  # new UIDs
    assert b.series_instance_uid != a.series_instance_uid
    assert b.content_sha256 == a.content_sha256
    changed = stored.copy()
    changed[5, 5, 5] += 1
    c = assemble_volume(make_ct_datasets(changed, slope=0.5, intercept=-1024.25))
    assert c.content_sha256 != a.content_sha256


def test_volume_metadata(stored):
    dss = make_ct_datasets(stored, patient_id="DF-0042")
    vol = assemble_volume(dss)
    assert vol.patient_id == "DF-0042"
    assert vol.frame_of_reference_uid == dss[0].FrameOfReferenceUID
    assert vol.series_instance_uid == dss[0].SeriesInstanceUID
    assert vol.study_instance_uid == dss[0].StudyInstanceUID
    assert vol.sop_class_uid == CT and vol.modality == "CT"
    assert vol.acquisition_date == "20260101"
    assert len(vol.demographics_sha256) == 64
    fi = vol.to_fusion_input("fixed")
    assert fi.shape == (24, 20, 12) and fi.content_sha256 == vol.content_sha256
    assert "PixelData" not in vol.header


@pytest.mark.parametrize("direction", [np.eye(3), rotation(0.3, 0.2, -0.4)])
def test_sitk_round_trip_exact_geometry(stored, direction):
    import SimpleITK as sitk

    vol = assemble_volume(make_ct_datasets(stored, direction=direction))
    img = volume_to_sitk(vol)
    assert img.GetSize() == vol.shape_xyz
    np.testing.assert_allclose(img.GetSpacing(), vol.spacing, rtol=0, atol=1e-12)
    np.testing.assert_allclose(img.GetOrigin(), vol.origin, rtol=0, atol=1e-12)
    np.testing.assert_allclose(np.array(img.GetDirection()).reshape(3, 3), vol.direction, atol=1e-12)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img), vol.voxels)
    # SimpleITK's index->point agrees with our affine
    for ijk in [(0, 0, 0), (23, 0, 0), (5, 19, 11), (23, 19, 11)]:
        np.testing.assert_allclose(img.TransformIndexToPhysicalPoint(ijk), vol.index_to_lps(np.array([ijk]))[0],
                                   atol=1e-9)
    back = volume_from_sitk(img, like=vol)
    np.testing.assert_array_equal(back.affine, vol.affine)
    np.testing.assert_array_equal(back.voxels, vol.voxels)
    assert back.content_sha256 == vol.content_sha256
    # and the other way: an image made in SimpleITK keeps its geometry through a Volume
    img2 = sitk.Image(7, 6, 5, sitk.sitkFloat32)
    img2.SetSpacing((0.3, 0.7, 1.1))
    img2.SetOrigin((1.5, -2.5, 3.25))
    img2.SetDirection(tuple(rotation(-0.2, 0.5, 0.1).ravel()))
    img2 = sitk.Add(img2, 2.5)
    v2 = volume_from_sitk(img2, like=vol, series_instance_uid="1.2.3")
    assert v2.series_instance_uid == "1.2.3" and v2.voxels.shape == (5, 6, 7)
    img3 = volume_to_sitk(v2)
    assert img3.GetSpacing() == img2.GetSpacing()
    assert img3.GetOrigin() == img2.GetOrigin()
    np.testing.assert_allclose(img3.GetDirection(), img2.GetDirection(), atol=1e-15)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(img3), sitk.GetArrayFromImage(img2))


def test_missing_slice_named(stored):
    dss = make_ct_datasets(stored)
    removed = dss.pop(6)
    with pytest.raises(GeometryError, match=r"missing slice") as ei:
        assemble_volume(dss)
    assert dss[5].SOPInstanceUID in str(ei.value) and dss[6].SOPInstanceUID in str(ei.value)
    assert removed.SOPInstanceUID not in str(ei.value)


def test_uneven_spacing_named(stored):
    dss = make_ct_datasets(stored)
    p = [float(v) for v in dss[4].ImagePositionPatient]
    dss[4].ImagePositionPatient = [p[0], p[1], p[2] + 0.2]
    with pytest.raises(GeometryError, match="uneven slice spacing") as ei:
        assemble_volume(dss)
    assert dss[3].SOPInstanceUID in str(ei.value)


def test_duplicate_positions_named(stored):
    dss = make_ct_datasets(stored)
    dss[7].ImagePositionPatient = dss[6].ImagePositionPatient
    with pytest.raises(GeometryError, match="duplicate slice position") as ei:
        assemble_volume(dss)
    assert dss[7].SOPInstanceUID in str(ei.value) and dss[6].SOPInstanceUID in str(ei.value)


def test_gantry_tilt_refused(stored):
    dss = make_ct_datasets(stored)
    for k, ds in enumerate(dss):  # positions move along y as z advances: a 10 degree tilt
        p = [float(v) for v in ds.ImagePositionPatient]
        ds.ImagePositionPatient = [p[0], p[1] + np.tan(np.radians(10)) * 0.6 * k, p[2]]
    with pytest.raises(GeometryError, match="gantry tilt"):
        assemble_volume(dss)


def test_mixed_orientation_and_size_named(stored):
    dss = make_ct_datasets(stored)
    dss[3].ImageOrientationPatient = [1, 0, 0, 0, 0.9950041652780258, 0.09983341664682815]
    with pytest.raises(GeometryError, match="mixed orientations") as ei:
        assemble_volume(dss)
    assert dss[3].SOPInstanceUID in str(ei.value)
    dss = make_ct_datasets(stored)
    dss[2].Rows = 10
    dss[2].PixelData = stored[2, :10].astype(np.uint16).tobytes()
    with pytest.raises(GeometryError, match="mixed image sizes") as ei:
        assemble_volume(dss)
    assert dss[2].SOPInstanceUID in str(ei.value)


def test_single_slice_and_2d_image_refused(stored):
    dss = make_ct_datasets(stored)
    with pytest.raises(InputError, match="single slice"):
        assemble_volume(dss[:1])
    dx = dss[0]
    dx.Modality = "PX"
    dx.SOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    with pytest.raises(InputError, match="2D image"):
        assemble_volume([dx])


def test_mixed_series_refused(stored, tmp_path):
    a = make_ct_datasets(stored)
    b = make_ct_datasets(stored)
    write_series(a, tmp_path / "x" / "a")
    write_series(b, tmp_path / "x" / "b")
    with pytest.raises(InputError, match="2 series found"):
        load_series(tmp_path / "x")
    (tmp_path / "x" / "a" / "notes.txt").write_text("not dicom")
    vol = load_series(tmp_path / "x" / "a")
    assert vol.series_instance_uid == a[0].SeriesInstanceUID
    with pytest.raises(InputError, match="no such file"):
        load_series(tmp_path / "nope")


def test_enhanced_multiframe_matches_single_frame(stored):
    import highdicom as hd

    dss = make_ct_datasets(stored, direction=rotation(0.1, 0.2, 0.3), slope=0.5, intercept=-1000)
    single = assemble_volume(dss)
    # highdicom wants positions in order; give them shuffled to exercise sorting
    legacy = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(_to_bytes(ds))) for ds in dss]
    enh = hd.legacy.LegacyConvertedEnhancedCTImage(
        legacy_datasets=legacy,
        series_instance_uid=generate_uid(),
        series_number=2,
        sop_instance_uid=generate_uid(),
        instance_number=1,
    )
    assert "PerFrameFunctionalGroupsSequence" in enh
    multi = assemble_volume([enh])
    np.testing.assert_allclose(multi.affine, single.affine, atol=1e-6)
    np.testing.assert_allclose(multi.voxels, single.voxels)
    assert multi.sop_instance_uids == (enh.SOPInstanceUID,)
    assert multi.sop_class_uid == "1.2.840.10008.5.1.4.1.1.2.2"


def _to_bytes(ds: Dataset) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.mark.parametrize("syntax", ["RLELossless", "JPEGLSLossless", "JPEG2000Lossless", "JPEGLosslessSV1"])
def test_compressed_series_decode_identically(stored, syntax, tmp_path):
    import pydicom.uid as U

    big = np.random.default_rng(5).integers(0, 4000, size=(5, 64, 72), dtype=np.uint16)
    dss = make_ct_datasets(big)
    ref = assemble_volume(dss)
    comp = [pydicom.dcmread(pydicom.filebase.DicomBytesIO(_to_bytes(ds))) for ds in dss]
    uid = getattr(U, syntax)
    for ds in comp:
        try:
            ds.compress(uid)
        except Exception as exc:  # encoder missing for this syntax in pydicom
            if syntax == "JPEGLosslessSV1":
                return _compress_with_dcmtk(dss, ref, tmp_path)
            raise AssertionError(f"cannot encode {syntax}: {exc}")
    folder = write_series(comp, tmp_path / syntax)
    vol = load_series(folder)
    assert pydicom.dcmread(next(folder.glob("*.dcm"))).file_meta.TransferSyntaxUID == uid
    np.testing.assert_array_equal(vol.voxels, ref.voxels)
    assert vol.content_sha256 == ref.content_sha256


def _compress_with_dcmtk(dss, ref, tmp_path):
    import subprocess

    from conftest import require_peer

    exe = require_peer("dcmcjpeg")["dcmcjpeg"]
    src = write_series(dss, tmp_path / "plain")
    dst = tmp_path / "jpeg14"
    dst.mkdir()
    for f in sorted(src.glob("*.dcm")):
        subprocess.run([exe, "+e1", f, dst / f.name], check=True, capture_output=True)  # lossless SV1
    assert pydicom.dcmread(next(dst.glob("*.dcm"))).file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.70"
    vol = load_series(dst)
    np.testing.assert_array_equal(vol.voxels, ref.voxels)
