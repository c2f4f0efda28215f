"""DICOM Spatial Registration objects (REG, 1.2.840.10008.5.1.4.1.1.66.1) for rigid fusions.

Encoding (see DESIGN.md, "Transform convention"):

* the REG instance's own Frame of Reference UID is the *registered* (fixed) frame;
* Registration Sequence item 1: the fixed frame with the identity matrix;
* Registration Sequence item 2: the moving frame with its moving->fixed matrix
  (Frame of Reference Transformation Matrix, row-major 16 values, type ``RIGID``);
* every referenced instance (any SOP class: images, Encapsulated STL, ...) is listed in
  the Common Instance Reference module: Referenced Series Sequence for instances of the
  REG's own study, Studies Containing Other Referenced Instances Sequence for the rest.

The REG is placed in the study of ``patient_source`` (normally the fixed series' header),
whose Patient and General Study attributes are copied.
"""

from __future__ import annotations

import datetime as _dt
import logging
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

# callers also import InstanceRef from here
from fusion.dicom_common import (
    MANUFACTURER,
    InstanceRef,
    RefLike,
    add_common_instance_reference,
    as_instance_ref,
    code_item,
    copy_patient_and_study,
    file_meta,
    sha256_file,
    sop_reference,
)
from fusion.errors import InputError
from fusion.records import FusionOutput, RigidTransform

log = logging.getLogger(__name__)

SPATIAL_REGISTRATION_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.1"


def refs_of_volume(volume: object) -> tuple[InstanceRef, ...]:
    """References to the instances a :class:`fusion.volume.Volume` was assembled from."""
    return tuple(
        InstanceRef(volume.sop_class_uid, uid, volume.series_instance_uid, volume.study_instance_uid)  # type: ignore[attr-defined]
        for uid in volume.sop_instance_uids  # type: ignore[attr-defined]
    )


def _ds(v: float) -> str:
    """A Decimal String (<= 16 characters) for a matrix element."""
    for prec in range(12, 4, -1):
        s = f"{v:.{prec}g}"
        if len(s) <= 16:
            return "0" if s in ("-0", "0") else s
    return f"{v:.4e}"


#: CID 7100 "RCS Registration Method" codes used here.
FRAME_IDENTITY_CODE = ("125021", "DCM", "Frame of Reference Identity")
IMAGE_CONTENT_CODE = ("125024", "DCM", "Image Content-based Alignment")
#: SOP classes that are not images (not listed in a Referenced Image Sequence).
_NON_IMAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.104.", "1.2.840.10008.5.1.4.1.1.66", "1.2.840.10008.5.1.4.1.1.88.")


def _referenced_images(refs: Sequence[InstanceRef]) -> DicomSequence:
    items = []
    for r in refs:
        if r.sop_class_uid.startswith(_NON_IMAGE_PREFIXES):
            continue
        items.append(sop_reference(r.sop_class_uid, r.sop_instance_uid))
    return DicomSequence(items)


def _matrix_item(matrix: np.ndarray, comment: str, code: tuple[str, str, str] = IMAGE_CONTENT_CODE) -> Dataset:
    m = Dataset()
    m.FrameOfReferenceTransformationMatrixType = "RIGID"
    m.FrameOfReferenceTransformationMatrix = [_ds(float(v)) for v in np.asarray(matrix, float).ravel()]
    reg = Dataset()
    reg.MatrixSequence = DicomSequence([m])
    reg.FrameOfReferenceTransformationComment = comment[:64]  # LO
    reg.RegistrationTypeCodeSequence = DicomSequence([code_item(code)])
    return reg


def write_spatial_registration(
    out_path: Path,
    *,
    matrix_moving_to_fixed: np.ndarray | Sequence[Sequence[float]],
    fixed_frame_uid: str,
    moving_frame_uid: str,
    fixed_refs: Iterable[RefLike],
    moving_refs: Iterable[RefLike],
    patient_source: Dataset,
    series_description: str = "dentfuse rigid registration",
    content_label: str = "DENTFUSE_REG",
    content_description: str = "Rigid registration of the moving frame to the fixed frame",
    content_creator_name: str = "",
    transformation_comment: str = "",
    series_number: int = 9901,
    instance_number: int = 1,
    software_versions: Mapping[str, str] | None = None,
    sop_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    content_datetime: _dt.datetime | None = None,
) -> FusionOutput:
    """Write a Spatial Registration object carrying one rigid moving->fixed matrix.

    Parameters
    ----------
    out_path
        File to write (parent folders are created).
    matrix_moving_to_fixed
        4x4 mapping a point in ``moving_frame_uid`` (LPS mm) to ``fixed_frame_uid``.
        Must be rigid (orthonormal rotation, det +1).
    fixed_frame_uid, moving_frame_uid
        Frame of Reference UIDs; they must differ.
    fixed_refs, moving_refs
        The registered instances (any SOP class) as :class:`InstanceRef` or
        ``(sop_class_uid, sop_instance_uid, series_uid, study_uid)`` tuples.
    patient_source
        Dataset whose Patient and General Study attributes are copied (the REG joins its study).
    software_versions
        Recorded in Software Versions (name=version, at most a few shown).

    Returns
    -------
    FusionOutput
        kind ``registration`` with path, sha256, SOP instance and series UIDs.

    Raises
    ------
    InputError
        The matrix is not rigid, frames are missing or equal, refs are malformed, or the
        patient source has no Study Instance UID.
    """
    try:
        rt = RigidTransform(np.asarray(matrix_moving_to_fixed, float).tolist(), moving_frame_uid, fixed_frame_uid)
    except ValueError as exc:
        raise InputError(f"REG {moving_frame_uid} -> {fixed_frame_uid}: {exc}") from exc
    if not fixed_frame_uid or not moving_frame_uid:
        raise InputError("REG needs both the fixed and the moving Frame of Reference UID")
    if fixed_frame_uid == moving_frame_uid:
        raise InputError(f"REG: fixed and moving inputs share the frame of reference {fixed_frame_uid}; "
                         "they are already registered, no REG is needed")
    try:
        f_refs = tuple(as_instance_ref(r) for r in fixed_refs)
        m_refs = tuple(as_instance_ref(r) for r in moving_refs)
    except ValueError as exc:
        raise InputError(f"REG: {exc}") from exc
    if not f_refs or not m_refs:
        raise InputError("REG needs at least one referenced instance of the fixed and of the moving input")
    study_uid = str(patient_source.get("StudyInstanceUID", "") or "")
    if not study_uid:
        raise InputError("REG: patient_source has no Study Instance UID; pass the fixed series' header")

    now = content_datetime or _dt.datetime.now(_dt.timezone.utc)
    sop_uid = sop_instance_uid or generate_uid()
    series_uid = series_instance_uid or generate_uid()

    ds = Dataset()
    ds.file_meta = file_meta(SPATIAL_REGISTRATION_SOP_CLASS, sop_uid)
    ds.SpecificCharacterSet = patient_source.get("SpecificCharacterSet", "ISO_IR 192") or "ISO_IR 192"
    ds.SOPClassUID = SPATIAL_REGISTRATION_SOP_CLASS
    ds.SOPInstanceUID = sop_uid
    # Patient + General Study (copied)
    copy_patient_and_study(ds, patient_source)
    # General Series + Spatial Registration Series
    ds.Modality = "REG"
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = series_description[:64]
    ds.Laterality = ""
    ds.SeriesDate = now.strftime("%Y%m%d")
    ds.SeriesTime = now.strftime("%H%M%S")
    # Frame of Reference: the registered (fixed) frame
    ds.FrameOfReferenceUID = fixed_frame_uid
    ds.PositionReferenceIndicator = ""
    # General + Enhanced General Equipment
    versions = dict(software_versions or {})
    ds.Manufacturer = MANUFACTURER
    ds.ManufacturerModelName = "dentfuse fusion"
    ds.DeviceSerialNumber = "0"
    sv = [f"dentfuse {versions.get('dentfuse', '')}".strip()]
    sv += [f"{k} {v}" for k, v in versions.items() if k in ("SimpleITK", "pydicom", "trimesh", "numpy")]
    ds.SoftwareVersions = [s[:64] for s in sv]
    # Spatial Registration module (Content Identification + Registration Sequence)
    ds.ContentDate = now.strftime("%Y%m%d")
    ds.ContentTime = now.strftime("%H%M%S")
    ds.InstanceNumber = instance_number
    ds.ContentLabel = content_label[:16].upper().replace(" ", "_")
    ds.ContentDescription = content_description[:64]
    ds.ContentCreatorName = content_creator_name[:64]

    fixed_item = Dataset()
    fixed_item.FrameOfReferenceUID = fixed_frame_uid
    fixed_images = _referenced_images(f_refs)
    if len(fixed_images):
        fixed_item.ReferencedImageSequence = fixed_images
    fixed_item.MatrixRegistrationSequence = DicomSequence([
        _matrix_item(np.eye(4), "fixed (registered) frame: identity", FRAME_IDENTITY_CODE)
    ])
    moving_item = Dataset()
    moving_item.FrameOfReferenceUID = moving_frame_uid
    moving_images = _referenced_images(m_refs)
    if len(moving_images):
        moving_item.ReferencedImageSequence = moving_images
    moving_item.MatrixRegistrationSequence = DicomSequence([
        _matrix_item(np.asarray(rt.matrix), transformation_comment or "moving frame to fixed frame, rigid")
    ])
    ds.RegistrationSequence = DicomSequence([fixed_item, moving_item])
    # Common Instance Reference
    add_common_instance_reference(ds, list(f_refs) + list(m_refs), study_uid)

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out_path, enforce_file_format=True)
    log.info("wrote REG %s (%s -> %s) to %s", sop_uid, moving_frame_uid, fixed_frame_uid, out_path)
    return FusionOutput(
        kind="registration",
        path=str(out_path),
        sha256=sha256_file(out_path),
        sop_instance_uids=(sop_uid,),
        series_instance_uid=series_uid,
        media_type="application/dicom",
    )


def _item_matrix(item: Dataset, where: str) -> np.ndarray:
    total = np.eye(4)
    mrs = item.get("MatrixRegistrationSequence")
    if not mrs:
        raise InputError(f"{where}: Registration Sequence item without Matrix Registration Sequence")
    for m in mrs[0].get("MatrixSequence", []):
        kind = str(m.get("FrameOfReferenceTransformationMatrixType", ""))
        vals = m.get("FrameOfReferenceTransformationMatrix")
        if vals is None or len(vals) != 16:
            raise InputError(f"{where}: Frame of Reference Transformation Matrix missing or not 16 values")
        mat = np.array([float(v) for v in vals]).reshape(4, 4)
        if kind not in ("RIGID", "RIGID_SCALE", "AFFINE"):
            raise InputError(f"{where}: unknown matrix type {kind!r}")
        total = mat @ total  # Matrix Sequence items are applied in order
    return total


def read_spatial_registrations(path: Path | str | Dataset) -> list[RigidTransform]:
    """Every rigid source->registered transform in a REG (identity items included).

    Raises
    ------
    InputError
        Not a Spatial Registration object, or a matrix that is not rigid.
    """
    ds = path if isinstance(path, Dataset) else pydicom.dcmread(Path(path))
    where = f"REG {ds.get('SOPInstanceUID', '?')}"
    if str(ds.get("SOPClassUID", "")) != SPATIAL_REGISTRATION_SOP_CLASS:
        raise InputError(f"{where}: SOP class {ds.get('SOPClassUID', '?')} is not Spatial Registration")
    target = str(ds.get("FrameOfReferenceUID", ""))
    out = []
    for item in ds.get("RegistrationSequence", []):
        mat = _item_matrix(item, where)
        try:
            out.append(RigidTransform(mat.tolist(), str(item.get("FrameOfReferenceUID", "")), target))
        except ValueError as exc:
            raise InputError(f"{where}: {exc}") from exc
    return out


def read_spatial_registration(path: Path | str | Dataset, moving_frame_uid: str | None = None) -> RigidTransform:
    """The moving->fixed :class:`RigidTransform` of a REG written by
    :func:`write_spatial_registration` (or any REG with one non-identity moving frame).

    ``moving_frame_uid`` selects the item when the REG registers several frames.

    Raises
    ------
    InputError
        No (or more than one, without ``moving_frame_uid``) moving frame in the REG.
    """
    transforms = read_spatial_registrations(path)
    moving = [t for t in transforms if t.source_frame_uid != t.target_frame_uid]
    if moving_frame_uid is not None:
        moving = [t for t in moving if t.source_frame_uid == moving_frame_uid]
    if len(moving) != 1:
        frames = [t.source_frame_uid for t in transforms]
        raise InputError(f"REG {path if not isinstance(path, Dataset) else ''}: expected one moving frame"
                         f"{' ' + moving_frame_uid if moving_frame_uid else ''}, found frames {frames}")
    return moving[0]
