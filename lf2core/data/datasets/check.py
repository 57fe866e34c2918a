"""``lf2 data check``: statistics and every problem of a dataset root, optionally decoding each image."""

from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

from .loading import detect_format, localise, parse
from .samples import SPLIT_NAMES, Splits, role_problems, split_stats


def check_image(path: str | os.PathLike) -> Optional[str]:
    """None if ``path`` opens, verifies and fully decodes with PIL, else the reason it does not."""
    from PIL import Image, ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            if im.width < 1 or im.height < 1:
                return "empty image"
    except Exception as e:  # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...)
        return f"{type(e).__name__}: {e}"
    return None


def format_stats_table(stats: dict[str, dict[str, int]]) -> str:
    """The per-split statistics as a small fixed-width table (an ``unlabelled`` column when any split has
    unlabelled images; they count as images, not as identities)."""
    extra = any(stats[s].get("unlabelled", 0) for s in SPLIT_NAMES)
    head = f"{'split':<8} {'identities':>10} {'images':>8} {'cameras':>8}"
    lines = [head + (f" {'unlabelled':>10}" if extra else "")]
    for s in SPLIT_NAMES:
        st = stats[s]
        lines.append(f"{s:<8} {st['identities']:>10} {st['images']:>8} {st['cameras']:>8}"
                     + (f" {st.get('unlabelled', 0):>10}" if extra else ""))
    return "\n".join(lines)


def check_main(root: str, fmt: Optional[str] = None, open_images: bool = True, workers: int = 0,
               role: str = "target") -> int:
    """``lf2 data check``: print split statistics and one line per problem; 1 if any problem, else 0.

    Every image file is scanned (name parsing and, with ``open_images``, PIL verify + full decode); the
    check never stops at the first problem. The splits are held to the rules ``prepare-data`` applies to
    a ``role`` (``source`` or ``target``) domain (``role_problems``). A wrong layout still raises
    DataError (the CLI exits 2).
    """
    recorded, local = localise(root)
    if fmt is None:
        fmt = detect_format(local)
        print(f"format: {fmt} (detected)")
    else:
        print(f"format: {fmt}")
    parsed = parse(fmt, local)
    print(f"root: {recorded}" + (f" (data in {parsed.data_dir})" if parsed.data_dir != local else ""))
    stats = {s: split_stats(parsed.splits[s]) for s in SPLIT_NAMES}
    print(format_stats_table(stats))
    if parsed.skipped:
        print(f"skipped {parsed.skipped} non-image entries")
    problems = list(parsed.problems)
    as_splits = Splits(*(parsed.splits[s] for s in SPLIT_NAMES))
    problems += [f"as a {role} domain: {p}" for p in role_problems(as_splits, role)]
    if open_images:
        files = [f for f in dict.fromkeys(parsed.files) if f.is_file()]
        from tqdm import tqdm

        n_workers = workers or min(8, os.cpu_count() or 1)
        with ThreadPoolExecutor(max_workers=n_workers) as pool:
            results = list(
                tqdm(pool.map(check_image, files, chunksize=64), total=len(files), desc="checking images",
                     unit="img", file=sys.stderr, disable=len(files) < 500)
            )
        bad = [(f, r) for f, r in zip(files, results) if r is not None]
        problems += [f"{f}: unreadable image ({r})" for f, r in bad]
        print(f"opened {len(files)} images, {len(bad)} unreadable")
    for p in problems:
        print(f"PROBLEM {p}")
    if problems:
        print(f"{len(problems)} problem(s) found")
        return 1
    print("ok")
    return 0
