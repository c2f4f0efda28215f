"""Scan loading and checks (fusion.surface) and the Encapsulated STL writer (fusion.surface_outputs)."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pydicom
import pytest
import trimesh

from conftest import require_peer
from fusion.surface import (
    ScanFormatError,
    ScanGeometryError,
    ScanTooLargeError,
    ScanUnitsError,
    count_faces_before_loading,
    is_encapsulated_stl,
    load_scan,
    mesh_content_sha256,
)
from fusion.errors import InputError
from fusion.surface_outputs import stl_bytes, write_encapsulated_stl, write_scan_stl


def arch_like_mesh(seed: int = 0) -> trimesh.Trimesh:
    """A bumpy half-torus ~50 mm wide: plausible dental-arch size in mm."""
    m = trimesh.creation.torus(major_radius=22.0, minor_radius=4.0, major_sections=64, minor_sections=16)
    rng = np.random.default_rng(seed)
    m.vertices += rng.normal(0, 0.05, m.vertices.shape)
    keep = m.triangles_center[:, 1] > -5.0
    m.update_faces(keep)
    m.remove_unreferenced_vertices()
    return m


def test_formats_load_with_same_content_hash(tmp_path: Path) -> None:
    m = arch_like_mesh()
    (tmp_path / "a.stl").write_bytes(trimesh.exchange.stl.export_stl(m))
    (tmp_path / "a_ascii.stl").write_text(trimesh.exchange.stl.export_stl_ascii(m))
    (tmp_path / "a.ply").write_bytes(trimesh.exchange.ply.export_ply(m, encoding="binary"))
    (tmp_path / "a.obj").write_text(trimesh.exchange.obj.export_obj(m, include_normals=False))
    scans = {p: load_scan(tmp_path / p) for p in ("a.stl", "a_ascii.stl", "a.ply", "a.obj")}
    for name, s in scans.items():
        assert s.n_faces == len(m.faces), name
        assert s.n_vertices == len(m.vertices), name  # STL's duplicated corners merged
        assert s.frame_of_reference_uid == "" and s.patient is None
        assert not s.vertices.flags.writeable
    # binary STL and PLY/OBJ: same float32 content, different file formats and orders -> same hash
    assert scans["a.stl"].content_sha256 == scans["a.ply"].content_sha256
    assert scans["a.stl"].content_sha256 != mesh_content_sha256(m.vertices + 0.01, m.faces)
    assert "merged" in " ".join(scans["a.stl"].notes)


def test_hash_ignores_vertex_and_face_order() -> None:
    m = arch_like_mesh()
    rng = np.random.default_rng(1)
    perm = rng.permutation(len(m.vertices))
    inv = np.argsort(perm)
    v2 = m.vertices[perm]
    f2 = inv[m.faces][rng.permutation(len(m.faces))]
    f2 = np.roll(f2, 1, axis=1)  # same orientation, other starting corner
    assert mesh_content_sha256(m.vertices, m.faces) == mesh_content_sha256(v2, f2)
    # reversed orientation is different content
    assert mesh_content_sha256(m.vertices, m.faces) != mesh_content_sha256(m.vertices, m.faces[:, ::-1])


def test_synthetic_scan_files_agree(small_set: Path) -> None:
    folder = small_set / "p1_scan"
    stl = load_scan(folder / "upper.stl")
    ply = load_scan(folder / "upper.ply")
    dcm = load_scan(folder / "upper.dcm")
    assert stl.content_sha256 == ply.content_sha256 == dcm.content_sha256
    assert is_encapsulated_stl(folder / "upper.dcm") and not is_encapsulated_stl(folder / "upper.stl")
    assert dcm.patient is not None and dcm.patient.patient_id == "DF-0001"
    assert dcm.frame_of_reference_uid and dcm.source.startswith("sop:")
    assert 40.0 < max(stl.extent_mm) < 100.0


def test_metres_and_unit_scale_detected_not_rescaled(tmp_path: Path) -> None:
    m = arch_like_mesh()
    metres = m.copy()
    metres.apply_scale(0.001)
    (tmp_path / "metres.stl").write_bytes(trimesh.exchange.stl.export_stl(metres))
    with pytest.raises(ScanUnitsError, match=r"metres.stl.*metres"):
        load_scan(tmp_path / "metres.stl")
    unit = m.copy()
    unit.apply_scale(1.0 / 50.0)
    (tmp_path / "unit.ply").write_bytes(trimesh.exchange.ply.export_ply(unit))
    with pytest.raises(ScanUnitsError, match=r"unit.ply.*unit-scaled|centimetres"):
        load_scan(tmp_path / "unit.ply")
    huge = m.copy()
    huge.apply_scale(1000.0)
    (tmp_path / "um.stl").write_bytes(trimesh.exchange.stl.export_stl(huge))
    with pytest.raises(ScanUnitsError, match="micrometres"):
        load_scan(tmp_path / "um.stl")
    assert issubclass(ScanUnitsError, InputError)


def test_no_faces_and_non_finite(tmp_path: Path) -> None:
    pts = np.random.default_rng(0).uniform(0, 40, (100, 3))
    cloud = trimesh.PointCloud(pts)
    (tmp_path / "cloud.ply").write_bytes(trimesh.exchange.ply.export_ply(cloud))
    with pytest.raises(ScanGeometryError, match=r"cloud.ply.*no faces"):
        load_scan(tmp_path / "cloud.ply")
    m = arch_like_mesh()
    data = bytearray(stl_bytes(m.vertices, m.faces))
    struct.pack_into("<f", data, 84 + 12, float("nan"))  # first vertex x of face 0
    (tmp_path / "nan.stl").write_bytes(bytes(data))
    with pytest.raises(ScanGeometryError, match=r"nan.stl.*non-finite"):
        load_scan(tmp_path / "nan.stl")
    (tmp_path / "empty.stl").write_bytes(b"")
    with pytest.raises(ScanGeometryError, match="empty"):
        load_scan(tmp_path / "empty.stl")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ScanFormatError, match="unsupported"):
        load_scan(tmp_path / "notes.txt")


def test_face_ceiling_checked_before_parsing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    m = arch_like_mesh()
    n = len(m.faces)
    (tmp_path / "a.stl").write_bytes(trimesh.exchange.stl.export_stl(m))
    (tmp_path / "a_ascii.stl").write_text(trimesh.exchange.stl.export_stl_ascii(m))
    (tmp_path / "a.ply").write_bytes(trimesh.exchange.ply.export_ply(m, encoding="binary"))
    (tmp_path / "a.obj").write_text(trimesh.exchange.obj.export_obj(m, include_normals=False))
    for name, kind in (("a.stl", "stl"), ("a_ascii.stl", "stl"), ("a.ply", "ply"), ("a.obj", "obj")):
        assert count_faces_before_loading(tmp_path / name, kind) == n, name

    def must_not_parse(*args, **kwargs):
        raise AssertionError("the mesh was parsed although it declares too many faces")

    monkeypatch.setattr(trimesh, "load_mesh", must_not_parse)
    for name in ("a.stl", "a_ascii.stl", "a.ply", "a.obj"):
        with pytest.raises(ScanTooLargeError, match=rf"{name}.*ceiling"):
            load_scan(tmp_path / name, max_faces=n - 1)
    # a hostile binary STL header claiming a billion triangles in a small file
    hostile = bytearray(trimesh.exchange.stl.export_stl(m))
    hostile[80:84] = struct.pack("<I", 1_000_000_000)
    (tmp_path / "hostile.stl").write_bytes(bytes(hostile))
    with pytest.raises(ScanFormatError, match="declares 1000000000 triangles"):
        load_scan(tmp_path / "hostile.stl")
    with pytest.raises(ScanTooLargeError, match="bytes exceeds"):
        load_scan(tmp_path / "a.stl", max_bytes=1000)
    # a PLY header claiming a billion vertices (and a few faces)
    (tmp_path / "verts.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 1000000000\n"
                                         b"property float x\nproperty float y\nproperty float z\nelement face 2\n"
                                         b"property list uchar int vertex_indices\nend_header\n" + b"\0" * 64)
    with pytest.raises(ScanTooLargeError, match="verts.ply"):
        load_scan(tmp_path / "verts.ply")
    # ASCII STL keywords in upper case are counted too
    (tmp_path / "upper.stl").write_text(trimesh.exchange.stl.export_stl_ascii(m).upper())
    assert count_faces_before_loading(tmp_path / "upper.stl", "stl") == n


def test_write_encapsulated_stl_round_trip_and_dciodvfy(tmp_path: Path, small_set: Path) -> None:
    peers = require_peer("dciodvfy")
    import subprocess

    m = arch_like_mesh()
    cbct_header = pydicom.dcmread(sorted((small_set / "p1_cbct_a").glob("*.dcm"))[0], stop_before_pixels=True)
    ref = (str(cbct_header.SOPClassUID), str(cbct_header.SOPInstanceUID), str(cbct_header.SeriesInstanceUID),
           str(cbct_header.StudyInstanceUID))
    other_study = ("1.2.840.10008.5.1.4.1.1.104.3", "1.2.3.4.5", "1.2.3.4.6", "1.2.3.4.7")
    out = write_encapsulated_stl(m, tmp_path / "a.dcm", frame_of_reference_uid=str(cbct_header.FrameOfReferenceUID),
                                 patient_source=cbct_header, source_refs=[ref, other_study],
                                 series_description="test scan")
    assert out.kind == "encapsulated_stl" and len(out.sop_instance_uids) == 1
    back = load_scan(tmp_path / "a.dcm")
    assert back.content_sha256 == mesh_content_sha256(m.vertices, m.faces)
    assert back.patient is not None and back.patient.patient_id == str(cbct_header.PatientID)
    assert back.frame_of_reference_uid == str(cbct_header.FrameOfReferenceUID)
    # explicit ids, no source dataset (the pipeline's import of a bare STL)
    out2 = write_encapsulated_stl((m.vertices, m.faces), tmp_path / "b.dcm", frame_of_reference_uid="1.2.3.99",
                                  patient_ids={"PatientID": "DF-0009", "PatientName": "Test^Scan"})
    ds = pydicom.dcmread(out2.path)
    assert ds.PatientID == "DF-0009" and ds.StudyInstanceUID and ds.MeasurementUnitsCodeSequence[0].CodeValue == "mm"
    for path in (out.path, out2.path):
        proc = subprocess.run([peers["dciodvfy"], path], capture_output=True, text=True)
        errors = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.startswith("Error")]
        assert errors == [], errors
    with pytest.raises(InputError, match="patient"):
        write_encapsulated_stl(m, tmp_path / "c.dcm", frame_of_reference_uid="1.2.3")
    stl = write_scan_stl(m, tmp_path / "x.stl")
    assert load_scan(stl.path).content_sha256 == back.content_sha256


def test_encapsulated_stl_in_other_units_refused(tmp_path: Path) -> None:
    m = arch_like_mesh()
    out = write_encapsulated_stl(m, tmp_path / "a.dcm", frame_of_reference_uid="1.2.3.99", patient_ids={"PatientID": "X"})
    ds = pydicom.dcmread(out.path)
    ds.MeasurementUnitsCodeSequence[0].CodeValue = "um"
    ds.save_as(tmp_path / "um.dcm")
    with pytest.raises(ScanUnitsError, match=r"um.dcm.*'um'"):
        load_scan(tmp_path / "um.dcm")
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.save_as(tmp_path / "ct.dcm")
    with pytest.raises(ScanFormatError, match="not Encapsulated STL"):
        load_scan(tmp_path / "ct.dcm")
