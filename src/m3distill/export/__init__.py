"""Export for serving: each student as ONNX (float32) and dynamic int8, verified against the torch student.

    result = m3distill.export_student("runs/x/students/student-4L", config.export)   # -> ExportResult
    m3distill.onnx_encoder("runs/x/students/student-4L", "int8").encode(texts)      # onnxruntime only

:func:`export_student` writes ``onnx/`` into the student folder (see :mod:`m3distill.export.student` for the files),
:mod:`m3distill.export.onnx` does the torch side (trace, quantise, verify) and :mod:`m3distill.onnx_serving` loads the
result without torch. Importing this package does not import torch.
"""

from m3distill.export.student import (
    ExportResult,
    VariantResult,
    check_onnx_dir_is_ours,
    export_fingerprint,
    export_student,
    student_export_status,
    verification_texts,
)

__all__ = [
    "ExportResult",
    "VariantResult",
    "check_onnx_dir_is_ours",
    "export_fingerprint",
    "export_student",
    "student_export_status",
    "verification_texts",
]
