"""A first build's model from an earlier export of the same request, confirmed on its images."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import queue
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from indexer.cache_dir import cache_dir
from indexer.config import ModelConfig, file_sha256
from indexer.errors import IndexerError
from indexer.model.portable import (
    EXPORTER,
    MODEL_FILE,
    OPSET,
    Exported,
    PortableEmbedder,
)
from indexer.model.runtime_choice import (
    BOUND,
    Choice,
    Decision,
    RuntimePlan,
    angle,
    joined,
    package_version,
)
from indexer.safeio import FileRefused, read_bounded, write_bytes_atomic
from indexer.version import __version__

log = logging.getLogger(__name__)
FOLDER = "exports/known"
MAX_ENTRY_BYTES = 64 << 20  # an entry's JSON (recipe, record, label names)
PACKAGES = ("timm", "torch", "onnx", "onnxruntime")  # whose versions shape the export
TIMED_IMAGES = 32  # of the first batch, each candidate's warm-up and timed passes (measured:
# with 64, auto timed cost 1.17x the fastest explicit build of 1,000 photos; 32: 1.08x)
SOURCES = ("timm", "indexer")  # whose code, hashed, defines the model and its recipe
CONFIRMED = ("weights_sha256", "label_set")  # besides runtime.RECIPE_FIELDS (the export's
# computation; its precision is the runtime's, decided apart: decide.py)


class UnconfirmedExport(IndexerError):
    """The cached export is not this request's computation: the run embeds again with torch."""


def request_identity(cfg: ModelConfig) -> dict[str, Any] | None:
    """What decides the exported computation, known before torch or timm is imported: the
    model, the weights' identity (checkpoint sha256, pretrained tag, or seed), the recipe's
    flags, the versions of the packages that build and check it and the digests of the code
    that defines the model and its recipe (timm's and indexer's sources). None: no identity
    here (a checkpoint that cannot be read: the torch path says why)."""
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
        "sources": {name: source_digest(name) for name in SOURCES},
        "indexer": __version__,
        "opset": OPSET,
        "exporter": EXPORTER,
    }


def source_digest(package: str) -> str | None:
    """sha256 over a package's Python sources as they are on disk now (edits and editable
    installs included; ~25 ms for timm's 300 files); None: not installed."""
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        data = path.read_bytes()
        name = path.relative_to(root).as_posix().encode()
        digest.update(len(name).to_bytes(8, "little") + name + len(data).to_bytes(8, "little"))
        digest.update(data)
    return digest.hexdigest()


def content_complete(identity: dict[str, Any]) -> bool:
    """Whether the identity names everything the export computes by content: the weights by
    their bytes (a checkpoint's sha256) or a seed, and the code by its sources. A pretrained
    tag names weights the hub may replace: such an export is confirmed against timm."""
    return "pretrained" not in identity["weights"] and all(identity["sources"].values())


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


@dataclass(frozen=True)
class Entry:
    """An earlier build's checked export of this request: what it was made for, its recipe
    and record, the model's bytes."""

    identity: dict[str, Any]
    recipe: dict[str, Any]
    record: dict[str, Any]
    model: bytes


def lookup(cfg: ModelConfig, identity: dict[str, Any]) -> Entry | None:
    """The export an earlier build made and checked for this request (identity:
    request_identity(cfg)), when its entry is whole (its bytes those its record names) and
    its recipe is the request's."""
    entry_path, model_path = _paths(identity)
    try:
        entry = json.loads(read_bounded(entry_path, MAX_ENTRY_BYTES, "a cache entry"))
        record = entry["record"]
        if entry["identity"] != json.loads(json.dumps(identity, default=str)):
            raise ValueError("it was made for another request")
        model = read_bounded(model_path, int(record["bytes"]), "the model's recorded size")
        if hashlib.sha256(model).hexdigest() != record["sha256"]:
            raise ValueError("its model file differs from its record (sha256)")
        mismatch = recipe_mismatch(entry["recipe"], cfg, identity)
        if mismatch:
            raise ValueError(f"its recipe is another request's ({mismatch})")
        return Entry(identity, entry["recipe"], record, model)
    except FileNotFoundError:
        return None
    except (OSError, FileRefused, ValueError, KeyError, TypeError, AttributeError) as exc:
        log.warning("the cached export %s is not usable (%s); ignoring it", entry_path, exc)
        return None


def recipe_mismatch(recipe: dict[str, Any], cfg: ModelConfig, identity: dict[str, Any]) -> str:
    """What in a cached recipe is not this request's (identity: request_identity(cfg)): the
    model, its weights, its flags."""
    weights = recipe.get("weights") or {}
    if cfg.checkpoint is not None:  # hashed once, for the identity
        sha = identity["weights"]["checkpoint_sha256"]
        want: dict[str, Any] = {"kind": "checkpoint", "sha256": sha}
    elif cfg.pretrained:
        want = {"kind": "pretrained"}
    else:
        want = {"kind": "random", "seed": cfg.seed}
    asked = {"name": cfg.name, "pooling": cfg.pooling, "feature_stage": cfg.feature_stage,
             "labels": cfg.labels, "normalize": cfg.normalize}  # fmt: skip
    wrong = [f"weights {k}" for k, v in want.items() if weights.get(k) != v]
    return ", ".join(wrong + [k for k, v in asked.items() if recipe.get(k) != v])


def chained_bound(bound: float, export_min: float) -> float:
    """The cosine a runtime must reach to the export run in fp32 so that it stays within
    ``bound`` of torch fp32, given the export reached ``export_min`` to torch when it was
    made: angles add (the triangle inequality on the sphere)."""
    slack = angle(bound) - angle(export_min)
    return math.cos(slack) if slack >= 0 else math.inf


class KnownExport(PortableEmbedder):
    """A cached export embedding a first build from its first batch, on the runtime and
    precision the build's plan names (asked for, or timed before on this machine).

    Nothing is published before the export is confirmed on the build's own first images.
    Where the request's identity names everything it computes by content (the weights'
    bytes or seed, the code's sources: content_complete), the export was checked against
    torch fp32 when it was made under that very identity; the chosen runtime must then
    reproduce the export run in fp32 (onnxruntime) within the bound that keeps it within its
    precision's bound of torch fp32 (chained_bound), and timm is never imported. Otherwise
    (pretrained weights: a tag the hub may serve other bytes under) a thread creates the
    model with timm meanwhile, and the runtime must reproduce torch fp32 itself. If either
    check fails, UnconfirmedExport: the run's vectors are discarded."""

    def __init__(self, cfg: ModelConfig, found: Entry, choice: Choice, plan: RuntimePlan) -> None:
        super().__init__(found.model, found.recipe, found.record, choice.runtime, None,
                         choice.precision)  # fmt: skip
        export_min = self._export_min()
        self.trusted = content_complete(found.identity) and (export_min or 0.0) >= BOUND["fp32"]
        self._confirm = None if self.trusted else Confirmation(cfg)
        self._checkpoint = cfg.checkpoint
        self._sent = False
        self._choice = choice
        self._plan = plan
        self._check: tuple[np.ndarray, bool] | None = None  # a trusted export's check images
        self._reference: Background | None = None  # the export in fp32 on them
        self._got: tuple[np.ndarray, list[dict[str, Any]]] | None = None  # the runtime's
        self._verdict: tuple[dict[str, Any], dict[str, Any]] | None = None  # a passed check
        self._failed_early = False  # the check failed when asked during the run

    def _export_min(self) -> float | None:
        """The export's recorded cosine to torch fp32 (at most 1: float rounding clipped);
        None where the record holds no plausible one (a bool, NaN, past 1 by more than
        rounding): such an entry is confirmed against timm, not trusted."""
        fidelity = self._record.get("fidelity")
        found = fidelity.get("min_cosine") if isinstance(fidelity, dict) else None
        if isinstance(found, bool) or not isinstance(found, (int, float)):
            return None
        if not -1.0 <= found <= 1.0 + 1e-6:  # NaN fails both
            return None
        return min(1.0, float(found))

    def settle(self, sample: np.ndarray) -> Decision:
        """The runtime this export embeds the build with: the plan's one, or, where the plan
        leaves several portable ones to time (auto, nothing cached), the fastest on the
        first batch (torch is not timed: the export runs without it, and it was the slowest
        on every CPU measured). The chosen one is confirmed like any known export, within
        its precision's bound, before anything is published; a trusted export's reference
        (the export in fp32 on these images) is computed from now on, in a thread."""
        decision = self._decide(sample)
        if self.trusted:
            self.settle_reference(sample)
        return decision

    def settle_reference(self, sample: np.ndarray | None) -> None:
        """Start computing the export's fp32 outputs on the check images, in a thread
        (onnxruntime lets go of the GIL: it runs beside the build's first batches)."""
        from indexer.model.export import check_images

        images, own = check_images(self, sample)
        reference = PortableEmbedder(self._bytes, self.recipe, self._record, "onnxruntime")
        self._reference = Background(lambda: reference._run(images))
        self._check = images, own

    def _decide(self, sample: np.ndarray) -> Decision:
        plan = self._plan
        if plan.single is not None and plan.how != "auto":
            return Decision(plan.single, plan.how, plan.why)
        if plan.single is not None:
            why = "the only runtime of the known export here (torch not timed)"
            return Decision(plan.single, "forced", why)
        from indexer.model.runtime_choice import pick, remember
        from indexer.model.runtime_trial import timed_rates

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
        slowest, timing = 0.0, sample[:TIMED_IMAGES]
        for runtime in runtimes.values():  # the warm-up (see trial.settle)
            start = time.perf_counter()
            runtime.embed(timing)
            slowest = max(slowest, time.perf_counter() - start)
        rates = timed_rates(runtimes, timing, slowest)
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
        if self._confirm is not None:
            if not self._sent:
                from indexer.model.export import CHECK_IMAGES

                self._confirm.send(np.array(np.asarray(images)[:CHECK_IMAGES]))
                self._sent = True
            self._confirm.check(self.recipe, wait=False)  # a wrong model stops the run at once
        vectors, rows = super().embed_with_labels(images, labels)
        if self._check is not None and self._got is None:  # the first batch: kept if it is
            check = self._check[0]  # the check images (else they are embedded at the end)
            first = np.asarray(images)[: len(check)]
            if first.shape == check.shape and np.array_equal(first, check):
                self._got = vectors[: len(check)], rows[: len(check)]
        return vectors, rows

    def portable_model(self, sample: np.ndarray | None, folder: Path) -> Exported:
        """Once the export is confirmed on the build's first images: the model stored in
        folder, its record with this build's fidelity, and the recipe (the manifest's)."""
        from indexer.model.export import FidelityError

        try:
            recipe, fidelity = self._trusted_check(sample) if self.trusted else self._confirmed(
                sample)  # fmt: skip
        except FidelityError as exc:
            raise UnconfirmedExport(f"the cached export does not reproduce torch ({exc})") from exc
        self.fidelity = fidelity
        # the same computation; the weights' path as given now; this runtime's precision
        self.recipe = {**recipe, "precision": self._choice.precision}
        self._record = {**self._record, "fidelity": fidelity, "export_seconds": 0.0,
                        "cached": True}  # fmt: skip
        return super().portable_model(sample, folder)

    def _confirmed(self, sample: np.ndarray | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The recipe timm makes now, and the runtime's fidelity to torch fp32 on the images."""
        from indexer.model.export import measure_fidelity

        assert self._confirm is not None
        if not self._sent:
            self._confirm.send(sample)
        recipe = self._confirm.check(self.recipe, wait=True)
        images, own, want_vectors, want_probs = self._confirm.reference()
        fidelity = measure_fidelity(self, images, want_vectors, want_probs, self._choice.precision)
        fidelity["images_from"] = "the build" if own else "generated scenes"
        return recipe, fidelity

    def confirmed_early(self) -> bool:
        """Whether a trusted export is confirmed already, asked without waiting: its fp32
        reference is computed and the first batch reproduced it (FidelityError: not, and
        the end of the build says so). A killed run's shards are salvaged once it is."""
        from indexer.model.export import FidelityError

        if self._verdict is not None:
            return True
        if not self.trusted or self._reference is None or self._failed_early:
            return False  # (without its first images, the check embeds its scenes now)
        if not self._reference.done():
            return False
        try:
            self._trusted_check(None)
        except FidelityError:
            self._failed_early = True  # asked once: the end of the build says why
            return False
        return True

    def _trusted_check(self, sample: np.ndarray | None) -> tuple[dict[str, Any], dict[str, Any]]:
        """The cached recipe (the weights' path as given now), and the runtime's fidelity to
        the export in fp32 on the images, stated as the bound it implies to torch fp32 (once:
        a check passed early is not made again)."""
        from indexer.model.export import FIDELITY_MIN, fidelity

        if self._verdict is not None:
            return self._verdict

        export_min = self._export_min()
        assert export_min is not None
        precision = self._choice.precision
        bound = FIDELITY_MIN if precision == "fp32" else BOUND[precision]
        if self._check is None:  # no batch was embedded (every item failed): scenes
            self.settle_reference(sample)
        assert self._check is not None and self._reference is not None
        images, own = self._check
        outputs = self._reference.result()
        want = np.asarray(outputs[0], dtype=np.float32).reshape(len(images), -1)
        probs = np.asarray(outputs[1]) if self.labels else None
        got, rows = self._got if self._got is not None else self.embed_with_labels(images)
        record = fidelity(want, probs, got, rows, precision, chained_bound(bound, export_min),
                          "the cached export in fp32 (onnxruntime)")  # fmt: skip
        to_torch = joined(record["min_cosine"], export_min)
        record.update(min_cosine=to_torch, bound=bound, reference="torch fp32, through the "
                      "cached export's own check", images_from="the build" if own
                      else "generated scenes", to_export=record["min_cosine"],
                      export_min_cosine=export_min)  # fmt: skip
        recipe = dict(self.recipe)
        if self._checkpoint is not None:
            recipe["weights"] = {**recipe["weights"], "path": str(self._checkpoint.resolve())}
        log.info("the cached export is trusted (its identity names the weights' bytes and "
                 "the code's sources): checked on %d images against itself in fp32, not "
                 "against timm", len(images))  # fmt: skip
        self._verdict = recipe, record
        return self._verdict

    def start(self) -> None:
        """Create the model in the background from now on (once the loader's workers exist)."""
        if self._confirm is not None:
            self._confirm.start()

    def close(self) -> None:
        """Let the thread end if it is still waiting for images (the run ended early)."""
        if self._confirm is not None:
            self._confirm.stop()


class Confirmation:
    """A thread that creates the model as the torch path would (timm), then computes torch
    fp32's outputs on the images it is sent. A thread, not a process: forking a process that
    may hold other threads' locks can deadlock, and a thread ends with the build."""

    def __init__(self, cfg: ModelConfig) -> None:
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
            import indexer.model.export  # here (torch), not in both threads at once
            import indexer.model.timm_model  # noqa: F401

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
            from indexer.model.export import reference_outputs
            from indexer.model.timm_model import load_embedder

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


class Background:
    """A call run in a daemon thread; result() waits for it and returns or raises as it did."""

    def __init__(self, call: Any) -> None:
        self._value: Any = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(call,), daemon=True,
                                        name="export-reference")  # fmt: skip
        self._thread.start()

    def _run(self, call: Any) -> None:
        try:
            self._value = call()
        except BaseException as exc:  # the caller hears of it
            self._error = exc

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> Any:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._value


def differences(made: dict[str, Any], cached: dict[str, Any]) -> list[str]:
    """The recipe fields in which the model made now differs from the cached export's."""
    from indexer.model.runtime import RECIPE_FIELDS

    def field(recipe: dict[str, Any], name: str) -> Any:
        if name == "weights_sha256":  # the checkpoint's bytes, wherever the file is now
            return (recipe.get("weights") or {}).get("sha256")
        return recipe.get(name)

    made, cached = (json.loads(json.dumps(r, default=str)) for r in (made, cached))  # as stored
    return [n for n in (*RECIPE_FIELDS, *CONFIRMED) if field(made, n) != field(cached, n)]
