"""A first build's model from an earlier export of the same request, confirmed against timm."""

from __future__ import annotations

import hashlib
import json
import logging
import queue
import threading
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np

from indexer import __version__
from indexer.config import ModelConfig, file_sha256
from indexer.configcache import cache_dir
from indexer.decide import Choice, Decision, RuntimePlan, package_version
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
CONFIRMED = ("weights_sha256", "label_set")  # besides runtime.RECIPE_FIELDS (the export's
# computation; its precision is the runtime's, decided apart: decide.py)


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
        "versions": {name: package_version(name) for name in PACKAGES},
        "indexer": __version__,
        "opset": OPSET,
        "exporter": EXPORTER,
    }


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
    """A cached export embedding a first build from its first batch, on the runtime and
    precision the build's plan names (asked for, or timed before on this machine), while a
    thread creates the model with timm. Nothing is published before that model agrees: the
    same weights and recipe, and the runtime reproducing torch fp32 on the build's first
    images within its precision's bound. If it does not, UnconfirmedExport: the run's
    vectors are discarded."""

    def __init__(self, cfg: ModelConfig, found: tuple[dict[str, Any], dict[str, Any], bytes],
                 choice: Choice, plan: RuntimePlan) -> None:  # fmt: skip
        recipe, record, model = found
        super().__init__(model, recipe, record, choice.runtime, None, choice.precision)
        self._confirm = Confirmation(cfg)
        self._sent = False
        self._choice = choice
        self._plan = plan

    def settle(self, sample: np.ndarray) -> Decision:
        """The runtime this export embeds the build with: the plan's one, or, where the plan
        leaves several portable ones to time (auto, nothing cached), the fastest on the
        first batch (torch is not timed: the export runs without it, and it was the slowest
        on every CPU measured). The chosen one is confirmed like any known export, within
        its precision's bound, before anything is published."""
        plan = self._plan
        if plan.single is not None and plan.how != "auto":
            return Decision(plan.single, plan.how, plan.why)
        if plan.single is not None:
            why = "the only runtime of the known export here (torch not timed)"
            return Decision(plan.single, "forced", why)
        from indexer.decide import pick, remember
        from indexer.trial import timed_rates

        runtimes: dict[Choice, PortableEmbedder] = {self._choice: self}
        for choice in plan.candidates:
            if choice not in runtimes:
                try:
                    runtimes[choice] = PortableEmbedder(
                        self._bytes, self.recipe, self._record, choice.runtime, None,
                        choice.precision,
                    )  # fmt: skip
                except IndexerError as exc:
                    log.warning("%s is not used: %s", choice.label, exc)
        slowest = 0.0
        for runtime in runtimes.values():  # the warm-up (see trial.settle)
            start = time.perf_counter()
            runtime.embed(sample)
            slowest = max(slowest, time.perf_counter() - start)
        rates = timed_rates(runtimes, sample, slowest)
        chosen = pick(rates)
        self._adopt(chosen, runtimes[chosen])
        shown = ", ".join(f"{c.label} {r:,.0f}" for c, r in sorted(rates.items()) if c != chosen)
        why = (f"fastest on the first batch of the known export's runtimes: {rates[chosen]:,.0f}"
               f" images/s (then {shown}); torch not timed")  # fmt: skip
        decision = Decision(chosen, "timed", why, {c.label: r for c, r in rates.items()})
        remember(plan.key, decision)
        return decision

    def _adopt(self, choice: Choice, runtime: PortableEmbedder) -> None:
        self._choice, self.name, self._run = choice, runtime.name, runtime._run
        self.recipe = {**self.recipe, "precision": choice.precision}

    def embed_with_labels(
        self, images: Any, labels: bool = True
    ) -> tuple[np.ndarray, list[dict[str, Any]]]:
        if not self._sent:
            from indexer.export import CHECK_IMAGES

            self._confirm.send(np.array(np.asarray(images)[:CHECK_IMAGES]))
            self._sent = True
        self._confirm.check(self.recipe, wait=False)  # a wrong model stops the run at once
        return super().embed_with_labels(images, labels)

    def portable_model(self, sample: np.ndarray | None, folder: Path) -> Exported:
        """Once the model made now confirms it: the model stored in folder, its record with
        this build's fidelity, and the recipe made now (the manifest's)."""
        from indexer.export import FidelityError, measure_fidelity

        if not self._sent:
            self._confirm.send(sample)
        recipe = self._confirm.check(self.recipe, wait=True)
        images, own, want_vectors, want_probs = self._confirm.reference()
        try:
            fidelity = measure_fidelity(self, images, want_vectors, want_probs,
                                        self._choice.precision)  # fmt: skip
        except FidelityError as exc:
            raise UnconfirmedExport(f"the cached export does not reproduce torch ({exc})") from exc
        fidelity["images_from"] = "the build" if own else "generated scenes"
        self.fidelity = fidelity
        # the same computation; the weights' path as given now; this runtime's precision
        self.recipe = {**recipe, "precision": self._choice.precision}
        self._record = {**self._record, "fidelity": fidelity, "export_seconds": 0.0,
                        "cached": True}  # fmt: skip
        return super().portable_model(sample, folder)

    def start(self) -> None:
        """Create the model in the background from now on (once the loader's workers exist)."""
        self._confirm.start()

    def close(self) -> None:
        """Let the thread end if it is still waiting for images (the run ended early)."""
        self._confirm.stop()


class Confirmation:
    """A thread that creates the model as the torch path would (timm), then computes torch
    fp32's outputs on the images it is sent. A thread, not a process: forking a process that
    may hold other threads' locks can deadlock, and a thread ends with the build."""

    def __init__(self, cfg: ModelConfig) -> None:
        import indexer.export  # here, not in both threads at once
        import indexer.model  # noqa: F401

        self._cfg = cfg
        self._images: queue.Queue[np.ndarray | bool | None] = queue.Queue()
        self._made = threading.Event()  # the model exists (or failed)
        self._done = threading.Event()  # the reference outputs exist (or failed)
        self._embedder: Any = None
        self._error: BaseException | None = None
        self._outputs: tuple[np.ndarray, bool, np.ndarray, np.ndarray | None] | None = None
        self._thread = threading.Thread(target=self._run, name="confirm-export", daemon=True)

    def start(self) -> None:
        """Start creating the model: after the DataLoader has forked its workers, which must
        not inherit a lock this thread holds (an import's, say) and wait on it forever."""
        if self._thread.ident is None:
            self._thread.start()

    def send(self, images: np.ndarray | None) -> None:
        self.start()
        self._images.put(images)

    def stop(self) -> None:
        self._images.put(False)

    def check(self, expected: dict[str, Any], wait: bool) -> dict[str, Any]:
        """The recipe made now, once it is known to be the cached one's (wait: block for it;
        else return the expected recipe while it is not known yet); raises when it is not."""
        if wait:
            self.start()
            self._made.wait()
        elif not self._made.is_set():
            return expected
        self._raise()
        differ = differences(self._embedder.recipe, expected)
        if differ:
            raise UnconfirmedExport(
                f"the cached export was made from another model ({', '.join(differ)} differ)"
            )
        return dict(self._embedder.recipe)

    def reference(self) -> tuple[np.ndarray, bool, np.ndarray, np.ndarray | None]:
        """The check images, whether they are the build's, and torch fp32's outputs on them."""
        self._done.wait()
        self._raise()
        assert self._outputs is not None
        return self._outputs

    def _raise(self) -> None:
        if isinstance(self._error, IndexerError):  # the torch path would fail the same way
            raise self._error
        if self._error is not None:
            raise UnconfirmedExport(
                f"the check of the cached export failed: {type(self._error).__name__}: "
                f"{self._error}"
            )

    def _run(self) -> None:
        try:
            from indexer.export import reference_outputs
            from indexer.model import load_embedder

            self._embedder = load_embedder(replace(self._cfg, device="cpu"))
            self._made.set()
            images = self._images.get()
            if images is not False:
                self._outputs = reference_outputs(self._embedder, images)  # type: ignore[arg-type]
        except BaseException as exc:  # whatever it is, the build must hear of it
            self._error = exc
        finally:
            self._made.set()
            self._done.set()


def differences(made: dict[str, Any], cached: dict[str, Any]) -> list[str]:
    """The recipe fields in which the model made now differs from the cached export's."""
    from indexer.runtime import RECIPE_FIELDS

    def field(recipe: dict[str, Any], name: str) -> Any:
        if name == "weights_sha256":  # the checkpoint's bytes, wherever the file is now
            return (recipe.get("weights") or {}).get("sha256")
        return recipe.get(name)

    made, cached = (json.loads(json.dumps(r, default=str)) for r in (made, cached))  # as stored
    return [n for n in (*RECIPE_FIELDS, *CONFIRMED) if field(made, n) != field(cached, n)]
