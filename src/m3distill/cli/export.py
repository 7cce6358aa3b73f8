"""`m3distill export`: students as ONNX (float32) and dynamic int8, verified against the torch students
(m3distill.exporting)."""

from __future__ import annotations

import argparse

from m3distill.cli._common import add_config_argument, resolve_config, show_progress
from m3distill.cli._flags import add_config_flags

_DESCRIPTION = """\
Write onnx/model.onnx (float32) and onnx/model_qint8_quantized.onnx (dynamic int8 weights) into each student
folder, with onnx/m3distill_export.json recording how close each variant stays to the torch student. The float32
graph must reach --min-cosine on the verification texts (the run's test texts, else the bundled sample corpus),
or nothing is written. The new onnx/ folder replaces the old one only once it is complete and verified; an onnx/
folder m3distill did not write is never touched. An export of the same student with the same settings is
skipped; one made from another student or with other settings is redone with --force.
"""

_EPILOG = """\
examples:
  m3distill export runs/x/students                      # every finished student in the folder
  m3distill export runs/x/students/student-4L --data runs/x/dataset
  m3distill export --config run.yaml                    # RUN_DIR/students, verified on RUN_DIR/dataset
  m3distill export runs/x/students --no-quantization-per-channel --force

load an export:
  SentenceTransformer(path, backend="onnx", model_kwargs={"file_name": "onnx/model_qint8_quantized.onnx"})
  m3distill.onnx_encoder(path, "int8").encode(texts)    # onnxruntime only, no torch
"""


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "export", help="export students to ONNX and int8 for serving, verified against the torch students",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("paths", metavar="PATH", nargs="*",
                        help="student folders, or folders of students (default: RUN_DIR/students)")
    parser.add_argument("--data", "--dataset", metavar="DIR",
                        help="dataset whose test texts verify the exports (default: RUN_DIR/dataset when it is "
                        "complete, else the bundled sample corpus)")
    parser.add_argument("--force", action="store_true",
                        help="export again, also students whose export is current or was made with other settings")
    add_config_argument(parser)
    add_config_flags(parser, "run_dir", "export.variants", "export.opset", "export.min_cosine", "export.verify_texts",
                     "export.batch_size", "export.quantization")
    parser.set_defaults(handler=run_export)


def run_export(args: argparse.Namespace) -> int:
    """Handler: resolve the config, run the export stage through the API, print one line per student."""
    import m3distill

    result = m3distill.export(resolve_config(args), students=args.paths or None, dataset_dir=args.data,
                              force=args.force, show_progress=show_progress(args))
    for student in result.students:
        print(student.line())
    return 0
