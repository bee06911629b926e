"""What the commands print: build summaries, hits, a collection described, an index in a line."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from indexer.build.new_version import BuildReport
    from indexer.query.collection import Hit


def summarize(report: BuildReport) -> str:
    c = report.counts
    if report.index is None:
        return (
            f"Nothing changed in {report.root}: {c['unchanged']} items unchanged "
            f"(version {report.version} stays), {report.seconds:.1f}s."
        )
    if report.reindexed:
        return (
            f"No item changed in {report.root}; re-indexed with the new index settings as "
            f"version {report.version}: {describe_index(report.index)}."
        )
    embedded = c["embedded"]
    reused = c["new"] + c["changed"] - embedded
    rate = f", {embedded / report.seconds:.1f} images/s embedded" if embedded else ""
    text = (
        f"Built {report.root}, version {report.version}: {embedded} embedded, {reused} reused "
        f"(renamed or copied), {c['unchanged']} unchanged, {c['deleted']} deleted, "
        f"{c['failed']} failed of {c['listed']} listed ({c['new']} new, {c['changed']} "
        f"changed); {report.rows} items in {report.shards} shard(s); "
        f"{report.seconds:.1f}s{rate}."
    )
    if c["failed"]:
        from indexer.build.failures import describe_reasons, describe_stages

        why = (describe_stages(report.failed_stages) if report.failed_stages
               else describe_reasons(report.failures))  # fmt: skip
        text += f" Failed: {why}; listed in {report.root / 'errors.parquet'}."
    if report.index.get("part"):
        return text + f" A part: `indexer index {report.root.parent.parent}` merges the parts."
    text += f" Index: {describe_index(report.index)}."
    if report.index.get("target_met") is False:
        text += f" Warning: {below_target(report.index)}"
    return text


def below_target(meta: dict[str, Any]) -> str:
    return (
        f"recall@{meta['recall_k']} {meta['recall_at_k']} stays below the target "
        f"{meta['target_recall']} even at the slowest search setting: choose "
        "--index-type ivf or flat (uncompressed vectors) or a lower --target-recall."
    )


def _short(name: str) -> str:
    return Path(name).name or name


def format_hits(query_name: str, hits: list[Hit]) -> str:
    lines = [f"query: {query_name}", f"{'rank':>4}  {'score':>7}  key"]
    lines += [f"{h.rank:>4}  {h.score:>7.4f}  {h.key}" for h in hits]
    return "\n".join(lines) + "\n"


def describe_runs(runs: list[dict[str, Any]]) -> str:
    lines = ["last runs:" if runs else "last runs:   none recorded"]
    for run in reversed(runs):
        c = run.get("counts") or {}
        lines.append(
            f"  {run['started']}  {run['command']:<6} {run['status']:<8} {run['seconds']:>8.1f}s  "
            f"listed {c.get('listed', '-')}, new {c.get('new', '-')}, "
            f"failed {c.get('failed', '-')}"
            + (f", {run['runtime']}" if run.get("runtime") else "")
            + (f"  ({run['error']})" if run.get("error") else "")
        )
    return "\n".join(lines)


def describe(root: Path, manifest: dict[str, Any], index_meta: dict[str, Any] | None) -> str:
    counts = manifest["counts"]
    lines = [
        f"collection:  {root} (version {manifest.get('version')})",
        f"created:     {manifest.get('created_at')} (indexer {manifest.get('indexer_version')})",
        *describe_model(manifest),
        f"embedding:   {manifest['embedding_dim']}-d, "
        f"{'L2-normalised' if manifest['normalized'] else 'raw'}, metric {manifest['metric']}",
        "sources:     " + ", ".join(_source_name(s) for s in manifest["sources"]),
        f"items:       {counts['items']} "
        f"({counts['embedded']} embedded, {counts['failed']} failed)",
        f"shards:      {len(manifest['shards'])}",
    ]
    if index_meta is None:
        lines.append(f"index:       missing: run `indexer index {root}`")
    else:
        lines.append(f"index:       {describe_index(index_meta)}")
        met = "met" if index_meta.get("target_met", True) else "NOT met"
        lines.append(
            f"             chosen because: {index_meta.get('reason', 'n/a')}; target recall "
            f"{index_meta.get('target_recall', 'n/a')} {met}"
        )
    return "\n".join(lines)


def describe_model(manifest: dict[str, Any]) -> list[str]:
    m = manifest["model"]
    if m is None:
        return ["model:       none: vectors indexed from Parquet (query with vectors)"]
    weights, dc = m["weights"], m["data_config"]
    ident = {
        "pretrained": weights.get("tag"),
        "checkpoint": weights.get("path"),
        "random": f"seed {weights.get('seed')}",
    }.get(weights["kind"])
    return [
        f"model:       {m['name']} (timm {m['timm_version']}, torch {m['torch_version']}, "
        f"{m['precision']})",
        f"weights:     {weights['kind']}: {ident}",
        f"preprocess:  {dc['input_size'][1]}x{dc['input_size'][2]} {dc['interpolation']}, "
        f"crop_pct {dc['crop_pct']} ({dc['crop_mode']}), mean {dc['mean']}, std {dc['std']}, "
        f"{manifest['decode']['mode']} decoding",
        describe_runtime(manifest),
        describe_portable(manifest),
    ]


def describe_runtime(manifest: dict[str, Any]) -> str:
    """The collection's runtime and precision, and how they were decided."""
    from indexer.model.runtime_choice import recorded

    built = recorded(manifest)
    record = manifest.get("runtime") or {}
    how = record.get("how", "inferred: built before runtimes were recorded")
    why = f": {record['why']}" if record.get("why") else ""
    return f"runtime:     {built.label if built else 'none'} ({how}{why})"


def describe_portable(manifest: dict[str, Any]) -> str:
    record = manifest.get("portable_model")
    if record is None:
        why = manifest.get("portable_model_reason") or "built before models were exported"
        return f"portable:    none ({why}): queries run torch"
    fidelity = record.get("fidelity") or {}
    return (
        f"portable:    {record['path']} (ONNX opset {record.get('opset')}, exported with torch "
        f"{record.get('torch_version')}; cosine to torch min {fidelity.get('min_cosine', 0):.6f}, "
        f"mean {fidelity.get('mean_cosine', 0):.6f} on {fidelity.get('images')} images)"
    )


def _source_name(source: dict[str, Any]) -> str:
    if source["kind"] == "parquet":
        return f"{source['path']} ({source['rows']} rows)"
    if source["kind"] == "hf":
        return f"hf:{source['name']} [{source['split']}] ({source['rows']} rows)"
    return str(source["path"])


def describe_index(meta: dict[str, Any]) -> str:
    """One line: type, size, build time, tuned parameters, recall, speed, bytes."""
    params = ", ".join(f"{k}={v}" for k, v in (meta.get("params") or {}).items())
    recall = meta.get("recall_at_k")
    qps = meta.get("queries_per_second")
    made = (
        f"reused from {meta['reused_from']} (files only touched)" if meta.get("reused_from")
        else f"updated from {meta['from_version']} in {meta['build_seconds']}s ({meta['why']})"
        if meta.get("how") == "updated"
        else f"built in {meta['build_seconds']}s"
    )  # fmt: skip
    return (
        f"{meta['type']} ({meta['factory']}{', on disk' if meta.get('on_disk') else ''}"
        f"{'; ' + params if params else ''}), {meta['ntotal']} vectors, {made}, "
        f"recall@{meta.get('recall_k')} "
        f"{'n/a' if recall is None else f'{recall:.3f}'}"
        f"{'' if qps is None else f', {qps:,.0f} queries/s'}, "
        f"{meta.get('bytes', 0) / 2**20:.1f} MiB"
    )
