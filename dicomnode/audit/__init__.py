"""The audit trail: models, engine, and the append-only event log."""
