"""Errors raised by the fusion package. One base; a subclass per distinct remedy.
Messages name the input (series UID, SOP instance UID or file) and what to do."""

from __future__ import annotations


class FusionError(Exception):
    """Base of every error the fusion package raises on purpose."""


class InputError(FusionError):
    """An input cannot be read or is not what the operation needs (e.g. a 2D image
    offered as a volume, a mesh with no faces)."""


class GeometryError(InputError):
    """A series' geometry is inconsistent (missing slices, uneven spacing, mixed
    orientations or sizes, gantry tilt, duplicate positions)."""


class PatientMismatchError(FusionError):
    """The inputs belong to different patients; the fusion is refused."""


class RegistrationError(FusionError):
    """Registration could not run at all (as opposed to running and failing its gate)."""
