"""One live run per output folder: a lock file created atomically, refreshed by its holder, taken over when dead.

    OUT/__annotation__/lock.json    {"host", "pid", "process_start", "started", "token", "command"}

The lock is written to a private temporary file and hard-linked to `lock.json`: `link` fails when the name exists,
atomically on a local disk and on NFS alike (the classic NFS lock recipe; O_EXCL is also atomic on NFSv3+, but
linking publishes the holder's details together with the lock). While it runs, the holder touches the file every
`HEARTBEAT_S` seconds. A holder counts as dead when, on this host (and pid namespace), its process is gone (or its
pid was reused by another process), and, on another host, when the lock was not touched for `STALE_AFTER_S` seconds
(judged by this host's clock against the file's modification time: keep the hosts' clocks within a few seconds of
each other). A dead holder's lock is taken over under a second, short-lived lock (`lock.json.takeover`), so that two
runs cannot both take over the same dead holder. A holder that finds its lock taken over (it was suspended for longer
than the timeout) stops before its next commit.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import sys
import threading
import time
import uuid
from pathlib import Path

from .store import OutputFolderError

LOCK = "lock.json"
HEARTBEAT_S = 10.0
STALE_AFTER_S = 120.0


class FolderBusyError(OutputFolderError):
    """Another live run holds the output folder."""


def process_start(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks since boot (Linux's /proc), to tell a reused pid apart."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def process_space() -> str:
    """Where a pid means this process's: the host, its boot and its pid namespace (containers sharing a host name or a
    kernel have separate pid spaces)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        boot, namespace = "", 0
    return f"{socket.gethostname()}/{boot}/{namespace}"


def process_alive(pid: int, start: int | None) -> bool:
    """Whether process `pid` of this host runs, and is the one that started at `start` (where that is known)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # someone else's process: it exists
    now = process_start(pid)
    return start is None or now is None or now == start


class FolderLock:
    """The lock of one output folder, held by this process: `acquire` it, `check` it before committing, `release`."""

    def __init__(self, folder: Path, stale_after_s: float = STALE_AFTER_S, heartbeat_s: float = HEARTBEAT_S):
        self.path = Path(folder) / LOCK
        self.stale_after_s, self.heartbeat_s = stale_after_s, heartbeat_s
        self.token = uuid.uuid4().hex
        self.holder = {
            "host": socket.gethostname(), "pid": os.getpid(), "process_start": process_start(os.getpid()),
            "process_space": process_space(),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "token": self.token, "command": " ".join(sys.argv)[:300],
        }
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------------ acquiring
    def acquire(self, wait: bool = False, poll_s: float = 2.0) -> FolderLock:
        """Takes the folder, taking over a dead holder's lock; raises `FolderBusyError` naming a live holder, or with
        `wait` polls every `poll_s` seconds until the folder is free."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        announced = False
        while True:
            if _link_new(self.path, json.dumps(self.holder)):
                break
            holder, age = self._read_holder()
            if holder is None:  # released just now: try again
                continue
            if self._dead(holder, age):
                print(f"[annotate] taking over {self.path.parent.parent}: its previous run ({_describe(holder)}) is "
                      "no longer running")
                self._take_over(holder)
                continue
            if not wait:
                raise FolderBusyError(
                    f"{self.path.parent.parent} is in use by another annotation run ({_describe(holder)}). Only one "
                    "run at a time may write a folder: wait for it to finish, pass --wait to wait for it, or choose "
                    f"another --output_dir. (A run that died is taken over: on this host as soon as its process is "
                    f"gone, from another host {self.stale_after_s:.0f} s after its last heartbeat; if no run holds "
                    f"the folder any more, delete {self.path}.)"
                )
            if not announced:
                print(f"[annotate] waiting for the run holding {self.path.parent.parent} ({_describe(holder)})")
                announced = True
            time.sleep(poll_s)
        self._thread = threading.Thread(target=self._beat, name="annotation-lock-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _read_holder(self) -> tuple[dict | None, float]:
        """The holder's details (None while unreadable) and the lock's age in seconds (0 when it just vanished)."""
        try:
            age = time.time() - self.path.stat().st_mtime
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None, 0.0
        except (OSError, ValueError):
            return {"damaged": True}, age
        return (holder if isinstance(holder, dict) else {"damaged": True}), age

    def _dead(self, holder: dict, age: float) -> bool:
        """Same process space: the holder's process is gone; elsewhere: its heartbeat is older than the timeout."""
        if holder.get("process_space") == self.holder["process_space"] and isinstance(holder.get("pid"), int):
            return not process_alive(holder["pid"], holder.get("process_start"))
        return age > self.stale_after_s

    def _take_over(self, dead: dict) -> None:
        """Removes a dead holder's lock under the takeover lock, if it is still that holder's."""
        guard = self.path.with_name(self.path.name + ".takeover")
        if not _link_new(guard, json.dumps(self.holder)):
            with contextlib.suppress(OSError):
                if time.time() - guard.stat().st_mtime > self.stale_after_s:  # a taker that died
                    guard.unlink()
            time.sleep(0.1)
            return
        try:
            holder, age = self._read_holder()
            if holder is not None and holder.get("token") == dead.get("token") and self._dead(holder, age):
                self.path.unlink()
        finally:
            guard.unlink()

    # --------------------------------------------------------------------------------------------------- holding
    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            if not self.holds():
                self.lost.set()
                return
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def holds(self) -> bool:
        """Whether the lock file is still this process's."""
        holder, _ = self._read_holder()
        return holder is not None and holder.get("token") == self.token

    def check(self) -> None:
        """Raises `FolderBusyError` when another run took the folder over (this one was thought dead)."""
        if self.lost.is_set() or not self.holds():
            raise FolderBusyError(
                f"Another run took over {self.path.parent.parent} while this one was stalled for more than "
                f"{self.stale_after_s:.0f} s; this run stops without committing more. Let the other run finish."
            )

    def release(self) -> None:
        """Stops the heartbeat and removes the lock file, if it is still this process's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.holds():
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()

    def __enter__(self) -> FolderLock:
        return self

    def __exit__(self, *exc_info) -> None:
        self.release()


def _link_new(path: Path, text: str) -> bool:
    """Creates `path` holding `text` unless it exists (write a private file, hard-link it); whether it did."""
    private = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    private.write_text(text)
    try:
        os.link(private, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # NFS may report an error for a link that was made: the private file's link count says
        return private.stat().st_nlink == 2
    finally:
        private.unlink()


def _describe(holder: dict | None) -> str:
    if not holder:
        return "unknown: its lock vanished"
    if holder.get("damaged"):
        return "unknown: its lock file is being written or damaged"
    return (f"host {holder.get('host')}, pid {holder.get('pid')}, started {holder.get('started')}: "
            f"{holder.get('command', '')}")


__all__ = [
    "HEARTBEAT_S", "LOCK", "STALE_AFTER_S", "FolderBusyError", "FolderLock", "process_alive", "process_space",
    "process_start",
]
