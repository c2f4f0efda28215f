"""Checked 3D volumes from DICOM series, and their exact SimpleITK twins.

Array and index convention
--------------------------
``Volume.voxels`` is a numpy array indexed ``voxels[k, j, i]`` = ``(slice, row, column)``,
i.e. ``(z, y, x)`` order, the same order as ``SimpleITK.GetArrayFromImage``.
``Volume.affine`` is a 4x4 matrix mapping a *continuous voxel index* ``(i, j, k, 1)``
(column, row, slice; voxel centres at integers) to DICOM patient coordinates (LPS, mm):

    affine[:3, 0] = row direction (Image Orientation (Patient) [0:3]) * column spacing
    affine[:3, 1] = column direction (IOP [3:6])                     * row spacing
    affine[:3, 2] = slice normal (row x column direction)             * slice spacing
    affine[:3, 3] = Image Position (Patient) of the first slice

Slices are sorted by their position projected on the slice normal (ascending), so the
direction block is always a proper rotation (det +1) scaled by the spacings. Slice
spacing comes from the positions, never from Slice Thickness.

Voxel values have the Modality LUT (rescale slope/intercept, per frame for enhanced
objects) applied. They stay integers (int16/int32) when every slope is 1 and every
intercept an integer, otherwise they are float32.

``content_sha256`` hashes the decoded voxel values (dtype, shape and bytes), not the
files, so a re-sent series with new UIDs and identical pixels has the same hash.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from fusion.errors import GeometryError, InputError
from fusion.records import FusionInput

log = logging.getLogger(__name__)

#: SOP classes accepted as 3D volumes (single-frame stacks or enhanced multi-frame).
VOLUME_SOP_CLASSES: dict[str, str] = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.1": "Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.4.4": "Legacy Converted Enhanced MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.13.1.2": "X-Ray 3D Craniofacial Image Storage",
}

#: Modalities that are 2D projection images and never volumes.
PROJECTION_MODALITIES = {"DX", "PX", "IO", "CR", "MG", "XA", "RF", "OP", "XC", "SC"}

MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class GeometryTolerances:
    """How far a series may deviate from a regular grid before it is refused.

    ``spacing_rel``/``spacing_abs_mm``: a gap between consecutive slices may differ from
    the median gap by at most ``max(spacing_abs_mm, spacing_rel * median)``.
    ``tilt_abs_mm``/``tilt_rel``: a slice's in-plane offset from the first slice's normal
    line may be at most ``max(tilt_abs_mm, tilt_rel * distance along the normal)``.
    ``orientation``: max difference of direction cosines between slices.
    ``min_slices``: fewer slices is "a 2D image offered as a volume".
    """

    spacing_rel: float = 0.02
    spacing_abs_mm: float = 0.01
    tilt_abs_mm: float = 0.02
    tilt_rel: float = 1e-3
    orientation: float = 1e-4
    min_slices: int = 3


@dataclass(frozen=True, eq=False)
class Volume:
    """A checked 3D image on a regular grid in a DICOM frame of reference.

    See the module docstring for the array order and the affine convention.
    """

    voxels: np.ndarray  # (z, y, x) = (slice, row, column)
    affine: np.ndarray  # 4x4, continuous index (i, j, k, 1) -> LPS mm
    frame_of_reference_uid: str
    modality: str = ""
    sop_class_uid: str = ""
    study_instance_uid: str = ""
    series_instance_uid: str = ""
    sop_instance_uids: tuple[str, ...] = ()  # in slice order (one per instance for multi-frame)
    patient_id: str = ""
    issuer_of_patient_id: str = ""
    demographics_sha256: str = ""
    acquisition_date: str = ""
    series_description: str = ""
    content_sha256: str = ""
    source_paths: tuple[str, ...] = ()
    header: Dataset | None = field(default=None, repr=False, compare=False)  # first instance, no pixels

    def __post_init__(self) -> None:
        vox = np.asarray(self.voxels)
        if vox.ndim != 3:
            raise ValueError(f"Volume voxels must be 3D (z, y, x), got shape {vox.shape}")
        aff = np.asarray(self.affine, dtype=np.float64)
        if aff.shape != (4, 4):
            raise ValueError(f"Volume affine must be 4x4, got shape {aff.shape}")
        vox.flags.writeable = False
        aff = aff.copy()
        aff.flags.writeable = False
        object.__setattr__(self, "voxels", vox)
        object.__setattr__(self, "affine", aff)
        if not self.content_sha256:
            object.__setattr__(self, "content_sha256", voxel_sha256(vox))

    # ---- geometry -------------------------------------------------------------
    @property
    def shape_xyz(self) -> tuple[int, int, int]:
        z, y, x = self.voxels.shape
        return (int(x), int(y), int(z))

    @property
    def spacing(self) -> tuple[float, float, float]:
        """Voxel spacing along i (column), j (row), k (slice), mm."""
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3x3 matrix whose columns are the unit i, j, k axis directions in LPS."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def origin(self) -> tuple[float, float, float]:
        """LPS position of voxel (0, 0, 0)'s centre."""
        return tuple(float(v) for v in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def extent_mm(self) -> tuple[float, float, float]:
        return tuple(float(n * s) for n, s in zip(self.shape_xyz, self.spacing))  # type: ignore[return-value]

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map (N, 3) continuous indices (i, j, k) to (N, 3) LPS points."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.affine[:3, :3].T + self.affine[:3, 3]

    def lps_to_index(self, points: np.ndarray) -> np.ndarray:
        """Map (N, 3) LPS points to (N, 3) continuous indices (i, j, k)."""
        pts = np.atleast_2d(np.asarray(points, dtype=np.float64))
        return np.linalg.solve(self.affine[:3, :3], (pts - self.affine[:3, 3]).T).T

    def corners_lps(self) -> np.ndarray:
        """(8, 3) LPS positions of the grid's corner voxel centres."""
        nx, ny, nz = self.shape_xyz
        c = np.array([[i, j, k] for i in (0, nx - 1) for j in (0, ny - 1) for k in (0, nz - 1)], float)
        return self.index_to_lps(c)

    def to_fusion_input(self, role: str) -> FusionInput:
        """The provenance record of this volume as a fusion input (``role`` fixed/moving)."""
        return FusionInput(
            role=role,  # type: ignore[arg-type]
            kind="volume",
            modality=self.modality,
            patient_id=self.patient_id,
            issuer_of_patient_id=self.issuer_of_patient_id,
            demographics_sha256=self.demographics_sha256,
            study_instance_uid=self.study_instance_uid,
            series_instance_uid=self.series_instance_uid,
            sop_instance_uids=self.sop_instance_uids,
            sop_class_uid=self.sop_class_uid,
            frame_of_reference_uid=self.frame_of_reference_uid,
            content_sha256=self.content_sha256,
            acquisition_date=self.acquisition_date,
            source_path=_common_parent(self.source_paths),
            shape=self.shape_xyz,
            spacing_mm=self.spacing,
            extent_mm=self.extent_mm,
        )


# ---- hashing --------------------------------------------------------------------

def voxel_sha256(voxels: np.ndarray) -> str:
    """sha256 of decoded voxel values: dtype, shape (z, y, x) and little-endian bytes."""
    arr = np.ascontiguousarray(voxels)
    if arr.dtype.byteorder == ">":
        arr = arr.astype(arr.dtype.newbyteorder("<"))
    h = hashlib.sha256()
    h.update(f"{arr.dtype.str}|{'x'.join(str(s) for s in arr.shape)}|".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def demographics_sha256(birth_date: str, sex: str) -> str:
    """Hash of Patient's Birth Date and Sex (so consistency can be checked without
    storing them). Empty string when both are empty."""
    b, s = (str(birth_date or "").strip(), str(sex or "").strip().upper())
    if not b and not s:
        return ""
    return hashlib.sha256(f"dentfuse-demographics-v1|{b}|{s}".encode()).hexdigest()


def dataset_demographics_sha256(ds: Dataset) -> str:
    return demographics_sha256(str(ds.get("PatientBirthDate", "") or ""), str(ds.get("PatientSex", "") or ""))


# ---- assembling -------------------------------------------------------------------

@dataclass
class _Frame:
    label: str  # names the instance (and frame) in error messages
    item: int  # index into the dataset list
    frame: int | None  # frame number (0-based) for multi-frame, None for single-frame
    position: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    row_spacing: float  # Pixel Spacing[0]: distance between rows
    col_spacing: float  # Pixel Spacing[1]: distance between columns
    rows: int
    cols: int
    slope: float
    intercept: float
    proj: float = 0.0


def _label(ds: Dataset, path: str | None) -> str:
    uid = str(ds.get("SOPInstanceUID", "") or "")
    if uid and path:
        return f"SOP instance {uid} ({path})"
    return f"SOP instance {uid}" if uid else (path or "<dataset without SOP Instance UID>")


def _floats(value: Any, n: int, what: str, label: str) -> np.ndarray:
    try:
        arr = np.array([float(v) for v in value], dtype=np.float64)
    except (TypeError, ValueError):
        arr = np.array([])
    if arr.shape != (n,) or not np.all(np.isfinite(arr)):
        raise GeometryError(f"{label}: {what} is missing or malformed ({value!r}); "
                            "the series cannot be placed in patient space")
    return arr


def _fg_item(ds: Dataset, frame: int, seq: str) -> Dataset | None:
    """Functional group macro ``seq`` for ``frame``: per-frame first, then shared."""
    pf = ds.get("PerFrameFunctionalGroupsSequence")
    if pf is not None and frame < len(pf):
        items = pf[frame].get(seq)
        if items:
            return items[0]
    sh = ds.get("SharedFunctionalGroupsSequence")
    if sh:
        items = sh[0].get(seq)
        if items:
            return items[0]
    return None


def _frames_of(ds: Dataset, item: int, path: str | None) -> list[_Frame]:
    label = _label(ds, path)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 2 or cols < 2:
        raise InputError(f"{label}: no image matrix (Rows={rows}, Columns={cols}); not an image")
    if int(ds.get("SamplesPerPixel", 1) or 1) != 1:
        raise InputError(f"{label}: colour image (Samples per Pixel "
                         f"{ds.SamplesPerPixel}); a volume needs greyscale slices")
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    frames: list[_Frame] = []
    if "PerFrameFunctionalGroupsSequence" in ds or "SharedFunctionalGroupsSequence" in ds:
        for f in range(n_frames):
            flabel = f"{label} frame {f + 1}"
            pos_item = _fg_item(ds, f, "PlanePositionSequence")
            ori_item = _fg_item(ds, f, "PlaneOrientationSequence")
            pm_item = _fg_item(ds, f, "PixelMeasuresSequence")
            pvt_item = _fg_item(ds, f, "PixelValueTransformationSequence")
            if pos_item is None or ori_item is None or pm_item is None:
                raise GeometryError(f"{flabel}: Plane Position, Plane Orientation or Pixel Measures "
                                    "functional group missing; the frame cannot be placed")
            pos = _floats(pos_item.get("ImagePositionPatient"), 3, "Image Position (Patient)", flabel)
            iop = _floats(ori_item.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)", flabel)
            ps = _floats(pm_item.get("PixelSpacing"), 2, "Pixel Spacing", flabel)
            slope = float(pvt_item.get("RescaleSlope", 1) or 1) if pvt_item is not None else float(ds.get("RescaleSlope", 1) or 1)
            icpt = float(pvt_item.get("RescaleIntercept", 0) or 0) if pvt_item is not None else float(ds.get("RescaleIntercept", 0) or 0)
            frames.append(_Frame(flabel, item, f, pos, iop[:3], iop[3:], ps[0], ps[1], rows, cols, slope, icpt))
    else:
        if n_frames != 1:
            raise InputError(f"{label}: {n_frames} frames without per-frame functional groups; "
                             "multi-frame objects need Plane Position per frame to form a volume")
        pos = _floats(ds.get("ImagePositionPatient"), 3, "Image Position (Patient)", label)
        iop = _floats(ds.get("ImageOrientationPatient"), 6, "Image Orientation (Patient)", label)
        ps = _floats(ds.get("PixelSpacing"), 2, "Pixel Spacing", label)
        slope = float(ds.get("RescaleSlope", 1) or 1)
        icpt = float(ds.get("RescaleIntercept", 0) or 0)
        frames.append(_Frame(label, item, None, pos, iop[:3], iop[3:], ps[0], ps[1], rows, cols, slope, icpt))
    for fr in frames:
        if fr.row_spacing <= 0 or fr.col_spacing <= 0:
            raise GeometryError(f"{fr.label}: Pixel Spacing {fr.row_spacing}\\{fr.col_spacing} is not positive")
        for name, v in (("row", fr.row_dir), ("column", fr.col_dir)):
            if abs(np.linalg.norm(v) - 1.0) > 1e-3:
                raise GeometryError(f"{fr.label}: Image Orientation (Patient) {name} direction is not a unit vector")
        if abs(float(np.dot(fr.row_dir, fr.col_dir))) > 1e-3:
            raise GeometryError(f"{fr.label}: Image Orientation (Patient) row and column directions are not orthogonal")
        fr.row_dir = fr.row_dir / np.linalg.norm(fr.row_dir)
        fr.col_dir = fr.col_dir / np.linalg.norm(fr.col_dir)
    return frames


def _read(item: Dataset | str | Path) -> tuple[Dataset, str | None]:
    if isinstance(item, Dataset):
        return item, (str(item.filename) if isinstance(getattr(item, "filename", None), str) else None)
    path = Path(item)
    try:
        return pydicom.dcmread(path), str(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
        raise InputError(f"{path}: cannot be read as DICOM ({exc}); remove it from the input") from exc


def _decode(ds: Dataset, label: str) -> np.ndarray:
    try:
        return ds.pixel_array
    except Exception as exc:  # noqa: BLE001 - decoder plugins raise many types
        ts = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
        raise InputError(f"{label}: pixel data cannot be decoded (transfer syntax {ts}: {exc}); "
                         "install the matching pylibjpeg plugin or re-send uncompressed") from exc


def assemble_volume(
    datasets_or_paths: Iterable[Dataset | str | Path],
    *,
    tolerances: GeometryTolerances = GeometryTolerances(),
) -> Volume:
    """Assemble one checked :class:`Volume` from the instances of one series.

    Parameters
    ----------
    datasets_or_paths
        pydicom datasets (with pixel data) and/or paths of DICOM files, all of one series:
        single-frame slices, or one or more enhanced multi-frame instances.
    tolerances
        Geometry tolerances (see :class:`GeometryTolerances`).

    Returns
    -------
    Volume
        Voxels in (z, y, x) order, sorted along the slice normal, rescale applied.

    Raises
    ------
    InputError
        Not DICOM, not an image, a 2D/projection image or a single slice, several series
        or frames of reference mixed, undecodable pixel data.
    GeometryError
        Missing or uneven slices, duplicate positions, mixed orientations or sizes,
        gantry tilt, missing position/orientation/spacing. The message names the instances.
    """
    items = list(datasets_or_paths)
    if not items:
        raise InputError("no instances given; a volume needs the files of one series")
    datasets: list[Dataset] = []
    paths: list[str | None] = []
    for it in items:
        ds, p = _read(it)
        datasets.append(ds)
        paths.append(p)

    first = datasets[0]
    first_label = _label(first, paths[0])
    series = sorted({str(ds.get("SeriesInstanceUID", "")) for ds in datasets})
    if len(series) > 1:
        raise InputError(f"{len(series)} series mixed in one volume input ({', '.join(series)}); "
                         "pass the files of one series only")
    for ds, p in zip(datasets, paths):
        sop_class = str(ds.get("SOPClassUID", ""))
        modality = str(ds.get("Modality", "") or "").upper()
        if sop_class == MEDIA_STORAGE_DIRECTORY:
            raise InputError(f"{p or 'dataset'}: a DICOMDIR is not an image; pass the series' files")
        if modality in PROJECTION_MODALITIES or (sop_class not in VOLUME_SOP_CLASSES and
                                                 "ImagePositionPatient" not in ds and
                                                 "PerFrameFunctionalGroupsSequence" not in ds):
            raise InputError(f"{_label(ds, p)}: a 2D image (modality {modality or '?'}, SOP class "
                             f"{sop_class or '?'}) was offered as a volume; only CT/CBCT/MR volumes "
                             "can be fused as volumes")
    frames_of_ref = sorted({str(ds.get("FrameOfReferenceUID", "")) for ds in datasets})
    if len(frames_of_ref) > 1:
        raise InputError(f"series {series[0]}: instances in {len(frames_of_ref)} frames of reference "
                         f"({', '.join(frames_of_ref)}); a volume needs one")
    for_uid = frames_of_ref[0]
    if not for_uid:
        raise InputError(f"{first_label}: Frame of Reference UID missing; the series cannot be "
                         "placed in a patient coordinate system")

    frames: list[_Frame] = []
    for idx, (ds, p) in enumerate(zip(datasets, paths)):
        frames.extend(_frames_of(ds, idx, p))
    if len(frames) < tolerances.min_slices:
        raise InputError(f"series {series[0]}: {len(frames)} slice(s) ({frames[0].label}); a 2D image "
                         f"or single slice is not a volume (need at least {tolerances.min_slices})")

    # --- consistency of size, spacing and orientation
    ref = frames[0]
    for fr in frames[1:]:
        if (fr.rows, fr.cols) != (ref.rows, ref.cols):
            raise GeometryError(f"series {series[0]}: mixed image sizes: {fr.label} is "
                                f"{fr.rows}x{fr.cols}, {ref.label} is {ref.rows}x{ref.cols}")
        if (abs(fr.row_spacing - ref.row_spacing) > 1e-4 * max(ref.row_spacing, 1)
                or abs(fr.col_spacing - ref.col_spacing) > 1e-4 * max(ref.col_spacing, 1)):
            raise GeometryError(f"series {series[0]}: mixed pixel spacing: {fr.label} has "
                                f"{fr.row_spacing}\\{fr.col_spacing}, {ref.label} has "
                                f"{ref.row_spacing}\\{ref.col_spacing}")
        if (np.max(np.abs(fr.row_dir - ref.row_dir)) > tolerances.orientation
                or np.max(np.abs(fr.col_dir - ref.col_dir)) > tolerances.orientation):
            raise GeometryError(f"series {series[0]}: mixed orientations: {fr.label} differs from "
                                f"{ref.label}; split the series or re-send it")

    normal = np.cross(ref.row_dir, ref.col_dir)
    normal /= np.linalg.norm(normal)
    for fr in frames:
        fr.proj = float(np.dot(fr.position, normal))
    frames.sort(key=lambda f: f.proj)
    projs = np.array([f.proj for f in frames])
    gaps = np.diff(projs)

    # duplicates
    in_plane = min(ref.row_spacing, ref.col_spacing)
    for n, g in enumerate(gaps):
        if g < 1e-3 * in_plane:
            raise GeometryError(f"series {series[0]}: duplicate slice position {projs[n]:.4f} mm along "
                                f"the normal: {frames[n].label} and {frames[n + 1].label}; "
                                "remove the duplicate instance")
    # gantry tilt: slice positions must lie on the normal line through the first slice
    for fr in frames[1:]:
        d = fr.position - frames[0].position
        along = float(np.dot(d, normal))
        lateral = float(np.linalg.norm(d - along * normal))
        if lateral > max(tolerances.tilt_abs_mm, tolerances.tilt_rel * abs(along)):
            angle = float(np.degrees(np.arctan2(lateral, abs(along))))
            raise GeometryError(f"series {series[0]}: gantry tilt or sheared stack of about {angle:.2f} "
                                f"deg: {fr.label} is {lateral:.3f} mm off the slice normal through "
                                f"{frames[0].label}; resample the series to an orthogonal grid first")
    # spacing
    spacing = float(np.median(gaps))
    tol = max(tolerances.spacing_abs_mm, tolerances.spacing_rel * spacing)
    bad = np.nonzero(np.abs(gaps - spacing) > tol)[0]
    if bad.size:
        n = int(bad[0])
        g = float(gaps[n])
        kind = (f"about {round(g / spacing) - 1} missing slice(s)" if g > 1.5 * spacing
                else "uneven slice spacing")
        raise GeometryError(f"series {series[0]}: {kind}: gap of {g:.4f} mm between {frames[n].label} "
                            f"and {frames[n + 1].label} (median spacing {spacing:.4f} mm, tolerance "
                            f"{tol:.4f} mm; {bad.size} irregular gap(s)); re-send the complete series")

    # --- voxels
    integral = all(f.slope == 1.0 and float(f.intercept).is_integer() for f in frames)
    nz = len(frames)
    decoded: dict[int, np.ndarray] = {}
    out: np.ndarray | None = None
    for k, fr in enumerate(frames):
        ds = datasets[fr.item]
        if fr.item not in decoded:
            decoded[fr.item] = _decode(ds, _label(ds, paths[fr.item]))
        arr = decoded[fr.item]
        if fr.frame is not None and int(ds.get("NumberOfFrames", 1) or 1) > 1:
            pix = arr[fr.frame]
        else:
            pix = arr
        if pix.shape != (fr.rows, fr.cols):
            raise InputError(f"{fr.label}: decoded pixel array has shape {pix.shape}, "
                             f"expected {fr.rows}x{fr.cols}")
        if out is None:
            out = np.empty((nz, fr.rows, fr.cols), dtype=np.int32 if integral else np.float32)
        if integral:
            out[k] = pix.astype(np.int32) + int(fr.intercept)
        else:
            out[k] = pix.astype(np.float32) * np.float32(fr.slope) + np.float32(fr.intercept)
        # free decoded multi-frame arrays once their last frame is used
        if fr.frame is None:
            decoded.pop(fr.item, None)
    decoded.clear()
    assert out is not None
    if integral and out.size and out.min() >= -32768 and out.max() <= 32767:
        out = out.astype(np.int16)
    if str(first.get("PhotometricInterpretation", "MONOCHROME2")) == "MONOCHROME1":
        log.info("series %s is MONOCHROME1; voxel values are kept as stored (not inverted)", series[0])

    affine = np.eye(4)
    affine[:3, 0] = ref.row_dir * ref.col_spacing
    affine[:3, 1] = ref.col_dir * ref.row_spacing
    affine[:3, 2] = normal * spacing
    affine[:3, 3] = frames[0].position

    sop_uids: list[str] = []
    for fr in frames:
        uid = str(datasets[fr.item].get("SOPInstanceUID", ""))
        if uid not in sop_uids:
            sop_uids.append(uid)
    header = _header_without_pixels(first)
    acq = ""
    for kw in ("AcquisitionDate", "ContentDate", "SeriesDate", "StudyDate"):
        if first.get(kw):
            acq = str(first.get(kw))
            break
    vol = Volume(
        voxels=out,
        affine=affine,
        frame_of_reference_uid=for_uid,
        modality=str(first.get("Modality", "") or ""),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        study_instance_uid=str(first.get("StudyInstanceUID", "")),
        series_instance_uid=series[0],
        sop_instance_uids=tuple(sop_uids),
        patient_id=str(first.get("PatientID", "") or ""),
        issuer_of_patient_id=str(first.get("IssuerOfPatientID", "") or ""),
        demographics_sha256=dataset_demographics_sha256(first),
        acquisition_date=acq,
        series_description=str(first.get("SeriesDescription", "") or ""),
        source_paths=tuple(p for p in paths if p),
        header=header,
    )
    log.info("assembled series %s: %s voxels, spacing %s mm, frame %s", vol.series_instance_uid,
             vol.shape_xyz, tuple(round(s, 4) for s in vol.spacing), for_uid)
    return vol


_BULK_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData", "PerFrameFunctionalGroupsSequence")


def _header_without_pixels(ds: Dataset) -> Dataset:
    """A new dataset sharing ``ds``'s elements except pixel data and per-frame groups
    (the source dataset is left untouched)."""
    skip = {pydicom.datadict.tag_for_keyword(k) for k in _BULK_KEYWORDS}
    header = Dataset()
    for elem in ds:
        if elem.tag not in skip:
            header.add(elem)
    if getattr(ds, "file_meta", None) is not None:
        header.file_meta = ds.file_meta
    return header


def _dicom_files(folder: Path) -> list[Path]:
    files: list[Path] = []
    for p in sorted(folder.rglob("*")):
        if not p.is_file():
            continue
        try:
            with open(p, "rb") as fh:
                head = fh.read(132)
        except OSError:
            continue
        if len(head) == 132 and head[128:132] == b"DICM":
            files.append(p)
        else:
            log.debug("skipping non-DICOM file %s", p)
    return files


def load_series(
    folder_or_files: str | Path | Sequence[str | Path],
    *,
    tolerances: GeometryTolerances = GeometryTolerances(),
) -> Volume:
    """Read a series from a folder (recursively; files without the DICOM preamble are
    skipped, DICOMDIRs refused) or from a list of files/folders, and assemble it.

    Raises
    ------
    InputError
        No DICOM files, several series in the input (the message lists them), or any
        error of :func:`assemble_volume`.
    GeometryError
        See :func:`assemble_volume`.
    """
    entries = [folder_or_files] if isinstance(folder_or_files, (str, Path)) else list(folder_or_files)
    files: list[Path] = []
    for e in entries:
        p = Path(e)
        if p.is_dir():
            files.extend(f for f in _dicom_files(p) if f.name.upper() != "DICOMDIR")
        elif p.is_file():
            files.append(p)
        else:
            raise InputError(f"{p}: no such file or folder")
    if not files:
        raise InputError(f"{', '.join(str(e) for e in entries)}: no DICOM files found")
    headers: dict[str, list[Path]] = {}
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True)
        except (InvalidDicomError, OSError, EOFError, ValueError) as exc:
            raise InputError(f"{f}: cannot be read as DICOM ({exc}); remove it from the input") from exc
        headers.setdefault(str(ds.get("SeriesInstanceUID", "")), []).append(f)
    if len(headers) > 1:
        desc = "; ".join(f"{uid} ({len(fs)} files, e.g. {fs[0]})" for uid, fs in headers.items())
        raise InputError(f"{len(headers)} series found in {', '.join(str(e) for e in entries)}: {desc}; "
                         "pass one series per input")
    return assemble_volume(files, tolerances=tolerances)


# ---- SimpleITK ------------------------------------------------------------------

def volume_to_sitk(volume: Volume, dtype: Any = None) -> "Any":
    """A SimpleITK image with exactly the volume's geometry (origin, spacing, direction).

    ``dtype`` optionally casts the voxels (e.g. ``np.float32`` for registration).
    """
    import SimpleITK as sitk

    arr = volume.voxels if dtype is None else volume.voxels.astype(dtype, copy=False)
    img = sitk.GetImageFromArray(np.ascontiguousarray(arr))
    img.SetSpacing(volume.spacing)
    img.SetOrigin(volume.origin)
    img.SetDirection(tuple(float(v) for v in volume.direction.ravel()))
    return img


def affine_from_sitk(image: Any) -> np.ndarray:
    """The 4x4 index->LPS affine of a 3D SimpleITK image."""
    if image.GetDimension() != 3:
        raise ValueError(f"expected a 3D image, got dimension {image.GetDimension()}")
    d = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
    aff = np.eye(4)
    aff[:3, :3] = d * np.array(image.GetSpacing(), dtype=np.float64)[None, :]
    aff[:3, 3] = image.GetOrigin()
    return aff


def volume_from_sitk(image: Any, like: Volume, **changes: Any) -> Volume:
    """A :class:`Volume` with the image's voxels and geometry and ``like``'s metadata
    (UIDs, patient, modality), overridden by ``changes``; the content hash is recomputed.
    """
    import SimpleITK as sitk

    arr = sitk.GetArrayFromImage(image)
    kw: dict[str, Any] = {"voxels": arr, "affine": affine_from_sitk(image), "content_sha256": ""}
    kw.update(changes)
    if "content_sha256" not in changes:
        kw["content_sha256"] = ""
    return dataclasses.replace(like, **kw)


def _common_parent(paths: Sequence[str]) -> str:
    if not paths:
        return ""
    parents = {str(Path(p).parent) for p in paths}
    return parents.pop() if len(parents) == 1 else str(Path(paths[0]).parent)
