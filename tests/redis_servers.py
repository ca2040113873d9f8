"""Real Redis servers for tests: one node (`RedisServer`) or a 3-master cluster (`RedisCluster`).

No mocks: these start the OS's `redis-server` on free loopback ports, each in its own temporary
directory with persistence off, and clean up (processes killed, directories removed) on exit,
even when a test fails or the interpreter exits early. `find_redis_server()` returns None when
the binary is missing so that tests can skip. redis-py is imported lazily (only `client()` and
`connect()` need it).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import weakref
from urllib.parse import quote, urlsplit

HOST = "127.0.0.1"
_SEARCH_DIRS = ("/usr/bin", "/usr/sbin", "/usr/local/bin")
_LIVE: weakref.WeakSet[RedisServer] = weakref.WeakSet()


def _find(name: str) -> str | None:
    path = shutil.which(name)
    if path:
        return path
    for d in _SEARCH_DIRS:
        p = os.path.join(d, name)
        if os.path.isfile(p) and os.access(p, os.X_OK):
            return p
    return None


def find_redis_server() -> str | None:
    """Path of `redis-server` (PATH, then /usr/bin, /usr/sbin, /usr/local/bin), or None."""
    return _find("redis-server")


def find_redis_cli() -> str | None:
    return _find("redis-cli")


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (racy: callers retry on a clash)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def _free_port_pair() -> tuple[int, int]:
    """Two distinct free ports (a cluster node's client port and its cluster-bus port)."""
    while True:
        a, b = free_port(), free_port()
        if a != b:
            return a, b


def _pdeathsig() -> None:  # runs in the child before exec: die with the parent thread
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _read_reply(f) -> bytes:
    """One RESP reply from a buffered socket file, as raw bytes (enough for +OK, -ERR, $bulk)."""
    line = f.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError(f"connection closed mid-reply: {line!r}")
    if line[:1] == b"$" and int(line[1:-2]) >= 0:
        return line + f.read(int(line[1:-2]) + 2)
    if line[:1] == b"*":
        return line + b"".join(_read_reply(f) for _ in range(max(int(line[1:-2]), 0)))
    return line


def _resp_command(port: int, *args: str, password: str | None = None, timeout: float = 1.0) -> bytes:
    """Send one command over a raw socket (AUTH first when a password is set); return the raw
    reply, e.g. b"+PONG\r\n" (the AUTH error instead when AUTH fails)."""

    def encode(*parts: str) -> bytes:
        out = [b"*%d\r\n" % len(parts)]
        for p in parts:
            b = p.encode()
            out.append(b"$%d\r\n%s\r\n" % (len(b), b))
        return b"".join(out)

    with socket.create_connection((HOST, port), timeout=timeout) as s, s.makefile("rb") as f:
        if password:
            s.sendall(encode("AUTH", password))
            auth = _read_reply(f)
            if not auth.startswith(b"+OK"):
                return auth
        s.sendall(encode(*args))
        return _read_reply(f)


def _log_tail(path: str, n: int = 20) -> str:
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError as e:
        return f"<no log: {e}>"


class RedisServer:
    """One `redis-server` on 127.0.0.1:<free port>, no persistence, logs to `<dir>/redis.log`.

    with RedisServer(password="pw", maxmemory="64mb") as r:
        r.url        # redis://:pw@127.0.0.1:PORT/0
        r.client()   # redis.Redis
        r.stop(); r.start()        # restart on the same port (empty: no persistence)
        r.pause(1.0)               # CLIENT PAUSE 1000 ALL
        r.pause(1.0, how="sigstop")  # SIGSTOP now, SIGCONT from a timer thread
    """

    def __init__(
        self,
        *,
        password: str | None = None,
        maxmemory: str | int | None = None,
        extra_args: tuple[str, ...] | list[str] = (),
        port: int | None = None,
        bus_port: bool = False,
        start_timeout: float = 10.0,
        _dir: str | None = None,
    ) -> None:
        binary = find_redis_server()
        if binary is None:
            raise RuntimeError("redis-server not found (apt-get install redis-server)")
        self.binary = binary
        self.password = password
        self.maxmemory = maxmemory
        self.extra_args = list(extra_args)
        self.port: int | None = port
        self.bus_port: int | None = None  # set when bus_port=True (cluster nodes)
        self._want_bus_port = bus_port
        self.start_timeout = start_timeout
        self._own_dir = _dir is None
        self.dir = _dir or tempfile.mkdtemp(prefix="kvtrie-redis-")
        self.log_path = os.path.join(self.dir, "redis.log")
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        self.proc: subprocess.Popen | None = None
        self._timers: list[threading.Timer] = []
        _LIVE.add(self)

    # -- attributes -------------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def url(self) -> str:
        auth = f":{quote(self.password, safe='')}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    # -- life cycle -------------------------------------------------------------------------
    def _args(self) -> list[str]:
        args = [
            self.binary,
            "--port", str(self.port),
            "--bind", HOST,
            "--dir", self.dir,
            "--save", "",
            "--appendonly", "no",
            "--daemonize", "no",
            "--logfile", self.log_path,
            "--loglevel", "notice",
        ]
        if self.bus_port is not None:
            args += ["--cluster-port", str(self.bus_port)]
        if self.password is not None:
            args += ["--requirepass", self.password, "--masterauth", self.password]
        if self.maxmemory is not None:
            args += ["--maxmemory", str(self.maxmemory), "--maxmemory-policy", "allkeys-lru"]
        return args + self.extra_args

    def start(self) -> RedisServer:
        """Start (or restart, on the same port) and wait until it answers PING."""
        if self.running:
            return self
        fixed_port = self.port is not None
        attempts = 3 if fixed_port else 10
        for attempt in range(attempts):
            if not fixed_port:
                if self._want_bus_port:
                    self.port, self.bus_port = _free_port_pair()
                else:
                    self.port = free_port()
            elif self._want_bus_port and self.bus_port is None:
                self.bus_port = free_port()
            with open(self.log_path, "a") as f:
                f.write(f"### kvtrie test harness: starting on port {self.port}\n")
            main_thread = threading.current_thread() is threading.main_thread()
            # Config errors go to stderr before the log file is open: keep them for messages.
            with open(self.stderr_path, "ab") as err:
                self.proc = subprocess.Popen(
                    self._args(),
                    stdin=subprocess.DEVNULL,
                    stdout=err,
                    stderr=err,
                    cwd=self.dir,
                    # PR_SET_PDEATHSIG fires when the *thread* that forked exits: main thread only.
                    preexec_fn=_pdeathsig if main_thread else None,
                )
            try:
                self._wait_ready()
                return self
            except _PortClash:
                self._reap()
                if fixed_port:  # restart on the same port: the old socket may linger briefly
                    time.sleep(0.2)
                continue
        raise RuntimeError(f"redis-server could not bind port {self.port} ({attempts} tries):\n"
                           + self.log_tail())

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.start_timeout
        last: object = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                if "Address already in use" in tail.rsplit("### kvtrie", 1)[-1]:
                    raise _PortClash()
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}:\n{tail}")
            try:
                reply = _resp_command(self.port, "PING", password=self.password, timeout=0.5)
                if reply.startswith(b"+PONG"):
                    return
                last = reply
            except OSError as e:
                last = e
            time.sleep(0.02)
        self._reap()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING within "
                           f"{self.start_timeout}s (last: {last!r}):\n{self.log_tail()}")

    def _cancel_timers(self) -> None:
        for t in self._timers:
            t.cancel()
        self._timers.clear()

    def _reap(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> None:
        p = self.proc
        if p is None:
            return
        self._cancel_timers()
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGCONT)  # a SIGSTOPped server would not act on SIGTERM
                p.send_signal(sig)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            except ProcessLookupError:
                pass
        self.proc = None

    def stop(self) -> None:
        """SIGTERM and wait (SIGKILL after 10 s). The port is kept, so `start()` reuses it."""
        self._reap(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL (a crash) and reap. The port is kept, so `start()` reuses it."""
        self._reap(signal.SIGKILL)

    def close(self) -> None:
        """Kill the server and remove its directory."""
        self._reap(signal.SIGKILL)
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> RedisServer:
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ----------------------------------------------------------------------------
    def log_tail(self, n: int = 20) -> str:
        """The last lines of the server's log file, then of its stderr (config errors)."""
        err = _log_tail(self.stderr_path, n) if os.path.exists(self.stderr_path) else ""
        return _log_tail(self.log_path, n) + (f"--- stderr:\n{err}" if err.strip() else "")

    def client(self, **kw):
        """A redis.Redis connected to this server (kwargs go to redis.Redis)."""
        import redis

        kw.setdefault("password", self.password)
        return redis.Redis(host=HOST, port=self.port, **kw)

    def flushall(self) -> None:
        c = self.client()
        try:
            c.flushall()
        finally:
            c.close()

    def pause(self, seconds: float, how: str = "client") -> None:
        """Make the server unresponsive for `seconds`; returns at once.

        how="client": `CLIENT PAUSE <ms> ALL` — the server keeps accepting connections, but every
          command from every client (new ones too) waits until the pause ends; nothing times out
          server-side, so callers see a slow server (their socket_timeout fires).
        how="sigstop": SIGSTOP the process, SIGCONT from a timer thread. The kernel still completes
          TCP handshakes (backlog), so connects succeed and reads hang: a hung host.
        """
        if not self.running:
            raise RuntimeError("server not running")
        if how == "client":
            reply = _resp_command(self.port, "CLIENT", "PAUSE", str(int(seconds * 1000)), "ALL",
                                  password=self.password)
            if not reply.startswith(b"+OK"):
                raise RuntimeError(f"CLIENT PAUSE failed: {reply!r}")
        elif how == "sigstop":
            pid = self.proc.pid
            os.kill(pid, signal.SIGSTOP)
            proc = self.proc

            def resume() -> None:
                if proc.poll() is None:
                    try:
                        os.kill(pid, signal.SIGCONT)
                    except ProcessLookupError:
                        pass

            t = threading.Timer(seconds, resume)
            t.daemon = True
            self._timers.append(t)
            t.start()
        else:
            raise ValueError(f"how must be 'client' or 'sigstop', not {how!r}")

    def resume(self) -> None:
        """End a sigstop pause early (a client pause is ended with `CLIENT UNPAUSE`)."""
        self._cancel_timers()
        if self.running:
            os.kill(self.proc.pid, signal.SIGCONT)


class _PortClash(Exception):
    pass


class RedisCluster:
    """A 3-master Redis Cluster (no replicas) on 127.0.0.1, built with `redis-cli --cluster create`.

    Each node has an explicit cluster-bus port (`--cluster-port`): the default, port + 10000, may
    be taken or above 65535 for an ephemeral port.

    with RedisCluster() as c:
        c.url      # redis://127.0.0.1:P1/0 (any node will do for a cluster client)
        c.urls     # one per node
        c.client() # redis.cluster.RedisCluster
    """

    def __init__(self, *, masters: int = 3, password: str | None = None,
                 node_timeout_ms: int = 2000, ready_timeout: float = 30.0) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        cli = find_redis_cli()
        if cli is None or find_redis_server() is None:
            raise RuntimeError("redis-server/redis-cli not found (apt-get install redis-server)")
        self.cli = cli
        self.masters = masters
        self.password = password
        self.node_timeout_ms = node_timeout_ms
        self.ready_timeout = ready_timeout
        self.nodes: list[RedisServer] = []
        self.startup_seconds: float | None = None

    @property
    def ports(self) -> list[int]:
        return [n.port for n in self.nodes]

    @property
    def urls(self) -> list[str]:
        return [n.url for n in self.nodes]

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def start(self) -> RedisCluster:
        t0 = time.monotonic()
        args = ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
                "--cluster-node-timeout", str(self.node_timeout_ms)]
        for _ in range(self.masters):
            node = RedisServer(password=self.password, extra_args=args, bus_port=True)
            self.nodes.append(node)
            node.start()
        cmd = [self.cli]
        env = dict(os.environ)
        if self.password:
            env["REDISCLI_AUTH"] = self.password  # not -a: keeps it out of ps and off stderr
        cmd += ["--cluster", "create", *[f"{HOST}:{p}" for p in self.ports],
                "--cluster-replicas", "0", "--cluster-yes"]
        r = subprocess.run(cmd, check=False, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=self.ready_timeout, env=env)
        if r.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed ({r.returncode}):\n"
                               f"{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
        self._wait_ok(time.monotonic() + self.ready_timeout)
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ok(self, deadline: float) -> None:
        pending = list(self.nodes)
        last = b""
        while pending:
            for n in list(pending):
                try:
                    last = _resp_command(n.port, "CLUSTER", "INFO", password=self.password)
                except OSError as e:
                    last = repr(e).encode()
                    continue
                if b"cluster_state:ok" in last and b"cluster_slots_assigned:16384" in last:
                    pending.remove(n)
            if not pending:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster not ok on ports {[n.port for n in pending]}: "
                                   f"{last.decode(errors='replace')}\n"
                                   + pending[0].log_tail())
            time.sleep(0.05)

    def stop(self) -> None:
        """Kill every node and remove their directories."""
        for n in self.nodes:
            n.close()

    def client(self, **kw):
        """A redis.cluster.RedisCluster seeded with the first node (kwargs go to it)."""
        from redis.cluster import RedisCluster as Client

        kw.setdefault("password", self.password)
        return Client(host=HOST, port=self.ports[0], **kw)

    def flushall(self) -> None:
        for n in self.nodes:
            n.flushall()

    def __enter__(self) -> RedisCluster:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc: object) -> None:
        self.stop()


def no_retry():
    """`retry=no_retry()` for a client that fails at once: redis-py >= 6 retries timeouts and
    connection errors by default (8.1: 10 times, jittered backoff up to 1 s), so `socket_timeout`
    alone does not bound how long a call takes against a paused server."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    return Retry(NoBackoff(), 0)


def connect(url: str, **kw):
    """redis.cluster.RedisCluster when the node at `url` runs in cluster mode, else redis.Redis.

    Probes with `INFO cluster` on db 0 (a cluster node refuses SELECT of any db, even 0 is sent
    only when the URL names one). The URL may be redis:// or rediss:// and may carry a password;
    kwargs (socket_timeout, retry, ...) go to the client either way. A cluster has only db 0: a
    URL naming another db raises ValueError.
    """
    import redis
    from redis.cluster import RedisCluster as Client

    parts = urlsplit(url)
    db = parts.path.strip("/")
    probe = redis.Redis.from_url(parts._replace(path="").geturl(), **kw)
    try:
        enabled = probe.info("cluster").get("cluster_enabled") == 1
    finally:
        probe.close()
    if not enabled:
        return redis.Redis.from_url(url, **kw)
    if db not in ("", "0"):
        raise ValueError(f"a Redis Cluster has only db 0, not {db!r}: {url}")
    return Client.from_url(url, **kw)


@atexit.register
def _cleanup_all() -> None:  # a test that forgot its `with`: leave no server behind
    for s in list(_LIVE):
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            s.close()
