"""Intraoral surface scans: load, check and describe them.

A scan arrives as a mesh file (binary or ASCII STL, PLY, OBJ) or as a DICOM Encapsulated
STL instance (SOP Class 1.2.840.10008.5.1.4.1.1.104.3). :func:`load_scan` returns a
:class:`SurfaceScan` in millimetres in the scan's own frame (the scanner's arbitrary
frame; for a DICOM instance, its Frame of Reference UID).

Every scan is checked before and after parsing:

* a face-count ceiling is enforced *before* the mesh is parsed (from the binary STL
  header, a streaming count of ASCII STL facets / OBJ faces, or the PLY header), so a
  hostile file cannot exhaust memory;
* faces present, coordinates finite;
* size plausible for dental anatomy in millimetres -- a scan in metres or in unit scale
  is detected and reported (:class:`ScanUnitsError`), never silently rescaled;
* duplicate vertices are merged, degenerate faces dropped.

Each failure raises an :class:`~fusion.errors.InputError` subclass whose message names
the file and the remedy.
"""

from __future__ import annotations

import hashlib
import io
import logging
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fusion.errors import InputError

log = logging.getLogger(__name__)

ENCAPSULATED_STL_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.104.3"
ENCAPSULATED_OBJ_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.104.4"

DEFAULT_MAX_FACES = 2_000_000
#: plausible largest extent of a dental scan in millimetres (one tooth .. a full jaw with palate)
MIN_EXTENT_MM = 4.0
MAX_EXTENT_MM = 160.0

MESH_SUFFIXES = {".stl": "stl", ".ply": "ply", ".obj": "obj"}
DICOM_SUFFIXES = {".dcm", ".dicom", ""}


class ScanFormatError(InputError):
    """The file is not a readable STL/PLY/OBJ mesh or Encapsulated STL instance."""


class ScanTooLargeError(InputError):
    """The file declares more faces (or bytes) than the configured ceiling."""


class ScanGeometryError(InputError):
    """The mesh has no faces, non-finite coordinates or too few usable triangles."""


class ScanUnitsError(InputError):
    """The mesh's size is implausible for a dental scan in millimetres (metres, unit scale...)."""


@dataclass(frozen=True)
class ScanPatient:
    """Patient and study identity carried by a DICOM scan (absent for a bare mesh file)."""

    patient_id: str
    issuer_of_patient_id: str = ""
    patient_name: str = ""
    patient_birth_date: str = ""
    patient_sex: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uid: str = ""
    sop_class_uid: str = ""
    modality: str = ""
    acquisition_date: str = ""
    manufacturer: str = ""


@dataclass(frozen=True, eq=False)
class SurfaceScan:
    """A checked triangle mesh in millimetres, in the scan's own frame.

    Attributes
    ----------
    vertices:
        (N, 3) float64, read-only, millimetres in the scan's frame (LPS when the frame is
        a DICOM frame of reference).
    faces:
        (M, 3) int64 vertex indices, read-only.
    source:
        The file path, or ``"sop:<SOP Instance UID>"`` for a DICOM instance.
    frame_of_reference_uid:
        The DICOM Frame of Reference UID, "" for a bare mesh file (arbitrary scanner frame).
    patient:
        Patient/study identity for a DICOM scan, ``None`` for a bare mesh file.
    content_sha256:
        Hash of the canonicalised vertices and faces (independent of the file format and
        of vertex/face order), so a copied or re-wrapped scan is recognisable.
    """

    vertices: np.ndarray
    faces: np.ndarray
    source: str
    frame_of_reference_uid: str = ""
    patient: ScanPatient | None = None
    content_sha256: str = ""
    file_format: str = ""
    path: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def n_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def n_vertices(self) -> int:
        return int(self.vertices.shape[0])

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        ext = self.vertices.max(axis=0) - self.vertices.min(axis=0)
        return (float(ext[0]), float(ext[1]), float(ext[2]))

    def to_trimesh(self):  # -> trimesh.Trimesh
        """A new :class:`trimesh.Trimesh` (no processing: vertices and faces as stored)."""
        import trimesh

        return trimesh.Trimesh(vertices=np.array(self.vertices), faces=np.array(self.faces), process=False)

    def transformed(self, matrix: np.ndarray, *, frame_of_reference_uid: str | None = None) -> "SurfaceScan":
        """Return a copy with vertices mapped by a rigid 4x4 ``matrix`` (scan frame -> target frame)."""
        m = np.asarray(matrix, dtype=float)
        if m.shape != (4, 4):
            raise ValueError(f"expected a 4x4 matrix, got shape {m.shape}")
        v = self.vertices @ m[:3, :3].T + m[:3, 3]
        return make_scan(
            v,
            self.faces,
            source=self.source,
            frame_of_reference_uid=self.frame_of_reference_uid if frame_of_reference_uid is None else frame_of_reference_uid,
            patient=self.patient,
            file_format=self.file_format,
            path=self.path,
            notes=self.notes,
        )


def mesh_content_sha256(vertices: np.ndarray, faces: np.ndarray) -> str:
    """SHA-256 of a mesh's content, independent of vertex order, face order and file format.

    Vertices are rounded to float32 (what STL stores), sorted lexicographically; faces are
    re-indexed, rotated so their smallest index comes first (orientation kept) and sorted.
    """
    v = np.ascontiguousarray(np.asarray(vertices, dtype=np.float32))
    f = np.asarray(faces, dtype=np.int64)
    order = np.lexsort((v[:, 2], v[:, 1], v[:, 0]))
    rank = np.empty_like(order)
    rank[order] = np.arange(order.size)
    fv = rank[f]
    shift = np.argmin(fv, axis=1)
    idx = (shift[:, None] + np.arange(3)[None, :]) % 3
    fv = np.take_along_axis(fv, idx, axis=1)
    fv = fv[np.lexsort((fv[:, 2], fv[:, 1], fv[:, 0]))]
    h = hashlib.sha256()
    h.update(b"dentfuse-mesh-v1")
    h.update(np.ascontiguousarray(v[order]).astype("<f4").tobytes())
    h.update(np.ascontiguousarray(fv).astype("<i8").tobytes())
    return h.hexdigest()


def make_scan(
    vertices: np.ndarray,
    faces: np.ndarray,
    *,
    source: str,
    frame_of_reference_uid: str = "",
    patient: ScanPatient | None = None,
    file_format: str = "",
    path: str = "",
    notes: tuple[str, ...] = (),
) -> SurfaceScan:
    """Build a :class:`SurfaceScan` from arrays (copied, made read-only, hashed)."""
    v = np.array(vertices, dtype=np.float64)
    f = np.array(faces, dtype=np.int64)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"vertices must be (N, 3), got shape {v.shape}")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"faces must be (M, 3), got shape {f.shape}")
    v.setflags(write=False)
    f.setflags(write=False)
    return SurfaceScan(
        vertices=v,
        faces=f,
        source=source,
        frame_of_reference_uid=frame_of_reference_uid,
        patient=patient,
        content_sha256=mesh_content_sha256(v, f),
        file_format=file_format,
        path=path,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------------------
# face-count ceilings, checked before parsing


def _count_in_stream(fh: io.BufferedIOBase, token: bytes, chunk: int = 1 << 20) -> int:
    """Count occurrences of ``token`` in a stream with bounded memory."""
    count = 0
    tail = b""
    keep = len(token) - 1
    while True:
        block = fh.read(chunk)
        if not block:
            break
        data = tail + block
        count += data.lower().count(token)
        # keep the last (len-1) bytes so a token split across chunks is seen once
        tail = data[-keep:] if keep else b""
    return count


def _stl_is_binary(head: bytes, size: int) -> tuple[bool, int]:
    """Return (is_binary, declared_faces) for STL bytes starting with ``head`` (>= 84 bytes)."""
    if len(head) >= 84:
        n = struct.unpack("<I", head[80:84])[0]
        if 84 + 50 * n == size or (84 + 50 * n == size - 1):
            return True, n
    stripped = head.lstrip()
    if stripped[:5].lower() == b"solid":
        return False, -1
    if len(head) >= 84:
        n = struct.unpack("<I", head[80:84])[0]
        return True, n
    return False, -1


def count_faces_before_loading(path: Path, file_type: str, data: bytes | None = None) -> int:
    """The number of faces a mesh file declares, found without parsing the mesh.

    Parameters
    ----------
    path:
        The file (used for reading when ``data`` is None, and in messages). For PLY the
        count is ``max(faces, vertices / 3)``: a vertex count far beyond what the faces can
        use is as hostile as too many faces.
    file_type:
        "stl", "ply" or "obj".
    data:
        The file's bytes when already in memory (Encapsulated STL payload).

    Raises
    ------
    ScanFormatError
        When the header is malformed (e.g. a binary STL whose size disagrees with its count).
    """
    def opener() -> io.BufferedIOBase:
        return io.BytesIO(data) if data is not None else open(path, "rb")

    size = len(data) if data is not None else path.stat().st_size
    with opener() as fh:
        head = fh.read(4096)
    if file_type == "stl":
        is_bin, n = _stl_is_binary(head, size)
        if is_bin:
            if 84 + 50 * n not in (size, size - 1):
                raise ScanFormatError(
                    f"{path}: binary STL header declares {n} triangles ({84 + 50 * n} bytes) but the file has "
                    f"{size} bytes; the file is truncated or not an STL -- re-export it from the scanner software"
                )
            return n
        with opener() as fh:
            return _count_in_stream(fh, b"endfacet")
    if file_type == "ply":
        if not head.startswith(b"ply"):
            raise ScanFormatError(f"{path}: not a PLY file (no 'ply' magic); re-export it as PLY, STL or OBJ")
        end = head.find(b"end_header")
        if end < 0:
            raise ScanFormatError(f"{path}: PLY header has no end_header within 4 kB; the file is malformed")
        faces = 0
        vertices = 0
        for line in head[:end].splitlines():
            parts = line.split()
            if len(parts) == 3 and parts[0] == b"element" and parts[1] in (b"face", b"tristrips", b"vertex"):
                try:
                    n = int(parts[2])
                except ValueError as exc:
                    raise ScanFormatError(f"{path}: PLY header element count {parts[2]!r} is not a number") from exc
                if parts[1] == b"vertex":
                    vertices = n
                else:
                    faces = n
        # a vertex count far beyond what the faces can use is as hostile as too many faces
        return max(faces, vertices // 3)
    if file_type == "obj":
        # a polygon 'f a b c d' triangulates into (k - 2) triangles
        total = 0
        with opener() as fh:
            rest = b""
            while True:
                block = fh.read(1 << 20)
                if not block:
                    lines = [rest] if rest else []
                else:
                    block = rest + block
                    lines = block.split(b"\n")
                    rest = lines.pop()
                for line in lines:
                    if line[:2] == b"f ":
                        total += max(len(line.split()) - 3, 1)
                if not block:
                    break
        return total
    raise ScanFormatError(f"{path}: unsupported mesh type {file_type!r}")


# ---------------------------------------------------------------------------------------
# loading


def _check_mesh(path_label: str, vertices: np.ndarray, faces: np.ndarray) -> None:
    if faces.shape[0] == 0:
        raise ScanGeometryError(
            f"{path_label}: the mesh has no faces (a point cloud?); export the scan as a triangle mesh"
        )
    if not np.all(np.isfinite(vertices)):
        raise ScanGeometryError(f"{path_label}: the mesh has non-finite (NaN/inf) coordinates; re-export the scan")
    used = vertices[np.unique(faces)] if faces.size else vertices
    ext = used.max(axis=0) - used.min(axis=0)
    largest = float(ext.max())
    if largest < MIN_EXTENT_MM:
        if largest * 1000.0 >= MIN_EXTENT_MM and largest * 1000.0 <= MAX_EXTENT_MM:
            hint = "it looks like metres (x1000 would give a plausible size)"
        elif largest * 10.0 >= MIN_EXTENT_MM:
            hint = "it looks like centimetres or a unit-scaled (normalised) mesh"
        else:
            hint = "it looks like a unit-scaled (normalised) mesh"
        raise ScanUnitsError(
            f"{path_label}: largest extent {largest:.4g} units is implausible for a dental scan in millimetres; "
            f"{hint}. Export the scan in millimetres (dentfuse does not rescale scans)"
        )
    if largest > MAX_EXTENT_MM:
        hint = "micrometres?" if MIN_EXTENT_MM <= largest / 1000.0 <= MAX_EXTENT_MM else "not a dental scan?"
        raise ScanUnitsError(
            f"{path_label}: largest extent {largest:.4g} mm is implausible for a dental scan ({hint}); "
            "export the scan in millimetres"
        )


def _mesh_from_bytes(label: str, data: bytes | None, path: Path, file_type: str):
    import trimesh

    try:
        if data is not None:
            mesh = trimesh.load_mesh(io.BytesIO(data), file_type=file_type, process=False)
        else:
            mesh = trimesh.load_mesh(str(path), file_type=file_type, process=False)
    except Exception as exc:  # trimesh raises many types for malformed files
        raise ScanFormatError(f"{label}: cannot parse as {file_type.upper()}: {exc}; re-export the scan") from exc
    if not isinstance(mesh, trimesh.Trimesh):
        raise ScanFormatError(f"{label}: {file_type.upper()} did not contain a single triangle mesh")
    return mesh


def _clean(label: str, mesh) -> tuple[np.ndarray, np.ndarray, list[str]]:
    notes: list[str] = []
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int64)
    if f.size and (f.min() < 0 or f.max() >= len(v)):
        raise ScanGeometryError(f"{label}: face indices out of range; the file is corrupt")
    _check_mesh(label, v, f)
    n_v0 = len(v)
    mesh.merge_vertices(merge_tex=True, merge_norm=True)
    n_dupe = n_v0 - len(mesh.vertices)
    if n_dupe:
        notes.append(f"merged {n_dupe} duplicate vertices")
    ok = mesh.nondegenerate_faces()
    # identical faces repeated
    if (~ok).any():
        notes.append(f"dropped {int((~ok).sum())} degenerate faces")
        mesh.update_faces(ok)
    uniq = mesh.unique_faces()
    if len(uniq) < len(mesh.faces):
        notes.append(f"dropped {len(mesh.faces) - len(uniq)} duplicate faces")
        keep = np.zeros(len(mesh.faces), dtype=bool)
        keep[uniq] = True
        mesh.update_faces(keep)
    mesh.remove_unreferenced_vertices()
    v = np.asarray(mesh.vertices, dtype=np.float64)
    f = np.asarray(mesh.faces, dtype=np.int64)
    if len(f) < 4:
        raise ScanGeometryError(f"{label}: only {len(f)} usable triangles after cleaning; not a scan")
    return v, f, notes


def _read_encapsulated(path: Path, max_faces: int, max_bytes: int) -> SurfaceScan:
    import pydicom
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(str(path))
    except (InvalidDicomError, OSError, ValueError) as exc:
        raise ScanFormatError(f"{path}: not a readable DICOM file ({exc})") from exc
    sop_class = str(ds.get("SOPClassUID", ""))
    if sop_class != ENCAPSULATED_STL_SOP_CLASS:
        raise ScanFormatError(
            f"{path}: SOP Class {sop_class or '(none)'} is not Encapsulated STL ({ENCAPSULATED_STL_SOP_CLASS}); "
            "send the scan as Encapsulated STL or as an STL/PLY/OBJ file"
        )
    mime = str(ds.get("MIMETypeOfEncapsulatedDocument", "model/stl") or "model/stl")
    if mime.lower() not in ("model/stl", "application/sla", "model/x.stl-binary", "model/x.stl-ascii"):
        raise ScanFormatError(f"{path}: MIME type {mime!r} is not STL")
    units = ds.get("MeasurementUnitsCodeSequence")
    if units:
        code = str(units[0].get("CodeValue", ""))
        if code and code != "mm":
            raise ScanUnitsError(
                f"{path}: Measurement Units Code Sequence says {code!r}; dentfuse needs millimetres (UCUM 'mm') "
                "and does not rescale scans -- re-export the scan in mm"
            )
    payload = ds.get("EncapsulatedDocument")
    if payload is None or len(payload) == 0:
        raise ScanGeometryError(f"{path}: Encapsulated Document is empty; the instance carries no mesh")
    data = bytes(payload)
    declared_len = ds.get("EncapsulatedDocumentLength")
    if declared_len is not None and 0 < int(declared_len) <= len(data):
        data = data[: int(declared_len)]
    elif len(data) >= 84:
        n = struct.unpack("<I", data[80:84])[0]
        if 84 + 50 * n == len(data) - 1:  # DICOM even-length pad byte
            data = data[:-1]
    if len(data) > max_bytes:
        raise ScanTooLargeError(f"{path}: payload of {len(data)} bytes exceeds the ceiling of {max_bytes} bytes")
    label = f"{path} (SOP Instance {ds.get('SOPInstanceUID', '?')})"
    n_faces = count_faces_before_loading(path, "stl", data=data)
    if n_faces > max_faces:
        raise ScanTooLargeError(
            f"{label}: declares {n_faces} faces, above the ceiling of {max_faces}; decimate the scan or raise max_faces"
        )
    mesh = _mesh_from_bytes(label, data, path, "stl")
    v, f, notes = _clean(label, mesh)
    issuer = str(ds.get("IssuerOfPatientID", "") or "")
    patient = ScanPatient(
        patient_id=str(ds.get("PatientID", "") or ""),
        issuer_of_patient_id=issuer,
        patient_name=str(ds.get("PatientName", "") or ""),
        patient_birth_date=str(ds.get("PatientBirthDate", "") or ""),
        patient_sex=str(ds.get("PatientSex", "") or ""),
        study_instance_uid=str(ds.get("StudyInstanceUID", "") or ""),
        series_instance_uid=str(ds.get("SeriesInstanceUID", "") or ""),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "") or ""),
        sop_class_uid=sop_class,
        modality=str(ds.get("Modality", "") or ""),
        acquisition_date=str(ds.get("AcquisitionDateTime", "") or "")[:8] or str(ds.get("ContentDate", "") or ""),
        manufacturer=str(ds.get("Manufacturer", "") or ""),
    )
    return make_scan(
        v,
        f,
        source=f"sop:{patient.sop_instance_uid}",
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or ""),
        patient=patient,
        file_format="dicom-encapsulated-stl",
        path=str(path),
        notes=tuple(notes),
    )


def is_encapsulated_stl(path: Path) -> bool:
    """True when ``path`` is a DICOM file (preamble 'DICM') holding an Encapsulated STL."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    if head[128:132] != b"DICM":
        return False
    import pydicom

    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return False
    return str(ds.get("SOPClassUID", "")) == ENCAPSULATED_STL_SOP_CLASS


def load_scan(path: Path | str, *, max_faces: int = DEFAULT_MAX_FACES, max_bytes: int = 512 * 1024 * 1024) -> SurfaceScan:
    """Load and check an intraoral scan.

    Parameters
    ----------
    path:
        An ``.stl`` (binary or ASCII), ``.ply``, ``.obj`` file, or a DICOM Encapsulated STL
        instance (any suffix, recognised by its 'DICM' preamble).
    max_faces:
        Ceiling on the number of faces, checked before the mesh is parsed.
    max_bytes:
        Ceiling on the file (or payload) size in bytes.

    Returns
    -------
    SurfaceScan
        Vertices in mm in the scan's frame, duplicate vertices merged.

    Raises
    ------
    ScanFormatError, ScanTooLargeError, ScanGeometryError, ScanUnitsError
        All subclasses of :class:`~fusion.errors.InputError`; the message names the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ScanFormatError(f"{path}: no such file")
    size = path.stat().st_size
    if size > max_bytes:
        raise ScanTooLargeError(f"{path}: {size} bytes exceeds the ceiling of {max_bytes} bytes")
    if size == 0:
        raise ScanGeometryError(f"{path}: empty file")
    with open(path, "rb") as fh:
        head = fh.read(132)
    if head[128:132] == b"DICM":
        return _read_encapsulated(path, max_faces, max_bytes)
    file_type = MESH_SUFFIXES.get(path.suffix.lower())
    if file_type is None:
        raise ScanFormatError(
            f"{path}: unsupported scan format {path.suffix!r}; use STL, PLY, OBJ or a DICOM Encapsulated STL"
        )
    n_faces = count_faces_before_loading(path, file_type)
    if n_faces > max_faces:
        raise ScanTooLargeError(
            f"{path}: declares {n_faces} faces, above the ceiling of {max_faces}; decimate the scan or raise max_faces"
        )
    mesh = _mesh_from_bytes(str(path), None, path, file_type)
    if len(mesh.faces) > max_faces:  # e.g. OBJ polygons triangulated differently
        raise ScanTooLargeError(f"{path}: {len(mesh.faces)} faces, above the ceiling of {max_faces}")
    v, f, notes = _clean(str(path), mesh)
    scan = make_scan(v, f, source=str(path), file_format=file_type, path=str(path), notes=tuple(notes))
    log.info("loaded scan %s: %d vertices, %d faces (%s)", path.name, scan.n_vertices, scan.n_faces, "; ".join(notes) or "clean")
    return scan
