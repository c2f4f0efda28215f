"""Errors of the billing hook. One base class; a subclass per distinct remedy."""

from __future__ import annotations


class BillingError(Exception):
    """Base class of every error raised by ``billing_hooks``."""


class UnknownFusionError(BillingError):
    """No fusion with this id was recorded in the ledger."""

    def __init__(self, fusion_id: str) -> None:
        super().__init__(
            f"fusion {fusion_id!r} is not in the ledger; check the id with `dentfuse events` "
            "or record the fusion first"
        )
        self.fusion_id = fusion_id


class NotReadyError(BillingError):
    """The requested step does not fit the decision's current status."""


class LedgerError(BillingError):
    """The ledger cannot be opened or written (not a tampering finding: see ``verify``)."""


class ExportError(BillingError):
    """A claim export cannot be built (missing provider data, report, ...)."""
