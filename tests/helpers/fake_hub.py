"""Test helper: a local HTTP server that answers the Hugging Face Hub calls ``pipeline.publish`` makes (create a
repository, list its files, preupload, commit) and keeps what was committed, so the upload is tested end to end
through ``huggingface_hub`` without a network.

Every file is answered as a regular (inline, base64) upload; the large-file transfer itself (Xet or LFS) is
``huggingface_hub``'s and is not re-implemented here.
"""

from __future__ import annotations

import base64
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlparse


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict] = {}  # repo id -> {"private": bool, "files": {path: bytes}}
        self.requests: list[tuple[str, str, str | None]] = []  # (method, path, Authorization header)
        self.commits: list[dict] = []  # {"repo", "summary", "added", "deleted"}
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # keep the test output clean
                pass

            def _send(self, code: int, body: object) -> None:
                blob = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(blob)))
                self.end_headers()
                self.wfile.write(blob)

            def _body(self) -> bytes:
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _record(self) -> str:
                path = unquote(urlparse(self.path).path)
                hub.requests.append((self.command, path, self.headers.get("Authorization")))
                return path

            def do_GET(self) -> None:
                path = self._record()
                parts = path.strip("/").split("/")
                # /api/models/{owner}/{name}/tree/{revision}[/...]
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "tree":
                    repo = hub.repos.get(f"{parts[2]}/{parts[3]}")
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"})
                    return self._send(
                        200,
                        [
                            {"type": "file", "path": p, "size": len(b), "oid": "0" * 40}
                            for p, b in repo["files"].items()
                        ],
                    )
                if parts[:2] == ["api", "models"] and len(parts) == 4:  # /api/models/{owner}/{name}: repo info
                    repo = hub.repos.get(f"{parts[2]}/{parts[3]}")
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"})
                    return self._send(
                        200, {"id": f"{parts[2]}/{parts[3]}", "private": repo["private"], "sha": "0" * 40}
                    )
                self._send(404, {"error": f"not faked: GET {path}"})

            def do_POST(self) -> None:
                path = self._record()
                body = self._body()
                parts = path.strip("/").split("/")
                if path == "/api/validate-yaml":  # the card's front matter, checked before a commit that has one
                    errors = hub.card_errors(json.loads(body)["content"])
                    return self._send(400 if errors else 200, {"errors": errors, "warnings": []})
                if path == "/api/repos/create":
                    req = json.loads(body)
                    repo_id = f"{req.get('organization') or 'me'}/{req['name']}"
                    if repo_id in hub.repos:
                        return self._send(409, {"error": "You already created this model repo", "url": repo_id})
                    private = req.get("visibility") == "private" or bool(req.get("private"))
                    hub.repos[repo_id] = {"private": private, "files": {}}
                    return self._send(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "preupload":
                    files = json.loads(body)["files"]
                    return self._send(
                        200,
                        {
                            "files": [
                                {"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files
                            ]
                        },
                    )
                if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] == "commit":
                    repo_id = f"{parts[2]}/{parts[3]}"
                    repo = hub.repos.get(repo_id)
                    if repo is None:
                        return self._send(404, {"error": "Repository not found"})
                    commit = {"repo": repo_id, "summary": None, "added": {}, "deleted": []}
                    for line in body.decode().splitlines():
                        item = json.loads(line)
                        key, value = item["key"], item["value"]
                        if key == "header":
                            commit["summary"] = value.get("summary")
                        elif key == "file":
                            commit["added"][value["path"]] = base64.b64decode(value["content"])
                        elif key == "deletedFile":
                            commit["deleted"].append(value["path"])
                        else:
                            return self._send(400, {"error": f"not faked: commit item {key}"})
                    for p in commit["deleted"]:
                        repo["files"].pop(p, None)
                    repo["files"].update(commit["added"])
                    hub.commits.append(commit)
                    return self._send(
                        200,
                        {
                            "commitUrl": f"{hub.url}/{repo_id}/commit/{len(hub.commits):040x}",
                            "commitOid": f"{len(hub.commits):040x}",
                        },
                    )
                self._send(404, {"error": f"not faked: POST {path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @staticmethod
    def card_errors(content: str) -> list[dict]:
        """A few of the Hub's metadata checks: front matter that parses, a licence, a base model that is a hub id."""
        import re

        import yaml

        if not content.startswith("---\n"):
            return [{"message": "no metadata"}]
        try:
            meta = yaml.safe_load(content.split("---\n")[1]) or {}
        except yaml.YAMLError as e:
            return [{"message": f"invalid YAML: {e}"}]
        errors = [] if meta.get("license") else [{"message": '"license" is required'}]
        base = meta.get("base_model")
        if base is not None and not re.fullmatch(r"[\w.\-]+/[\w.\-]+", str(base)):
            errors.append({"message": f'"base_model" {base!r} is not a model id'})
        return errors

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
