"""dentfuse billing hook: D0395 rules, tamper-evident ledger, claim evidence exporters
(FHIR R4, X12 837D) and the delivery outbox. Sees fusion only through FusionResult.

Modules: ``rules`` (the D0395 rules), ``decision`` (BillingDecision), ``companions``
(suggested capture codes), ``ledger`` (append-only hash chain), ``fhir`` and ``x12``
(claim exports), ``outbox`` (at-least-once delivery), ``service`` (:class:`BillingHook`,
the one object the pipeline uses), ``errors`` (:class:`BillingError` and subclasses).
"""
