"""A first build's model from an earlier export of the same request, confirmed against timm."""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import multiprocessing
import os
import queue
from dataclasses import asdict, replace
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

import numpy as np

from indexer import __version__, errors
from indexer.config import ModelConfig, file_sha256
from indexer.configcache import cache_dir
from indexer.errors import IndexerError
from indexer.portable import (
    EXPORTER,
    MODEL_FILE,
    OPSET,
    Exported,
    PortableEmbedder,
)
from indexer.safeio import FileRefused, read_bounded, write_bytes_atomic

log = logging.getLogger(__name__)
FOLDER = "exports/known"
MAX_ENTRY_BYTES = 64 << 20  # an entry's JSON (recipe, record, label names)
PACKAGES = ("timm", "torch", "onnx", "onnxruntime")  # whose versions shape the export
CONFIRMED = ("weights_sha256", "precision", "label_set")  # besides runtime.RECIPE_FIELDS
POLL_SECONDS = 1.0


class UnconfirmedExport(IndexerError):
    """The cached export is not this request's computation: the run embeds again with torch."""


def request_identity(cfg: ModelConfig) -> dict[str, Any] | None:
    """What decides the exported computation, known before torch or timm is imported: the
    model, the weights' identity (checkpoint sha256, pretrained tag, or seed), the recipe's
    flags and the versions of the packages that build and check it. None: no identity here
    (a checkpoint that cannot be read: the torch path says why)."""
    if cfg.checkpoint is not None:
        try:
            weights: dict[str, Any] = {"checkpoint_sha256": file_sha256(cfg.checkpoint)}
        except OSError:
            return None
    elif cfg.pretrained:
        weights = {"pretrained": cfg.name}
    else:
        weights = {"seed": cfg.seed}
    flags = {k: v for k, v in asdict(cfg).items() if k not in ("checkpoint", "runtime", "seed")}
    return {
        **flags,
        "weights": weights,
        "versions": {name: _version(name) for name in PACKAGES},
        "indexer": __version__,
        "opset": OPSET,
        "exporter": EXPORTER,
    }


def _version(package: str) -> str | None:
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def _paths(identity: dict[str, Any]) -> tuple[Path, Path]:
    text = json.dumps(identity, sort_keys=True, default=str)
    key = hashlib.sha256(text.encode()).hexdigest()[:32]
    folder = cache_dir() / FOLDER
    return folder / f"{key}.json", folder / f"{key}.onnx"


def remember(
    cfg: ModelConfig, recipe: dict[str, Any], record: dict[str, Any], version: Path
) -> None:
    """Keep a build's checked export under its request's identity. A cache that cannot be
    written costs only speed: logged, not raised."""
    identity = request_identity(cfg)
    if identity is None:
        return
    entry, model = _paths(identity)
    text = json.dumps({"identity": identity, "recipe": recipe, "record": record},
                      sort_keys=True, default=str)  # fmt: skip
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        write_bytes_atomic(model, (version / MODEL_FILE).read_bytes(), sync=False)
        write_bytes_atomic(entry, text.encode("utf-8"), sync=False)
    except OSError as exc:
        log.info("cannot remember the export in %s: %s", entry.parent, exc)


def lookup(cfg: ModelConfig) -> tuple[dict[str, Any], dict[str, Any], bytes] | None:
    """The recipe, record and model bytes an earlier build exported for this request, when
    its entry is whole (its bytes those its record names); a hint only, until confirmed."""
    identity = request_identity(cfg)
    if identity is None:
        return None
    entry_path, model_path = _paths(identity)
    try:
        entry = json.loads(read_bounded(entry_path, MAX_ENTRY_BYTES, "a cache entry"))
        record = entry["record"]
        if entry["identity"] != json.loads(json.dumps(identity, default=str)):
            raise ValueError("it was made for another request")
        model = read_bounded(model_path, int(record["bytes"]), "the model's recorded size")
        if hashlib.sha256(model).hexdigest() != record["sha256"]:
            raise ValueError("its model file differs from its record (sha256)")
        return entry["recipe"], record, model
    except FileNotFoundError:
        return None
    except (OSError, FileRefused, ValueError, KeyError, TypeError) as exc:
        log.warning("the cached export %s is not usable (%s); ignoring it", entry_path, exc)
        return None


class KnownExport(PortableEmbedder):
    """A cached export embedding a first build from its first batch, on onnxruntime, while a
    child process creates the model with timm. Nothing is published before the child agrees:
    the same weights and recipe, and onnxruntime reproducing torch fp32 on the build's first
    images. If it does not, UnconfirmedExport: the run's vectors are discarded."""

    def __init__(self, cfg: ModelConfig, found: tuple[dict[str, Any], dict[str, Any], bytes]):
        recipe, record, model = found
        self._confirm = Confirmation(cfg)  # forked before onnxruntime starts its threads
        super().__init__(model, recipe, record)
        self._sent = False

    def embed_with_labels(
        self, images: Any, labels: bool = True
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        if not self._sent:
            from indexer.export import CHECK_IMAGES

            self._confirm.send(np.array(np.asarray(images)[:CHECK_IMAGES]))
            self._sent = True
        self._confirm.poll(self.recipe)  # a wrong recipe stops the run at once
        return super().embed_with_labels(images, labels)

    def portable_model(self, sample: np.ndarray | None, folder: Path) -> Exported:
        """Once the child confirms it: the model stored in folder, its record with this
        build's fidelity, and the recipe the child made (the manifest's)."""
        from indexer.export import FidelityError, measure_fidelity

        if not self._sent:
            self._confirm.send(sample)
        recipe, images, own, want_vectors, want_probs = self._confirm.result(self.recipe)
        try:
            fidelity = measure_fidelity(self, images, want_vectors, want_probs)
        except FidelityError as exc:
            raise UnconfirmedExport(f"the cached export does not reproduce torch ({exc})") from exc
        fidelity["images_from"] = "the build" if own else "generated scenes"
        self.recipe = recipe  # the same computation; the weights' path as given now
        self._record = {**self._record, "fidelity": fidelity, "export_seconds": 0.0,
                        "cached": True}  # fmt: skip
        return super().portable_model(sample, folder)

    def close(self) -> None:
        self._confirm.close()


class Confirmation:
    """A child process (forked: torch is already imported) that creates the model with timm
    and sends back its recipe, then torch fp32's outputs on the images it is sent."""

    def __init__(self, cfg: ModelConfig) -> None:
        ctx = multiprocessing.get_context("fork")
        self._inbox: Any = ctx.Queue()
        self._outbox: Any = ctx.Queue()
        self._recipe: dict[str, Any] | None = None
        self._child = ctx.Process(target=_child, args=(cfg, os.getpid(), self._inbox,
                                                       self._outbox), daemon=True)  # fmt: skip
        self._child.start()

    def send(self, images: np.ndarray | None) -> None:
        self._inbox.put(images)

    def poll(self, expected: dict[str, Any]) -> None:
        """Check the child's recipe if it has arrived (non-blocking)."""
        if self._recipe is None:
            with contextlib.suppress(queue.Empty):
                self._take(self._outbox.get_nowait(), expected)

    def result(
        self, expected: dict[str, Any]
    ) -> tuple[dict[str, Any], np.ndarray, bool, np.ndarray, np.ndarray | None]:
        """Wait for the child: its recipe (checked), the images, and torch's outputs on them."""
        while True:
            message = self._next()
            if message[0] == "expected":
                assert self._recipe is not None
                self.close()
                return self._recipe, *message[1:]
            self._take(message, expected)

    def _next(self) -> tuple[Any, ...]:
        while True:
            try:
                return tuple(self._outbox.get(timeout=POLL_SECONDS))
            except queue.Empty:
                if not self._child.is_alive():
                    raise UnconfirmedExport(
                        f"the check of the cached export ended without an answer (exit code "
                        f"{self._child.exitcode})"
                    ) from None

    def _take(self, message: tuple[Any, ...], expected: dict[str, Any]) -> None:
        kind = message[0]
        if kind == "error":  # the model cannot be created: the torch path would fail the same
            self.close()
            raise _error_class(message[1])(message[2])
        if kind == "failed":
            self.close()
            raise UnconfirmedExport(f"the check of the cached export failed: {message[1]}")
        if kind == "recipe":
            differ = differences(message[1], expected)
            if differ:
                self.close()
                raise UnconfirmedExport(
                    f"the cached export was made from another model ({', '.join(differ)} differ)"
                )
            self._recipe = message[1]

    def close(self) -> None:
        if self._child.is_alive():
            self._child.kill()
        self._child.join(timeout=5)


def _error_class(name: str) -> type[IndexerError]:
    found = getattr(errors, name, None)
    is_ours = isinstance(found, type) and issubclass(found, IndexerError)
    return found if is_ours else errors.ModelError  # type: ignore[return-value]


def differences(made: dict[str, Any], cached: dict[str, Any]) -> list[str]:
    """The recipe fields in which the model made now differs from the cached export's."""
    from indexer.runtime import RECIPE_FIELDS

    def field(recipe: dict[str, Any], name: str) -> Any:
        if name == "weights_sha256":  # the checkpoint's bytes, wherever the file is now
            return (recipe.get("weights") or {}).get("sha256")
        return recipe.get(name)

    made, cached = (json.loads(json.dumps(r, default=str)) for r in (made, cached))  # as stored
    return [n for n in (*RECIPE_FIELDS, *CONFIRMED) if field(made, n) != field(cached, n)]


def _child(cfg: ModelConfig, parent: int, inbox: Any, outbox: Any) -> None:
    """Create the model as the torch path would; send its recipe, then torch fp32's outputs."""
    try:
        import torch

        torch.set_num_threads(1)  # the build's workers and onnxruntime keep the cores
        from indexer.export import reference_outputs
        from indexer.model import load_embedder

        embedder = load_embedder(replace(cfg, device="cpu"))
        outbox.put(("recipe", embedder.recipe))
        while True:
            try:
                sample = inbox.get(timeout=POLL_SECONDS)
                break
            except queue.Empty:
                if os.getppid() != parent:  # the build is gone
                    return
        outbox.put(("expected", *reference_outputs(embedder, sample)))
    except IndexerError as exc:
        outbox.put(("error", type(exc).__name__, str(exc)))
    except BaseException as exc:  # whatever it is, the build must hear of it
        outbox.put(("failed", f"{type(exc).__name__}: {exc}"))
    finally:
        outbox.close()
        outbox.join_thread()
