"""The exported model outside torch: a collection's ONNX file run by onnxruntime or OpenVINO."""

from __future__ import annotations

import hashlib
import os
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from indexer.config import DataConfig
from indexer.errors import CollectionError, InputError

MODEL_FILE = "model.onnx"
BACKENDS = ("onnxruntime", "openvino")
INPUT = "images"  # uint8 [N, H, W, 3], the DataLoader's batches as they are
OUTPUTS = ("embedding", "probs")  # probs only when the recipe stores --labels
MAX_MODEL_BYTES = 4 << 30
OPSET = 18
EXPORTER = "torch.onnx.export(dynamo=False)"
# the precisions each backend computes in, as its own setting names them (OpenVINO's bf16
# runs natively on AVX512-BF16/AMX; decide.candidates offers it only there)
PRECISION_HINT = {"onnxruntime": {"fp32": ""}, "openvino": {"fp32": "f32", "bf16": "bf16"}}


@dataclass(frozen=True)
class Exported:
    """A version's portable model (its manifest record) or why none was stored (reason)."""

    record: dict[str, Any] | None
    reason: str | None = None


class PortableEmbedder:
    """The collection's own exported model: uint8 image batches in, float32 embeddings out,
    computed exactly as the recipe says (normalisation, trunk, pooling, labels, L2 norm)."""

    def __init__(self, model: bytes, recipe: dict[str, Any], record: dict[str, Any],
                 backend: str = "onnxruntime", source: Path | None = None,
                 precision: str = "fp32") -> None:  # fmt: skip
        if backend not in BACKENDS:
            raise InputError(f"unknown portable runtime {backend!r}: use {' or '.join(BACKENDS)}")
        if precision not in PRECISION_HINT[backend]:
            raise InputError(f"{backend} does not compute in {precision}: use --precision fp32")
        self.name = backend
        self.on_cuda = False
        self.recipe = {**recipe, "precision": precision}  # what this runtime computes in
        self.data_config = DataConfig.from_dict(recipe["data_config"])
        self.normalize = bool(recipe["normalize"])
        self.labels = int(recipe.get("labels") or 0)
        self._names: list[str] | None = record.get("label_names")
        self._record, self._source, self._bytes = record, source, model
        hint = PRECISION_HINT[backend][precision]
        self._run = _onnxruntime(model) if backend == "onnxruntime" else _openvino(model, hint)

    @property
    def dim(self) -> int:
        return int(self.recipe["embedding_dim"])

    def embed(self, images: Any) -> np.ndarray:
        """uint8 [N,H,W,3] (a numpy array, or a CPU tensor) -> float32 [N,dim]."""
        return self.embed_with_labels(images, labels=False)[0]

    def embed_with_labels(
        self, images: Any, labels: bool = True
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        batch = np.ascontiguousarray(np.asarray(images), dtype=np.uint8)
        outputs = self._run(batch)
        vectors = np.asarray(outputs[0], dtype=np.float32).reshape(len(batch), -1)
        rows = self._top(np.asarray(outputs[1])) if labels and self.labels else []
        return vectors, rows

    def portable_model(self, sample: np.ndarray | None, folder: Path) -> Exported:
        """The model this runtime runs, stored in folder as it is (a hard link to its file)."""
        from indexer.safeio import write_bytes_atomic

        if self._source is not None:
            os.link(self._source, folder / MODEL_FILE)
        else:
            write_bytes_atomic(folder / MODEL_FILE, self._bytes)
        return Exported({**self._record, "path": MODEL_FILE})

    def _top(self, probs: np.ndarray) -> list[dict[str, Any]]:
        if self._names is not None and len(self._names) != probs.shape[1]:
            raise CollectionError(
                f"the portable model's record names {len(self._names)} classes but the model "
                f"has {probs.shape[1]}: the manifest was altered; run `indexer verify --repair`"
            )
        order = np.argsort(-probs, axis=1, kind="stable")[:, : self.labels]
        rows = []
        for p, i in zip(np.take_along_axis(probs, order, 1).tolist(), order.tolist(), strict=True):
            names = [self._names[n] for n in i] if self._names else None
            rows.append({"label_index": i, "label_name": names, "label_prob": p})
        return rows


def import_runtime(module: str, missing: str) -> Any:
    """The runtime's package, or `missing` as an InputError. A signal's exception raised
    during its native initialisation (SIGTERM's Interrupted, ^C), which pybind11 turns into
    an ImportError, is raised as itself: the run was stopped, the package is there."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        cause: BaseException | None = exc
        seen: set[int] = set()
        while cause is not None and id(cause) not in seen:
            if isinstance(cause, KeyboardInterrupt):
                raise cause from None
            seen.add(id(cause))
            cause = cause.__cause__ or cause.__context__
        raise InputError(missing) from exc


def _onnxruntime(model: bytes) -> Any:
    ort = import_runtime("onnxruntime", "the onnxruntime package is not installed: pip "
                         "install onnxruntime, or use --runtime torch")  # fmt: skip
    options = ort.SessionOptions()
    options.log_severity_level = 3  # warnings about unused initialisers are not the user's
    # Idle intra-op threads sleep instead of spinning: they would take the cores that decode
    # images (the DataLoader's workers, the service's uploads) for nothing. bench/serve.py:
    # 113 -> 150 uploads/s at concurrency 16 on 2 cores.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    try:
        session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
        raise CollectionError(f"onnxruntime cannot load the portable model: {_gist(exc)}") from exc
    names = [o.name for o in session.get_outputs()]
    return lambda batch: session.run(names, {INPUT: batch})


def _openvino(model: bytes, hint: str) -> Any:
    # `import openvino` loads its model converter, whose telemetry sends an event to Google
    # Analytics and rewrites ~/intel/stats at every import unless the user opted out: a
    # batch job's data tool sends nothing and writes only its collection. Blocking the
    # telemetry package makes OpenVINO use its own no-op stub (and saves ~0.1 s a start);
    # a process that loaded it already keeps it.
    sys.modules.setdefault("openvino_telemetry", None)  # type: ignore[arg-type]
    ov = import_runtime("openvino", "the openvino package is not installed: pip install "
                        "openvino, or use --runtime onnx")  # fmt: skip
    try:
        core = ov.Core()
        compiled = core.compile_model(core.read_model(model, b""), "CPU",
                                      {"INFERENCE_PRECISION_HINT": hint})  # fmt: skip
    except Exception as exc:
        raise CollectionError(f"OpenVINO cannot load the portable model: {_gist(exc)}") from exc
    local = threading.local()  # an infer request runs one call at a time: one per thread
    # (the service embeds uploads from several threads at once)

    def run(batch: np.ndarray) -> list[np.ndarray]:
        request = getattr(local, "request", None)
        if request is None:
            request = local.request = compiled.create_infer_request()
        result = request.infer({INPUT: batch})
        return [np.array(result[out]) for out in compiled.outputs]

    return run


def _gist(exc: BaseException) -> str:
    return next(
        (line.strip() for line in str(exc).splitlines() if line.strip()), type(exc).__name__
    )


def read_model(version: Path, record: dict[str, Any]) -> bytes:
    """The model file's bytes, refused unless they are the ones the manifest records (a
    file larger than its recorded size is refused before it is read)."""
    path = version / str(record["path"])
    from indexer.safeio import FileRefused, read_bounded

    try:
        if path.is_symlink():  # ours is a file (hard-linked between versions), never a link
            raise FileRefused(f"{path} is a symbolic link")
        data = read_bounded(path, int(record.get("bytes") or MAX_MODEL_BYTES),
                            "the model's recorded size")  # fmt: skip
    except (OSError, FileRefused) as exc:
        raise CollectionError(
            f"the portable model {path} cannot be read ({exc}): run `indexer verify --repair "
            f"{version.parent.parent}`, or query with --runtime torch"
        ) from exc
    if hashlib.sha256(data).hexdigest() != record["sha256"]:
        raise CollectionError(
            f"the portable model {path} differs from the one its manifest records (sha256): "
            f"run `indexer verify --repair {version.parent.parent}`, or query with --runtime torch"
        )
    return data


def load_portable(
    version: Path, manifest: dict[str, Any], backend: str, precision: str = "fp32"
) -> PortableEmbedder:
    """The collection's portable model on a CPU runtime at a precision, its bytes checked
    first."""
    record = manifest["portable_model"]
    data = read_model(version, record)
    source = version / str(record["path"])
    return PortableEmbedder(data, manifest["model"], record, backend, source, precision)
