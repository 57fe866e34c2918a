#!/usr/bin/env bash
# `make test-containers`: start the engine if it can, build the CPU image, run the container tests
# (tests/test_containers.py: a tiny pipeline through kfp.local.DockerRunner against S3 + MLflow servers on
# 127.0.0.1, checked against the subprocess run), then stop the engine if this script started it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
t0=$(date +%s)
started=0
out=$(bash docker/engine.sh start) || exit 1
echo "$out"
case "$out" in *started*) started=1 ;; esac
cleanup() { [ "$started" = 1 ] && bash docker/engine.sh stop || true; }
trap cleanup EXIT
report=build/images-cpu.json
"$PY" docker/build.py images --variant cpu --quiet --report "$report"
image=$("$PY" -c "import json,sys; print(json.load(open(sys.argv[1]))['images'][0]['image'])" "$report")
LF2_CONTAINER_TESTS=1 LF2_IMAGE="$image" OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
    "$PY" -m pytest -p no:cacheprovider tests/test_containers.py -v -rs
echo "test-containers: passed in $(( $(date +%s) - t0 )) s (image $image)"
