"""jax's persistent compilation cache, on for every command: a rerun reads its programs from disk.

A preempted TPU VM that restarts and resumes, `--mode=eval` of a checkpoint, a report,
predict: each compiles the same train and eval programs again, which takes minutes on a
pod slice and tens of seconds on a CPU. jax can keep compiled executables in a folder,
keyed by the program, its compile options and flags, the jax/jaxlib version and the
devices; `cli.start_command` turns that on with the folder of `--compilation_cache`:

- by default `~/.cache/resnet_jax/jax_compilation_cache` (`$JAX_COMPILATION_CACHE_DIR`
  when it is set);
- any folder jax can write, `gs://bucket/folder` included (jax reaches it through
  etils.epath), which the hosts of a pod slice can share;
- `none` turns it off.

jax stores only programs that took at least a second to compile (its default threshold):
the steps and the initialisation, not the many tiny eager operations. A cached executable
is only ever a copy of what the compiler would produce, so results are the same with and
without the cache. XLA:CPU checks that a stored executable suits the CPU that loads it and
compiles afresh when it does not (a home folder shared by different machines).
"""

import collections
import functools
import os

import jax
from absl import logging

OFF = "none"
DEFAULT_LOCATION = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(
    "~", ".cache", "resnet_jax", "jax_compilation_cache"
)

_HIT = "/jax/compilation_cache/cache_hits"
_REQUEST = "/jax/compilation_cache/compile_requests_use_cache"
_WRITE = "/jax/compilation_cache/cache_misses"  # jax records it when it writes an entry.

_counts: collections.Counter = collections.Counter()
_state = {"location": None}


@functools.cache
def _count_events() -> None:
    def listener(event: str, **_) -> None:
        if event in (_HIT, _REQUEST, _WRITE):
            _counts[event] += 1

    jax.monitoring.register_event_listener(listener)


def enable(location: str) -> str | None:
    """Points jax's persistent compilation cache at `location`; `none` (or "") turns it off.

    Call before the first compilation. A local folder that cannot be created or written
    leaves the cache off with a warning: it only saves time. Returns the folder used, or None.
    """
    if location.strip().lower() in ("", OFF):
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    if "://" not in location:
        location = os.path.abspath(os.path.expanduser(location))
        try:
            os.makedirs(location, exist_ok=True)
            if not os.access(location, os.W_OK | os.X_OK):
                raise PermissionError("not writable")
        except OSError as e:
            logging.warning(
                "Cannot use %s as the compilation cache (%s): every program is compiled "
                "afresh. Choose another folder with --compilation_cache=DIR, or turn it off "
                "with --compilation_cache=none.",
                location,
                e,
            )
            jax.config.update("jax_enable_compilation_cache", False)
            return None
    jax.config.update("jax_enable_compilation_cache", True)
    jax.config.update("jax_compilation_cache_dir", location)
    _count_events()
    _state["location"] = location
    return location


def location() -> str | None:
    """The cache's folder, or None when it is off."""
    return _state["location"]


def summary() -> str:
    """What the cache did so far in this process, for a log line."""
    location = _state["location"]
    if location is None:
        return "compilation cache off"
    hits, requests, writes = _counts[_HIT], _counts[_REQUEST], _counts[_WRITE]
    return (
        f"compilation cache {location}: {hits} programs read, {requests - hits} compiled "
        f"({writes} stored)"
    )
