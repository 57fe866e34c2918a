"""A Kubernetes API server on 127.0.0.1 that speaks the subset ``components.trainjob`` uses for the
TrainJob custom resource (``trainer.kubeflow.org/v1alpha1``, namespaced ``trainjobs``):

- ``POST   /apis/<g>/<v>/namespaces/<ns>/trainjobs``           create (201; 409 if the name exists; 422 if
  the body does not validate against the pinned CRD schema, ``tests/schemas/trainjob-v2.1.0.schema.yaml``)
- ``GET    /apis/<g>/<v>/namespaces/<ns>/trainjobs/<name>``    get (404 when absent)
- ``GET    /apis/<g>/<v>/namespaces/<ns>/trainjobs?watch=true&fieldSelector=metadata.name=<n>
  &resourceVersion=<rv>&timeoutSeconds=<t>``                    watch: JSON lines ``{"type", "object"}`` of
  every change after ``rv``, for at most ``t`` seconds, then the connection closes
- ``DELETE /apis/<g>/<v>/namespaces/<ns>/trainjobs/<name>``    delete (honours ``preconditions.uid``: 409)

After a create, ``script`` (a list of ``(delay_s, status, hook)``) is played on the new object by a
thread: each step replaces ``.status`` after ``delay_s`` and calls ``hook(obj)`` (e.g. to write the
output the pods would write). Requests are recorded in ``requests`` (method, path, query, body).
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Callable, Optional
from urllib.parse import parse_qs, urlparse

import jsonschema
import yaml

SCHEMA = yaml.safe_load((Path(__file__).parent / "schemas" / "trainjob-v2.1.0.schema.yaml").read_text())
PREFIX = "/apis/trainer.kubeflow.org/v1alpha1/namespaces/"

Step = tuple[float, dict, Optional[Callable[[dict], None]]]


class FakeKube:
    def __init__(self, script: Optional[list[Step]] = None) -> None:
        self.script = script or []
        self.objects: dict[tuple[str, str], dict] = {}
        self.events: list[tuple[int, str, str, str, dict]] = []  # (rv, type, ns, name, object)
        self.rv = 100
        self.cond = threading.Condition()
        self.requests: list[tuple[str, str, dict, Any]] = []
        self.deleted: list[str] = []
        self.server: Optional[ThreadingHTTPServer] = None

    # ----------------------------------------------------------------- state
    def _bump(self, kind: str, ns: str, obj: dict) -> None:
        self.rv += 1
        obj["metadata"]["resourceVersion"] = str(self.rv)
        self.events.append((self.rv, kind, ns, obj["metadata"]["name"], copy.deepcopy(obj)))
        self.cond.notify_all()

    def put(self, ns: str, obj: dict) -> dict:
        """Store ``obj`` as if someone else had created it (no script)."""
        with self.cond:
            obj = copy.deepcopy(obj)
            obj["metadata"].setdefault("uid", str(uuid.uuid4()))
            self.objects[(ns, obj["metadata"]["name"])] = obj
            self._bump("ADDED", ns, obj)
            return obj

    def _play(self, ns: str, name: str) -> None:
        for delay, status, hook in self.script:
            time.sleep(delay)
            with self.cond:
                obj = self.objects.get((ns, name))
                if obj is None:
                    return
                obj["status"] = copy.deepcopy(status)
                if hook is not None:
                    hook(obj)
                self._bump("MODIFIED", ns, obj)

    # ----------------------------------------------------------------- http
    def handler(self) -> type:
        fake = self

        class H(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # watch answers are chunked, like the API server's

            def log_message(self, *a: Any) -> None:
                pass

            def _send(self, code: int, body: Any) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _status(self, code: int, reason: str, message: str) -> None:
                self._send(code, {"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code,
                                  "reason": reason, "message": message})

            def _route(self) -> tuple[Optional[str], Optional[str], dict]:
                u = urlparse(self.path)
                q = {k: v[0] for k, v in parse_qs(u.query).items()}
                if not u.path.startswith(PREFIX):
                    return None, None, q
                rest = u.path[len(PREFIX):].split("/")
                if len(rest) < 2 or rest[1] != "trainjobs":
                    return None, None, q
                return rest[0], (rest[2] if len(rest) > 2 else ""), q

            def _body(self) -> Any:
                n = int(self.headers.get("Content-Length") or 0)
                return json.loads(self.rfile.read(n)) if n else None

            def do_POST(self) -> None:
                ns, name, q = self._route()
                body = self._body()
                fake.requests.append(("POST", self.path, q, body))
                if ns is None or name:
                    return self._status(404, "NotFound", "no such resource")
                try:
                    jsonschema.validate(body, SCHEMA)
                except jsonschema.ValidationError as e:
                    return self._status(422, "Invalid", f"TrainJob is invalid: {e.message}")
                key = (ns, body["metadata"]["name"])
                with fake.cond:
                    if key in fake.objects:
                        return self._status(409, "AlreadyExists", f"trainjobs {key[1]} already exists")
                    obj = copy.deepcopy(body)
                    obj["metadata"].update(uid=str(uuid.uuid4()), namespace=ns,
                                           creationTimestamp=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
                    fake.objects[key] = obj
                    fake._bump("ADDED", ns, obj)
                    out = copy.deepcopy(obj)
                threading.Thread(target=fake._play, args=key, daemon=True).start()
                self._send(201, out)

            def do_GET(self) -> None:
                ns, name, q = self._route()
                fake.requests.append(("GET", self.path, q, None))
                if ns is None:
                    return self._status(404, "NotFound", "no such resource")
                if name:
                    with fake.cond:
                        obj = copy.deepcopy(fake.objects.get((ns, name)))
                    return self._send(200, obj) if obj else self._status(404, "NotFound", f"trainjobs {name} not found")
                if q.get("watch", "").lower() not in ("true", "1"):
                    with fake.cond:
                        items = [copy.deepcopy(o) for (n, _), o in fake.objects.items() if n == ns]
                    return self._send(200, {"apiVersion": "trainer.kubeflow.org/v1alpha1", "kind": "TrainJobList",
                                            "items": items, "metadata": {"resourceVersion": str(fake.rv)}})
                self._watch(ns, q)

            def _watch(self, ns: str, q: dict) -> None:
                want = q.get("fieldSelector", "").partition("metadata.name=")[2] or None
                since = int(q.get("resourceVersion") or 0)
                deadline = time.monotonic() + float(q.get("timeoutSeconds") or 30)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Transfer-Encoding", "chunked")
                self.send_header("Connection", "close")
                self.end_headers()

                def chunk(data: bytes) -> None:
                    self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                    self.wfile.flush()

                try:
                    while True:
                        with fake.cond:
                            new = [e for e in fake.events if e[0] > since and e[2] == ns
                                   and (want is None or e[3] == want)]
                            if not new:
                                left = deadline - time.monotonic()
                                if left <= 0:
                                    chunk(b"")  # the last chunk: the watch ends
                                    return
                                fake.cond.wait(min(left, 0.2))
                                continue
                        for rv, kind, _, _, obj in new:
                            chunk((json.dumps({"type": kind, "object": obj}) + "\n").encode())
                            since = rv
                except (BrokenPipeError, ConnectionResetError):
                    return

            def do_DELETE(self) -> None:
                ns, name, q = self._route()
                body = self._body()
                fake.requests.append(("DELETE", self.path, q, body))
                with fake.cond:
                    obj = fake.objects.get((ns, name or ""))
                    if obj is None:
                        return self._status(404, "NotFound", f"trainjobs {name} not found")
                    want_uid = ((body or {}).get("preconditions") or {}).get("uid")
                    if want_uid and want_uid != obj["metadata"]["uid"]:
                        return self._status(409, "Conflict", "Precondition failed: UID in precondition")
                    del fake.objects[(ns, name)]
                    fake.deleted.append(name)
                    fake._bump("DELETED", ns, obj)
                self._send(200, {"kind": "Status", "apiVersion": "v1", "status": "Success"})

        return H

    def __enter__(self) -> str:
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self.handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __exit__(self, *exc: Any) -> None:
        assert self.server is not None
        self.server.shutdown()
        self.server.server_close()
