"""DICOM UID validation (PS3.5 section 9.1): checked before any UID is used in a path."""

from __future__ import annotations

import re

from dicom_node.errors import InvalidUIDError

MAX_UID_LENGTH = 64
_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")


def is_valid_uid(value: object) -> bool:
    """True when ``value`` is a str UID: digits and dots, no empty component, no leading
    zero in a component (except "0" itself), at most 64 characters."""
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_UID_LENGTH
        and _UID_RE.fullmatch(value) is not None
    )


def check_uid(value: object, what: str = "UID") -> str:
    """Return ``value`` when it is a valid UID, else raise :class:`InvalidUIDError`.

    Parameters
    ----------
    value:
        The candidate UID (any type; only ``str`` can be valid).
    what:
        Name of the attribute, used in the message (e.g. ``"SeriesInstanceUID"``).

    Raises
    ------
    InvalidUIDError
        The value is not a str, is empty, longer than 64 characters or not of the form
        ``digits(.digits)*`` without leading zeros.
    """
    if is_valid_uid(value):
        return value  # type: ignore[return-value]
    shown = repr(value)[:80]
    if isinstance(value, str) and len(value) > MAX_UID_LENGTH:
        raise InvalidUIDError(
            f"{what} {shown}... is {len(value)} characters long (maximum {MAX_UID_LENGTH}); "
            "fix the sending device's UID generator"
        )
    raise InvalidUIDError(
        f"{what} {shown} is not a valid DICOM UID (digits and dots, no leading zeros); "
        "fix the sending device or the file"
    )
