"""Speed of the synthetic data generator on ONE core.

    .venv/bin/python bench/synth.py [--ids 200] [--test-ids 100] [--height 128] [--width 64] [--repeat 2]

Writes both domains (``write_domain``, the full path: drawing, JPEG encoding, files, atomic commit) into a
temporary directory and prints, per domain, images/s of wall time and images per CPU-second of this
process (the one-core figure that stays meaningful when other jobs share the machine), plus the load
average. BLAS/OpenMP threads are limited to 1 before numpy is imported.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_v] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from lf2core.data import synthetic  # noqa: E402


def contact_sheet(path: Path, n_ids: int = 6, seed: int = 0, version: str = synthetic.GENERATOR_VERSION) -> None:
    """PNG grid: for each domain, ``n_ids`` identities (rows) x its cameras (columns), 128x64 each."""
    import numpy as np
    from PIL import Image, ImageDraw

    h, w, gap, lab_w, head = 128, 64, 4, 58, 34
    panels = []
    for domain in synthetic.DOMAINS:
        ncam = synthetic.STYLES_BY_VERSION[version][domain].num_cams
        pids = list(range(1, n_ids + 1))
        imgs = synthetic.render_examples(domain, pids, list(range(ncam)), seed=seed, height=h, width=w,
                                         version=version)
        pw, ph = lab_w + ncam * (w + gap), head + n_ids * (h + gap)
        panel = Image.new("RGB", (pw, ph), (255, 255, 255))
        d = ImageDraw.Draw(panel)
        d.text((4, 2), f"domain {domain} ({ncam} cameras)", fill=(0, 0, 0))
        for c in range(ncam):
            d.text((lab_w + c * (w + gap) + 14, 18), f"cam {c + 1}", fill=(0, 0, 0))
        for i, pid in enumerate(pids):
            y = head + i * (h + gap)
            d.text((4, y + h // 2 - 6), f"id {pid:04d}", fill=(0, 0, 0))
            for c in range(ncam):
                panel.paste(Image.fromarray(np.ascontiguousarray(imgs[i, c])), (lab_w + c * (w + gap), y))
        panels.append(panel)
    total_w = sum(p.width for p in panels) + 16 * (len(panels) - 1)
    sheet = Image.new("RGB", (total_w, max(p.height for p in panels) + 16), (255, 255, 255))
    x = 0
    for p in panels:
        sheet.paste(p, (x, 0))
        x += p.width + 16
    ImageDraw.Draw(sheet).text((4, sheet.height - 14), f"lf2 synthetic data, generator v{version},"
                               f" seed {seed}; same id = same person in every camera", fill=(90, 90, 90))
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path, optimize=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ids", type=int, default=200)
    ap.add_argument("--test-ids", type=int, default=100)
    ap.add_argument("--height", type=int, default=128)
    ap.add_argument("--width", type=int, default=64)
    ap.add_argument("--repeat", type=int, default=2, help="best of N runs per domain")
    ap.add_argument("--version", default=synthetic.GENERATOR_VERSION, choices=synthetic.VERSIONS)
    ap.add_argument("--contact-sheet", default="", metavar="PNG",
                    help="only write the contact sheet (identities x cameras for both domains) to PNG")
    args = ap.parse_args()
    if args.contact_sheet:
        contact_sheet(Path(args.contact_sheet), version=args.version)
        print(f"wrote {args.contact_sheet}")
        return
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for domain in synthetic.DOMAINS:
            best: dict = {}
            for r in range(args.repeat):
                out = Path(tmp) / f"{domain}{r}"
                c0, w0 = time.process_time(), time.perf_counter()
                st = synthetic.write_domain(domain, out, ids=args.ids, test_ids=args.test_ids, seed=r, version=args.version,
                                            height=args.height, width=args.width)
                cpu, wall = time.process_time() - c0, time.perf_counter() - w0
                row = {"domain": domain, "images": st["images"], "wall_s": round(wall, 2),
                       "images_per_s_wall": round(st["images"] / wall, 1),
                       "images_per_cpu_s": round(st["images"] / cpu, 1),
                       "size": f"{args.height}x{args.width}", "version": synthetic.GENERATOR_VERSION}
                if not best or row["images_per_cpu_s"] > best["images_per_cpu_s"]:
                    best = row
            rows.append(best)
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    for row in rows:
        row["loadavg_1m"] = round(load[0], 2)
        print(json.dumps(row))
    print(f"cpu cores on this machine: {os.cpu_count()}; load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


if __name__ == "__main__":
    main()
