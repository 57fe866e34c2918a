"""How long lf2 takes, with its DEFAULT limits, to fail against a dead or silent S3 / MLflow endpoint.

Each case runs the real ``lf2`` command in a subprocess against a server on 127.0.0.1 that either is not
there (connection refused) or accepts connections and never answers; prints the wall time, the exit code
and the one error line. Goal (docs/reliability.md): every case fails in <= 60 s.

    python bench/fail_fast.py [--repeat 2]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from faults import closed_port, silent_server  # noqa: E402


def run(argv: list[str], env: dict[str, str]) -> tuple[float, int, str]:
    full = {**{k: v for k, v in os.environ.items() if not k.startswith(("LF2_S3_", "MLFLOW_HTTP_"))}, **env}
    t0 = time.monotonic()
    r = subprocess.run([sys.executable, "-m", "lf2core.cli", *argv], capture_output=True, text=True, env=full,
                       cwd=tempfile.mkdtemp(prefix="lf2-ff-"))
    line = next((ln for ln in r.stderr.splitlines() if ln.startswith("lf2: error:")), r.stderr.strip()[-200:])
    return time.monotonic() - t0, r.returncode, line


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeat", type=int, default=1)
    args = ap.parse_args()
    s3 = {"AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "y", "AWS_DEFAULT_REGION": "us-east-1"}
    cases = [
        ("S3 silent: lf2 data check s3://b/market", silent_server, lambda u: (["data", "check", "s3://b/market"],
                                                                          {**s3, "AWS_ENDPOINT_URL": u})),
        ("S3 dead: lf2 data check s3://b/market", closed_port, lambda u: (["data", "check", "s3://b/market"],
                                                                      {**s3, "AWS_ENDPOINT_URL": u})),
        ("MLflow silent: lf2 promote", silent_server, lambda u: (["promote", "--tracking-uri", u], {})),
        ("MLflow dead: lf2 promote", closed_port, lambda u: (["promote", "--tracking-uri", u], {})),
    ]
    print(f"{'case':<44} {'seconds':>8} {'rc':>3}  error line")
    worst = 0.0
    for name, server, make in cases:
        for _ in range(args.repeat):
            with server() as url:
                argv, env = make(url)
                secs, rc, line = run(argv, env)
            worst = max(worst, secs)
            print(f"{name:<44} {secs:>8.1f} {rc:>3}  {line}")
    print(f"worst: {worst:.1f} s (goal <= 60 s)")
    return 0 if worst <= 60 else 1


if __name__ == "__main__":
    sys.exit(main())
