"""Export throughput: the project's streaming exporter against a plain upload and the legacy way.

    python -m bench export [--quick] [--skip-rss] [--reps=N] [--part-size-mib=N]
                           [--part-concurrency=N]

(Options take the `--name=value` form: `python -m bench` reads bare words as names.)

Starts its own SeaweedFS on loopback, generates the folders once, then for each
shape alternates, in a rotating order, three ways of getting the folder into S3:

- ours:   `ObjectStore.upload_tar` (streaming tar + sha256 + multipart upload +
          the metadata self-copy) followed by `ObjectStore.verify` (HEAD);
- plain:  boto3 `upload_file` of the same bytes already tarred, same client, part
          size and concurrency: the store's own limit;
- legacy: tar to a temporary file, read it back for sha256, `upload_file` it.

It prints per-repetition times and paired ratios, their medians, and the peak RSS
of a child process exporting a generated 5 GB folder through `ObjectStore`.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ACCESS_KEY = "dlm-bench"
SECRET_KEY = "dlm-bench-secret"
MIB = 1 << 20
LEGACY_TARGET = 0.70  # ours / legacy
RSS_TARGET_MB = 300
RSS_EVENT_BYTES = 5 * 10**9


@dataclass(frozen=True)
class Shape:
    name: str
    total_bytes: int
    files: int
    plain_target: float  # ours / plain


FULL_SHAPES = (
    Shape("1 GiB in 40 files", 1 << 30, 40, 1.05),
    Shape("200 MiB in 2000 files", 200 * MIB, 2000, 1.20),
)
QUICK_SHAPES = (
    Shape("64 MiB in 8 files", 64 * MIB, 8, 1.05),
    Shape("16 MiB in 400 files", 16 * MIB, 400, 1.20),
)
VARIANTS = ("ours", "plain", "legacy")


@dataclass
class Timings:
    tar_bytes: int = 0
    seconds: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})
    # CPU seconds of this process plus SeaweedFS: steadier than wall time when the
    # machine is shared, since other processes' load mostly stretches waiting.
    cpu: dict[str, list[float]] = field(default_factory=lambda: {v: [] for v in VARIANTS})

    def ratios(self, other: str, of: str = "seconds") -> list[float]:
        values = getattr(self, of)
        return [o / p for o, p in zip(values["ours"], values[other], strict=True)]


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench export")
    parser.add_argument("--quick", action="store_true", help="small folders, 2 repetitions")
    parser.add_argument("--skip-rss", action="store_true", help="skip the 5 GB peak-RSS run")
    parser.add_argument("--reps", type=int, default=None, help="repetitions (default 5)")
    parser.add_argument("--part-size-mib", type=int, default=None)
    parser.add_argument("--part-concurrency", type=int, default=None)
    parser.add_argument("--rss-child", nargs=3, metavar=("ENDPOINT", "BUCKET", "SOURCE"))
    return parser.parse_args(argv)


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.rss_child:
        endpoint, bucket, source = args.rss_child
        return rss_child(endpoint, bucket, source, args.part_size_mib, args.part_concurrency)

    from dlm_pipelines.dev.seaweedfs import SeaweedFS
    from dlm_pipelines.settings import Settings

    defaults = Settings()
    part_mib = args.part_size_mib or defaults.export_part_size_mib
    concurrency = args.part_concurrency or defaults.export_part_concurrency
    reps = args.reps or (2 if args.quick else 5)
    shapes = QUICK_SHAPES if args.quick else FULL_SHAPES
    os.environ["AWS_ACCESS_KEY_ID"] = ACCESS_KEY
    os.environ["AWS_SECRET_ACCESS_KEY"] = SECRET_KEY
    # SIGTERM unwinds like Ctrl-C, so SeaweedFS is killed and the temp dir removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))

    scratch = Path(tempfile.mkdtemp(prefix="dlm-bench-export-"))
    server = SeaweedFS(scratch / "seaweedfs", ACCESS_KEY, SECRET_KEY)
    try:
        server.start()
        store = make_store(server.endpoint_url, "bench-export", part_mib, concurrency)
        store.ensure_bucket()
        print(
            f"SeaweedFS {server.endpoint_url}; part size {part_mib} MiB × {concurrency} "
            f"concurrent (same for all variants); {reps} repetitions, alternating",
            flush=True,
        )
        pid = server.process.pid if server.process else os.getpid()
        results = {shape: run_shape(store, shape, scratch, reps, pid) for shape in shapes}
        rss_mb = None
        if not args.skip_rss:
            rss_mb = measure_rss(store, scratch, part_mib, concurrency, quick=args.quick)
        return report(results, rss_mb, judged=not args.quick)
    finally:
        server.stop()
        shutil.rmtree(scratch, ignore_errors=True)


def make_store(endpoint: str, bucket: str, part_mib: int, concurrency: int) -> Any:
    from dlm_pipelines.resources import ObjectStore

    return ObjectStore(
        bucket=bucket, endpoint_url=endpoint, part_size_mib=part_mib, part_concurrency=concurrency
    )


def generate(folder: Path, total_bytes: int, files: int, *, seed: int) -> None:
    """Random (incompressible) files, 100 per sub-folder like a tiled acquisition."""
    rng = random.Random(seed)
    each = total_bytes // files
    for i in range(files):
        path = folder / f"row{i // 100:03d}" / f"Img_{i:05d}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as out:
            left = each
            while left:
                n = min(left, 4 * MIB)
                out.write(rng.randbytes(n))
                left -= n


def bench_metadata(ref_id: str) -> dict[str, Any]:
    return {
        "ref_id": ref_id,
        "timestamp": "2026-01-01T00:00:00+00:00",
        "schema_version": "1a1",
        "metadata": {"bench": True},
    }


def run_shape(store: Any, shape: Shape, scratch: Path, reps: int, server_pid: int) -> Timings:
    from boto3.s3.transfer import TransferConfig

    from dlm_pipelines.tar_stream import estimate_tar_size, part_size_for, write_tar

    source = scratch / f"src-{shape.files}"
    print(f"\n{shape.name}: generating {source}", flush=True)
    generate(source, shape.total_bytes, shape.files, seed=shape.files)
    pretarred = scratch / f"pretarred-{shape.files}.tar"
    with pretarred.open("wb") as out:
        write_tar(source, bench_metadata("plain"), out)
    chunk = part_size_for(estimate_tar_size(source), store.part_size_mib * MIB)
    config = TransferConfig(
        multipart_threshold=chunk,
        multipart_chunksize=chunk,
        max_concurrency=store.part_concurrency,
        use_threads=True,
    )
    client, bucket = store.client, store.bucket

    def ours(key: str) -> None:
        result = store.upload_tar(source=source, metadata=bench_metadata(key), key=key, ref_id=key)
        store.verify_object(key, size=result.size, sha256=result.sha256, ref_id=key)

    def plain(key: str) -> None:
        client.upload_file(str(pretarred), bucket, key, Config=config)

    def legacy(key: str) -> None:
        temporary = scratch / "legacy.tar"
        try:
            with temporary.open("wb") as out:
                write_tar(source, bench_metadata(key), out)
            with temporary.open("rb") as back:
                digest = hashlib.file_digest(back, "sha256").hexdigest()
            extra = {"Metadata": {"sha256": digest}, "ContentType": "application/x-tar"}
            client.upload_file(str(temporary), bucket, key, ExtraArgs=extra, Config=config)
        finally:
            temporary.unlink(missing_ok=True)

    run: dict[str, Callable[[str], None]] = {"ours": ours, "plain": plain, "legacy": legacy}
    timings = Timings(tar_bytes=pretarred.stat().st_size)
    timed(plain, store, "warm-up", server_pid)  # SeaweedFS volumes, connections
    for rep in range(reps):
        order = VARIANTS[rep % 3 :] + VARIANTS[: rep % 3]
        for variant in order:
            seconds, cpu = timed(run[variant], store, f"{variant}-{rep}", server_pid)
            timings.seconds[variant].append(seconds)
            timings.cpu[variant].append(cpu)
        line = "  ".join(f"{v} {timings.seconds[v][-1]:6.2f}s" for v in VARIANTS)
        print(f"  rep {rep + 1}: {line}  (load {os.getloadavg()[0]:.1f})", flush=True)
    shutil.rmtree(source)
    pretarred.unlink()
    return timings


def timed(
    action: Callable[[str], None], store: Any, key: str, server_pid: int
) -> tuple[float, float]:
    """Wall seconds, and CPU seconds of this process plus SeaweedFS, of `action(key)`.

    Dirty pages of the variant before (SeaweedFS's volume writes, the legacy temp
    file) are written back first, untimed: no variant pays for another's writeback.
    """
    os.sync()
    cpu_before = cpu_seconds(server_pid) + time.process_time()
    started = time.perf_counter()
    action(key)
    seconds = time.perf_counter() - started
    cpu = cpu_seconds(server_pid) + time.process_time() - cpu_before
    store.client.delete_object(Bucket=store.bucket, Key=key)
    return seconds, cpu


def cpu_seconds(pid: int) -> float:
    """User plus system CPU seconds of a process (all its threads) from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure_rss(store: Any, scratch: Path, part_mib: int, concurrency: int, quick: bool) -> float:
    """Peak RSS (MB) of a fresh process exporting a generated 5 GB folder through ObjectStore."""
    total = RSS_EVENT_BYTES // 10 if quick else RSS_EVENT_BYTES
    source = scratch / "src-rss"
    print(f"\npeak RSS: generating {total / 1e9:.1f} GB in {source}", flush=True)
    block = random.Random(5).randbytes(64 * MIB)  # content does not matter for memory
    files = 20
    source.mkdir()
    for i in range(files):
        with (source / f"Img_{i:03d}.tif").open("wb") as out:
            left = total // files
            while left:
                n = min(left, len(block))
                out.write(block[:n])
                left -= n
    command = [
        sys.executable,
        "-m",
        "bench.export",
        "--rss-child",
        store.endpoint_url,
        store.bucket,
        str(source),
        f"--part-size-mib={part_mib}",
        f"--part-concurrency={concurrency}",
    ]
    # The child reports its own VmHWM: getrusage(RUSAGE_CHILDREN) would also count
    # this (large) process's pages, shared with the child between fork and exec.
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired as exc:
        raise RuntimeError("the RSS child did not finish in 30 minutes") from exc
    if done.returncode != 0:
        raise RuntimeError(f"RSS child failed with {done.returncode}: {done.stderr[-2000:]}")
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    peak_mb = facts["vmhwm_kib"] * 1024 / 1e6
    print(
        f"  exported {facts['size'] / 1e9:.2f} GB in {facts['seconds']:.1f} s "
        f"({facts['size'] / MIB / facts['seconds']:.0f} MiB/s); peak RSS (VmHWM) {peak_mb:.0f} MB",
        flush=True,
    )
    shutil.rmtree(source)
    return peak_mb


def rss_child(
    endpoint: str, bucket: str, source: str, part_mib: int | None, concurrency: int | None
) -> int:
    store = make_store(endpoint, bucket, part_mib or 16, concurrency or 4)
    key = "rss/event.tar"
    started = time.perf_counter()
    result = store.upload_tar(
        source=Path(source), metadata=bench_metadata("rss"), key=key, ref_id="rss"
    )
    store.verify_object(key, size=result.size, sha256=result.sha256, ref_id="rss")
    seconds = time.perf_counter() - started
    store.client.delete_object(Bucket=bucket, Key=key)
    status = Path("/proc/self/status").read_text()
    vmhwm = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM"))
    print(json.dumps({"size": result.size, "seconds": seconds, "vmhwm_kib": vmhwm}))
    return 0


def report(results: dict[Shape, Timings], rss_mb: float | None, judged: bool) -> int:
    header = (
        f"{'shape':<22} {'rep':>6} {'ours s':>7} {'plain s':>8} {'legacy s':>9} "
        f"{'ours MiB/s':>10} {'plain MiB/s':>11} {'legacy MiB/s':>12} "
        f"{'ours/plain':>10} {'ours/legacy':>11} {'cpu o/p':>7} {'cpu o/l':>7}"
    )
    print("\n" + header + "\n" + "-" * len(header))
    missed: list[str] = []
    for shape, t in results.items():
        mib = t.tar_bytes / MIB
        vs_plain, vs_legacy = t.ratios("plain"), t.ratios("legacy")
        cpu_plain, cpu_legacy = t.ratios("plain", of="cpu"), t.ratios("legacy", of="cpu")
        rows = [(str(i + 1), i) for i in range(len(vs_plain))] + [("median", None)]
        for label, i in rows:

            def pick(values: list[float], i: int | None = i) -> float:
                return statistics.median(values) if i is None else values[i]

            secs = {v: pick(t.seconds[v]) for v in VARIANTS}
            print(
                f"{shape.name if label in ('1', 'median') else '':<22} {label:>6} "
                f"{secs['ours']:7.2f} {secs['plain']:8.2f} {secs['legacy']:9.2f} "
                f"{mib / secs['ours']:10.0f} {mib / secs['plain']:11.0f} "
                f"{mib / secs['legacy']:12.0f} {pick(vs_plain):10.3f} {pick(vs_legacy):11.3f} "
                f"{pick(cpu_plain):7.3f} {pick(cpu_legacy):7.3f}"
            )
        p, lg = statistics.median(vs_plain), statistics.median(vs_legacy)
        verdict_p = "ok" if p <= shape.plain_target else "MISSED"
        verdict_l = "ok" if lg <= LEGACY_TARGET else "MISSED"
        print(
            f"{'':<22} {'target':>6} {'':>7} {'':>8} {'':>9} {'':>10} {'':>11} {'':>12} "
            f"{'≤' + format(shape.plain_target, '.2f') + ' ' + verdict_p:>10} "
            f"{'≤' + format(LEGACY_TARGET, '.2f') + ' ' + verdict_l:>11}"
        )
        missed += [f"{shape.name} vs plain"] * (verdict_p != "ok")
        missed += [f"{shape.name} vs legacy"] * (verdict_l != "ok")
    if rss_mb is not None:
        verdict = "ok" if rss_mb <= RSS_TARGET_MB else "MISSED"
        size = "5 GB" if judged else f"{RSS_EVENT_BYTES / 10 / 1e9:.1f} GB (quick)"
        print(f"peak RSS exporting a {size} event: {rss_mb:.0f} MB (≤{RSS_TARGET_MB} {verdict})")
        missed += ["peak RSS"] * (verdict != "ok")
    print(
        "ratios: time ours / time other per repetition, and the median of those ratios "
        "(lower is better); cpu o/p, o/l: the same for CPU seconds of the benchmark "
        "process plus SeaweedFS"
    )
    if not judged:
        print("--quick: smoke run, targets not judged")
        return 0
    if missed:
        print("missed: " + ", ".join(missed))
    return 1 if missed else 0


if __name__ == "__main__":  # the RSS child: python -m bench.export --rss-child ...
    sys.exit(main(sys.argv[1:]))
