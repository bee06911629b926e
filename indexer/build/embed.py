"""The embedding loop of a build: batches through the runtime into shards, timed by stage."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tqdm import tqdm

from indexer.build.stage_times import Stages
from indexer.collection.layout import CollectionPaths
from indexer.collection.shards import (
    ShardInfo,
    ShardWriter,
)
from indexer.config import BuildConfig
from indexer.model.portable import Exported

if TYPE_CHECKING:  # torch-heavy: imported only when a build has something to embed
    from indexer.model.runtime import Runtime
    from indexer.model.runtime_choice import Decision, RuntimePlan
from indexer.build.gpu_decoding import RawDecoding, ahead_if_routed
from indexer.build.runtime_setup import mark_runtime
from indexer.build.shard_rows import EmbedJob, error_row, new_rows, rows_table
from indexer.build.threads import closing_iterator, process_age
from indexer.decode.batch import Batch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Embedded:
    """What the embedding loop made: new shards, error rows, items whose stored vector is
    reused, the first images embedded (a portable model is checked on them), the portable
    model exported during the run (if it was), the runtime that embedded, how it was
    decided, and the recipe it computed (its precision the decided one)."""

    shards: list[ShardInfo]
    errors: list[dict[str, Any]]
    reused: list[tuple[int, str, dict[str, Any]]]
    sample: np.ndarray | None
    exported: Exported | None = None
    runtime: str | None = None
    decision: Decision | None = None
    recipe: dict[str, Any] | None = None


SAMPLE = 64  # images kept for the portable model's fidelity check


class Embedding:
    """The run's runtime. A build that loaded torch settles its runtime on the first batch
    (trial.settle: each candidate checked against torch fp32, timed when auto has a choice)
    and embeds every batch, the first included, with the one it keeps; a run that loaded the
    recorded runtime (or a known export) embeds with it from the start."""

    def __init__(self, runtime: Runtime, plan: RuntimePlan | None, folder: Path) -> None:
        self.runtime, self.plan, self.folder = runtime, plan, folder
        self.sample: np.ndarray | None = None
        self.exported: Exported | None = None
        self.decision: Decision | None = None
        self.first_done = 0.0  # when the first batch was embedded
        self.after_first = 0  # images embedded since
        self.remote = False  # the Ray engine's actors embed (the driver settled beforehand)

    def __call__(self, pixels: Any) -> tuple[np.ndarray, list[dict[str, Any]]]:
        first = self.sample is None
        if first:
            head = pixels[:SAMPLE]
            self.sample = np.array(head.cpu().numpy() if hasattr(head, "cpu") else head)
            self._settle(self.sample)
        out = self.runtime.embed_with_labels(pixels)
        if first:
            self.first_done = time.perf_counter()
            log.info("first batch embedded (%s) %.2f s after the process started",
                     self.runtime.name, process_age())  # fmt: skip
        else:
            self.after_first += len(out[0])
        return out

    def _settle(self, sample: np.ndarray) -> None:
        from indexer.model.known_export import KnownExport
        from indexer.model.runtime_choice import Decision

        plan = self.plan
        if plan is None:
            return
        if self.runtime.name == "torch":
            from indexer.model.runtime_trial import settle
            from indexer.model.timm_model import Embedder

            assert isinstance(self.runtime, Embedder)
            self.runtime, self.decision, self.exported = settle(plan, self.runtime, sample,
                                                                self.folder)  # fmt: skip
        elif isinstance(self.runtime, KnownExport):  # timed among its runtimes, or the plan's
            self.decision = self.runtime.settle(sample)
        elif (single := plan.single) is not None:
            self.decision = Decision(single, plan.how, plan.why)
        if self.decision is not None:  # before the first shard: a re-run after a kill keeps it
            mark_runtime(self.folder, self.decision.choice)

    def settled(self) -> Decision | None:
        """How the runtime was decided: on the first batch, or by the plan when no batch was
        embedded here (the Ray engine's actors, a run whose items all failed: asked for or
        recorded, not a cached choice that no image confirmed)."""
        from indexer.model.runtime_choice import Decision

        plan = self.plan
        if self.decision is not None or plan is None or (single := plan.single) is None:
            return self.decision
        if plan.how == "cached" and not self.remote:  # nothing here confirmed it: the next
            return None  # run decides (the Ray driver checked it on generated scenes)
        return Decision(single, plan.how, plan.why)

    @property
    def names(self) -> str | None:
        return self.runtime.name if self.sample is not None or self.remote else None

    def log_rate(self) -> float | None:
        """Images/s after the first batch, logged (None: no image after it)."""
        if not self.after_first:
            return None
        seconds = time.perf_counter() - self.first_done
        rate = self.after_first / seconds
        log.info("after the first batch: %d images in %.2f s, %.0f images/s (%s)",
                 self.after_first, seconds, rate, self.names)  # fmt: skip
        return rate


def embed_items(
    job: EmbedJob, batches: Iterator[Batch], paths: CollectionPaths, cfg: BuildConfig
) -> Embedded:
    """Stream batches through the model into new shards; failures become error rows, and
    items whose bytes are already embedded are set aside to reuse their vectors."""
    errors: list[dict[str, Any]] = []
    reused: list[tuple[int, str, dict[str, Any]]] = []
    embed = Embedding(job.embedder, job.runtime_plan, paths.root)
    if cfg.engine.kind == "ray" and job.runtime_plan and (ray := job.runtime_plan.single):
        mark_runtime(paths.root, ray)  # its actors embed: no first batch settles it here
        embed.remote = True
    stages = Stages()
    raw = RawDecoding(cfg, stages)
    if job.embedder.on_cuda and cfg.loader.decode != "cpu":
        batches = ahead_if_routed(batches, raw, job.embedder)
    bar = tqdm(total=len(job.plan.check), unit="img", disable=_no_bar(cfg.loader.progress))
    writer = ShardWriter(paths.shards, job.schema, cfg.shard_size, prefix=job.prefix)
    pending = job.confirmed
    with writer, bar, closing_iterator(batches):
        for batch in stages.each(batches, "waiting for batches"):
            if batch.raw:
                raw.decode(batch, job.embedder)
            if batch.positions:
                vectors, labels = batch.vectors, batch.labels
                if vectors is None:
                    assert batch.pixels is not None
                    with stages.timed("embedding" if embed.sample is not None else "first batch"):
                        vectors, labels = embed(batch.pixels)
                with stages.timed("writing"):
                    writer.write(rows_table(job, new_rows(batch, labels), vectors))
                if pending is not None and pending_confirmed(job.embedder):
                    pending()  # a killed run's shards may be salvaged from now on
                    pending = None
            errors += [error_row(job, *error) for error in batch.errors]
            reused += batch.reused
            bar.update(len(batch.positions) + len(batch.errors) + len(batch.reused))
        rate = embed.log_rate()
        raw.log_share()
        if job.embedder.on_cuda and rate is not None:  # what --decode auto compares
            from indexer.build.decode_choice import record_run

            path = "gpu" if raw.gpu or raw.fallback else "cpu"  # nvJPEG decoded, or only the CPU
            record_run(getattr(job.embedder, "device", None), job.embedder.data_config.input_size,
                       cfg.loader, path, rate, embed.after_first)  # fmt: skip
        log.info("seconds by stage: %s", stages.summary())
        decision = embed.settled()
        return Embedded(writer.close(), errors, reused, embed.sample, embed.exported,
                        embed.names, decision, embed.runtime.recipe)  # fmt: skip


def pending_confirmed(runtime: Any) -> bool:
    """Whether a known export this build embeds with is confirmed by now (asked without
    waiting); never for other runtimes (they need no confirmation)."""
    early = getattr(runtime, "confirmed_early", None)
    return bool(early()) if early is not None else False


def _no_bar(progress: bool | None) -> bool | None:
    return None if progress is None else not progress  # tqdm: None = only on a terminal
