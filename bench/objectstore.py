"""Builds from a bucket against the same photos in a local folder: 300 ImageNet photos, in
fresh processes, the folder build then `s3://` builds through moto's S3 server on 127.0.0.1
behind a proxy adding 0, 20, 50 and 100 ms to every request (tests/s3server.py); images/s
and each bucket build's rate over the folder's (target at 50 ms: >= 0.8). Then the listing
rate over 3,000 objects. The S3 server and the proxy run in this process, on the same
cores as the build, so every GET also costs the build's machine its serving CPU."""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from throughput import BIN, REPO, imagenet_corpus, prepared, run_timed

from tests.s3server import S3

LATENCIES = (0.0, 0.020, 0.050, 0.100)


def build_cmd(source: str, out: Path, ck: Path) -> list[str]:
    shutil.rmtree(out, ignore_errors=True)
    return [str(BIN / "indexer"), "build", source, "--out", str(out), "--checkpoint", str(ck),
            "--no-progress", "--precision", "fp32"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--work", type=Path, default=REPO / "build" / "bench")
    parser.add_argument("--photos", type=int, default=300)
    args = parser.parse_args()
    ck = prepared(args.work)
    photos = sorted(p for p in imagenet_corpus(args.work).rglob("*") if p.is_file())
    photos = photos[: args.photos]
    folder = args.work / "objectstore" / "photos"
    shutil.rmtree(folder.parent, ignore_errors=True)
    folder.mkdir(parents=True)
    for p in photos:
        shutil.copyfile(p, folder / p.name)
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # moto's server logs each request
    s3 = S3()
    try:
        client = s3.client()
        client.create_bucket(Bucket="bench")
        for p in sorted(folder.iterdir()):
            client.upload_file(str(p), "bench", f"photos/{p.name}")
        s3.preload("bench")  # objects served by the proxy alone: ~1 ms of its CPU a GET
        env = {**os.environ, **s3.env()}
        os.environ.update(s3.env())
        out = folder.parent / "out"
        run_timed(build_cmd(str(folder), out, ck))  # warm: the export and the decision known
        local = run_timed(build_cmd(str(folder), out, ck)).seconds
        lines = [
            f"# bucket vs folder: {len(photos)} photos, fresh processes",
            f"{'local folder':>22}: {local:6.2f} s {len(photos) / local:7.1f} images/s",
        ]
        for latency in LATENCIES:
            s3.faults.latency = latency
            cmd = ["env", *[f"{k}={v}" for k, v in s3.env().items()],
                   *build_cmd("s3://bench/photos/", out, ck)]  # fmt: skip
            served = time.process_time()  # the S3 server's and the proxy's CPU (this process)
            seconds = run_timed(cmd).seconds
            served = time.process_time() - served
            target = " (target >= 0.80)" if latency == 0.050 else ""
            lines.append(f"{f's3, +{latency * 1000:.0f} ms a request':>22}: {seconds:6.2f} s "
                         f"{len(photos) / seconds:7.1f} images/s, {local / seconds:.2f}x the "
                         f"folder's rate{target}; the S3 server took {served:.2f} CPU-s of "
                         "the same cores")  # fmt: skip
        del env
        s3.faults.latency = 0.0
        lines += listing_rate(s3)
    finally:
        s3.stop()
    print("\n".join(lines))


def listing_rate(s3: S3, count: int = 3000) -> list[str]:
    """Objects listed per second over `count` objects in 30 sub-prefixes, at 0 and 50 ms a
    request: one flat paged listing (fsspec's find, the baseline) and indexer's split one
    (the sub-prefixes at once)."""
    from indexer.sources.bucket import BucketSource, open_filesystem

    client = s3.client()
    for n in range(count):
        client.put_object(Bucket="bench", Key=f"many/{n // 100:03d}/{n:06d}.jpg", Body=b"x")
    lines = []
    for latency in (0.0, 0.050):
        s3.faults.latency = latency
        start = time.perf_counter()
        flat = open_filesystem("s3", {}).find("bench/many", detail=True)
        flat_seconds = time.perf_counter() - start
        start = time.perf_counter()
        listed = BucketSource("s3://bench/many/").keys_and_locators()
        seconds = time.perf_counter() - start
        assert len(listed) == len(flat) == count
        lines.append(
            f"{f'listing, +{latency * 1000:.0f} ms':>22}: {count:,} objects: flat "
            f"{count / flat_seconds:,.0f} objects/s, split {count / seconds:,.0f} objects/s "
            f"({flat_seconds / seconds:.2f}x; 100M objects: "
            f"{100e6 / (count / seconds) / 3600:.1f} h at this rate)"
        )
    s3.faults.latency = 0.0
    return lines


if __name__ == "__main__":
    main()
