"""DIMSE status codes used by the node, in one place (PS3.4 Annex B, PS3.7 Annex C).

The C-STORE handler answers only with members of :class:`Status`, so every failure has
a name in the log and the audit trail.
"""

from __future__ import annotations

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    # Storage warnings (PS3.4 B.2.3)
    WARNING_COERCION_OF_DATA_ELEMENTS = 0xB000
    WARNING_ELEMENTS_DISCARDED = 0xB006
    WARNING_DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xB007
    # General failures (PS3.7 C.4)
    PROCESSING_FAILURE = 0x0110
    SOP_CLASS_NOT_SUPPORTED = 0x0122
    NOT_AUTHORIZED = 0x0124
    # Storage failures (PS3.4 B.2.3): ranges, specific values chosen by the SCP
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_DISK_FULL = 0xA701
    DATASET_DOES_NOT_MATCH_SOP_CLASS = 0xA900
    SOP_INSTANCE_UID_MISMATCH = 0xA901  # dataset UID differs from the C-STORE command's
    CANNOT_UNDERSTAND = 0xC000
    CANNOT_UNDERSTAND_TRUNCATED = 0xC001  # dataset shorter than its declared lengths
    CANNOT_UNDERSTAND_MISSING_ATTRIBUTE = 0xC002  # SOP/study/series UID or PatientID absent
    CANNOT_UNDERSTAND_INVALID_UID = 0xC003  # a UID fails syntax or length checks

    @property
    def is_success(self) -> bool:
        return self == Status.SUCCESS

    @property
    def is_warning(self) -> bool:
        return 0xB000 <= self <= 0xBFFF

    @property
    def is_failure(self) -> bool:
        return not (self.is_success or self.is_warning)
