"""One training run per workdir: a claim file taken before anything is written.

The same command started twice on one workdir (a second terminal, a scheduler retrying
while the first attempt still runs, `scripts/tpu_train.sh` run twice) would otherwise
have two runs saving and deleting each other's checkpoints in one folder. Training takes
`WORKDIR/RUNNING.json` first (process 0 for all processes of a multi-host run) and gives
it back when it ends, however it ends short of SIGKILL. The file names the host, the
process id and the time, and the running job renews its `heartbeat` every
HEARTBEAT_S seconds.

A claim left by a run that died (SIGKILL, a lost VM) does not block the rerun. It is
stale, and taken over with a warning, when
- it was made on this host and its process no longer runs (checked at once), or
- its heartbeat is older than STALE_AFTER_S (a claim from another host).

On a local disk the claim is created atomically (O_EXCL): of two launches at the same
moment exactly one wins. On gs:// it is written and read back, which leaves a window of
about a second for two launches to both believe they won. Reading commands
(`--mode=eval`, report, predict) do not claim.
"""

import json
import os
import socket
import threading
import time
from typing import Any

from etils import epath

CLAIM_FILE = "RUNNING.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0


class WorkdirError(RuntimeError):
    """The workdir cannot be claimed: it cannot be written, or another run holds it."""


class WorkdirInUseError(WorkdirError):
    """Another live run holds the workdir."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (ticks since boot), telling a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _alive_here(claim: dict[str, Any]) -> bool:
    """Whether the claim's process still runs (the claim was made on this host)."""
    pid = claim.get("pid")
    if not isinstance(pid, int):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # Someone else's process: it exists.
    started = claim.get("process_start")
    return started is None or _process_start(pid) in (None, started)


def stale_reason(claim: dict[str, Any], now: float | None = None) -> str | None:
    """Why `claim` no longer holds (a sentence), or None while its run lives."""
    now = time.time() if now is None else now
    if claim.get("host") == socket.gethostname():
        if not _alive_here(claim):
            return f"its process {claim.get('pid')} on this host no longer runs"
        return None
    age = now - float(claim.get("heartbeat", 0))
    if age > STALE_AFTER_S:
        return f"its heartbeat is {age:.0f} s old (more than {STALE_AFTER_S:.0f} s)"
    return None


def _describe(claim: dict[str, Any], now: float) -> str:
    return (
        f"process {claim.get('pid')} on host {claim.get('host')} (process "
        f"{claim.get('process_index', 0)} of {claim.get('process_count', 1)}), started "
        f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(claim.get('started', 0)))}, "
        f"heartbeat {now - float(claim.get('heartbeat', 0)):.0f} s ago"
    )


class Claim:
    """The claim on a workdir: `take()`, a heartbeat thread, `release()`."""

    def __init__(self, workdir: epath.Path, process_index: int = 0, process_count: int = 1):
        self.path = epath.Path(workdir) / CLAIM_FILE
        now = time.time()
        pid = os.getpid()
        self.record = {
            "host": socket.gethostname(),
            "pid": pid,
            "process_start": _process_start(pid),
            "process_index": process_index,
            "process_count": process_count,
            "started": now,
            "heartbeat": now,
        }
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.took_over: str | None = None

    def _read(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (ValueError, OSError):
            return {}  # Unreadable: half-written by a run that died while writing it.

    def _modified(self) -> float:
        try:
            return self.path.stat().mtime
        except OSError:
            return 0.0

    def _create(self) -> bool:
        """Creates the claim file if there is none; True when this call created it."""
        text = json.dumps(self.record)
        if "://" in str(self.path):
            if self.path.exists():
                return False
            self.path.write_text(text)
            time.sleep(1.0)  # A launch racing this one has written by now: read back.
            return self._read() == self.record
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True

    def take(self) -> None:
        """Claims the workdir, taking over a stale claim; raises WorkdirInUseError if live.

        Raises OSError when the workdir cannot be written.
        """
        for _ in range(20):  # Another launch may be writing, removing or replacing it.
            try:
                created = self._create()
            except OSError as e:
                raise WorkdirError(
                    f"cannot write {self.path} ({e.strerror or e}): free space or fix the "
                    "folder's permissions, or train in another --workdir, then rerun."
                ) from None
            if created:
                self._start_heartbeat()
                return
            held = self._read()
            if held is None:
                continue
            now = time.time()
            if held == {} and now - self._modified() < 10:
                time.sleep(1.0)  # Being written by a launch that just created it.
                continue
            reason = "it cannot be read" if held == {} else stale_reason(held, now)
            if reason is None:
                raise WorkdirInUseError(
                    f"{self.path.parent} is in use by the run of {_describe(held, now)}. "
                    f"Wait for it to end, stop it (kill {held.get('pid')} on "
                    f"{held.get('host')}), or train in another --workdir. A claim left by "
                    f"a run that died is taken over at once on the same host, or "
                    f"{STALE_AFTER_S:.0f} s after its last heartbeat (remove "
                    f"{self.path} by hand only if that run is certainly gone)."
                )
            self.took_over = reason
            self.path.unlink(missing_ok=True)
        raise WorkdirInUseError(
            f"{self.path.parent}: another launch keeps claiming it; start one run only."
        )

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                self.record["heartbeat"] = time.time()
                try:
                    temporary = self.path.parent / f".{CLAIM_FILE}.{os.getpid()}"
                    temporary.write_text(json.dumps(self.record))
                    temporary.replace(self.path)
                except OSError:
                    pass  # A full or read-only disk: the run's own writes report it.

        self._thread = threading.Thread(target=beat, name="workdir-claim", daemon=True)
        self._thread.start()

    def release(self) -> None:
        """Stops the heartbeat and removes the claim, if it is still this run's."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        held = self._read()
        if (
            held
            and held.get("pid") == self.record["pid"]
            and held.get("host") == (self.record["host"])
        ):
            self.path.unlink(missing_ok=True)
