"""Storage SOP classes the node accepts, their kind, and the accepted transfer syntaxes.

pynetdicom's ``StoragePresentationContexts`` lacks the Encapsulated 3D classes (STL, OBJ,
MTL), so the node builds its own contexts from :data:`STORAGE_SOP_CLASSES`.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Mapping

from pydicom import uid as _uid

from dicom_node.records import InstanceKind

STORAGE_SOP_CLASSES: Mapping[str, tuple[str, InstanceKind]] = MappingProxyType({
    # 3D volumes
    "1.2.840.10008.5.1.4.1.1.2": ("CT Image Storage", "volume"),
    "1.2.840.10008.5.1.4.1.1.2.1": ("Enhanced CT Image Storage", "volume"),
    "1.2.840.10008.5.1.4.1.1.2.2": ("Legacy Converted Enhanced CT Image Storage", "volume"),
    "1.2.840.10008.5.1.4.1.1.4": ("MR Image Storage", "volume"),
    "1.2.840.10008.5.1.4.1.1.4.1": ("Enhanced MR Image Storage", "volume"),
    "1.2.840.10008.5.1.4.1.1.4.4": ("Legacy Converted Enhanced MR Image Storage", "volume"),
    "1.2.840.10008.5.1.4.1.1.13.1.2": ("X-Ray 3D Craniofacial Image Storage", "volume"),
    # surface scans
    "1.2.840.10008.5.1.4.1.1.104.3": ("Encapsulated STL Storage", "surface"),
    "1.2.840.10008.5.1.4.1.1.104.4": ("Encapsulated OBJ Storage", "surface"),
    "1.2.840.10008.5.1.4.1.1.104.5": ("Encapsulated MTL Storage", "surface"),
    # registration and segmentation
    "1.2.840.10008.5.1.4.1.1.66.1": ("Spatial Registration Storage", "registration"),
    "1.2.840.10008.5.1.4.1.1.66.3": ("Deformable Spatial Registration Storage", "registration"),
    "1.2.840.10008.5.1.4.1.1.66.4": ("Segmentation Storage", "segmentation"),
    "1.2.840.10008.5.1.4.1.1.66.5": ("Surface Segmentation Storage", "segmentation"),
    # 2D images a dental clinic also sends
    "1.2.840.10008.5.1.4.1.1.1": ("Computed Radiography Image Storage", "2d"),
    "1.2.840.10008.5.1.4.1.1.1.1": ("Digital X-Ray Image Storage - For Presentation", "2d"),
    "1.2.840.10008.5.1.4.1.1.1.1.1": ("Digital X-Ray Image Storage - For Processing", "2d"),
    "1.2.840.10008.5.1.4.1.1.1.3": ("Digital Intra-Oral X-Ray Image Storage - For Presentation", "2d"),
    "1.2.840.10008.5.1.4.1.1.1.3.1": ("Digital Intra-Oral X-Ray Image Storage - For Processing", "2d"),
    "1.2.840.10008.5.1.4.1.1.7": ("Secondary Capture Image Storage", "2d"),
    "1.2.840.10008.5.1.4.1.1.7.1": ("Multi-frame Single Bit Secondary Capture Image Storage", "2d"),
    "1.2.840.10008.5.1.4.1.1.7.2": ("Multi-frame Grayscale Byte Secondary Capture Image Storage", "2d"),
    "1.2.840.10008.5.1.4.1.1.7.3": ("Multi-frame Grayscale Word Secondary Capture Image Storage", "2d"),
    "1.2.840.10008.5.1.4.1.1.7.4": ("Multi-frame True Color Secondary Capture Image Storage", "2d"),
    "1.2.840.10008.5.1.4.1.1.77.1.4": ("VL Photographic Image Storage", "2d"),
    # other documents that travel with a study
    "1.2.840.10008.5.1.4.1.1.104.1": ("Encapsulated PDF Storage", "other"),
    "1.2.840.10008.5.1.4.1.1.88.22": ("Enhanced SR Storage", "other"),
    "1.2.840.10008.5.1.4.1.1.88.33": ("Comprehensive SR Storage", "other"),
    "1.2.840.10008.5.1.4.1.1.88.67": ("X-Ray Radiation Dose SR Storage", "other"),
})

VERIFICATION_SOP_CLASS = "1.2.840.10008.1.1"

# Transfer syntaxes accepted for every storage context, in order of preference.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    _uid.ExplicitVRLittleEndian,
    _uid.ImplicitVRLittleEndian,
    _uid.DeflatedExplicitVRLittleEndian,
    _uid.JPEGBaseline8Bit,
    _uid.JPEGExtended12Bit,
    _uid.JPEGLosslessSV1,
    _uid.JPEGLossless,
    _uid.JPEGLSLossless,
    _uid.JPEGLSNearLossless,
    _uid.JPEG2000Lossless,
    _uid.JPEG2000,
    _uid.RLELossless,
)

DEFLATED_TRANSFER_SYNTAX = _uid.DeflatedExplicitVRLittleEndian


def kind_of(sop_class_uid: str) -> InstanceKind:
    """The kind of an instance of ``sop_class_uid`` ("other" when not listed)."""
    entry = STORAGE_SOP_CLASSES.get(sop_class_uid)
    return entry[1] if entry else "other"


def is_accepted(sop_class_uid: str) -> bool:
    return sop_class_uid in STORAGE_SOP_CLASSES
