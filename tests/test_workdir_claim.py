"""The claim on a workdir (resnet_jax/workdir_claim.py): live claims refuse, stale ones give way.

The whole command's behaviour (a second launch refused while the first runs, the rerun
after a SIGKILL taking over and ending bitwise equal) is in tests/test_checkpoints.py.
"""

import json
import os
import socket
import subprocess
import time

import pytest

from resnet_jax import workdir_claim
from resnet_jax.workdir_claim import Claim, WorkdirError, WorkdirInUseError


def _write_claim(workdir, **fields):
    record = {"host": socket.gethostname(), "pid": os.getpid(), "heartbeat": time.time()}
    record.update(fields)
    (workdir / "RUNNING.json").write_text(json.dumps(record))


def _dead_pid():
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_a_live_claim_refuses_a_second_and_is_given_back(tmp_path):
    first = Claim(tmp_path)
    first.take()
    held = json.loads((tmp_path / "RUNNING.json").read_text())
    assert (held["host"], held["pid"]) == (socket.gethostname(), os.getpid())
    with pytest.raises(WorkdirInUseError, match=rf"is in use by the run of process {os.getpid()}"):
        Claim(tmp_path).take()
    first.release()
    assert not (tmp_path / "RUNNING.json").exists()
    again = Claim(tmp_path)
    again.take()
    assert again.took_over is None
    again.release()


def test_a_claim_whose_process_died_on_this_host_is_taken_over_at_once(tmp_path):
    pid = _dead_pid()
    _write_claim(tmp_path, pid=pid)
    claim = Claim(tmp_path)
    claim.take()
    assert claim.took_over == f"its process {pid} on this host no longer runs"
    assert json.loads((tmp_path / "RUNNING.json").read_text())["pid"] == os.getpid()
    claim.release()


def test_a_reused_pid_does_not_keep_a_dead_runs_claim(tmp_path):
    # Our own pid, but a different process start time: the pid was reused.
    _write_claim(tmp_path, process_start="1")
    claim = Claim(tmp_path)
    claim.take()
    assert "no longer runs" in claim.took_over
    claim.release()


def test_another_hosts_claim_holds_until_its_heartbeat_is_old(tmp_path):
    stale_after = workdir_claim.STALE_AFTER_S
    _write_claim(tmp_path, host="worker-7", pid=1, heartbeat=time.time() - stale_after / 2)
    with pytest.raises(WorkdirInUseError, match="process 1 on host worker-7"):
        Claim(tmp_path).take()
    _write_claim(tmp_path, host="worker-7", pid=1, heartbeat=time.time() - stale_after - 5)
    claim = Claim(tmp_path)
    claim.take()
    assert claim.took_over.startswith("its heartbeat is ")
    claim.release()


def test_the_heartbeat_is_renewed_while_the_run_lives(tmp_path, monkeypatch):
    monkeypatch.setattr(workdir_claim, "HEARTBEAT_S", 0.05)
    claim = Claim(tmp_path)
    claim.take()
    started = json.loads((tmp_path / "RUNNING.json").read_text())["heartbeat"]
    time.sleep(0.5)
    assert json.loads((tmp_path / "RUNNING.json").read_text())["heartbeat"] > started
    claim.release()
    assert not list(tmp_path.iterdir())  # No temporary file left either.


def test_an_old_unreadable_claim_is_taken_over(tmp_path):
    (tmp_path / "RUNNING.json").write_text('{"host": "vm", "pi')
    old = time.time() - 60
    os.utime(tmp_path / "RUNNING.json", (old, old))
    claim = Claim(tmp_path)
    claim.take()
    assert claim.took_over == "it cannot be read"
    claim.release()


def test_release_leaves_another_runs_claim_alone(tmp_path):
    claim = Claim(tmp_path)
    claim.take()
    _write_claim(tmp_path, host="worker-7", pid=1)  # Taken over by another run meanwhile.
    claim.release()
    assert json.loads((tmp_path / "RUNNING.json").read_text())["host"] == "worker-7"


def test_a_workdir_that_cannot_be_written_is_one_clear_error(tmp_path):
    not_a_folder = tmp_path / "file"
    not_a_folder.write_text("")
    with pytest.raises(WorkdirError, match=r"cannot write .*RUNNING.json \(Not a directory\)"):
        Claim(not_a_folder).take()
