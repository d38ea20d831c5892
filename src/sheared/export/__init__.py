"""`sheared export`: masks -> an exact-shape, verified standard Hugging Face checkpoint."""

from sheared.export.export import REPORT_FILE, ExportVerificationError, export_model, export_run

__all__ = ["REPORT_FILE", "ExportVerificationError", "export_model", "export_run"]
