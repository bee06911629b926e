"""A first batch settles the runtime: each candidate checked against torch fp32, and timed."""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path

import numpy as np

from indexer.errors import IndexerError, ModelError
from indexer.model import export
from indexer.model.portable import MODEL_FILE, Exported, PortableEmbedder
from indexer.model.runtime import Runtime
from indexer.model.runtime_choice import (
    PORTABLE,
    Choice,
    Decision,
    RuntimePlan,
    pick,
    remember,
)
from indexer.model.timm_model import Embedder

log = logging.getLogger(__name__)
ROUNDS = 3  # timed passes over the check images per candidate, interleaved; the best counts
PRUNE = 1.3  # after the first pass, candidates this much slower than the fastest are dropped
PASS_SECONDS = 0.3  # a timed pass of the slowest candidate takes about this long at most
MIN_TIMED = 8  # images in a timed pass, at the least


def settle(
    plan: RuntimePlan, torch_runtime: Embedder, sample: np.ndarray | None, folder: Path
) -> tuple[Runtime, Decision, Exported | None]:
    """The runtime that embeds the build (first batch included), how it was decided, and the
    portable model exported into folder (None when no candidate needed it). Every candidate
    must reproduce torch fp32 on the build's first images (cosine >= BOUND of its precision);
    with plan.how auto the fastest of those is kept, and remembered for this machine."""
    reference = _reference(torch_runtime, sample)
    images, own, want, probs = reference
    exported, offered = _exported(plan, torch_runtime, sample, folder, reference)
    try:
        runtimes = _runtimes(offered, torch_runtime, exported, folder)
    except IndexerError as exc:
        if plan.how != "cached":
            raise
        log.warning("the cached choice %s does not load (%s); timing the others",
                    plan.candidates[0].label, exc)  # fmt: skip
        others = tuple(c for c in plan.others if c != plan.candidates[0])
        return settle(replace(plan, candidates=others, how="auto"), torch_runtime, sample,
                      folder)  # fmt: skip
    # each candidate's first call: its fidelity check, and the warm-up of its timing (memory,
    # kernels chosen for this batch shape: oneDNN's bf16 ones ran at 20 images/s on a smaller
    # first call against 600+, graphs compiled)
    outputs, first = {}, {}
    for choice, runtime in runtimes.items():
        start = time.perf_counter()
        outputs[choice] = runtime.embed_with_labels(images)
        first[choice] = time.perf_counter() - start
    fidelity, refused = {}, {}
    for choice, (vectors, rows) in outputs.items():
        try:
            fidelity[choice] = export.fidelity(want, probs, vectors, rows, choice.precision)
        except export.FidelityError as exc:
            refused[choice] = str(exc)
    if not fidelity:
        reasons = "; ".join(f"{c.label}: {why}" for c, why in refused.items())
        raise ModelError(f"no runtime reproduces torch fp32 on the build's images ({reasons}): "
                         "use --runtime torch --precision fp32")  # fmt: skip
    for choice, why in refused.items():
        log.warning("%s is not used: %s", choice.label, why)
    if plan.how == "cached" and plan.candidates[0] not in fidelity:
        log.warning("the cached choice %s failed its check; timing the others",
                    plan.candidates[0].label)  # fmt: skip
        others = tuple(c for c in plan.others if c != plan.candidates[0])
        return settle(replace(plan, candidates=others, how="auto"), torch_runtime, sample,
                      folder)  # fmt: skip
    timed = plan.how == "auto" and len(fidelity) > 1
    passing = {c: runtimes[c] for c in fidelity}
    rates = timed_rates(passing, images, max(first[c] for c in fidelity)) if timed else {}
    chosen = pick(rates) if timed else next(iter(fidelity))
    images_from = "the build" if own else "generated scenes"
    decision = Decision(
        chosen,
        "timed" if timed else ("forced" if plan.how == "auto" else plan.how),
        _why(plan, chosen, rates, timed),
        {c.label: r for c, r in rates.items()} if timed else {},
        {**fidelity[chosen], "images_from": images_from},
    )
    if timed:
        remember(plan.key, decision)
    log.info("embedding with %s (%s: %s)", chosen.label, decision.how, decision.why)
    return runtimes[chosen], decision, exported


def timing_size(images: int, slowest_first: float) -> int:
    """How many of the check images each timed pass runs: all of them for a small model;
    for a large one, as many as the slowest candidate's first call (an overestimate: it
    includes its warm-up) says run in about PASS_SECONDS, never fewer than MIN_TIMED."""
    if slowest_first <= PASS_SECONDS:
        return images
    return max(MIN_TIMED, min(images, int(images * PASS_SECONDS / slowest_first)))


def _reference(torch_runtime: Embedder, sample: np.ndarray | None) -> export.Reference:
    """The check images, whether they are the build's, and torch fp32's outputs on them. On
    CUDA the model itself runs them in fp32 on its device (no copy of a large model run on
    the CPU, which the export at the end makes anyway), vectors only; on the CPU, the
    export's reference (class probabilities too)."""
    if not torch_runtime.on_cuda:
        return export.reference_outputs(torch_runtime, sample)
    images, own = export.check_images(torch_runtime, sample)
    vectors, _ = torch_runtime.at_precision("fp32").embed_with_labels(images, labels=False)
    return images, own, vectors, None


def _exported(
    plan: RuntimePlan,
    torch_runtime: Embedder,
    sample: np.ndarray | None,
    folder: Path,
    reference: export.Reference,
) -> tuple[Exported | None, tuple[Choice, ...]]:
    """The portable model when a candidate runs it (exported and checked on onnxruntime as
    always, against the trial's own reference on the CPU: torch runs the images once), and
    the candidates left: without a portable model, only torch's."""
    if not any(c.runtime in PORTABLE for c in plan.candidates):
        return None, plan.candidates
    known = None if torch_runtime.on_cuda else reference  # on CUDA, the device's: not fp32's
    exported = export.export_portable(torch_runtime, sample, folder, known)
    if exported.record is not None:
        return exported, plan.candidates
    left = tuple(c for c in plan.candidates if c.runtime == "torch")
    if not left:
        asked = ", ".join(c.label for c in plan.candidates)
        raise ModelError(f"{asked} runs the exported model, and there is none "
                         f"({exported.reason}): use --runtime torch")  # fmt: skip
    log.warning("no portable model (%s): choosing among %s", exported.reason,
                ", ".join(c.label for c in left))  # fmt: skip
    return exported, left


def _runtimes(offered: tuple[Choice, ...], torch_runtime: Embedder, exported: Exported | None,
              folder: Path) -> dict[Choice, Runtime]:  # fmt: skip
    """Each candidate ready to run; one that cannot load (OpenVINO failing to compile the
    model, say) is left out with a warning, unless it was the only one."""
    out: dict[Choice, Runtime] = {}
    for choice in offered:
        try:
            out[choice] = _runtime(choice, torch_runtime, exported, folder)
        except IndexerError as exc:
            if len(offered) == 1:
                raise
            log.warning("%s is not used: %s", choice.label, exc)
    return out


def _runtime(choice: Choice, torch_runtime: Embedder, exported: Exported | None,
             folder: Path) -> Runtime:  # fmt: skip
    if choice.runtime == "torch":
        return torch_runtime.at_precision(choice.precision)
    assert exported is not None and exported.record is not None
    path = folder / MODEL_FILE
    return PortableEmbedder(path.read_bytes(), torch_runtime.recipe, exported.record,
                            choice.runtime, path, choice.precision)  # fmt: skip


def timed_rates(
    runtimes: Mapping[Choice, Runtime], images: np.ndarray, slowest_first: float
) -> dict[Choice, float]:
    """Each runtime's images/s on (as many as timing_size allows of) the images, after each
    has run them once (`slowest_first`: the slowest of those first calls, in seconds)."""
    timing = images[: timing_size(len(images), slowest_first)]
    seconds = _timed(dict(runtimes), timing, warm=len(timing) < len(images))
    return {c: len(timing) / t for c, t in seconds.items()}


def _timed(
    runtimes: dict[Choice, Runtime], images: np.ndarray, warm: bool = False
) -> dict[Choice, float]:
    """Each runtime's best time over ROUNDS passes on the images, taken in turn (a burst of
    other work on the machine touches every candidate alike); after the first, those over
    PRUNE times the fastest are not timed again (they cannot win: the trial costs less)."""
    if warm:  # a batch shape their first call did not run: kernels are chosen per shape
        for runtime in runtimes.values():
            runtime.embed(images)
    best: dict[Choice, float] = {}
    for n in range(ROUNDS):
        if n == 1:
            fastest = min(best.values())
            runtimes = {c: r for c, r in runtimes.items() if best[c] <= fastest * PRUNE}
        for choice, runtime in runtimes.items():
            start = time.perf_counter()
            runtime.embed(images)
            best[choice] = min(best.get(choice, float("inf")), time.perf_counter() - start)
    return best


def _why(plan: RuntimePlan, chosen: Choice, rates: dict[Choice, float], timed: bool) -> str:
    if not timed:
        return plan.why or "the only candidate left"
    others = sorted(((r, c) for c, r in rates.items() if c != chosen), reverse=True)
    shown = ", ".join(f"{c.label} {r:,.0f}" for r, c in others[:4])
    return (f"fastest on the first batch: {rates[chosen]:,.0f} images/s"
            + (f" (then {shown})" if shown else ""))  # fmt: skip
