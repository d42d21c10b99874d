"""A run directory you can trust: one process at a time, and files that survive a kill.

    with RunDirLock(run_dir):                    # RunDirBusy (naming host and pid) if another run holds it
        atomic_write_text(run_dir / "config.yaml", text)      # old or new content, never half of it
        append_jsonl(run_dir / "metrics.jsonl", record)       # first drops a torn last line
        records = read_jsonl(run_dir / "metrics.jsonl")       # tolerates a torn last line only
        evals = read_json(run_dir / "eval.json", {}, recover=True)

Locking. A local run directory is locked with ``fcntl.flock`` on ``<run_dir>/run.lock``, which holds
the holder's host, pid, process start time and command line. The OS releases the lock when the
holder dies, however it dies. If the lock is held but the file names a process on this host that no
longer lives (a child that inherited the lock outlived it), the lock is taken over. On a filesystem
without ``flock`` the file's contents are the lock: taken when empty or naming a dead local process.

A URL run directory (``gs://...``) gets a lease instead: ``run.lock`` is created with a conditional
write (tensorstore's ``if_equal``: the write happens only if the object is still absent, or still the
expired lease that was read), and a heartbeat thread renews it every ``ttl_s / 4`` seconds, again
conditionally. This is best-effort: expiry compares the lease's heartbeat with this host's clock, so
clock skew shortens or lengthens it, and a holder stalled for more than ``ttl_s`` loses the lease
without noticing until its next heartbeat (``RunDirLock.lost``).
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import errno
import json
import os
import socket
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from jaxsae.errors import UserError

LOCK_FILE = "run.lock"
_MISSING = object()


class RunDirBusy(UserError, RuntimeError):
    """Another process holds the run directory. ``holder``: what its lock file says (host, pid, ...)."""

    def __init__(self, message: str, holder: dict[str, Any] | None):
        super().__init__(message)
        self.holder = holder or {}


class CorruptFileError(UserError, ValueError):
    """A run file (metrics.jsonl, eval.json, ...) that cannot be parsed; the message names file and fix."""


# --------------------------------------------------------------------------- processes

def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a pid from its reuse."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and parentheses
    return None if fields[0] == "Z" else fields[19]  # a zombie has exited already


def _alive(pid: int, start: str | None = None) -> bool:
    """Whether process ``pid`` on this host lives (and, given its recorded start time, is the same one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    if os.path.exists(f"/proc/{pid}"):
        now = _start_time(pid)
        return now is not None and (start is None or now == start)
    return True


def _me() -> dict[str, Any]:
    pid = os.getpid()
    return {"host": socket.gethostname(), "pid": pid, "pid_start": _start_time(pid),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "argv": " ".join(sys.argv)[:300], "token": uuid.uuid4().hex}


def _dead_here(holder: dict[str, Any]) -> bool:
    return (holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int)
            and not _alive(holder["pid"], holder.get("pid_start")))


def _busy(where: str, holder: dict[str, Any] | None, lock_path: str) -> RunDirBusy:
    if not holder:
        return RunDirBusy(f"run directory {where} is in use by another process (its {LOCK_FILE} is locked); wait "
                          "for it to finish or use another run directory", holder)
    who = f"pid {holder.get('pid')} on host {holder.get('host')} (since {holder.get('started')}: {holder.get('argv')})"
    here = holder.get("host") == socket.gethostname()
    how = (f"wait for it to finish or stop it (kill {holder.get('pid')}), or use another run directory" if here else
           f"wait for it to finish, or use another run directory; if it no longer runs there, delete {lock_path}")
    return RunDirBusy(f"run directory {where} is in use by {who}; {how}", holder)


# --------------------------------------------------------------------------- the lock

class RunDirLock:
    """An exclusive lock on one run directory (context manager). Local paths: ``flock`` on
    ``run.lock``; URLs: a best-effort lease (module docstring). A second holder gets RunDirBusy."""

    def __init__(self, path: str | os.PathLike, *, ttl_s: float = 300.0):
        self.path = os.fspath(path)
        self.url = "://" in self.path and not self.path.startswith("file://")
        self.ttl_s = ttl_s
        self.info: dict[str, Any] | None = None  # what our lock file says, while held
        self.previous: dict[str, Any] | None = None  # a dead holder this lock was taken over from
        self._fd: int | None = None
        self._kv = None
        self._gen: bytes = b""
        self._stop = threading.Event()
        self._lost = threading.Event()
        self._beat: threading.Thread | None = None

    def __enter__(self) -> "RunDirLock":
        self.acquire()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.release()

    @property
    def held(self) -> bool:
        return self.info is not None

    @property
    def lost(self) -> bool:
        """A URL lease that another process took over (after this one missed heartbeats for ttl_s)."""
        return self._lost.is_set()

    def acquire(self) -> "RunDirLock":
        if self.held:
            raise RuntimeError(f"{self.path}: this RunDirLock is held already")
        (self._acquire_lease if self.url else self._acquire_local)()
        atexit.register(self.release)  # a process that exits without releasing still says so
        return self

    def release(self) -> None:
        if not self.held or self.info["pid"] != os.getpid():  # a forked child must not release its parent's lock
            return
        atexit.unregister(self.release)
        (self._release_lease if self.url else self._release_local)()
        self.info = None

    # -- local: flock -------------------------------------------------------------------------
    def _acquire_local(self) -> None:
        import fcntl

        path = self.path.removeprefix("file://")
        os.makedirs(path, exist_ok=True)
        lock_path = os.path.join(path, LOCK_FILE)
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                mode = "locked"
            except BlockingIOError:
                mode = "held"
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL):
                    raise
                mode = "no flock"  # this filesystem has none: the file's contents are the lock
            holder = _parse(os.pread(fd, 1 << 16, 0))
            dead = bool(holder) and _dead_here(holder)
            free = {"held": dead,  # its dead holder's child inherited the descriptor and outlived it
                    "no flock": not holder or dead,
                    # unlocked, yet named by a live process here: one that took the lock over as above
                    "locked": not holder or dead or holder.get("host") != socket.gethostname()}[mode]
            if not free:
                if mode == "locked":
                    fcntl.flock(fd, fcntl.LOCK_UN)
                raise _busy(path, holder, lock_path)
            self.previous = holder if holder else None
            self.info = _me()
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(self.info) + "\n").encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def _release_local(self) -> None:
        import fcntl

        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # never unlink: a waiter may have the file open, and would lock a ghost
            fcntl.flock(fd, fcntl.LOCK_UN)
        except OSError:
            pass
        finally:
            os.close(fd)

    # -- URL: lease ---------------------------------------------------------------------------
    def _acquire_lease(self) -> None:
        import tensorstore as ts

        base = self.path if self.path.endswith("/") else self.path + "/"
        from jaxsae.data.store import (
            _CONTEXT,  # memory:// lives in a context: share the store's
        )

        self._kv = ts.KvStore.open(base, context=_CONTEXT).result()
        cur = self._kv.read(LOCK_FILE).result()
        holder = _parse(bytes(cur.value)) if cur.state == "value" else None
        if holder and time.time() - float(holder.get("heartbeat", 0)) < self.ttl_s:
            raise _busy(self.path, holder, base + LOCK_FILE)
        info = {**_me(), "heartbeat": time.time()}
        gen = self._kv.write(LOCK_FILE, json.dumps(info).encode(), if_equal=cur.stamp.generation).result().generation
        if not gen:  # someone else wrote it between our read and write
            now = self._kv.read(LOCK_FILE).result()
            raise _busy(self.path, _parse(bytes(now.value)) if now.state == "value" else None, base + LOCK_FILE)
        self.previous, self.info, self._gen = holder, info, gen
        self._stop.clear()
        self._lost.clear()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="RunDirLease")
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            info = {**self.info, "heartbeat": time.time()}
            try:
                gen = self._kv.write(LOCK_FILE, json.dumps(info).encode(), if_equal=self._gen).result().generation
            except Exception:  # noqa: BLE001 - a transient error: try again at the next beat
                continue
            if not gen:
                self._lost.set()
                return
            self._gen = gen

    def _release_lease(self) -> None:
        self._stop.set()
        if self._beat is not None:
            self._beat.join(timeout=30)
        if not self._lost.is_set():
            with contextlib.suppress(Exception):
                self._kv.write(LOCK_FILE, None, if_equal=self._gen).result()


def _parse(data: bytes) -> dict[str, Any] | None:
    try:
        v = json.loads(data.decode() or "null")
    except (UnicodeDecodeError, ValueError):
        return None
    return v if isinstance(v, dict) else None


# --------------------------------------------------------------------------- atomic writes

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces ``path`` with ``data``: a temp file in the same directory, fsync, ``os.replace``, so a
    reader (or a kill) sees the old content or the new, never part of it. URLs: one object write."""
    s = os.fspath(path)
    if "://" in s:
        from etils import epath

        epath.Path(s).write_bytes(data)  # object stores replace whole objects
        return
    p = Path(s)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{p.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):  # make the rename itself durable
        dfd = os.open(p.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """``atomic_write_bytes`` of ``text`` in UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


# --------------------------------------------------------------------------- JSON lines

def _decode_line(path: Any, n: int, line: bytes) -> dict[str, Any]:
    try:
        rec = json.loads(line)
    except ValueError as e:
        raise CorruptFileError(f"{path}: line {n} is not valid JSON ({e}) and is not the last line, so this is "
                               f"corruption, not a torn write: fix or delete line {n}") from None
    if not isinstance(rec, dict):
        raise CorruptFileError(f"{path}: line {n} is a JSON {type(rec).__name__}, not an object: fix or delete it")
    return rec


def _complete(tail: bytes) -> bool:
    """Whether text after the last newline is a whole record (only its newline is missing)."""
    try:
        return isinstance(json.loads(tail), dict)
    except (ValueError, UnicodeDecodeError):
        return False


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a JSON-lines file ([] if it does not exist). A torn last line (a partial record
    after the last newline, as a kill mid-append leaves) is dropped; an unparsable line anywhere else
    is a CorruptFileError naming the line."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    *lines, tail = data.split(b"\n")
    records = [_decode_line(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if tail.strip() and _complete(tail):
        records.append(json.loads(tail))
    return records


def _repair_tail(f) -> None:
    """Ends the file (opened 'a+b') with a newline: a complete last record gets its newline, a torn
    one is cut off."""
    size = f.seek(0, os.SEEK_END)
    if size == 0:
        return
    f.seek(size - 1)
    if f.read(1) == b"\n":
        return
    start, block = size, 1 << 12
    while start > 0:  # find the last newline, reading backwards
        lo = max(0, start - block)
        f.seek(lo)
        chunk = f.read(start - lo)
        i = chunk.rfind(b"\n")
        if i >= 0:
            start = lo + i + 1
            break
        start = lo
    f.seek(start)
    if _complete(f.read(size - start)):
        f.write(b"\n")
    else:
        f.truncate(start)
    f.flush()


def append_jsonl(path: str | os.PathLike, record: dict[str, Any], *, fsync: bool = False) -> None:
    """Appends ``record`` as one line, first cutting off a torn last line so the file stays valid JSON
    lines. ``fsync``: also make it durable now (a metrics line usually need not be)."""
    line = (json.dumps(record) + "\n").encode()
    with open(path, "a+b") as f:
        _repair_tail(f)
        f.write(line)
        f.flush()
        if fsync:
            os.fsync(f.fileno())


def write_jsonl(path: str | os.PathLike, records: list[dict[str, Any]]) -> None:
    """Replaces the file with ``records`` atomically (e.g. metrics rewound to a restored step)."""
    atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in records))


# --------------------------------------------------------------------------- JSON

def read_json(path: str | os.PathLike, default: Any = _MISSING, *, recover: bool = False) -> Any:
    """The parsed JSON file; ``default`` if it does not exist (FileNotFoundError without one).

    A truncated or corrupt file is a CorruptFileError naming it and the fix, unless ``recover``: then
    it is moved aside to ``<name>.corrupt`` (kept for inspection), one line says so on stderr, and
    ``default`` is returned, for files the run can rebuild (eval.json: the phases are re-evaluated).
    Written with ``atomic_write_text``, a file is never truncated by a kill of its writer."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        if default is _MISSING:
            raise
        return default
    try:
        return json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        if recover and default is not _MISSING:
            aside = p.with_name(p.name + ".corrupt")
            os.replace(p, aside)
            print(f"warning: {p} was not valid JSON ({e}); moved it to {aside} and starting it afresh",
                  file=sys.stderr, flush=True)
            return default
        raise CorruptFileError(f"{p} is not valid JSON (truncated or half-written: {e}); restore it, or delete it "
                               "to have it rebuilt") from None
