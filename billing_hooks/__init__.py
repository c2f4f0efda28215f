"""dentfuse billing hook: D0395 rules, tamper-evident ledger, claim evidence exporters
(FHIR R4, X12 837D) and the delivery outbox. Sees fusion only through FusionResult."""
