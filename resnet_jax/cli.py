"""What the commands share: their start (quiet logs, the compilation cache) and one-line errors."""

import faulthandler
import logging as std_logging
import os
import pathlib
import signal
import sys
import time
from collections.abc import Callable

from absl import flags, logging

from resnet_jax import checkpointing, compile_cache, config_checks, data, workdir_claim

flags.DEFINE_string(
    "compilation_cache",
    compile_cache.DEFAULT_LOCATION,
    "Folder (or gs:// path) of jax's persistent compilation cache, where a rerun, an eval, "
    "a report or predict read the programs compiled before; none turns it off. See "
    "resnet_jax/compile_cache.py.",
)


def _show_in_help(name: str) -> None:
    """Lists --NAME in the command's --help (absl shows the main module's key flags there).

    A flag defined in this module would otherwise show only in --helpfull; absl names
    the main module by sys.argv[0].
    """
    flags.FLAGS.register_key_flag_for_module(sys.argv[0], flags.FLAGS[name])


_show_in_help("compilation_cache")


class FlagError(ValueError):
    """A flag or argument that is missing or wrong: one line, not absl's usage text."""


# Errors that mean bad input: reported as one clear line, not a traceback.
USER_ERRORS = (
    FlagError,
    config_checks.ConfigError,
    data.DatasetError,
    checkpointing.CheckpointError,
    FloatingPointError,
    workdir_claim.WorkdirError,
)

# Where INFO lines come from that the console shows by default: ours. Libraries' INFO
# lines (Orbax writes ~25 per checkpoint) need --verbosity=1, which also shows our DEBUG
# lines and clu's (its progress notes), never other libraries' (PIL's alone write one
# per image read).
_OURS = f"{os.sep}resnet_jax{os.sep}"
_DEBUG_SHOWN = (_OURS, f"{os.sep}clu{os.sep}")
# Library warnings that only restate what the command asked for or is about to say:
# Orbax opening checkpoints to read them, or saving a step that has no evaluation to rank
# it by; tensorflow-datasets finding the folder of a dataset it has not prepared yet.
_NOISE = (
    "Given directory is read only",
    "Requested `tracked_metric`; did not provide metrics",
    "Variant folder ",
)


class _QuietLibraries(std_logging.Filter):
    def filter(self, record: std_logging.LogRecord) -> bool:
        if flags.FLAGS["verbosity"].value >= 1:
            return record.levelno >= std_logging.INFO or any(
                part in record.pathname for part in _DEBUG_SHOWN
            )
        if record.levelno == std_logging.WARNING and str(record.msg).startswith(_NOISE):
            return False
        if _OURS not in record.pathname and _restates_storage(record):
            return False
        return record.levelno >= std_logging.WARNING or _OURS in record.pathname


def _restates_storage(record: std_logging.LogRecord) -> bool:
    """A library's report of a full or read-only disk: the command's error line says it once."""
    text = record.getMessage()
    if record.exc_info and record.exc_info[1] is not None:
        text += str(record.exc_info[1])
    return any(marker in text for marker in checkpointing.STORAGE_MARKERS)


def _quiet_closed_loops(unraisable) -> None:
    """Drops "Event loop is closed" from writes that outlive Orbax's loop after a failed save."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


def use_checkout_configs() -> None:
    """Puts the checkout on sys.path, so `from configs import default` works from any cwd.

    Config files import each other that way; it applies when the package runs from its
    checkout (pip install -e .).
    """
    checkout = pathlib.Path(__file__).resolve().parents[1]
    if (checkout / "configs" / "default.py").is_file() and str(checkout) not in sys.path:
        sys.path.append(str(checkout))


def quiet_libraries() -> None:
    """Hides libraries' INFO log lines unless --verbosity=1 (call inside the absl main)."""
    logging.get_absl_handler().addFilter(_QuietLibraries())


def reject_arguments(argv: list[str]) -> None:
    """A command's absl main takes flags only: anything else exits with one line."""
    if len(argv) > 1:
        sys.exit(
            f"error: unexpected arguments: {' '.join(argv[1:])}. This command takes flags "
            "only (--name=value; see --help)."
        )


def start_command(argv: list[str], takes_arguments: bool = False) -> None:
    """What every command does first, inside its absl main (the flags are parsed).

    Rejects arguments that are not flags (unless `takes_arguments`); hides libraries' INFO log lines unless --verbosity=1; makes `kill -USR1 PID` print
    every thread's Python stack (what a stuck run is waiting on); turns on the
    compilation cache of --compilation_cache (exit_on_user_error logs what it did).
    """
    if not takes_arguments:
        reject_arguments(argv)
    quiet_libraries()
    sys.unraisablehook = _quiet_closed_loops
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    compile_cache.enable(flags.FLAGS.compilation_cache)


def exit_on_user_error(
    function: Callable[[], None],
    extra: tuple[type[Exception], ...] = (),
    step_flag: str = "--config.eval_checkpoint=STEP",
) -> None:
    """Runs `function`; a USER_ERRORS (or `extra`) exception exits 1 with an `error:` line.

    A checkpoint step that cannot be used is reported with `step_flag`, the command's way
    of choosing another step. When `function` returns, logs what the compilation cache did.
    """
    try:
        function()
    except checkpointing.UnusableStepError as e:
        sys.exit(f"error: {e.with_flag(step_flag)}")
    except (*USER_ERRORS, *extra) as e:
        sys.exit(f"error: {e}")
    if compile_cache.location():
        logging.info("%s.", compile_cache.summary().capitalize())


def _error_lines(error: BaseException) -> list[str]:
    """The innermost message of `error` as stripped lines (ml_collections nests KeyErrors)."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    # str() of a KeyError is the repr of its message; every other error reads as it is.
    text = str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)
    return [line.strip() for line in text.splitlines() if line.strip()] or [repr(error)]


def config_error(error: Exception) -> str:
    """The one-line `error: ...` for a failure to parse the flags or to load --config."""
    if isinstance(error, flags.Error):
        if "Error whilst parsing config file" in str(error):
            # A config file that takes an argument (file.py:ARG) is loaded while the
            # flags are parsed; its error's last line says what is wrong.
            return f"error: cannot load the config: {_error_lines(error)[-1]}"
        return f"error: {error} (see --help for the flags)."
    if isinstance(error, (AttributeError, KeyError)):
        key, *hint = _error_lines(error)
        return " ".join(
            [
                f"error: no config key {key}.",
                *hint,
                "Every key, with its meaning, is in resnet_jax/defaults.py.",
            ]
        )
    return (
        f"error: cannot load the config: {_error_lines(error)[-1]}. Check the --config path "
        "(relative to the working directory) and the file, for example --config "
        "configs/resnet18.py from the checkout."
    )


def define_checkpoint_flag(
    help_text: str = "Which checkpoint: latest, best or a step number.",
) -> None:
    """--checkpoint for the commands that read one; checked when the flags are parsed."""
    flags.DEFINE_string("checkpoint", "latest", help_text)
    flags.register_validator(
        "checkpoint",
        lambda value: value in ("latest", "best") or value.isdigit(),
        message="must be latest, best or a step number",
    )
    _show_in_help("checkpoint")


def define_weights_flag() -> None:
    """--weights for the commands that read a model from a checkpoint."""
    flags.DEFINE_enum(
        "weights",
        "raw",
        ["raw", "ema"],
        "Which weights: the trained ones (raw), or their moving average (ema; runs trained "
        "with --config.ema_decay > 0).",
    )
    _show_in_help("weights")


# The required flags of the command that runs: name -> what the flag is, with an example.
_REQUIRED: dict[str, str] = {}


def require_flag(name: str, what: str) -> None:
    """Makes --NAME required: `parse_flags` stops with one line naming it when it is missing.

    Instead of absl's mark_flag_as_required, whose error is a two-line FATAL that does
    not say what the flag is for. `what` does, with an example: "the run folder whose
    checkpoint classifies the images (e.g. --workdir runs/resnet18)".
    """
    _REQUIRED[name] = what


def missing_flags(names: list[str]) -> str:
    """The message for required flags `names` that were not given, one line."""
    return "; ".join(f"--{name} is required: {_REQUIRED[name]}" for name in names) + "."


def parse_flags(argv: list[str]) -> list[str]:
    """absl's parsing, with its problems (and those of --config) as one line, not a traceback.

    For `app.run(main, flags_parser=parse_flags)` in every command. Flags of
    `require_flag` that were not given are named, with what they are for.
    """
    try:
        rest = flags.FLAGS(argv)
        # The config file loads lazily, and a failure shows at the first use: make it here.
        if "config" in flags.FLAGS and flags.FLAGS.config is not None:
            flags.FLAGS.config.to_dict()
    except Exception as e:  # noqa: BLE001 - a config file can fail to load for any reason.
        sys.exit(config_error(e))
    missing = [name for name in _REQUIRED if flags.FLAGS[name].value is None]
    if missing:
        sys.exit(f"error: {missing_flags(missing)}")
    return rest


class Progress:
    """A progress line on stderr, `LABEL: done/total UNIT (%), rate, time left`.

    Redrawn in place on a terminal; elsewhere (logs, pipes) printed every ~10% and at the end.
    """

    def __init__(self, total: int, label: str, unit: str):
        self.total, self.start, self.shown = total, time.monotonic(), 0
        self.label, self.unit = label, unit
        self.interactive = sys.stderr.isatty()

    def update(self, done: int) -> None:
        if not self.interactive and done < self.total and done - self.shown < self.total / 10:
            return
        self.shown = done
        elapsed = time.monotonic() - self.start
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else 0.0
        line = (
            f"{self.label}: {done}/{self.total} {self.unit} ({100 * done / self.total:.0f}%), "
            f"{rate:.1f} {self.unit}/s, {eta:.0f} s left"
        )
        end = "\n" if done == self.total or not self.interactive else ""
        print(f"\r{line}" if self.interactive else line, end=end, file=sys.stderr, flush=True)
