"""Export for serving: each student as ONNX (float32) and dynamic int8, verified against the torch student.

    result = m3distill.export_student("runs/x/students/student-4L", config.export)   # -> ExportResult
    m3distill.onnx_encoder("runs/x/students/student-4L", "int8").encode(texts)      # onnxruntime only

:func:`write_export` writes ``onnx/`` into the student folder (see :mod:`m3distill.exporting.student` for the
files), :mod:`m3distill.exporting.onnx` does the torch side (trace, quantise, verify) and
:mod:`m3distill.onnx_serving` loads the result without torch. Whether an export is current is the export stage's
question (:mod:`m3distill.stages.export`); ``m3distill.export()`` and ``m3distill.export_student`` ask it. The
package is named ``exporting`` (as ``training`` and ``evaluation``) so that ``m3distill.export``, the API function,
is never shadowed by it. Importing this package does not import torch.
"""

from m3distill.exporting.student import (
    EXPORT_RECORD_FORMAT,
    ExportResult,
    VariantResult,
    check_onnx_dir_is_ours,
    read_export_result,
    verification_texts,
    write_export,
)

__all__ = [
    "EXPORT_RECORD_FORMAT",
    "ExportResult",
    "VariantResult",
    "check_onnx_dir_is_ours",
    "read_export_result",
    "verification_texts",
    "write_export",
]
