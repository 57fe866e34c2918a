"""Object-storage throughput of lf2core.storage against a moto S3 server on 127.0.0.1.

Prints: single-object PUT/GET of small files, multipart upload + download of one big file, an
``output_dir`` commit of a directory of many small files (a stage output / dataset) and the cold and
warm ``local_path`` of that prefix (download into the cache, then cache hit).

moto keeps objects in memory in a Python process, so the figures measure lf2's client-side overhead
and a loopback server, not a real object store.

    python bench/storage_s3.py [--big-mb 128] [--files 500]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from lf2core import storage
from pipelines.local_servers import create_bucket, moto_s3_server, s3_env


def _t(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--big-mb", type=int, default=128)
    ap.add_argument("--files", type=int, default=500)
    ap.add_argument("--file-kb", type=int, default=8)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as d, moto_s3_server(Path(d)) as url:
        os.environ.update(s3_env(url))
        create_bucket(url, "bench")
        storage.set_cache_dir(Path(d) / "cache")
        small = os.urandom(args.file_kb * 1024)
        n = 100
        t_put = _t(lambda: [storage.write_bytes(f"s3://bench/small/{i}", small) for i in range(n)])
        t_get = _t(lambda: [storage.read_bytes(f"s3://bench/small/{i}") for i in range(n)])
        print(f"small objects ({args.file_kb} KiB): PUT {n / t_put:.0f}/s, GET {n / t_get:.0f}/s")

        big = Path(d) / "big.bin"
        big.write_bytes(os.urandom(args.big_mb * 1024 * 1024))
        t_up = _t(lambda: storage.upload_file(big, "s3://bench/big/big.bin"))
        t_down = _t(lambda: storage.local_path("s3://bench/big/big.bin"))
        print(f"big file ({args.big_mb} MiB, multipart {storage.s3.MULTIPART_CHUNKSIZE >> 20} MiB parts): "
              f"upload {args.big_mb / t_up:.0f} MiB/s, download {args.big_mb / t_down:.0f} MiB/s")

        def commit() -> None:
            with storage.output_dir("s3://bench/stage") as out:
                for i in range(args.files):
                    (out / f"{i:05d}.jpg").write_bytes(small)

        t_commit = _t(commit)
        t_cold = _t(lambda: storage.local_path("s3://bench/stage"))
        t_warm = _t(lambda: storage.local_path("s3://bench/stage"))
        print(f"output_dir commit of {args.files} x {args.file_kb} KiB files: {t_commit:.2f}s "
              f"({args.files / t_commit:.0f} files/s)")
        print(f"local_path of that prefix: cold {t_cold:.2f}s ({args.files / t_cold:.0f} files/s), "
              f"warm (cache hit, one listing) {t_warm * 1000:.0f} ms")


if __name__ == "__main__":
    main()
