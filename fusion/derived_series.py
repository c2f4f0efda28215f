"""The moving volume resampled onto the fixed grid: a DICOM derived series in the fixed
frame of reference, and NRRD / NIfTI files for research tools.

The derived series joins the fixed series' patient and study, carries the fixed frame of
reference and grid (one single-frame instance per fixed slice), ImageType
``DERIVED\\SECONDARY``, a Derivation Description naming the registration, and per slice a
Source Image Sequence listing the moving instances that slice was interpolated from.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
from pathlib import Path
from typing import Mapping

import numpy as np
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import generate_uid

from fusion.dicom_common import (
    MANUFACTURER,
    InstanceRef,
    add_common_instance_reference,
    code_item,
    copy_patient_and_study,
    file_meta,
    sha256_file,
    sop_reference,
)
from fusion.errors import InputError
from fusion.records import FusionOutput
from fusion.volume import Volume, volume_to_sitk

log = logging.getLogger(__name__)

CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE = "1.2.840.10008.5.1.4.1.1.4"
SOURCE_FOR_PROCESSING = ("121322", "DCM", "Source image for image processing operation")
DERIVATION_CODE = ("113072", "DCM", "Multiplanar reformatting")
MR_KEYWORDS = ("ScanningSequence", "SequenceVariant", "ScanOptions", "MRAcquisitionType", "RepetitionTime",
               "EchoTime", "EchoTrainLength", "InversionTime", "MagneticFieldStrength", "SequenceName",
               "ImagingFrequency", "ImagedNucleus", "FlipAngle")
EQUIPMENT_KEYWORDS = ("Manufacturer", "InstitutionName", "StationName")


def moving_to_fixed_transform(matrix_moving_to_fixed: np.ndarray) -> sitk.AffineTransform:
    """The SimpleITK resampling transform (fixed point -> moving point) of a moving->fixed matrix."""
    inv = np.linalg.inv(np.asarray(matrix_moving_to_fixed, float))
    t = sitk.AffineTransform(3)
    t.SetMatrix(tuple(float(v) for v in inv[:3, :3].ravel()))
    t.SetTranslation(tuple(float(v) for v in inv[:3, 3]))
    return t


def resample_moving(fixed: Volume, moving: Volume, matrix_moving_to_fixed: np.ndarray,
                    default_value: float | None = None) -> sitk.Image:
    """``moving`` resampled (linear) onto ``fixed``'s grid; outside the moving field of view
    the value is ``default_value`` (default: the moving volume's minimum). float32."""
    ref = sitk.Image(fixed.shape_xyz, sitk.sitkUInt8)
    ref.SetSpacing(fixed.spacing)
    ref.SetOrigin(fixed.origin)
    ref.SetDirection(tuple(float(v) for v in fixed.direction.ravel()))
    mov = volume_to_sitk(moving, np.float32)
    if default_value is None:
        default_value = float(moving.voxels.min())
    return sitk.Resample(mov, ref, moving_to_fixed_transform(matrix_moving_to_fixed), sitk.sitkLinear,
                         float(default_value), sitk.sitkFloat32)


def _ds(v: float) -> str:
    for prec in range(12, 4, -1):
        s = f"{v:.{prec}g}"
        if len(s) <= 16:
            return s
    return f"{v:.6e}"[:16]


def _manifest_sha256(files: list[Path]) -> str:
    """sha256 of the ``<sha256>  <name>`` lines of the series' files, sorted by name."""
    lines = "".join(f"{sha256_file(f)}  {f.name}\n" for f in sorted(files))
    return hashlib.sha256(lines.encode()).hexdigest(), lines  # type: ignore[return-value]


def _source_slices(fixed: Volume, moving: Volume, matrix_moving_to_fixed: np.ndarray) -> list[tuple[int, int]]:
    """Per fixed slice, the range of moving slice indices its plane passes through."""
    nx, ny, nz = fixed.shape_xyz
    corners = np.array([[i, j] for i in (0, nx - 1) for j in (0, ny - 1)], float)
    inv = np.linalg.inv(matrix_moving_to_fixed)
    out = []
    mz = moving.shape_xyz[2]
    for k in range(nz):
        ijk = np.c_[corners, np.full(4, k)]
        p_fixed = fixed.index_to_lps(ijk)
        p_moving = p_fixed @ inv[:3, :3].T + inv[:3, 3]
        kk = moving.lps_to_index(p_moving)[:, 2]
        lo, hi = int(np.floor(kk.min())), int(np.ceil(kk.max()))
        out.append((max(lo, 0), min(hi, mz - 1)))
    return out


def write_derived_series(
    out_dir: Path,
    resampled: sitk.Image,
    *,
    fixed: Volume,
    moving: Volume,
    matrix_moving_to_fixed: np.ndarray,
    derivation_description: str,
    series_description: str = "",
    series_number: int = 9902,
    software_versions: Mapping[str, str] | None = None,
    series_instance_uid: str | None = None,
    content_datetime: _dt.datetime | None = None,
) -> FusionOutput:
    """Write ``resampled`` (on ``fixed``'s grid) as a single-frame DICOM series.

    Parameters
    ----------
    out_dir
        Folder for the series (created); one ``IMnnnn.dcm`` per slice and ``SHA256SUMS``.
    resampled
        The moving volume on the fixed grid (from :func:`resample_moving`).
    fixed, moving
        The registered volumes; ``fixed.header`` supplies patient and study, ``moving``
        the modality and the source instances.
    derivation_description
        Free text (<= 1024 chars) naming the registration (method, REG UID, fusion id).

    Returns
    -------
    FusionOutput
        kind ``derived_series``; ``path`` the folder, ``sha256`` the hash of its
        ``SHA256SUMS`` manifest (sha256 and name of every file).

    Raises
    ------
    InputError
        The resampled image is not on the fixed grid, or the fixed volume has no header.
    """
    if fixed.header is None:
        raise InputError(f"series {fixed.series_instance_uid}: no DICOM header to derive a series from")
    if resampled.GetSize() != fixed.shape_xyz:
        raise InputError(f"resampled image size {resampled.GetSize()} is not the fixed grid {fixed.shape_xyz}")
    arr = sitk.GetArrayFromImage(resampled).astype(np.float64)
    integral = np.issubdtype(moving.voxels.dtype, np.integer)
    lo, hi = float(arr.min()), float(arr.max())
    if integral and lo >= -32768 and hi <= 32767:
        slope, intercept = 1.0, 0.0
        stored = np.rint(arr).astype(np.int16)
    else:
        intercept = 0.0
        slope = max(abs(lo), abs(hi)) / 32000.0 or 1.0
        stored = np.rint(arr / slope).astype(np.int16)
    modality = (moving.modality or "OT").upper()
    sop_class = MR_IMAGE if modality == "MR" else CT_IMAGE
    if modality not in ("MR", "CT"):
        modality = "CT"
    now = content_datetime or _dt.datetime.now(_dt.timezone.utc)
    series_uid = series_instance_uid or generate_uid()
    fh = fixed.header
    mh = moving.header if moving.header is not None else Dataset()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    sources = _source_slices(fixed, moving, matrix_moving_to_fixed)
    multi_frame_moving = len(moving.sop_instance_uids) != moving.shape_xyz[2]
    row_dir = fixed.direction[:, 0]
    col_dir = fixed.direction[:, 1]
    sx, sy, _ = fixed.spacing
    versions = dict(software_versions or {})
    files: list[Path] = []
    uids: list[str] = []
    nx, ny, nz = fixed.shape_xyz
    for k in range(nz):
        sop_uid = generate_uid()
        ds = Dataset()
        ds.file_meta = file_meta(sop_class, sop_uid)
        ds.SpecificCharacterSet = fh.get("SpecificCharacterSet", "ISO_IR 192") or "ISO_IR 192"
        ds.SOPClassUID = sop_class
        ds.SOPInstanceUID = sop_uid
        copy_patient_and_study(ds, fh)
        ds.Modality = modality
        ds.SeriesInstanceUID = series_uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = (series_description or f"{modality} registered to {fixed.modality or 'fixed'}")[:64]
        ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
        ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
        ds.Laterality = ""
        ds.PatientPosition = fh.get("PatientPosition", "") or ""
        ds.FrameOfReferenceUID = fixed.frame_of_reference_uid
        ds.PositionReferenceIndicator = fh.get("PositionReferenceIndicator", "") or ""
        ds.Manufacturer = MANUFACTURER
        ds.ManufacturerModelName = "dentfuse fusion"
        ds.SoftwareVersions = [f"dentfuse {versions.get('dentfuse', '')}".strip()] + \
            [f"{n} {versions[n]}"[:64] for n in ("SimpleITK", "pydicom") if n in versions]
        ds.InstanceNumber = k + 1
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"] if sop_class == CT_IMAGE else ["DERIVED", "SECONDARY", "MPR"]
        ds.DerivationDescription = derivation_description[:1024]
        ds.DerivationCodeSequence = DicomSequence([code_item(DERIVATION_CODE)])
        lo_k, hi_k = sources[k]
        src_items = []
        if multi_frame_moving:
            refs = [(uid, None) for uid in moving.sop_instance_uids]
        else:
            refs = [(moving.sop_instance_uids[j], None) for j in range(lo_k, hi_k + 1)] if hi_k >= lo_k else []
        for uid, _ in refs:
            it = sop_reference(moving.sop_class_uid, uid)
            it.PurposeOfReferenceCodeSequence = DicomSequence([code_item(SOURCE_FOR_PROCESSING)])
            src_items.append(it)
        if src_items:
            ds.SourceImageSequence = DicomSequence(src_items)
        # Common Instance Reference: the instances listed in the Source Image Sequence
        add_common_instance_reference(ds, [InstanceRef(moving.sop_class_uid, uid, moving.series_instance_uid,
                                                       moving.study_instance_uid) for uid, _ in refs],
                                      str(fh.get("StudyInstanceUID", "")))
        # image plane (the fixed grid)
        pos = fixed.index_to_lps(np.array([[0.0, 0.0, float(k)]]))[0]
        ds.ImagePositionPatient = [_ds(float(v)) for v in pos]
        ds.ImageOrientationPatient = [_ds(float(v)) for v in list(row_dir) + list(col_dir)]
        ds.PixelSpacing = [_ds(sy), _ds(sx)]
        ds.SliceThickness = _ds(fixed.spacing[2])
        ds.SliceLocation = _ds(float(np.dot(pos, np.cross(row_dir, col_dir))))
        # image pixel
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = ny, nx
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept = _ds(intercept)
        ds.RescaleSlope = _ds(slope)
        if sop_class == CT_IMAGE:
            ds.RescaleType = "HU" if moving.modality.upper() == "CT" else "US"
            ds.KVP = mh.get("KVP", "") or ""
            ds.AcquisitionNumber = mh.get("AcquisitionNumber", "") or ""
        else:
            for kw in MR_KEYWORDS:
                if kw in mh:
                    ds[kw] = mh[kw]
            for kw, default in (("ScanningSequence", "RM"), ("SequenceVariant", "NONE"), ("ScanOptions", ""),
                                ("MRAcquisitionType", "3D"), ("EchoTime", ""), ("EchoTrainLength", "")):
                if kw not in ds:
                    setattr(ds, kw, default)
            if "RepetitionTime" not in ds:
                ds.RepetitionTime = ""
        sl = stored[k]
        ds.SmallestImagePixelValue = int(sl.min())
        ds.LargestImagePixelValue = int(sl.max())
        ds["SmallestImagePixelValue"].VR = "SS"
        ds["LargestImagePixelValue"].VR = "SS"
        ds.PixelData = np.ascontiguousarray(sl).tobytes()
        path = out_dir / f"IM{k + 1:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        uids.append(sop_uid)
    digest, lines = _manifest_sha256(files)
    (out_dir / "SHA256SUMS").write_text(lines)
    log.info("wrote derived series %s (%d slices) to %s", series_uid, nz, out_dir)
    return FusionOutput(
        kind="derived_series",
        path=str(out_dir),
        sha256=digest,
        sop_instance_uids=tuple(uids),
        series_instance_uid=series_uid,
        media_type="application/dicom",
    )


def write_research_volume(path: Path, image: sitk.Image, kind: str) -> FusionOutput:
    """Write an image as NRRD (``.nrrd``) or NIfTI (``.nii.gz``) via SimpleITK.

    NRRD keeps LPS; SimpleITK converts to the NIfTI RAS convention itself.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path), useCompression=path.name.endswith(".gz"), compressionLevel=1)
    media = "application/x-nrrd" if path.suffix == ".nrrd" else "application/x-nifti"
    return FusionOutput(kind=kind, path=str(path), sha256=sha256_file(path), media_type=media)
