"""Export: masks -> an exact-shape standard Hugging Face checkpoint, verified before success."""

from sheared.export.export import ExportVerificationError, export_model, export_run

__all__ = ["ExportVerificationError", "export_model", "export_run"]
