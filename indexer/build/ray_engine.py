"""The Ray Data engine: items decoded as CPU tasks, embedded by an actor pool, streamed back."""

from __future__ import annotations

import functools
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from indexer.build.decode_choice import choose_gpu_decoding
from indexer.config import BuildConfig, LoaderConfig, ModelConfig
from indexer.decode.batch import Batch
from indexer.decode.images import DecodeError
from indexer.decode.item_dataset import ItemDataset
from indexer.decode.preprocess import Preprocessor
from indexer.errors import ModelError
from indexer.sources import Item, Source

if TYPE_CHECKING:
    from indexer.build.plan import PublishedVersion
    from indexer.model.runtime import Runtime
    from indexer.model.runtime_choice import RuntimePlan

log = logging.getLogger(__name__)
OK, FAILED, REUSE, RAW = 0, 1, 2, 3  # what a decoded row is (RAW: for the actor to decode)


def start_ray(address: str | None) -> None:
    """Join the cluster at address, or start a local Ray (unless this process already has one)."""
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             ignore_reinit_error=True)  # fmt: skip


@dataclass(frozen=True)
class RayPlan:
    """Where the work runs: GPUs per embedding actor, and whether the actors decode JPEGs."""

    gpus: int
    gpu_decode: bool


def ray_plan(cfg: BuildConfig) -> RayPlan:
    """The cluster's plan (Ray started, or joined, here): a GPU per actor where it has GPUs,
    and the actors decode JPEGs only with --decode gpu (refused without GPUs or with exact
    preprocessing; each actor checks its own nvJPEG). auto decodes in the CPU tasks: no run
    measures nvJPEG on the actors against them (decodechoice: never a slower default)."""
    import ray

    start_ray(cfg.engine.address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) > 0 else 0
    exact = cfg.loader.preprocessing == "exact"
    if cfg.loader.decode == "auto" and gpus and not exact:  # never an unmeasured default
        log.info("decoding JPEGs in the Ray CPU tasks: nvJPEG on the GPU actors is not measured "
                 "against them (--decode gpu decodes there)")  # fmt: skip
        return RayPlan(gpus, False)
    decode = choose_gpu_decoding(cfg.loader.decode, gpus > 0, exact, lambda: None,
                                 "GPUs in the Ray cluster")  # fmt: skip
    return RayPlan(gpus, decode)


def ray_runtime(
    cfg: BuildConfig, plan: RuntimePlan, prev: PublishedVersion
) -> tuple[Runtime, RuntimePlan]:
    """What the actors embed with, settled in the driver before any item is read, as the
    local engine would on this machine: the collection's recorded runtime (its portable
    model), or a first build's plan, its candidates checked against torch fp32 (and timed,
    for auto) on generated scenes; and the plan naming that one choice."""
    from indexer.build.runtime_setup import portable_recorded, portable_runtime
    from indexer.model.portable import PortableEmbedder
    from indexer.model.runtime_choice import Choice, RuntimePlan
    from indexer.model.timm_model import load_embedder

    if portable_recorded(plan, prev):
        recorded = portable_runtime(plan, prev)
        if recorded is not None:
            return recorded, plan
    if prev.manifest is None and ray_plan(cfg).gpus and cfg.model.runtime in ("auto", "torch"):
        precision = "fp32" if cfg.model.precision == "fp32" else "bf16"  # the GPUs' default
        why = "the Ray cluster has GPUs: its actors embed with torch on them"
        plan = RuntimePlan((Choice("torch", precision),), "engine", why)
    model = replace(cfg.model, precision=plan.single.precision if plan.single else "fp32")
    embedder = load_embedder(model)
    if plan.single is not None and plan.single.runtime == "torch":
        return embedder, plan
    import tempfile

    from indexer.model.runtime_trial import settle

    with tempfile.TemporaryDirectory(prefix="indexer-ray-") as folder:
        runtime, decision, _ = settle(plan, embedder, None, Path(folder))
    if isinstance(runtime, PortableEmbedder):  # its bytes, not the temporary file
        chosen = decision.choice
        runtime = PortableEmbedder(runtime._bytes, runtime.recipe, runtime._record,
                                   chosen.runtime, None, chosen.precision)  # fmt: skip
    return runtime, RuntimePlan((decision.choice,), decision.how, decision.why, plan.key)


def ray_batches(
    items: list[Item],
    sources: list[Source],
    cfg: BuildConfig,
    known: frozenset[str],
    positions: list[int],
    embedder: Runtime,
    plan: RayPlan | None = None,
) -> Iterator[Batch]:
    """Batches with their vectors computed by Ray: the same rows the local engine makes,
    embedded by the same runtime at the same precision (a portable model's bytes shipped to
    the actors, or torch's weights made there and checked against the driver's). With GPUs
    in the cluster and --decode gpu, the decode tasks only read and route JPEGs, and the GPU
    actors decode them (indexer.decode.gpu) before embedding. The plan is the cluster's unless
    one is given."""
    import ray

    plan = plan or ray_plan(cfg)
    start_ray(cfg.engine.address)
    loader = cfg.loader
    preprocess = Preprocessor(embedder.data_config, loader.preprocessing, loader.max_pixels,
                              loader.allow_truncated)  # fmt: skip
    routed = plan.gpu_decode and preprocess.cfg.geometry_supported
    dataset = ItemDataset(items, sources, preprocess, known, 0.0, loader.decode_hook,
                          preprocess.max_pixels if routed else None)  # fmt: skip
    rows = ray.data.from_items([{"position": p} for p in positions])
    decode = functools.partial(decode_rows, dataset=dataset)  # shipped with each task
    decoded = rows.map_batches(decode, batch_size=loader.batch_size, batch_format="numpy")
    model = replace(cfg.model, precision=str(embedder.recipe.get("precision") or "fp32"))
    embedded = decoded.map_batches(
        EmbedActor,
        fn_constructor_kwargs={
            "model": model,
            "state_sha256": embedder.recipe["state_sha256"],
            "loader": loader,
            "gpu_decode": routed,
            "portable": portable_spec(embedder),
        },
        batch_size=loader.batch_size,
        batch_format="numpy",
        concurrency=cfg.engine.concurrency or 1,
        num_gpus=plan.gpus,
    )
    for batch in embedded.iter_batches(batch_size=None, batch_format="numpy"):
        yield to_batch(batch)


def portable_spec(runtime: Runtime) -> dict[str, Any] | None:
    """What an actor needs to run the portable model as the driver does (None: torch)."""
    from indexer.model.portable import PortableEmbedder

    if not isinstance(runtime, PortableEmbedder):
        return None
    return {"model": runtime._bytes, "recipe": runtime.recipe, "record": runtime._record,
            "runtime": runtime.name, "precision": runtime.recipe["precision"]}  # fmt: skip


def decode_rows(batch: dict[str, np.ndarray], dataset: ItemDataset) -> dict[str, np.ndarray]:
    """Read a block's items (a store's together, concurrently) and decode them (or, routed
    to the GPU, only read them); a failure is that item's row, never the block's."""
    h, w = dataset.preprocess.cfg.input_size[1:]
    positions = [int(p) for p in batch["position"].tolist()]
    try:
        out = dataset.__getitems__(positions)
    except Exception:  # one by one: each failure its own item's row
        out = []
        for position in positions:
            try:
                out.append(dataset[position])
            except Exception as exc:  # anything the dataset did not already turn into an error
                out.append({"position": position,
                            "error": ("decode", f"{type(exc).__name__}: {exc}")})  # fmt: skip
    routes = [s.get("route") for s in out]
    return {
        "position": np.array([s["position"] for s in out], np.int64),
        "status": np.array([_status(s) for s in out], np.int8),
        "pixels": np.stack([s.get("pixels", np.zeros((h, w, 3), np.uint8)) for s in out]),
        "width": np.array([_size(s)[0] for s in out], np.int32),
        "height": np.array([_size(s)[1] for s in out], np.int32),
        "hash": np.array([s.get("hash") or s.get("reuse") or "" for s in out], object),
        "meta": np.array([json.dumps(s.get("meta", {}), default=str) for s in out], object),
        "stage": np.array([s["error"][0] if "error" in s else "" for s in out], object),
        "reason": np.array([s["error"][1] if "error" in s else "" for s in out], object),
        "raw": np.array([s.get("raw", b"") for s in out], object),
        "orientation": np.array([r.orientation if r else 1 for r in routes], np.int8),
    }


def _size(sample: dict[str, Any]) -> tuple[int, int]:
    """The item's width and height as the model sees it (a routed JPEG's from its header,
    turned by its EXIF orientation)."""
    found = sample.get("route")
    if found is None:
        return sample.get("width", 0), sample.get("height", 0)
    size: tuple[int, int] = found.oriented_size
    return size


def _status(sample: dict[str, object]) -> int:
    if "raw" in sample:
        return RAW
    return OK if "pixels" in sample else FAILED if "error" in sample else REUSE


class EmbedActor:
    """One model per actor: the driver's portable model on the driver's runtime and
    precision (no timm, no torch model), or torch's, refused when its weights differ from
    the driver's. With gpu_decode, it decodes the rows the tasks left RAW on its device
    first (those the GPU cannot decode on the CPU, here; an error row if that fails too)."""

    def __init__(
        self,
        model: ModelConfig,
        state_sha256: str,
        loader: LoaderConfig,
        gpu_decode: bool = False,
        portable: dict[str, Any] | None = None,
    ) -> None:
        self.embedder: Any = _actor_model(model, state_sha256, portable)
        cfg = self.embedder.data_config
        self.cpu = Preprocessor(cfg, loader.preprocessing, loader.max_pixels,
                                loader.allow_truncated)  # fmt: skip
        self.decoder = None
        if gpu_decode and loader.preprocessing != "exact":  # routed here; nvJPEG checked
            from indexer.build.decode_choice import check_nvjpeg
            from indexer.decode.gpu import GpuDecoder, unusable

            device = self.embedder.device
            where = check_nvjpeg(loader.decode, lambda: unusable(device))
            if where.gpu:
                self.decoder = GpuDecoder(cfg, device)
            else:  # its routed rows are decoded on the CPU here
                log.warning("decoding JPEGs on the CPU: %s", where.why)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        batch = dict(batch)
        for name in ("status", "stage", "reason"):  # this actor's to change
            batch[name] = batch[name].copy()
        raw = np.flatnonzero(batch["status"] == RAW)
        if len(raw):  # rows are written: a copy, never the block Ray handed over
            pixels = torch.from_numpy(np.array(batch["pixels"])).to(self.embedder.device)
            self._decode(batch, raw, pixels)
        else:
            pixels = torch.from_numpy(np.ascontiguousarray(batch["pixels"]))
        good = batch["status"] == OK
        vectors = np.zeros((len(good), self.embedder.dim), np.float32)
        labels = np.array([""] * len(good), object)
        if good.any():
            index = torch.from_numpy(np.flatnonzero(good)).to(pixels.device)
            vectors[good], rows = self.embedder.embed_with_labels(pixels[index])
            if rows:
                labels[good] = [json.dumps(r) for r in rows]
        out = {k: v for k, v in batch.items() if k not in ("pixels", "raw", "orientation")}
        out["vector"] = vectors
        out["labels"] = labels
        return out

    def _decode(self, batch: dict[str, np.ndarray], raw: np.ndarray, pixels: Any) -> None:
        """The RAW rows' pixels decoded into their place: on the GPU where it can."""
        import torch

        from indexer.decode.jpeg_route import Route

        good: list[int] = []
        if self.decoder is not None:
            datas = [(bytes(batch["raw"][n]), Route(True, orientation=int(batch["orientation"][n])))
                     for n in raw]  # fmt: skip
            decoded, good = self.decoder.prepare(self.decoder.decode(datas),
                                                 [route for _, route in datas])  # fmt: skip
            if decoded is not None:
                pixels[torch.from_numpy(raw[good]).to(pixels.device)] = decoded
        kept = set(good)
        for k, n in enumerate(raw):
            if k in kept:
                batch["status"][n] = OK
                continue
            try:  # the GPU failed (or there is none): the CPU path, as the local engine does
                prepared = self.cpu(bytes(batch["raw"][n]))
                pixels[n] = torch.tensor(prepared.pixels).to(pixels.device)
                batch["status"][n] = OK
            except DecodeError as exc:
                batch["status"][n], batch["stage"][n], batch["reason"][n] = (
                    FAILED,
                    "decode",
                    str(exc),
                )
            except Exception as exc:
                batch["status"][n], batch["stage"][n] = FAILED, "preprocess"
                batch["reason"][n] = f"{type(exc).__name__}: {exc}"


def _actor_model(model: ModelConfig, state_sha256: str, portable: dict[str, Any] | None) -> Any:
    """The actor's runtime: the shipped portable model where the machine runs its runtime and
    precision natively (else a one-line ModelError: a cluster's workers must offer what the
    driver chose), or torch's model with the driver's weights."""
    if portable is not None:
        from indexer.model.portable import PortableEmbedder
        from indexer.model.runtime_choice import Choice, candidates, this_machine

        choice = Choice(portable["runtime"], portable["precision"])
        offered = candidates("auto", "auto", this_machine(cuda=False))
        if choice not in offered:
            raise ModelError(f"a Ray worker cannot run {choice.label} natively, which the "
                             "driver chose: give every worker the same CPU features and "
                             "packages, or pass --runtime and --precision it offers")  # fmt: skip
        return PortableEmbedder(portable["model"], portable["recipe"], portable["record"],
                                choice.runtime, None, choice.precision)  # fmt: skip
    from indexer.model.timm_model import load_embedder

    embedder = load_embedder(model)
    if embedder.recipe["state_sha256"] != state_sha256:
        raise ModelError(
            "a Ray worker made other weights than the driver (different timm or torch, "
            "or a checkpoint that differs there): install the same versions everywhere"
        )
    return embedder


def to_batch(batch: dict[str, np.ndarray]) -> Batch:
    """A Ray result block as the loader's Batch, vectors included."""
    result = Batch()
    good = []
    for n, status in enumerate(batch["status"].tolist()):
        position = int(batch["position"][n])
        meta = json.loads(batch["meta"][n])
        if status == FAILED:
            result.errors.append((position, str(batch["stage"][n]), str(batch["reason"][n])))
        elif status == REUSE:
            result.reused.append((position, str(batch["hash"][n]), meta))
        else:
            result.positions.append(position)
            result.widths.append(int(batch["width"][n]))
            result.heights.append(int(batch["height"][n]))
            result.hashes.append(str(batch["hash"][n]))
            result.metadata.append(meta)
            if batch["labels"][n]:
                result.labels.append(json.loads(batch["labels"][n]))
            good.append(n)
    if good:
        result.vectors = np.asarray(batch["vector"][good], np.float32)
    return result
