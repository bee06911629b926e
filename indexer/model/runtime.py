"""The runtime seam: what embeds images (torch and timm, or the portable model), and which runs."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from indexer.config import RUNTIMES, DataConfig
from indexer.errors import CollectionError, IndexerError, InputError
from indexer.model.portable import MODEL_FILE, Exported
from indexer.model.runtime_choice import PORTABLE, Choice, Machine

log = logging.getLogger(__name__)
BACKEND_OF = {"onnx": "onnxruntime", "openvino": "openvino"}  # --runtime -> portable backend
RECIPE_FIELDS = ("name", "state_sha256", "forward", "pooling", "feature_stage", "labels",
                 "normalize", "data_config", "embedding_dim")  # fmt: skip


class Runtime(Protocol):
    """What embeds uint8 image batches as a recipe says; torch (model.Embedder) and the
    portable model (portable.PortableEmbedder) both provide it."""

    name: str  # recorded in each run: torch, onnxruntime or openvino
    recipe: dict[str, Any]
    data_config: DataConfig
    normalize: bool
    labels: int
    on_cuda: bool  # torch on a CUDA device (a portable runtime is on the CPU)

    @property
    def dim(self) -> int: ...

    def embed(self, images: Any) -> np.ndarray: ...

    def embed_with_labels(
        self, images: Any, labels: bool = True
    ) -> tuple[np.ndarray, list[dict[str, Any]]]: ...

    def portable_model(self, sample: np.ndarray | None, folder: Path) -> Exported:
        """Store this computation as folder/model.onnx (checked on the sample images)."""
        ...


class RecordedRecipe:
    """The published version's recipe for a run that embeds nothing (every file it reads holds
    bytes already stored: touched, renamed or copied): no model or runtime is loaded."""

    name = "none"
    on_cuda = False

    def __init__(self, manifest: dict[str, Any]) -> None:
        self.recipe = manifest["model"]
        self.data_config = DataConfig.from_dict(self.recipe["data_config"])
        self.normalize = bool(self.recipe["normalize"])
        self.labels = int(self.recipe.get("labels") or 0)
        self._reason = absent_reason(manifest)
        self._damaged = "portable_model" in manifest

    @property
    def dim(self) -> int:
        return int(self.recipe["embedding_dim"])

    def embed(self, images: Any) -> np.ndarray:
        raise RuntimeError("a run of stored vectors embeds nothing")

    def embed_with_labels(
        self, images: Any, labels: bool = True
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        raise RuntimeError("a run of stored vectors embeds nothing")

    def portable_model(self, sample: np.ndarray | None, folder: Path) -> Exported:
        """Nothing to carry: a damaged model is exported again from the recipe (with torch)."""
        if self._damaged:
            return export_from_recipe(self.recipe, folder)
        return Exported(None, self._reason)


def choose_runtime(
    asked: str, cuda: bool, unusable: str | None, built: str = "onnxruntime",
    installed: frozenset[str] = frozenset(PORTABLE),
) -> str:  # fmt: skip
    """torch, onnxruntime or openvino, for what was asked (auto, torch, onnx, openvino), on a
    CUDA device or not, given why the collection's portable model cannot serve (None: it can)
    and the collection's own runtime (auto takes it; a portable one not installed here gives
    way to the other portable runtime)."""
    if asked not in RUNTIMES:
        raise InputError(f"unknown runtime {asked!r}: use one of {', '.join(RUNTIMES)}")
    if asked == "torch" or (asked == "auto" and (cuda or unusable is not None)):
        return "torch"
    if asked == "auto":
        if built == "torch" or built in installed:
            return built
        return next((name for name in PORTABLE if name in installed), "torch")
    if cuda:
        raise InputError(f"--runtime {asked} runs on the CPU: use --device cpu, or --runtime auto")
    if unusable is not None:
        raise InputError(f"--runtime {asked}: {unusable}: use --runtime torch (or auto)")
    return BACKEND_OF[asked]


def why_not_portable(manifest: dict[str, Any] | None) -> str | None:
    """None when the manifest records a portable model (stored only once it passed its
    fidelity check), else why there is none, in a line."""
    if manifest is None:
        return (
            "there is no published version to take it from (a first build, or --rebuild, "
            "runs torch and exports one)"
        )
    if manifest.get("model") is None:
        return "the collection holds vectors indexed from Parquet, with no model"
    if "portable_model" in manifest:
        return None
    return f"the collection has no portable model ({absent_reason(manifest)})"


def export_from_recipe(recipe: dict[str, Any], folder: Path) -> Exported:
    """The recipe's model created again with torch and exported into folder (checked on
    generated scenes), for a version whose model file was damaged; or why it cannot be."""
    log.warning(
        "the portable model file was damaged (or not the model that made the vectors): "
        "exporting it again from the recipe"
    )
    try:
        from indexer.model.timm_model import embedder_from_recipe

        embedder = embedder_from_recipe(recipe, "cpu")
    except (IndexerError, ImportError) as exc:
        return Exported(None, f"the model file was damaged and cannot be exported again: {exc}")
    return embedder.portable_model(None, folder)


def absent_reason(manifest: dict[str, Any]) -> str:
    """Why a new version made from this one carries no portable model (its file not carried)."""
    if "portable_model" in manifest:
        return "the previous version's model file was damaged"
    return str(manifest.get("portable_model_reason") or "built before models were exported")


ROCM = "/dev/kfd"  # AMD's compute driver: torch's ROCm build answers to "cuda"


def gpu_visible() -> bool:
    """An NVIDIA driver is loaded and not hidden from this process (told without torch)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", "unset").strip() in ("", "-1"):
        return False
    return Path("/proc/driver/nvidia/version").exists()


def wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and gpu_visible())


def embeds_on_cuda(device: str) -> bool:
    """Whether torch embeds on CUDA for this --device; with no GPU driver in sight (NVIDIA's,
    or ROCm's /dev/kfd) auto is the CPU, told without importing torch."""
    if device == "cpu" or (device == "auto" and not gpu_visible() and not Path(ROCM).exists()):
        return False
    from indexer.model.timm_model import resolve_device

    return resolve_device(device).type == "cuda"


def open_portable(
    asked: str, cuda: bool, version: Path | None, manifest: dict[str, Any] | None
) -> Runtime | None:
    """The version's portable model where --runtime, the device and the collection's own
    runtime choose it, at the collection's precision where that runtime computes in it;
    None: torch. With auto, a damaged model file means torch (warned); asked by name, it is
    an error."""
    from indexer.model.runtime_choice import recorded, this_machine

    built = recorded(manifest)
    machine = this_machine(cuda)
    own = built.runtime if built is not None else "onnxruntime"
    choice = choose_runtime(asked, cuda, why_not_portable(manifest), own, machine.installed)
    if choice == "torch" or version is None or manifest is None:
        return None
    from indexer.model.portable import load_portable

    try:
        return load_portable(version, manifest, choice, query_precision(choice, built, machine))
    except CollectionError as exc:
        if asked != "auto":
            raise
        log.warning("%s; embedding with torch instead", exc)
        return None


def query_precision(runtime: str, built: Choice | None, machine: Machine) -> str:
    """The precision a query embeds in with this runtime: the collection's, where the runtime
    and the CPU compute in it; else fp32, said in a line (within the collection's bound)."""
    from indexer.model.runtime_choice import supports

    if built is None or built.precision == "fp32":
        return "fp32"
    if supports(runtime, built.precision) and machine.native_bf16:
        return built.precision
    log.info("queries embed with %s in fp32 (the collection's vectors are %s %s): within the "
             "%s bound", runtime, built.runtime, built.precision, built.precision)  # fmt: skip
    return "fp32"


def query_runtime(asked: str, device: str, version: Path, manifest: dict[str, Any]) -> Runtime:
    """The runtime that embeds query images for this published version."""
    from indexer.model.runtime_choice import recorded

    portable = open_portable(asked, wants_cuda(device), version, manifest)
    if portable is not None:
        return portable
    try:
        from indexer.model.timm_model import embedder_from_recipe
    except ImportError as exc:  # a slim install: no torch or timm
        built = recorded(manifest)
        if (
            asked == "auto"
            and built is not None
            and built.runtime == "torch"
            and (why_not_portable(manifest) is None)
        ):
            log.info("torch is not installed here: queries embed with the portable model "
                     "(the collection embeds with torch)")  # fmt: skip
            from indexer.model.portable import load_portable

            return load_portable(version, manifest, "onnxruntime")
        raise InputError(
            f"{exc.name or 'torch'} is not installed here, and the collection's portable model "
            f"cannot serve ({why_not_portable(manifest) or 'its model file is damaged'}): "
            "install torch and timm, or run `indexer verify --repair` where they are"
        ) from exc
    return embedder_from_recipe(manifest["model"], device)


def same_recipe(a: dict[str, Any] | None, b: dict[str, Any] | None) -> bool:
    """Whether two recipes compute the same vectors (the fields a portable model bakes in)."""
    return a is not None and b is not None and all(a.get(f) == b.get(f) for f in RECIPE_FIELDS)


def carry_portable(
    previous: Path | None, manifest: dict[str, Any] | None, recipe: dict[str, Any], folder: Path
) -> dict[str, Any] | None:
    """Link the previous version's portable model into folder when it is of this recipe and
    its bytes are the recorded ones; its record, or None when it cannot be carried."""
    if previous is None or manifest is None or "portable_model" not in manifest:
        return None
    if not same_recipe(manifest.get("model"), recipe):
        return None
    from indexer.model.portable import read_model

    record = manifest["portable_model"]
    try:
        read_model(previous, record)  # damaged: not carried; a torch run exports it again
    except CollectionError as exc:
        log.warning("%s", exc)
        return None
    os.link(previous / str(record["path"]), folder / MODEL_FILE)
    return {**record, "path": MODEL_FILE}


def with_portable(manifest: dict[str, Any], exported: Exported) -> dict[str, Any]:
    """The manifest with its portable_model record, or the line saying why there is none."""
    out = {
        k: v for k, v in manifest.items() if k not in ("portable_model", "portable_model_reason")
    }
    if exported.record is not None:
        out["portable_model"] = exported.record
    elif exported.reason:
        out["portable_model_reason"] = exported.reason
    return out
