"""Outputs of a scan-to-CBCT fusion: the scan as STL and as DICOM Encapsulated STL in the
CBCT's frame, and the scan burned into the CBCT grid as a label volume.

:func:`write_encapsulated_stl` is general: the pipeline also uses it to wrap an imported
STL/PLY/OBJ file into DICOM. Patient and study come either from a source dataset (the
CBCT's header) or from explicit identifiers (``patient_ids``) when there is none.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Iterable, Mapping

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

# callers also import sha256_file from here
from fusion.dicom_common import (
    MANUFACTURER,
    PATIENT_KEYWORDS,
    STUDY_KEYWORDS,
    InstanceRef,
    add_common_instance_reference,
    as_instance_ref,
    copy_patient_and_study,
    file_meta,
    sha256_file,
    sop_reference,
)
from fusion.errors import InputError
from fusion.records import FusionOutput
from fusion.surface import ENCAPSULATED_STL_SOP_CLASS, SurfaceScan

log = logging.getLogger(__name__)

MODEL_NAME = "dentfuse surface fusion"

#: Patient and General Study attributes copied from ``patient_source``: the usual ones
#: except Patient's Size and Weight, which Encapsulated STL instances have never carried.
_COPIED_KEYWORDS = tuple(kw for kw in PATIENT_KEYWORDS + STUDY_KEYWORDS
                         if kw not in ("PatientSize", "PatientWeight"))


def _arrays(mesh_or_scan) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(mesh_or_scan, SurfaceScan):
        return np.asarray(mesh_or_scan.vertices), np.asarray(mesh_or_scan.faces)
    if isinstance(mesh_or_scan, tuple) and len(mesh_or_scan) == 2:
        return np.asarray(mesh_or_scan[0], float), np.asarray(mesh_or_scan[1], np.int64)
    if hasattr(mesh_or_scan, "vertices") and hasattr(mesh_or_scan, "faces"):
        return np.asarray(mesh_or_scan.vertices, float), np.asarray(mesh_or_scan.faces, np.int64)
    raise TypeError(f"expected a SurfaceScan, trimesh.Trimesh or (vertices, faces), got {type(mesh_or_scan).__name__}")


def stl_bytes(vertices: np.ndarray, faces: np.ndarray, header: str = "dentfuse") -> bytes:
    """Binary STL of a triangle mesh (float32 coordinates, face normals from the winding)."""
    v = np.asarray(vertices, dtype=np.float64)
    f = np.asarray(faces, dtype=np.int64)
    tri = v[f]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    ln = np.linalg.norm(n, axis=1, keepdims=True)
    n = np.where(ln > 0, n / np.maximum(ln, 1e-300), 0.0)
    rec = np.zeros(len(f), dtype=[("n", "<f4", 3), ("v", "<f4", (3, 3)), ("attr", "<u2")])
    rec["n"] = n
    rec["v"] = tri
    head = header.encode("ascii", "replace")[:80].ljust(80, b" ")
    if head.lower().startswith(b"solid"):
        head = b"x" + head[1:]
    return head + np.uint32(len(f)).tobytes() + rec.tobytes()


def write_scan_stl(mesh_or_scan, out_path: Path, *, header: str = "dentfuse scan") -> FusionOutput:
    """Write a binary STL. Returns a FusionOutput of kind ``scan_stl``."""
    v, f = _arrays(mesh_or_scan)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_bytes(stl_bytes(v, f, header))
    return FusionOutput(kind="scan_stl", path=str(out_path), sha256=sha256_file(out_path), media_type="model/stl")


def _common_instance_reference(ds: Dataset, refs: list[InstanceRef]) -> None:
    """Source Instance Sequence plus the Common Instance Reference module it requires."""
    ds.SourceInstanceSequence = DicomSequence([sop_reference(r.sop_class_uid, r.sop_instance_uid) for r in refs])
    add_common_instance_reference(ds, refs, str(ds.StudyInstanceUID))


def write_encapsulated_stl(
    mesh_or_scan,
    out_path: Path,
    *,
    frame_of_reference_uid: str,
    patient_source: Dataset | None = None,
    patient_ids: Mapping[str, str] | None = None,
    series_description: str = "dentfuse intraoral scan",
    document_title: str = "Intraoral scan",
    source_refs: Iterable = (),
    series_instance_uid: str | None = None,
    sop_instance_uid: str | None = None,
    series_number: int = 9902,
    instance_number: int = 1,
    software_versions: Mapping[str, str] | None = None,
    manufacturer: str = MANUFACTURER,
    model_name: str = MODEL_NAME,
    device_serial_number: str = "dentfuse-0",
    content_datetime: _dt.datetime | None = None,
    burned_in_annotation: bool = False,
) -> FusionOutput:
    """Write a DICOM Encapsulated STL instance (SOP Class 1.2.840.10008.5.1.4.1.1.104.3).

    Parameters
    ----------
    mesh_or_scan:
        A :class:`~fusion.surface.SurfaceScan`, a ``trimesh.Trimesh`` or ``(vertices, faces)``,
        coordinates in mm in ``frame_of_reference_uid``.
    frame_of_reference_uid:
        The frame the coordinates are in (the CBCT's after fusion; a new one for an imported
        scanner file).
    patient_source:
        A dataset whose Patient and General Study attributes are copied (e.g. the CBCT header).
    patient_ids:
        Explicit attributes by DICOM keyword (``PatientID``, ``PatientName``,
        ``IssuerOfPatientID``, ``PatientBirthDate``, ``PatientSex``, ``StudyInstanceUID``,
        ``StudyDate`` ...), used when there is no source dataset or to override it. A new
        Study Instance UID is generated when none is given.
    source_refs:
        Instances the mesh derives from: :class:`fusion.dicom_common.InstanceRef` or
        ``(sop_class_uid, sop_instance_uid, series_instance_uid, study_instance_uid)``
        tuples; listed in Source Instance Sequence and the Common Instance Reference module.

    Returns
    -------
    FusionOutput
        kind ``encapsulated_stl`` with path, sha256, SOP Instance and Series UIDs.

    Raises
    ------
    InputError
        No frame of reference, no patient identity at all, or an empty mesh.
    """
    v, f = _arrays(mesh_or_scan)
    if len(f) == 0:
        raise InputError(f"{out_path}: cannot encapsulate a mesh without faces")
    if not frame_of_reference_uid:
        raise InputError(f"{out_path}: an Encapsulated STL needs a Frame of Reference UID")
    if patient_source is None and not patient_ids:
        raise InputError(f"{out_path}: give patient_source (a DICOM header) or patient_ids (at least PatientID)")
    now = content_datetime or _dt.datetime.now(_dt.timezone.utc)
    payload = stl_bytes(v, f, "dentfuse " + series_description)

    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    copy_patient_and_study(ds, patient_source, _COPIED_KEYWORDS)
    for kw, val in (patient_ids or {}).items():
        setattr(ds, kw, val)
    if not str(ds.get("PatientID", "")):
        raise InputError(f"{out_path}: no Patient ID in patient_source or patient_ids")
    if not ds.get("StudyInstanceUID"):
        ds.StudyInstanceUID = generate_uid()
    sop_uid = sop_instance_uid or generate_uid()
    ds.SOPClassUID = ENCAPSULATED_STL_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = now.strftime("%Y%m%d")
    ds.InstanceCreationTime = now.strftime("%H%M%S")
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.AcquisitionDateTime = now.strftime("%Y%m%d%H%M%S")
    ds.Modality = "M3D"
    ds.SeriesInstanceUID = series_instance_uid or generate_uid()
    ds.SeriesNumber = int(series_number)
    ds.SeriesDescription = series_description[:64]
    ds.InstanceNumber = int(instance_number)
    ds.Manufacturer = manufacturer
    ds.ManufacturerModelName = model_name
    ds.DeviceSerialNumber = device_serial_number
    sv = software_versions or {}
    ds.SoftwareVersions = [f"{k}={val}"[:64] for k, val in list(sv.items())[:6]] or ["dentfuse"]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    units = Dataset()
    units.CodeValue = "mm"
    units.CodingSchemeDesignator = "UCUM"
    units.CodeMeaning = "millimeter"
    ds.MeasurementUnitsCodeSequence = DicomSequence([units])
    ds.BurnedInAnnotation = "YES" if burned_in_annotation else "NO"
    ds.DocumentTitle = document_title[:1024]
    ds.ConceptNameCodeSequence = DicomSequence([])
    ds.MIMETypeOfEncapsulatedDocument = "model/stl"
    try:
        refs = [as_instance_ref(r) for r in source_refs]
    except ValueError as exc:
        raise InputError(f"{out_path}: {exc}") from exc
    if refs:
        _common_instance_reference(ds, refs)
    ds.EncapsulatedDocumentLength = len(payload)
    ds.EncapsulatedDocument = payload + (b"\x00" if len(payload) % 2 else b"")

    ds.file_meta = file_meta(ENCAPSULATED_STL_SOP_CLASS, sop_uid)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(out_path), enforce_file_format=True)
    log.info("wrote Encapsulated STL %s (SOP %s, frame %s)", out_path.name, sop_uid, frame_of_reference_uid)
    return FusionOutput(
        kind="encapsulated_stl",
        path=str(out_path),
        sha256=sha256_file(out_path),
        sop_instance_uids=(sop_uid,),
        series_instance_uid=str(ds.SeriesInstanceUID),
        media_type="application/dicom",
    )


# ---------------------------------------------------------------------------------------
# label volume


def surface_samples(vertices: np.ndarray, faces: np.ndarray, max_step_mm: float) -> tuple[np.ndarray, np.ndarray]:
    """Points covering every triangle with spacing <= ``max_step_mm``; (points, face index)."""
    v = np.asarray(vertices, float)
    f = np.asarray(faces, np.int64)
    tri = v[f]
    edge = np.max(np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=2), axis=1)
    k_all = np.maximum(np.ceil(edge / max_step_mm).astype(int), 1)
    pts: list[np.ndarray] = []
    fids: list[np.ndarray] = []
    for k in np.unique(k_all):
        sel = np.flatnonzero(k_all == k)
        a, b = np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="ij")
        keep = a + b <= k
        wa, wb = a[keep] / k, b[keep] / k
        wc = 1.0 - wa - wb
        t = tri[sel]
        p = wa[None, :, None] * t[:, None, 0] + wb[None, :, None] * t[:, None, 1] + wc[None, :, None] * t[:, None, 2]
        pts.append(p.reshape(-1, 3))
        fids.append(np.repeat(sel, len(wa)))
    return np.concatenate(pts), np.concatenate(fids)


def burn_scan_labels(
    shape_zyx: tuple[int, int, int],
    affine: np.ndarray,
    vertices: np.ndarray,
    faces: np.ndarray,
    face_labels: np.ndarray,
) -> np.ndarray:
    """Label volume (uint8, z/y/x) on a CBCT grid: voxels the scan surface passes through
    get their face's label (higher labels win where two meet). Vertices are in the grid's
    frame (LPS mm); ``affine`` maps continuous index (i, j, k, 1) to LPS."""
    aff = np.asarray(affine, float)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    pts, fid = surface_samples(vertices, faces, 0.5 * float(spacing.min()))
    ijk = np.linalg.solve(aff[:3, :3], (pts - aff[:3, 3]).T).T
    idx = np.rint(ijk).astype(np.int64)
    nz, ny, nx = shape_zyx
    ok = (idx[:, 0] >= 0) & (idx[:, 0] < nx) & (idx[:, 1] >= 0) & (idx[:, 1] < ny) & (idx[:, 2] >= 0) & (idx[:, 2] < nz)
    lab = np.zeros(shape_zyx, dtype=np.uint8)
    lv = np.asarray(face_labels, np.uint8)[fid[ok]]
    order = np.argsort(lv, kind="stable")  # higher labels written last
    i = idx[ok][order]
    lab[i[:, 2], i[:, 1], i[:, 0]] = lv[order]
    return lab


def write_label_volume(labels: np.ndarray, affine: np.ndarray, out_path: Path) -> FusionOutput:
    """Write a label volume on a grid (z/y/x array, index->LPS affine) as NIfTI (.nii.gz) or
    NRRD (.nrrd), by suffix, through SimpleITK (which converts LPS to the file's convention)."""
    import SimpleITK as sitk

    aff = np.asarray(affine, float)
    spacing = np.linalg.norm(aff[:3, :3], axis=0)
    img = sitk.GetImageFromArray(np.ascontiguousarray(labels))
    img.SetSpacing([float(s) for s in spacing])
    img.SetOrigin([float(o) for o in aff[:3, 3]])
    img.SetDirection([float(d) for d in (aff[:3, :3] / spacing[None, :]).ravel()])
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(out_path), useCompression=True)
    kind = "label_volume"
    media = "application/x-nifti" if out_path.name.endswith((".nii", ".nii.gz")) else "application/x-nrrd"
    return FusionOutput(kind=kind, path=str(out_path), sha256=sha256_file(out_path), media_type=media)


def write_scan_segmentation(
    labels: np.ndarray,
    cbct,
    out_path: Path,
    *,
    series_description: str = "dentfuse scan in CBCT",
    software_versions: Mapping[str, str] | None = None,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    series_number: int = 9904,
    manufacturer: str = MANUFACTURER,
    device_serial_number: str = "dentfuse-0",
) -> FusionOutput:
    """Write the burned-in scan labels as a DICOM Segmentation (highdicom, BINARY) on the
    CBCT's own slices, so a PACS viewer shows crowns and gum over the bone.

    Parameters
    ----------
    labels:
        (z, y, x) uint8 on the CBCT grid: 1 = scan surface on the CBCT crowns, 2 = the rest
        (gingiva).
    cbct:
        The CBCT :class:`~fusion.volume.Volume` (single-frame instances: ``sop_instance_uids``
        in slice order, ``source_paths`` the files).

    Returns
    -------
    FusionOutput
        kind ``segmentation``.

    Raises
    ------
    InputError
        The CBCT is not one single-frame instance per slice (e.g. an enhanced multi-frame
        object): use the label volume (NIfTI) instead.
    """
    import highdicom as hd
    from pydicom.sr.coding import Code
    from pydicom.sr.codedict import codes

    labels = np.asarray(labels)
    uids = list(cbct.sop_instance_uids)
    if len(uids) != labels.shape[0] or len(cbct.source_paths) != len(uids):
        raise InputError(f"{out_path}: {labels.shape[0]} label slices but {len(uids)} CBCT instances; "
                         "a Segmentation here needs one single-frame source instance per slice")
    # only the slices the scan crosses are segmented (and referenced)
    used = np.flatnonzero(labels.reshape(labels.shape[0], -1).any(axis=1))
    if used.size == 0:
        raise InputError(f"{out_path}: the scan does not cross the CBCT grid; nothing to segment")
    k0, k1 = int(used[0]), int(used[-1]) + 1
    wanted = set(uids[k0:k1])
    path_of: dict[str, str] = {}
    for p in cbct.source_paths:
        uid = str(pydicom.dcmread(str(p), specific_tags=["SOPInstanceUID"]).get("SOPInstanceUID", ""))
        if uid in wanted:
            path_of[uid] = str(p)
    try:
        sources = [pydicom.dcmread(path_of[u], stop_before_pixels=True) for u in uids[k0:k1]]  # slice order
    except KeyError as exc:
        raise InputError(f"{out_path}: CBCT instance {exc} not found among its source files") from exc
    labels = labels[k0:k1]
    versions = ", ".join(f"{k} {v}" for k, v in list((software_versions or {}).items())[:4]) or "dentfuse"
    algo = hd.AlgorithmIdentificationSequence(name="dentfuse surface fusion", version=versions[:64],
                                              family=codes.cid7162.HistogramAnalysis)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=1, segment_label="scan on CBCT crowns",
            segmented_property_category=codes.SCT.Tissue, segmented_property_type=codes.SCT.Tooth,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo),
        hd.seg.SegmentDescription(
            segment_number=2, segment_label="scan elsewhere (gingiva)",
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=Code("113279002", "SCT", "Gingival structure"),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algo),
    ]
    stacked = np.stack([labels == 1, labels == 2], axis=-1)
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=stacked,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number,
        sop_instance_uid=sop_instance_uid or generate_uid(),
        instance_number=1,
        manufacturer=manufacturer,
        manufacturer_model_name=MODEL_NAME,
        software_versions=versions[:64],
        device_serial_number=device_serial_number,
        series_description=series_description[:64],
        omit_empty_frames=True,
    )
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(str(out_path))
    return FusionOutput(kind="segmentation", path=str(out_path), sha256=sha256_file(out_path),
                        sop_instance_uids=(str(seg.SOPInstanceUID),), series_instance_uid=str(seg.SeriesInstanceUID),
                        media_type="application/dicom")
