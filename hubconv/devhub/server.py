"""HTTP/1.1 server plumbing for the dev Hub (standard library only) and the `DevHub` object."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import socket
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from . import rules
from .app import HubApp, HubError, Request, Response, error_response
from .auth import Identity, TokenRegistry, generate_token, parse_authorization, redact_query
from .faults import FaultInjector, RequestLog
from .storage import RepoRef, Storage

logger = logging.getLogger("hubconv.devhub")

DRAIN_LIMIT = 256 * 1024 * 1024  # bytes of an unread request body we read and discard to keep the connection
COPY_CHUNK = 1 << 20
_UNLOGGED_ADMIN = ("/_devhub/requests", "/_devhub/faults", "/_devhub/health")


class ClientDisconnected(Exception):
    """The client closed the connection before sending the whole request body."""


class _Dropped(Exception):
    """A 'drop' fault: close the connection without answering."""


class BodyReader:
    """Reads a request body framed by Content-Length or `Transfer-Encoding: chunked`."""

    def __init__(self, rfile: Any, headers: Any):
        self._rfile = rfile
        self.bytes_read = 0
        te = (headers.get("Transfer-Encoding") or "").lower()
        self.chunked = self._chunked = "chunked" in te
        self._chunk_left = 0
        self.done = False
        self._remaining = 0
        self.drop_after: int | None = None  # 'drop' fault: cut the connection once this many bytes were read
        if not self._chunked:
            cl = headers.get("Content-Length")
            if cl is not None:
                try:
                    self._remaining = int(cl)
                except ValueError:
                    raise HubError(400, f"Invalid Content-Length {cl!r}") from None
                if self._remaining < 0:
                    raise HubError(400, "Invalid Content-Length")
            self.done = self._remaining == 0

    def _read_exact(self, n: int, *, count: bool = True) -> bytes:
        data = self._rfile.read(n)
        if count:
            self.bytes_read += len(data)
        if len(data) < n:
            raise ClientDisconnected(f"connection closed after {self.bytes_read} body bytes")
        return data

    def _next_chunk(self) -> None:
        line = self._rfile.readline(1024)
        if not line.endswith(b"\n"):
            raise ClientDisconnected("connection closed inside a chunk header")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise HubError(400, "Malformed chunked body") from None
        if size == 0:
            while True:  # trailers, up to the empty line
                trailer = self._rfile.readline(8192)
                if not trailer.endswith(b"\n"):
                    raise ClientDisconnected("connection closed inside chunk trailers")
                if trailer in (b"\r\n", b"\n"):
                    break
            self.done = True
        self._chunk_left = size

    def read(self, n: int = -1) -> bytes:
        if n is None or n < 0:
            parts = []
            while not self.done:
                parts.append(self.read(COPY_CHUNK))
            return b"".join(parts)
        if self.done or n == 0:
            return b""
        if self.drop_after is not None:
            if self.bytes_read >= self.drop_after:
                raise _Dropped()
            n = min(n, self.drop_after - self.bytes_read)
        if not self._chunked:
            data = self._read_exact(min(n, self._remaining))
            self._remaining -= len(data)
            self.done = self._remaining == 0
        else:
            out = []
            want = n
            while want > 0 and not self.done:
                if self._chunk_left == 0:
                    self._next_chunk()
                    continue
                data = self._read_exact(min(want, self._chunk_left))
                self._chunk_left -= len(data)
                want -= len(data)
                out.append(data)
                if self._chunk_left == 0:
                    self._read_exact(2, count=False)  # CRLF after the chunk data
            data = b"".join(out)
        return data

    def drain(self, limit: int) -> bool:
        """Read and discard the rest of the body (up to `limit` bytes). True if the body is fully consumed."""
        budget = limit
        while not self.done and budget > 0:
            budget -= len(self.read(min(COPY_CHUNK, budget)))
        return self.done


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubconv-devhub/0.1"
    sys_version = ""
    timeout = 60  # idle keep-alive connections are closed after this many seconds
    server: _Server

    # -------------------------------------------------------------- lifecycle / logging
    def setup(self) -> None:
        super().setup()
        self.server.hub._track(self.connection, add=True)

    def finish(self) -> None:
        with contextlib.suppress(OSError):
            super().finish()
        self.server.hub._track(self.connection, add=False)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:  # we log once per request in _handle
        pass

    def log_message(self, format: str, *args: Any) -> None:
        self.server.hub._log(logging.INFO, redact_query(f"{self.address_string()} {format % args}"))

    # -------------------------------------------------------------- methods
    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()

    # -------------------------------------------------------------- core
    def _base_url(self) -> str:
        hub = self.server.hub
        host = self.headers.get("Host") or ""
        if host and all(c.isalnum() or c in ".-:[]" for c in host):
            return f"http://{host}"
        return hub.url

    def _handle(self) -> None:
        hub = self.server.hub
        t0 = time.monotonic()
        method = self.command
        split = urlsplit(self.path)
        raw_path = split.path or "/"
        path = unquote(raw_path)
        token = parse_authorization(self.headers.get("Authorization"))
        identity = hub.tokens.lookup(token) if token else None
        response: Response | None = None
        fault: str | None = None
        dropped = False
        body: BodyReader | None = None
        try:
            body = BodyReader(self.rfile, self.headers)
            admin_path = path.startswith("/_devhub/") and not path.startswith("/_devhub/lfs/")
            if not admin_path:
                for rule in hub.faults.take(method, path):
                    if rule.delay:
                        time.sleep(rule.delay)
                    if rule.action == "drop":
                        fault = "drop"
                        if not rule.after_bytes or body.done:
                            raise _Dropped()
                        # Let the request proceed (e.g. an upload starts being stored) and cut the connection
                        # once `after_bytes` of its body have been read.
                        body.drop_after = rule.after_bytes
                        break
                    if rule.action == "status":
                        fault = f"status:{rule.status}"
                        headers = {"Retry-After": str(rule.retry_after)} if rule.retry_after is not None else None
                        response = error_response(HubError(rule.status, rule.message, headers=headers))
                        break
            if response is None:
                if token and identity is None:
                    response = error_response(HubError(401, "Invalid credentials in Authorization header"))
                else:
                    req = Request(
                        method=method,
                        target=self.path,
                        raw_path=raw_path,
                        query=parse_qs(split.query, keep_blank_values=True),
                        headers=self.headers,
                        body=body,
                        base_url=self._base_url(),
                        identity=identity,
                        token_given=token is not None,
                    )
                    response = hub.app.dispatch(req)
            if body.drop_after is not None:
                raise _Dropped()  # the handler did not read that far: drop before answering anyway
        except _Dropped:
            dropped = True
        except ClientDisconnected:
            dropped = True
            fault = fault or "client-disconnected"
        except HubError as e:
            response = error_response(e)
            response.close = True  # the request framing itself was invalid
        except Exception:
            hub._log(
                logging.ERROR,
                f"devhub: unhandled error on {method} {redact_query(path)}\n{traceback.format_exc()}",
                token,
            )
            response = error_response(HubError(500, "Internal Server Error"))

        if not dropped and response is not None and body is not None and not body.done:
            try:
                if not body.drain(DRAIN_LIMIT):
                    response.close = True
            except (ClientDisconnected, HubError, OSError):
                dropped = True

        # Log first, then answer: a client that saw the response (or the dropped connection) finds its request in
        # the log. bytesOut is what we are about to send (the body length; 0 for HEAD and dropped requests).
        status = None if dropped or response is None else response.status
        if response is None or dropped or method == "HEAD":
            bytes_out = 0
        else:
            bytes_out = response.length if response.file is not None else len(response.body)
        ms = (time.monotonic() - t0) * 1000
        user = identity.user if identity else None
        entry = None
        if not path.startswith(_UNLOGGED_ADMIN):
            entry = {
                "ts": time.time(),
                "method": method,
                "path": path,
                "query": redact_query(split.query),
                "status": status,
                "bytesIn": body.bytes_read if body else 0,
                "chunked": bool(body and body.chunked),
                "bytesOut": bytes_out,
                "user": user,
                "authenticated": identity is not None,
                "fault": fault,
                "durationMs": round(ms, 2),
            }
            hub.request_log.add(entry)
        hub._log(
            logging.INFO,
            f'{self.client_address[0]} "{method} {redact_query(self.path)}" '
            f"{status if status is not None else 'dropped'} in={body.bytes_read if body else 0} out={bytes_out}"
            f" auth={'Bearer ***' if token else '-'} user={user or '-'} {ms:.1f}ms"
            + (f" fault={fault}" if fault else ""),
            token,
        )

        if dropped or response is None:
            self.close_connection = True
            with contextlib.suppress(OSError):
                self.connection.shutdown(socket.SHUT_RDWR)
        elif not self._send(response, head=method == "HEAD") and entry is not None:
            entry["sendFailed"] = True

    def _send(self, response: Response, *, head: bool) -> bool:
        length = response.length if response.file is not None else len(response.body)
        try:
            self.send_response(response.status)
            for key, value in response.headers.items():
                if key.lower() not in ("content-length", "connection", "transfer-encoding"):
                    self.send_header(key, value)
            request_id = self.headers.get("X-Amzn-Trace-Id") or self.headers.get("X-Request-Id")
            if request_id and len(request_id) < 200 and request_id.isprintable():
                self.send_header("X-Request-Id", request_id)
            self.send_header("Content-Length", str(length))
            if response.close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if head:
                return True
            if response.file is None:
                self.wfile.write(response.body)
                return True
            sent = 0
            with open(response.file, "rb") as f:
                f.seek(response.offset)
                while sent < length:
                    chunk = f.read(min(COPY_CHUNK, length - sent))
                    if not chunk:
                        raise OSError("file shorter than expected")
                    self.wfile.write(chunk)
                    sent += len(chunk)
            return True
        except OSError:
            self.close_connection = True
            return False


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 128
    hub: DevHub


class DevHub:
    """A local, on-disk Hugging Face Hub speaking the HTTP API used by `huggingface_hub` (uploads, PRs, downloads).

    >>> with DevHub(tmp_path) as hub:
    ...     api = HfApi(endpoint=hub.url, token=hub.token)

    Clients must disable Xet (`HF_HUB_DISABLE_XET=1`): the dev Hub speaks the LFS "basic" transfer only.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        host: str = "127.0.0.1",
        port: int = 0,
        token: str | None = None,
        read_token: str | None = None,
        *,
        user: str = "devuser",
        orgs: tuple[str, ...] | list[str] = ("devorg",),
        log_file: str | os.PathLike[str] | None = "devhub.log",
        lfs_threshold: int = rules.LFS_SIZE_THRESHOLD,
    ):
        self.storage = Storage(data_dir)
        self.storage.cleanup_tmp(older_than=3600)
        self.host = host
        self._port = port
        self.token = token or generate_token()
        self.read_token = read_token or generate_token()
        if self.token == self.read_token:
            raise ValueError("the write token and the read token must differ")
        self.user = user
        self.tokens = TokenRegistry()
        self.tokens.add(self.token, Identity(user, "write", tuple(orgs), "devhub-write", admin=True))
        self.tokens.add(self.read_token, Identity(user, "read", tuple(orgs), "devhub-read"))
        self._secrets = [self.token, self.read_token]  # never logged (see _log)
        self._secrets_lock = threading.Lock()
        self.faults = FaultInjector()
        self.request_log = RequestLog()
        self.app = HubApp(
            self.storage,
            self.tokens,
            secret=secrets.token_bytes(32),
            faults=self.faults,
            request_log=self.request_log,
            lfs_threshold=lfs_threshold,
        )
        self.log_path: Path | None = None
        if log_file is not None:
            self.log_path = Path(log_file) if os.path.isabs(log_file) else self.storage.root / log_file
        self._log_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._connections: set[socket.socket] = set()
        self._conn_lock = threading.Lock()

    # -------------------------------------------------------------- lifecycle
    def _bind(self) -> _Server:
        if self._server is None:
            server = _Server((self.host, self._port), _Handler)
            server.hub = self
            self._server = server
        return self._server

    def start(self) -> DevHub:
        """Serve in a background (daemon) thread; returns self."""
        if self._thread is not None:
            return self
        server = self._bind()
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.05}, name="devhub", daemon=True
        )
        self._thread.start()
        self._log(logging.INFO, f"devhub listening on {self.url} (data: {self.storage.root})")
        return self

    def serve_forever(self) -> None:
        """Serve in the calling thread until `stop()` is called from another thread (or KeyboardInterrupt)."""
        server = self._bind()
        self._log(logging.INFO, f"devhub listening on {self.url} (data: {self.storage.root})")
        try:
            server.serve_forever(poll_interval=0.2)
        finally:
            self._close_server()

    def stop(self) -> None:
        server = self._server
        if server is None:
            return
        if self._thread is not None:
            server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._close_server()

    def _close_server(self) -> None:
        server, self._server = self._server, None
        with self._conn_lock:
            conns = list(self._connections)
        for conn in conns:  # idle keep-alive connections would otherwise linger until their timeout
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        if server is not None:
            server.server_close()

    def __enter__(self) -> DevHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._conn_lock:
            (self._connections.add if add else self._connections.discard)(conn)

    @property
    def port(self) -> int:
        if self._server is not None:
            return self._server.server_address[1]
        return self._port

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    # -------------------------------------------------------------- logging (never logs tokens)
    def _log(self, level: int, message: str, *secrets: str | None) -> None:
        """Log to `hubconv.devhub` and the log file; every known token and `secrets` (e.g. the token a request
        presented, known or not) are replaced by `***`, belt and braces: no code path should put them here."""
        with self._secrets_lock:
            known = [*self._secrets, *(s for s in secrets if s)]
        for secret in sorted(known, key=len, reverse=True):
            message = message.replace(secret, "***")
        logger.log(level, message)
        if self.log_path is not None:
            line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {logging.getLevelName(level)} {message}\n"
            with self._log_lock, open(self.log_path, "a", encoding="utf-8") as f:
                f.write(line)

    # -------------------------------------------------------------- identities
    def add_token(
        self, user: str, role: str = "write", *, orgs: tuple[str, ...] | list[str] = (), token: str | None = None
    ) -> str:
        """Register another identity (e.g. a second user to test private repos). Returns its token."""
        if role not in ("read", "write"):
            raise ValueError("role must be 'read' or 'write'")
        token = token or generate_token()
        self.tokens.add(token, Identity(user, role, tuple(orgs), f"devhub-{role}"))
        with self._secrets_lock:
            self._secrets.append(token)
        return token

    # -------------------------------------------------------------- faults
    def inject_fault(self, **rule: Any) -> dict[str, Any]:
        """Add a fault rule (see `FaultRule`); returns it as a dict (with its `id`)."""
        return self.faults.add(**rule).public()

    def fail_next(
        self, n: int = 1, *, method: str = ".*", path: str = ".*", status: int = 500, retry_after: int | None = None
    ) -> dict[str, Any]:
        """Answer the next `n` matching requests with `status` (500, 429, 503...)."""
        return self.inject_fault(
            method=method, path=path, action="status", status=status, count=n, retry_after=retry_after
        )

    def drop_next(self, n: int = 1, *, method: str = ".*", path: str = ".*", after_bytes: int = 0) -> dict[str, Any]:
        """Close the connection of the next `n` matching requests after reading `after_bytes` of their body."""
        return self.inject_fault(method=method, path=path, action="drop", count=n, after_bytes=after_bytes)

    def add_latency(
        self, seconds: float, *, method: str = ".*", path: str = ".*", count: int | None = None
    ) -> dict[str, Any]:
        return self.inject_fault(method=method, path=path, action="latency", delay=seconds, count=count)

    def clear_faults(self) -> None:
        self.faults.clear()

    def list_faults(self) -> list[dict[str, Any]]:
        return self.faults.list()

    # -------------------------------------------------------------- request log
    def requests(self, *, method: str | None = None, path: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        """Recent requests (no tokens): method, path (decoded), query (signatures redacted), status, bytesIn, ..."""
        return self.request_log.entries(method=method, path=path, since=since)

    def mark(self) -> int:
        """Id of the last logged request: pass it as `since=` to only see what happens next."""
        return self.request_log.last_id()

    def clear_requests(self) -> None:
        self.request_log.clear()

    # -------------------------------------------------------------- inspection helpers for tests
    @staticmethod
    def _ref(repo_id: str, repo_type: str = "model") -> RepoRef:
        ns, _, name = repo_id.partition("/")
        return RepoRef(repo_type, ns, name)

    def head(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> str | None:
        """Commit sha `revision` resolves to (None if the repo or revision does not exist)."""
        ref = self._ref(repo_id, repo_type)
        if self.storage.get_repo(ref) is None:
            return None
        found = self.storage.resolve(ref, revision)
        return found[0] if found else None

    def files(self, repo_id: str, revision: str = "main", repo_type: str = "model") -> dict[str, bytes]:
        """{path: content} of a revision, read straight from storage."""
        ref = self._ref(repo_id, repo_type)
        sha = self.head(repo_id, revision, repo_type)
        if sha is None:
            raise KeyError(f"{repo_type} {repo_id}@{revision}")
        tree = self.storage.read_commit(ref, sha)["tree"]
        return {p: self.storage.read_entry(e) for p, e in tree.items()}
