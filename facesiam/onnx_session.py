"""Opening an onnxruntime session with one-line errors: the one way for every ONNX file facesiam reads (an export
run by onnx_runtime.OnnxEmbedder, a teacher in faces/teachers.py). Imports nothing of facesiam but errors, so any
room can use it."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, Sequence

from .errors import InputError

METADATA_KEY = "facesiam"  # the ONNX metadata key facesiam/export.py writes its JSON under


def open_session(path: str | Path, *, threads: Optional[int] = None, providers: Optional[Sequence[str]] = None,
                 needs: str = "--onnx", missing_hint: str, unreadable_hint: str) -> Any:
    """An onnxruntime InferenceSession on ``path``.

    A missing onnxruntime is an InputError naming ``needs``; a missing file a FileNotFoundError ending in
    ``missing_hint``; an unreadable or non-ONNX file an InputError ending in ``unreadable_hint``. ``threads``: intra-op
    threads (one inter-op thread); None leaves onnxruntime's default.
    """
    try:
        import onnxruntime as ort
    except ImportError:
        raise InputError(f"{needs} needs onnxruntime: pip install onnxruntime (or onnxruntime-gpu)") from None
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such ONNX file; {missing_hint}")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    try:
        return ort.InferenceSession(str(path), options, providers=list(providers or ort.get_available_providers()))
    except Exception as err:  # onnxruntime raises its own exception types for unreadable models
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise InputError(f"{path}: not a readable ONNX model ({first}); {unreadable_hint}") from None
