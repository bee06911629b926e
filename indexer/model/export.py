"""Export a build's embedding computation to ONNX, checked against torch on the build's images."""

from __future__ import annotations

import copy
import hashlib
import io
import json
import logging
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from indexer.cache_dir import cache_dir
from indexer.model.forward import class_names, embed_forward
from indexer.model.portable import (
    EXPORTER,
    MAX_MODEL_BYTES,
    MODEL_FILE,
    OPSET,
    OUTPUTS,
    Exported,
    PortableEmbedder,
)
from indexer.model.runtime_choice import BOUND, LABELS_TOLERANCE
from indexer.safeio import read_bounded, write_bytes_atomic

if TYPE_CHECKING:  # export_portable is the torch runtime's (it imports this module)
    from indexer.model.timm_model import Embedder

log = logging.getLogger(__name__)
FIDELITY_MIN = BOUND["fp32"]  # per-image cosine to torch fp32 below which it is not stored
CHECK_IMAGES = 64  # the build's first images the export is checked on
MIN_CHECK = 8  # never fewer images than this (generated scenes make up the rest)
CACHE = "exports"


class _Portable(torch.nn.Module):
    """uint8 NHWC in; the recipe's embedding (and class probabilities) out, in fp32."""

    def __init__(self, embedder: Embedder) -> None:
        super().__init__()
        self.model = copy.deepcopy(embedder.model).float().cpu().eval()
        self.mean: torch.Tensor
        self.std: torch.Tensor
        self.register_buffer("mean", embedder._mean.detach().float().cpu())
        self.register_buffer("std", embedder._std.detach().float().cpu())
        self.pooling, self.stage = embedder.pooling, embedder.stage
        self.normalize, self.labels = embedder.normalize, embedder.labels > 0
        self.eval()  # BatchNorm and dropout as at inference, in the export and the check

    def forward(self, images: torch.Tensor) -> Any:
        x = (images.permute(0, 3, 1, 2).float() - self.mean) / self.std
        out, logits = embed_forward(self.model, x, self.pooling, self.stage, self.labels)
        out = out.float().flatten(1)
        if self.normalize:
            out = torch.nn.functional.normalize(out, dim=1)
        if logits is not None:
            return out, logits.float().softmax(-1)
        return out


Reference = tuple[np.ndarray, bool, np.ndarray, np.ndarray | None]  # reference_outputs()


def export_portable(
    embedder: Embedder,
    sample: np.ndarray | None,
    version: Path,
    known: Reference | None = None,
) -> Exported:
    """Export the embedder's computation into version/model.onnx if it reproduces torch fp32
    on the sample images (cosine >= FIDELITY_MIN each); else store nothing and say why.
    `known`: reference_outputs(embedder, sample), when the caller has them (not made twice)."""
    started = time.perf_counter()
    try:
        wrapper = _Portable(embedder)
        images, own, want, probs = known or reference_outputs(embedder, sample, wrapper)
        model, record = _cached_or_exported(wrapper, embedder, images, (want, probs))
        record["fidelity"]["images_from"] = "the build" if own else "generated scenes"
        record["export_seconds"] = round(time.perf_counter() - started, 3)
    except FidelityError as exc:
        return Exported(None, str(exc))
    except Exception as exc:  # an exporter's failure costs only the portable model
        log.debug("export failed", exc_info=True)
        gist = next((ln.strip() for ln in str(exc).splitlines() if ln.strip()), "")
        return Exported(None, f"export failed: {type(exc).__name__}: {gist}"[:300])
    write_bytes_atomic(version / MODEL_FILE, model)
    return Exported(record)


def check_images(
    embedder: Embedder | PortableEmbedder, sample: np.ndarray | None
) -> tuple[np.ndarray, bool]:
    """The images an export is checked on (the build's first ones, made up to MIN_CHECK with
    generated scenes), and whether any are the build's own."""
    own = sample is not None and len(sample) > 0
    images = sample if sample is not None and own else fallback_images(embedder)
    if len(images) < MIN_CHECK:  # a first batch of few good images: add generated scenes
        images = np.concatenate([images, fallback_images(embedder, MIN_CHECK - len(images))])
    return images[:CHECK_IMAGES], own


class FidelityError(Exception):
    """The exported model does not reproduce torch closely enough to be used."""


def check_fidelity(
    model: bytes,
    embedder: Embedder,
    images: np.ndarray,
    want: tuple[np.ndarray, np.ndarray | None],
) -> dict[str, Any]:
    """The manifest record, once onnxruntime's vectors match torch fp32's (`want`, its
    embeddings and class probabilities) on every image."""
    want_vectors, want_probs = want
    names = class_names(embedder.recipe.get("label_set")) if embedder.labels else None
    record = _record(model, embedder, names)
    portable = PortableEmbedder(model, embedder.recipe, record)
    record["fidelity"] = measure_fidelity(portable, images, want_vectors, want_probs)
    return record


def reference(wrapper: _Portable, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """torch fp32's embeddings (and class probabilities) of the images: what an export must
    reproduce."""
    wrapper.eval()  # the exporter restores the mode it found; never compare in training mode
    with torch.inference_mode():
        expected = wrapper(torch.from_numpy(np.ascontiguousarray(images)))
    if isinstance(expected, tuple):
        return expected[0].numpy(), expected[1].numpy()
    return expected.numpy(), None


def reference_outputs(
    embedder: Embedder, sample: np.ndarray | None, wrapper: _Portable | None = None
) -> Reference:
    """The check images for this sample, whether they are the build's, and torch fp32's
    outputs on them (what an export, new or cached, is checked against)."""
    images, own = check_images(embedder, sample)
    vectors, probs = reference(wrapper or _Portable(embedder), images)
    return images, own, vectors, probs


def measure_fidelity(
    portable: PortableEmbedder,
    images: np.ndarray,
    want_vectors: np.ndarray,
    want_probs: np.ndarray | None,
    precision: str = "fp32",
) -> dict[str, Any]:
    """The fidelity record of the portable model against torch fp32's outputs on the images;
    FidelityError when one image's cosine is below its precision's bound or a probability is
    off."""
    got, rows = portable.embed_with_labels(images)
    return fidelity(want_vectors, want_probs, got, rows, precision)


def fidelity(
    want: np.ndarray,
    probs: np.ndarray | None,
    got: np.ndarray,
    rows: list[dict[str, Any]],
    precision: str = "fp32",
    bound: float | None = None,
    reference: str = "torch fp32",
) -> dict[str, Any]:
    """The fidelity record of a runtime's outputs (`got`, its label `rows`) against the
    reference's (torch fp32's unless said: `want`, `probs`): FidelityError when one image's
    cosine is below the bound (the precision's unless given; fp32: FIDELITY_MIN) or a class
    probability is off by more than the precision allows."""
    if bound is None:
        bound = FIDELITY_MIN if precision == "fp32" else BOUND[precision]
    found = cosines(want, got)
    if not np.all(found >= bound):
        raise FidelityError(
            f"the exported model reproduces {reference} only to cosine {found.min():.6f} "
            f"(needs {bound:.6f}) on the build's images"
        )
    if probs is not None and rows:
        have = np.array([r["label_prob"] for r in rows])
        ref = np.take_along_axis(probs, np.array([r["label_index"] for r in rows]), 1)
        if np.abs(have - ref).max(initial=0.0) > LABELS_TOLERANCE[precision]:
            raise FidelityError(f"the class probabilities differ from {reference}'s")
    return {
        "images": len(found),
        "min_cosine": float(found.min()),
        "mean_cosine": float(found.mean()),
        "reference": reference,
        "bound": bound,
    }


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    norms = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    dots = (a64 * b64).sum(axis=1)
    return np.where(norms > 0, dots / np.maximum(norms, 1e-300), 1.0)


def _record(model: bytes, embedder: Embedder, names: list[str] | None) -> dict[str, Any]:
    import timm

    _, height, width = embedder.data_config.input_size
    record: dict[str, Any] = {
        "path": MODEL_FILE,
        "sha256": hashlib.sha256(model).hexdigest(),
        "bytes": len(model),
        "format": "onnx",
        "opset": OPSET,
        "exporter": EXPORTER,
        "torch_version": torch.__version__,
        "timm_version": timm.__version__,
        "input": {"name": "images", "dtype": "uint8", "shape": ["batch", height, width, 3]},
        "outputs": list(OUTPUTS[: 2 if embedder.labels else 1]),
    }
    if names is not None:
        record["label_names"] = names
    return record


def _export(wrapper: _Portable, images: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    outputs = list(OUTPUTS[: 2 if wrapper.labels else 1])
    example = torch.from_numpy(np.ascontiguousarray(images[:2]))
    with warnings.catch_warnings(), torch.inference_mode(False), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python control flow
        torch.onnx.export(
            wrapper,
            (example,),
            buffer,  # type: ignore[arg-type]  # the legacy exporter writes to file objects
            dynamo=False,
            opset_version=OPSET,
            input_names=["images"],
            output_names=outputs,
            dynamic_axes={name: {0: "batch"} for name in ["images", *outputs]},
        )
    return buffer.getvalue()


def _cached_or_exported(
    wrapper: _Portable,
    embedder: Embedder,
    images: np.ndarray,
    want: tuple[np.ndarray, np.ndarray | None],
) -> tuple[bytes, dict[str, Any]]:
    """An earlier export of exactly this computation (same weights, versions, recipe), else a
    new one, remembered; with its record. Either must pass the fidelity check on these
    images: a stale or corrupt cache entry never decides a vector (it is exported again)."""
    path = cache_dir() / CACHE / f"{cache_key(embedder)}.onnx"
    try:
        cached = read_bounded(path, MAX_MODEL_BYTES, "the largest model read")  # no FIFO
        return cached, check_fidelity(cached, embedder, images, want)
    except FileNotFoundError:
        pass
    except Exception as exc:  # unreadable, corrupt or not this computation: export again
        log.warning("the cached export %s is not usable (%s); exporting again", path, exc)
    model = _export(wrapper, images)
    record = check_fidelity(model, embedder, images, want)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(path, model, sync=False)
    except OSError as exc:
        log.info("cannot remember the export in %s: %s", path, exc)
    return model, record


def cache_key(embedder: Embedder) -> str:
    """What makes an export the same: the weights' fingerprint, the recipe, the versions."""
    r = embedder.recipe
    identity = {k: r.get(k) for k in ("name", "state_sha256", "timm_version", "torch_version",
                                      "forward", "pooling", "feature_stage", "labels",
                                      "normalize", "data_config", "embedding_dim")}  # fmt: skip
    identity.update(opset=OPSET, exporter=EXPORTER)
    text = json.dumps(identity, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def fallback_images(embedder: Embedder | PortableEmbedder, count: int = 16) -> np.ndarray:
    """Generated scenes at the model's input size, when the build has no pixels of its own
    at hand (the Ray engine, a repair of the model file)."""
    from indexer.synthetic import scene

    _, height, width = embedder.data_config.input_size
    return np.stack([np.asarray(scene(seed, (width, height))) for seed in range(count)])
