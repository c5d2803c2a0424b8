"""HTTP client for the job service (used by `llm-prune jobs ...` and the demo).

`Client(base_url, api_key)`; the defaults come from LLM_PRUNE_SERVER and LLM_PRUNE_API_KEY. API
error objects become `UserError` with the server's message, so the CLI prints one line."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tarfile
import time
import uuid
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import quote

import httpx

from llm_prune.errors import UserError, first_line
from llm_prune.paths import check_output_dir

DEFAULT_SERVER = "http://127.0.0.1:8000"
STREAM_READ_TIMEOUT = 60.0  # the server sends a keep-alive every 15 s while a job is quiet
RECONNECTS = 5  # a followed event stream that breaks is resumed from its last event this many times


def _server_url(url: str) -> str:
    """`host:port` as curl takes it (http:// assumed); anything but an http(s) URL with a host and a
    port a socket can have is refused here, not reported later as an unreachable server."""
    if "://" not in url:
        url = "http://" + url
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError) as exc:
        reason = first_line(exc, 200)
    else:
        port = parsed.port
        reason = ("the scheme must be http or https" if parsed.scheme not in ("http", "https") else
                  "it names no host" if not parsed.host else
                  f"port {port} is out of range (1-65535)" if port is not None and not 0 < port < 65536 else "")
        if not reason:
            return url.rstrip("/")
    raise UserError(f"invalid server URL '{url}': {reason}; expected e.g. {DEFAULT_SERVER}", param="server")


class Client:
    def __init__(self, base_url: str | None = None, api_key: str | None = None, timeout: float = 60.0):
        if base_url is not None and not base_url.strip():  # an unset variable expanded, not a choice of default
            raise UserError("the server URL is empty; check --server or LLM_PRUNE_SERVER", param="server")
        self.base_url = _server_url((base_url or os.environ.get("LLM_PRUNE_SERVER") or DEFAULT_SERVER).strip())
        key = api_key if api_key is not None else os.environ.get("LLM_PRUNE_API_KEY")
        key = key.strip() if key else key  # a key pasted with its line end is the same key
        if key and not (key.isascii() and key.isprintable()):
            # An HTTP header carries ASCII only; httpx would fail with an encoding error on the first request.
            raise UserError("the API key must be printable ASCII (keys look like lp-...); check --api-key or "
                            "LLM_PRUNE_API_KEY", param="api_key")
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            self.http = httpx.Client(base_url=self.base_url, headers=headers, timeout=timeout)
        except (httpx.InvalidURL, ValueError) as exc:
            raise UserError(f"invalid server URL '{self.base_url}': {first_line(exc, 200)}; expected e.g. "
                            f"{DEFAULT_SERVER}", param="server") from None
        # Streams wait for the next event or chunk at most this long: a server that stops answering
        # mid-stream is reported instead of waited on forever.
        # (connect, read, write, pool)
        self.stream_timeout = (timeout, max(timeout, STREAM_READ_TIMEOUT), timeout, timeout)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _call(self, method: str, path: str, retries: int = 0, **kw) -> Any:
        """One request; with `retries`, a request whose answer was lost (the connection) is sent again
        (for a POST only with an Idempotency-Key, which makes that safe)."""
        for attempt in range(retries + 1):
            try:
                r = self.http.request(method, path, **kw)
                break
            except httpx.TransportError as exc:
                if attempt < retries:
                    time.sleep(1.0 + attempt)
                    continue
                maybe = " (the job may or may not have been submitted; `llm-prune jobs list` shows it)" \
                    if retries and method == "POST" else ""
                raise UserError(f"cannot reach the server at {self.base_url}: {first_line(exc, 200)}{maybe}") \
                    from None
            except (httpx.HTTPError, httpx.InvalidURL) as exc:  # an undecodable body, a bad URL
                raise UserError(f"cannot reach the server at {self.base_url}: {first_line(exc, 200)}") from None
        _raise_for_error(r)
        return self._api_object(r)

    def _api_object(self, r: httpx.Response) -> dict:
        """The body of a successful answer, which is always an API object; anything else means the
        URL is not an llm-prune server (another service, a proxy's page, a redirect)."""
        try:
            data = r.json()
        except ValueError:
            data = None
        if not isinstance(data, dict) or "object" not in data:
            kind = r.headers.get("content-type", "no content type").split(";")[0]
            raise UserError(f"{self.base_url} did not answer as an llm-prune server (HTTP {r.status_code}, {kind}); "
                            "check --server / LLM_PRUNE_SERVER", param="server")
        return data

    # --- files and jobs -------------------------------------------------------------------
    def upload(self, path: str | Path, purpose: str = "recovery") -> dict:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"file not found: {path}", param="file")
        with open(p, "rb") as fh:
            return self._call("POST", "/v1/files", files={"file": (p.name, fh)}, data={"purpose": purpose})

    def submit(self, body: dict, retries: int = 2) -> dict:
        """POST the job with an `Idempotency-Key`: when the answer is lost (a timeout, a dropped
        connection), the same request is sent again and the server returns the job it made, once."""
        return self._call("POST", "/v1/jobs", retries=retries, json=body,
                          headers={"Idempotency-Key": str(uuid.uuid4())})

    def list_jobs(self, after: str | None = None, limit: int = 20) -> dict:
        params = {"limit": limit, **({"after": after} if after else {})}
        return self._call("GET", "/v1/jobs", params=params)

    def job(self, job_id: str, retries: int = 0) -> dict:
        """`retries`: polls that outlast a server restart (a GET is safe to repeat)."""
        return self._call("GET", f"/v1/jobs/{_segment(job_id)}", retries=retries)

    def cancel(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{_segment(job_id)}/cancel")

    def retry(self, job_id: str) -> dict:
        return self._call("POST", f"/v1/jobs/{_segment(job_id)}/retry")

    def delete(self, job_id: str) -> dict:
        return self._call("DELETE", f"/v1/jobs/{_segment(job_id)}")

    def events(self, job_id: str, after: int | None = None, limit: int = 100) -> dict:
        params = {"limit": limit, **({"after": after} if after is not None else {})}
        return self._call("GET", f"/v1/jobs/{_segment(job_id)}/events", params=params)

    def stream_events(self, job_id: str, after: int | None = None) -> Iterator[dict]:
        """Server-Sent Events until the job ends; yields event objects, then {'end': status}. A
        stream that breaks (a restarted server, a dropped connection) is resumed from the last
        event received, as an SSE client does, up to `RECONNECTS` times in a row."""
        path, failures = f"/v1/jobs/{_segment(job_id)}/events", 0
        while True:
            params = {"stream": "true", **({"after": after} if after is not None else {})}
            try:
                with self.http.stream("GET", path, params=params, timeout=self.stream_timeout) as r:
                    if r.status_code >= 400:
                        r.read()
                        _raise_for_error(r)
                    if not r.headers.get("content-type", "").startswith("text/event-stream"):
                        r.read()
                        self._api_object(r)  # refuses what is not ours; an API object is not a stream either
                        raise UserError(f"{self.base_url} did not answer with an event stream", param="server")
                    name = None
                    for line in r.iter_lines():
                        if line.startswith("event:"):
                            name = line.split(":", 1)[1].strip()
                        elif line.startswith("data:"):
                            data = json.loads(line.split(":", 1)[1])
                            if name == "end":
                                yield {"end": data.get("status")}
                                return
                            if name == "error":  # the stream's key was revoked: said as its 401 would be
                                err = data.get("error") or {}
                                raise UserError(str(err.get("message") or "the server ended the event stream"),
                                                param=err.get("param"), code=err.get("code") or "api_error")
                            after, failures = data.get("id", after), 0
                            yield data
                reason = "the server closed the stream"
            except (httpx.HTTPError, ValueError) as exc:  # transport, timeout, decoding; a garbled data line
                reason = first_line(exc, 200)
            failures += 1
            if failures > RECONNECTS:
                resume = f" --after {after}" if after is not None else ""
                raise UserError(f"lost the event stream from {self.base_url} ({reason}); run `llm-prune jobs events "
                                f"{job_id} -f{resume}` to continue")
            time.sleep(min(2.0 * failures, 10.0))

    def checkpoints(self, job_id: str) -> list[dict]:
        return self._call("GET", f"/v1/jobs/{_segment(job_id)}/checkpoints")["data"]

    def download(self, job_id: str, out_dir: str | Path, name: str = "final", progress=None) -> Path:
        """Stream the checkpoint's .tar, check its sha256, unpack it; returns the model directory."""
        out = check_output_dir(out_dir, param="out", label="--out")
        found = {c["name"]: c for c in self.checkpoints(job_id)}
        if name not in found:
            have = ", ".join(found) or "none yet"
            raise UserError(f"job {job_id} has no checkpoint '{name}' (available: {have})", param="checkpoint")
        ckpt = found[name]
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create --out directory {out}: {exc.strerror or exc}", param="out") from None
        target = out / name
        if target.exists() and (not target.is_dir() or any(target.iterdir())):
            # Unpacking over it would mix two checkpoints' files (another job's adapter, stale shards).
            raise UserError(f"--out {out} already holds '{name}'; give another --out or remove {target}",
                            param="out")
        tar_path = out / f"{job_id}-{name}.tar"
        # A broken download leaves the .part file; the next call resumes it with a Range request
        # (If-Range: a changed archive is sent whole instead).
        part = tar_path.with_name(tar_path.name + ".part")
        for path in (part, tar_path):
            if path.is_dir():
                raise UserError(f"{path} is a directory, where the download goes; move it", param="out")
        have = part.stat().st_size if part.exists() and part.stat().st_size < ckpt["archive_bytes"] else 0
        headers = {"Range": f"bytes={have}-", "If-Range": f'"{ckpt["archive_sha256"]}"'} if have else {}
        try:
            with self.http.stream("GET", ckpt["archive_url"], headers=headers, timeout=self.stream_timeout) as r:
                if r.status_code >= 400:
                    r.read()
                    _raise_for_error(r)
                resumed = r.status_code == 206
                with open(part, "ab" if resumed else "wb") as fh:
                    if progress is not None and resumed:
                        progress(have, ckpt["archive_bytes"])
                    for chunk in r.iter_bytes():  # as received: a cut loses nothing already here
                        fh.write(chunk)
                        if progress is not None:
                            progress(len(chunk), ckpt["archive_bytes"])
        except httpx.HTTPError as exc:  # the connection broke or stalled: what arrived stays in the .part file
            got = part.stat().st_size if part.exists() else 0
            raise UserError(f"download of {name} was interrupted after {got:,} of {ckpt['archive_bytes']:,} bytes "
                            f"({first_line(exc, 200)}); run the command again to resume") from None
        h = hashlib.sha256()
        with open(part, "rb") as fh:
            for block in iter(lambda: fh.read(1024 * 1024), b""):
                h.update(block)
        if h.hexdigest() != ckpt["archive_sha256"]:
            part.unlink()
            raise UserError(f"download of {name} is corrupt (sha256 mismatch); try again")
        part.replace(tar_path)
        # Unpacked beside and renamed into place: a failed unpack (a full disk) leaves no half checkpoint.
        staging = out / f".{job_id}-{name}.unpacking"
        try:
            shutil.rmtree(staging, ignore_errors=True)
            with tarfile.open(tar_path) as tar:
                tar.extractall(staging, filter="data")  # refuses members outside `staging`, links, devices
            (staging / name).rename(target)
        except (tarfile.TarError, OSError) as exc:
            raise UserError(f"could not unpack the {name} checkpoint into {out}: {first_line(exc, 200)}; the archive "
                            f"is kept at {tar_path}") from None
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        tar_path.unlink()
        return target


def _raise_for_error(r: httpx.Response) -> None:
    if r.status_code < 400:
        return
    try:
        err = r.json()["error"]
        message, param, code = err["message"], err.get("param"), err.get("code") or "api_error"
        if not isinstance(message, str) or not message:
            raise TypeError
    except (ValueError, KeyError, TypeError):
        kind = r.headers.get("content-type", "no content type").split(";")[0]
        if "json" not in kind and "text/plain" not in kind:  # a web page: another server or a proxy's
            raise UserError(f"{r.request.url.scheme}://{r.request.url.netloc.decode()} did not answer as an "
                            f"llm-prune server (HTTP {r.status_code}, {kind}); check --server / LLM_PRUNE_SERVER",
                            param="server", code="api_error") from None
        body = " ".join(r.text[:200].split())  # one line
        message, param, code = f"server answered {r.status_code}: {body}".rstrip(": "), None, "api_error"
    raise UserError(message, param=param, code=code)


def _segment(job_id: str) -> str:
    """A job id as one path segment: `/`, `?`, `#` and `..` in it cannot reach another route."""
    if not job_id.strip():
        raise UserError("give a job id (job-...)", param="job_id")
    if job_id in (".", ".."):  # quote() keeps them, and the HTTP client resolves them as path steps
        raise UserError(f"no job with id '{job_id}'", param="job_id")
    return quote(job_id, safe="", errors="backslashreplace")  # bytes of another encoding: no such id
