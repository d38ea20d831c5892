"""`sheared export`: masks -> an exact-shape, verified standard Hugging Face checkpoint (and GGUF file)."""

from sheared.export.export import REPORT_FILE, ExportVerificationError, export_model, export_run
from sheared.export.gguf import GGUFVerificationError, add_gguf_to_export, export_gguf, gguf_path

__all__ = [
    "REPORT_FILE",
    "ExportVerificationError",
    "GGUFVerificationError",
    "add_gguf_to_export",
    "export_gguf",
    "export_model",
    "export_run",
    "gguf_path",
]
