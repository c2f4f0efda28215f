"""DICOM writers for the synthetic set: CT/MR image series, a DX panoramic, Encapsulated STL.

Everything is written Explicit VR Little Endian with a proper File Meta header; UIDs come
from the caller (deterministic for the seed).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
DX_PRESENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"
ENCAPSULATED_STL_STORAGE = "1.2.840.10008.5.1.4.1.1.104.3"

IMPLEMENTATION_VERSION = "DENTFUSE_SYNTH1"


@dataclass(frozen=True)
class Patient:
    name: str
    patient_id: str
    issuer: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class Grid:
    """Image grid in an acquisition frame: index (i, j, k) -> origin + direction @ (spacing * ijk)."""

    size: tuple[int, int, int]  # (nx, ny, nz) = (Columns, Rows, slices)
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, ...]  # 3x3 row-major; columns are the i, j, k axis directions

    @property
    def matrix(self) -> np.ndarray:
        return np.array(self.direction, dtype=float).reshape(3, 3)

    def index_to_frame(self) -> np.ndarray:
        m = np.eye(4)
        m[:3, :3] = self.matrix * np.array(self.spacing)[None, :]
        m[:3, 3] = self.origin
        return m

    def to_dict(self) -> dict:
        return {"size": list(self.size), "spacing": [round(s, 6) for s in self.spacing],
                "origin": [round(o, 6) for o in self.origin],
                "direction": [round(d, 9) for d in self.direction],
                "affine_index_to_frame": np.round(self.index_to_frame(), 9).tolist()}


def _file_meta(sop_class: str, sop_instance: str) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = IMPLEMENTATION_VERSION
    return meta


def _patient_study(ds: Dataset, patient: Patient, study: dict) -> None:
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.IssuerOfPatientID = patient.issuer
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    ds.StudyInstanceUID = study["uid"]
    ds.StudyDate = study["date"]
    ds.StudyTime = study["time"]
    ds.StudyID = study["id"]
    ds.AccessionNumber = study["accession"]
    ds.ReferringPhysicianName = "REFERRING^DENTIST"
    ds.StudyDescription = study["description"]


def _equipment(ds: Dataset, equipment: dict) -> None:
    ds.Manufacturer = equipment["manufacturer"]
    ds.ManufacturerModelName = equipment["model"]
    ds.DeviceSerialNumber = equipment["serial"]
    ds.SoftwareVersions = equipment["software"]
    ds.InstitutionName = "Synthetic Dental Clinic"
    ds.StationName = equipment.get("station", "SYNTH01")


def _new_instance(sop_class: str, sop_uid: str, modality: str, *, patient: Patient, study: dict,
                  series: dict, equipment: dict) -> Dataset:
    """A dataset with the file meta, patient, study, equipment, SOP common and series
    attributes every instance written here shares."""
    ds = Dataset()
    ds.file_meta = _file_meta(sop_class, sop_uid)
    _patient_study(ds, patient, study)
    _equipment(ds, equipment)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = series["date"]
    ds.InstanceCreationTime = series["time"]
    ds.Modality = modality
    ds.SeriesInstanceUID = series["uid"]
    ds.SeriesNumber = series["number"]
    ds.SeriesDescription = series["description"]
    return ds


def write_image_series(folder: Path, stored: np.ndarray, grid: Grid, *, sop_class: str,
                       modality: str, patient: Patient, study: dict, series: dict,
                       equipment: dict, sop_uids: list[str], frame_of_reference_uid: str,
                       rescale: tuple[float, float, str] | None, window: tuple[float, float],
                       extra: dict, skip_slices: tuple[int, ...] = ()) -> list[str]:
    """Write one file per slice; stored is (nz, ny, nx) uint16. Returns the file names written."""
    folder.mkdir(parents=True, exist_ok=True)
    nz, ny, nx = stored.shape
    assert (nx, ny, nz) == tuple(grid.size), (stored.shape, grid.size)
    d = grid.matrix
    row_dir, col_dir, normal = d[:, 0], d[:, 1], d[:, 2]
    names = []
    for k in range(nz):
        if k in skip_slices:
            continue
        pos = np.array(grid.origin) + normal * grid.spacing[2] * k
        ds = _new_instance(sop_class, sop_uids[k], modality, patient=patient, study=study, series=series,
                           equipment=equipment)
        ds.ImageType = extra.get("ImageType", ["ORIGINAL", "PRIMARY", "AXIAL"])
        ds.SeriesDate = series["date"]
        ds.SeriesTime = series["time"]
        ds.AcquisitionDate = series["date"]
        ds.AcquisitionTime = series["time"]
        ds.ContentDate = series["date"]
        ds.ContentTime = series["time"]
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ds.BodyPartExamined = "JAW"
        ds.PatientPosition = extra.get("PatientPosition", "HFS")
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.ImagePositionPatient = [f"{v:.6f}" for v in pos]
        ds.ImageOrientationPatient = [f"{v:.9f}" for v in (*row_dir, *col_dir)]
        ds.SliceLocation = f"{float(pos @ normal):.6f}"
        ds.SliceThickness = f"{grid.spacing[2]:.6g}"
        ds.PixelSpacing = [f"{grid.spacing[1]:.6g}", f"{grid.spacing[0]:.6g}"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ny
        ds.Columns = nx
        ds.BitsAllocated = 16
        ds.BitsStored = 16
        ds.HighBit = 15
        ds.PixelRepresentation = 0
        if rescale is not None:
            ds.RescaleIntercept = f"{rescale[0]:g}"
            ds.RescaleSlope = f"{rescale[1]:g}"
            ds.RescaleType = rescale[2]
        ds.WindowCenter = f"{window[0]:g}"
        ds.WindowWidth = f"{window[1]:g}"
        ds.LossyImageCompression = "00"
        for key, value in extra.items():
            if key not in ("ImageType", "PatientPosition"):
                setattr(ds, key, value)
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<u2").tobytes()
        name = f"{modality}{k + 1:04d}.dcm"
        ds.save_as(folder / name, enforce_file_format=True)
        names.append(name)
    return names


def write_dx(path: Path, stored: np.ndarray, pixel_mm: float, *, patient: Patient, study: dict,
             series: dict, equipment: dict, sop_uid: str) -> None:
    """A 2D panoramic radiograph as a Digital X-Ray (For Presentation) instance."""
    ds = _new_instance(DX_PRESENTATION_STORAGE, sop_uid, "DX", patient=patient, study=study, series=series,
                       equipment=equipment)
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    ds.SeriesDate = series["date"]
    ds.SeriesTime = series["time"]
    ds.AcquisitionDate = series["date"]
    ds.AcquisitionTime = series["time"]
    ds.ContentDate = series["date"]
    ds.ContentTime = series["time"]
    ds.InstanceNumber = 1
    ds.BodyPartExamined = "JAW"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.PatientOrientation = ["L", "F"]
    ds.ImageLaterality = "B"
    ds.ViewPosition = ""
    ds.KVP = "70"
    ds.ExposureTime = "14000"
    ds.XRayTubeCurrent = "8"
    ds.DetectorType = "SCINTILLATOR"
    ds.PositionerType = "PANORAMIC"
    ds.AnatomicRegionSequence = Sequence([_code("661005", "SCT", "Jaw region")])
    ds.AcquisitionContextSequence = Sequence([])
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1
    ds.PixelSpacingCalibrationDescription = "nominal magnification at the focal trough"
    ds.ImagerPixelSpacing = [f"{pixel_mm:g}", f"{pixel_mm:g}"]
    ds.PixelSpacing = [f"{pixel_mm:g}", f"{pixel_mm:g}"]
    ds.PixelSpacingCalibrationType = "GEOMETRY"
    ds.BurnedInAnnotation = "NO"
    ds.LossyImageCompression = "00"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = stored.shape
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    ds.WindowCenter = "2048"
    ds.WindowWidth = "4096"
    ds.PresentationLUTShape = "IDENTITY"
    ds.PixelData = np.ascontiguousarray(stored).astype("<u2").tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def write_encapsulated_stl(path: Path, stl_bytes: bytes, *, patient: Patient, study: dict,
                           series: dict, equipment: dict, sop_uid: str,
                           frame_of_reference_uid: str, title: str) -> None:
    """An Encapsulated STL instance (the module list stl2dcm writes, with real values)."""
    ds = _new_instance(ENCAPSULATED_STL_STORAGE, sop_uid, "M3D", patient=patient, study=study, series=series,
                       equipment=equipment)
    ds.InstanceNumber = 1
    ds.ContentDate = series["date"]
    ds.ContentTime = series["time"]
    ds.AcquisitionDateTime = series["date"] + series["time"]
    ds.FrameOfReferenceUID = frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.BurnedInAnnotation = "NO"
    ds.DocumentTitle = title
    ds.ConceptNameCodeSequence = Sequence([])
    ds.MeasurementUnitsCodeSequence = Sequence([_code("mm", "UCUM", "millimeter")])
    ds.MIMETypeOfEncapsulatedDocument = "model/stl"
    data = stl_bytes if len(stl_bytes) % 2 == 0 else stl_bytes + b"\x00"
    ds.EncapsulatedDocument = data
    ds.EncapsulatedDocumentLength = len(stl_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
