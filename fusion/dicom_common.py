"""Pieces shared by the DICOM writers (Spatial Registration in :mod:`fusion.reg_object`,
Encapsulated STL in :mod:`fusion.surface_outputs`, derived series in
:mod:`fusion.derived_series`): references to other instances, the Patient and General
Study attributes copied from a source header, file meta information, and the hash
recorded for every written file.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence, Union

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

#: Manufacturer of every instance dentfuse writes.
MANUFACTURER = "dentfuse"

#: Patient module (and common patient-level) attributes copied from a source header.
PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex",
    "OtherPatientIDsSequence", "PatientAge", "PatientSize", "PatientWeight",
)
#: General Study module attributes copied from a source header.
STUDY_KEYWORDS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "ReferringPhysicianName", "StudyID",
    "AccessionNumber", "StudyDescription",
)
#: Type 2 Patient and General Study attributes: present, empty when unknown.
TYPE2_EMPTY = ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyDate", "StudyTime",
               "ReferringPhysicianName", "StudyID", "AccessionNumber")


@dataclass(frozen=True)
class InstanceRef:
    """A reference to one stored instance of any SOP class."""

    sop_class_uid: str
    sop_instance_uid: str
    series_instance_uid: str
    study_instance_uid: str


RefLike = Union[InstanceRef, tuple[str, str, str, str]]


def as_instance_ref(ref: RefLike) -> InstanceRef:
    """An :class:`InstanceRef` from a record or a ``(sop_class_uid, sop_instance_uid,
    series_instance_uid, study_instance_uid)`` tuple.

    Raises
    ------
    ValueError
        The tuple does not have four values, or a UID is empty.
    """
    if isinstance(ref, InstanceRef):
        r = ref
    else:
        try:
            r = InstanceRef(*(str(v) for v in ref))
        except TypeError as exc:
            raise ValueError(f"instance reference {ref!r}: expected (sop_class_uid, sop_instance_uid, "
                             "series_instance_uid, study_instance_uid)") from exc
    if not all((r.sop_class_uid, r.sop_instance_uid, r.series_instance_uid, r.study_instance_uid)):
        raise ValueError(f"instance reference {r}: every UID is required")
    return r


def code_item(code: tuple[str, str, str]) -> Dataset:
    """A Code Sequence item from ``(code value, coding scheme designator, code meaning)``."""
    c = Dataset()
    c.CodeValue, c.CodingSchemeDesignator, c.CodeMeaning = code
    return c


def sop_reference(sop_class_uid: str, sop_instance_uid: str) -> Dataset:
    """A SOP Instance Reference Macro item (Referenced SOP Class and Instance UIDs)."""
    i = Dataset()
    i.ReferencedSOPClassUID = sop_class_uid
    i.ReferencedSOPInstanceUID = sop_instance_uid
    return i


def _referenced_series_items(series: Mapping[str, list[InstanceRef]]) -> DicomSequence:
    """Referenced Series Sequence items: per series UID, its Referenced Instance Sequence."""
    items = []
    for series_uid, insts in series.items():
        s = Dataset()
        s.SeriesInstanceUID = series_uid
        s.ReferencedInstanceSequence = DicomSequence([sop_reference(r.sop_class_uid, r.sop_instance_uid)
                                                      for r in insts])
        items.append(s)
    return DicomSequence(items)


def add_common_instance_reference(ds: Dataset, refs: Iterable[InstanceRef], own_study: str) -> None:
    """Set the Common Instance Reference module of ``ds`` listing ``refs`` (duplicates once).

    Instances of ``own_study`` (the study ``ds`` belongs to) go in the Referenced Series
    Sequence, the others in the Studies Containing Other Referenced Instances Sequence, one
    item per study; studies, series and instances keep the order of their first reference.
    """
    by_study: dict[str, dict[str, list[InstanceRef]]] = {}
    for r in refs:
        series = by_study.setdefault(r.study_instance_uid, {}).setdefault(r.series_instance_uid, [])
        if r not in series:
            series.append(r)
    if own_study in by_study:
        ds.ReferencedSeriesSequence = _referenced_series_items(by_study[own_study])
    others = []
    for study_uid, series_of_study in by_study.items():
        if study_uid == own_study:
            continue
        it = Dataset()
        it.StudyInstanceUID = study_uid
        it.ReferencedSeriesSequence = _referenced_series_items(series_of_study)
        others.append(it)
    if others:
        ds.StudiesContainingOtherReferencedInstancesSequence = DicomSequence(others)


def copy_patient_and_study(ds: Dataset, source: Dataset | None,
                           keywords: Sequence[str] = PATIENT_KEYWORDS + STUDY_KEYWORDS) -> None:
    """Copy the ``keywords`` present in ``source`` (if any) into ``ds``, then give every
    Type 2 Patient and General Study attribute still missing an empty value."""
    if source is not None:
        for kw in keywords:
            if kw in source:
                ds[kw] = source[kw]
    for kw in TYPE2_EMPTY:
        if kw not in ds:
            setattr(ds, kw, "")


def file_meta(sop_class_uid: str, sop_instance_uid: str) -> FileMetaDataset:
    """File meta information of an instance dentfuse writes (Explicit VR Little Endian)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class_uid
    meta.MediaStorageSOPInstanceUID = sop_instance_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "DENTFUSE"
    return meta


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file's bytes (read in 1 MiB blocks)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
