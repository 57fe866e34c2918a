"""``lf2 pipeline submit`` through the real kfp.Client against a minimal KFP v2beta1 REST endpoint on
127.0.0.1 that records what it receives."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Iterator

import pytest

from pipelines.cli import main as pipeline_main


class _Api(BaseHTTPRequestHandler):
    posts: list = []

    def _send(self, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:  # noqa: N802
        if self.path.startswith("/apis/v2beta1/healthz"):
            self._send({"multi_user": False})
        elif self.path.startswith("/apis/v2beta1/experiments"):
            self._send({"experiments": [{"experiment_id": "exp-1", "display_name": "lf2"}], "total_size": 1})
        else:
            self._send({})

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        type(self).posts.append((self.path, body))
        if self.path.startswith("/apis/v2beta1/runs"):
            self._send({"run_id": "run-123", "display_name": body.get("display_name"), "experiment_id": "exp-1"})
        else:
            self._send({"experiment_id": "exp-1", "display_name": body.get("display_name", "")})

    def log_message(self, *args) -> None:
        pass


@pytest.fixture()
def kfp_api() -> Iterator[str]:
    _Api.posts = []
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Api)
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()


def test_submit_sends_pipeline_parameters_and_run_name(kfp_api: str, capsys) -> None:
    rc = pipeline_main(["submit", "--host", kfp_api, "-c", "demo", "-s", "finetune.rounds=2", "--gpus", "1",
                        "--run-name", "nightly", "--object-prefix", "s3://bucket/lf2", "--experiment", "mlf-exp",
                        "--kfp-experiment", "lf2", "--image", "reg.example/lf2:t"])
    assert rc == 0
    assert "submitted run run-123" in capsys.readouterr().out
    runs = [b for p, b in _Api.posts if p.startswith("/apis/v2beta1/runs")]
    assert len(runs) == 1
    run = runs[0]
    assert run["display_name"] == "nightly" and run["experiment_id"] == "exp-1"
    params = run["runtime_config"]["parameters"]
    assert params["recipe"] == "demo" and json.loads(params["overrides"]) == ["finetune.rounds=2"]
    assert params["object_prefix"] == "s3://bucket/lf2" and params["mlflow_experiment"] == "mlf-exp"
    spec = run["pipeline_spec"]
    tasks = spec["pipeline_spec"]["root"]["dag"]["tasks"] if "pipeline_spec" in spec else spec["root"]["dag"]["tasks"]
    assert {"finetune", "finetune-2", "register"} <= set(tasks)


def test_submit_unreachable_host_is_one_clear_error() -> None:
    from lf2core.errors import Lf2Error

    with pytest.raises(Lf2Error, match=r"^http://127.0.0.1:9: cannot submit the pipeline"):
        pipeline_main(["submit", "--host", "http://127.0.0.1:9", "-s", "finetune.rounds=1"])
