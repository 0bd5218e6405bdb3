"""One command that measures a GPU or TPU host within minutes: a JSON and a markdown table.

    python scripts/device_check.py                   # ResNet-18, CIFAR-100 sizes, <= 8 minutes
    python scripts/device_check.py --budget_s=300 --out=/tmp/check
    python scripts/device_check.py --tiny            # CPU-sized, for tests/test_device_check.py

Parts, in this order, each in a subprocess of its own with a hard time limit (killed
when it runs over, recorded as such, and the check goes on); the whole check stops
starting parts when --budget_s is spent:

- step: the train step of ResNet-18 (CIFAR stem, 100 classes, 32 px) at batch 128, 512
  and 1024, in float32 and bfloat16: images/s, achieved TFLOP/s and the fraction of the
  chip's peak (known chips, scripts/timing.py), the device's peak memory, the compile
  time; and the eval step's images/s at the same batch;
- deterministic: the bfloat16 step at batch 512 with config.deterministic=True (XLA's
  deterministic GPU kernels), beside the same row without;
- input: the device-resident training input (crop + flip drawn on the device) at 32 px;
- main: `python -m resnet_jax.main --config configs/resnet18.py` on a generated
  CIFAR-shaped image folder for two epochs: time to the first step (input, initialisation,
  compilation) and time per epoch, scaled to CIFAR's 50,000 images;
- torch: the same step in PyTorch when it sees a GPU (channels_last, bfloat16 autocast;
  then torch.compile, which may not finish in its limit); on a CPU only with --tiny.

Writes OUT/device_check.json (every row, with its status and the machine) and
OUT/device_check.md, after every part, so a check cut short keeps what it measured.
Record the table in docs/benchmarks.md with the command that made it.
"""

import json
import os
import pathlib
import re
import sys
import tempfile
import time
from typing import Any

_CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_CHECKOUT), str(_CHECKOUT / "scripts")]

import timing  # noqa: E402  (scripts/timing.py; it imports jax only inside its functions)
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_float("budget_s", 480, "Seconds for the whole check: no part starts after them.")
flags.DEFINE_string("out", "device_check", "Folder for device_check.json and device_check.md.")
flags.DEFINE_bool("tiny", False, "A tiny net at 16 px and small batches: the check on a CPU.")
flags.DEFINE_string("part", None, "Internal: run one part's measurement and print its JSON.")
flags.DEFINE_string("part_settings", "{}", "Internal: the part's settings, as JSON.")
flags.DEFINE_string("limits", "", "Seconds per part, e.g. step=60,torch=30 (replaces defaults).")
flags.DEFINE_list("parts", None, "Only these parts (default: all), e.g. step,main.")
flags.DEFINE_bool("torch_compile", True, "Also time PyTorch's step under torch.compile.")

# Hard limits per subprocess, in seconds (one `step` row is one subprocess).
LIMITS = {"step": 75, "deterministic": 75, "input": 45, "main": 150, "torch": 90}
# What is measured at full size and with --tiny.
FULL = {"batches": (128, 512, 1024), "steps": 20, "repeats": 3, "main_images": 8192}
TINY = {"batches": (8,), "steps": 2, "repeats": 1, "main_images": 64}


def _config(settings: dict[str, Any]):
    """The headline config (or the tiny net) at the row's batch size and dtype."""
    from configs import resnet18, smoke

    config = smoke.get_config() if settings["tiny"] else resnet18.get_config()
    if not settings["tiny"]:
        config.model.num_classes = 100
    config.batch_size = config.eval_batch_size = settings.get("batch_size", config.batch_size)
    config.half_precision = settings.get("dtype") == "bfloat16"
    config.deterministic = settings.get("deterministic", False)
    config.profile_num_steps = 0
    return config


def _num_classes(config) -> int:
    return config.model.num_classes or 4


# --- the parts, each run in its own process by `--part` -------------------------------------


def measure_step(settings: dict[str, Any]) -> dict[str, Any]:
    from resnet_jax import sharding

    config = _config(settings)
    mesh = sharding.make_mesh()
    result, train_round = timing.step_timers(
        config, mesh, _num_classes(config), settings["steps"], settings["repeats"]
    )
    result["train_img_per_s"] = max(train_round() for _ in range(settings["repeats"]))
    timing.flop_rates(result, config, mesh)
    return result


def measure_input(settings: dict[str, Any]) -> dict[str, Any]:
    return timing.input_rates(_config(settings), 10 * settings["steps"], settings["repeats"])


def measure_torch(settings: dict[str, Any]) -> dict[str, Any]:
    config = _config(settings)
    info, timer = timing.torch_timer(
        config,
        _num_classes(config),
        settings["steps"],
        channels_last=True,
        compiled=settings["compiled"],
    )
    if timer is None:
        return {"status": "skipped", "note": info["torch_note"]}
    if info["torch_device"] != "cuda" and not settings["tiny"]:
        return {"status": "skipped", "note": "PyTorch sees no GPU"}
    return {**info, "train_img_per_s": max(timer() for _ in range(settings["repeats"]))}


def write_folder(settings: dict[str, Any]) -> dict[str, Any]:
    config = _config(settings)
    timing.write_noise_folder(
        pathlib.Path(settings["root"]),
        settings["main_images"],
        config.batch_size,
        config.image_size,
        _num_classes(config),
    )
    return {}


def machine(settings: dict[str, Any]) -> dict[str, Any]:
    import jax

    device = jax.devices()[0]
    return {
        "device_kind": device.device_kind,
        "platform": device.platform,
        "devices": jax.device_count(),
        "host_cores": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


MEASURE = {
    "step": measure_step,
    "deterministic": measure_step,
    "input": measure_input,
    "torch": measure_torch,
    "folder": write_folder,  # Steps of the main part, and the machine's description.
    "machine": machine,
}


def _environment(settings: dict[str, Any]) -> dict[str, str]:
    env = dict(os.environ)
    if settings.get("deterministic"):
        # What main.py sets for config.deterministic, before jax starts its backends.
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_gpu_deterministic_ops=true".strip()
    return env


def _last_line(output: str) -> str:
    """What a failed part printed last (its error), for the row's note."""
    return (output.strip().splitlines() or [""])[-1][:300]


def run_part(part: str, settings: dict[str, Any], limit: float) -> dict[str, Any]:
    """One row: `part` measured in a subprocess of this script, killed after `limit` s."""
    command = [
        sys.executable,
        __file__,
        f"--part={part}",
        f"--part_settings={json.dumps(settings)}",
    ]
    status, output, seconds = timing.run_limited(command, _environment(settings), limit)
    row = {"part": part, **settings, "status": status, "seconds": round(seconds, 1)}
    found = [line for line in output.splitlines() if line.startswith("{")]
    if status == "ok" and found:
        row.update(json.loads(found[-1]))
    elif status != "ok" and "timed out" not in status:
        row["note"] = _last_line(output)
    return row


def run_main_part(settings: dict[str, Any], limit: float) -> dict[str, Any]:
    """Two epochs of `python -m resnet_jax.main` on a generated folder of CIFAR-shaped noise."""
    start = time.perf_counter()
    images, batch = settings["main_images"], settings["batch_size"]
    steps_per_epoch = images // batch
    with tempfile.TemporaryDirectory(prefix="device_check_") as tmp:
        written = run_part("folder", {**settings, "root": f"{tmp}/data"}, limit)
        if written["status"] != "ok":
            return {**written, "part": "main", "note": f"writing the images: {written['status']}"}
        command = [
            sys.executable,
            "-m",
            "resnet_jax.main",
            "--config",
            "configs/smoke.py" if settings["tiny"] else "configs/resnet18.py",
            f"--workdir={tmp}/run",
            "--config.dataset=image_folder",
            f"--config.data_dir={tmp}/data",
            f"--config.batch_size={batch}",
            f"--config.eval_batch_size={batch}",
            f"--config.half_precision={settings['dtype'] == 'bfloat16'}",
            f"--config.num_train_steps={2 * steps_per_epoch}",
            f"--config.log_every_steps={steps_per_epoch}",
            f"--config.eval_every_steps={2 * steps_per_epoch}",
            f"--config.checkpoint_every_steps={2 * steps_per_epoch}",
            "--config.eval_resize_size=0",
            "--compilation_cache=none",  # The time to the first step includes compiling.
        ]
        left = limit - (time.perf_counter() - start)
        status, output, _ = timing.run_limited(command, dict(os.environ), left)
    row = {"part": "main", **settings, "status": status}
    row["seconds"] = round(time.perf_counter() - start, 1)
    first = re.search(r"Step 1 done ([\d.]+) s after the run started", output)
    if first:
        row["first_step_s"] = float(first.group(1))
    # The second epoch's rate: steady state, the first epoch's compilation behind it.
    rate = re.search(rf"\[{2 * steps_per_epoch}\] train_examples_per_sec=([\d.]+)", output)
    if status == "ok" and rate:
        rate = float(rate.group(1))
        row.update(train_img_per_s=rate, epoch_s=images / rate, cifar_epoch_s=50_000 / rate)
    elif status != "ok" and "timed out" not in status:
        row["note"] = _last_line(output)
    return row


# --- the check ---------------------------------------------------------------------------------


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}g}" if abs(value) < 1000 else f"{value:,.0f}"
    return str(value)


def markdown(check: dict[str, Any]) -> str:
    machine = {
        key: check["machine"].get(key, "?")
        for key in ("devices", "device_kind", "platform", "host_cores", "jax", "date")
    }
    lines = [
        f"Device check: {machine['devices']} x {machine['device_kind']} ({machine['platform']}), "
        f"{machine['host_cores']} host cores, jax {machine['jax']}, {machine['date']}; "
        f"{check['total_s']:.0f} s of a {check['budget_s']:.0f} s budget.",
        "",
        "| part | batch | dtype | images/s | TFLOP/s | of peak | peak memory | compile s | "
        "status |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in check["rows"]:
        part = row["part"] + (" (torch.compile)" if row.get("compiled") else "")
        if row.get("deterministic"):
            part += " (deterministic=True)"
        peak = row.get("device_peak_bytes")
        compile_s = row.get("compile_s", row.get("first_step_s"))
        status = row["status"] + (f": {row['note']}" if row.get("note") else "")
        rate = row.get("train_img_per_s", row.get("input_img_per_s"))
        extra = []
        if row.get("eval_img_per_s"):
            extra.append(f"eval {_fmt(row['eval_img_per_s'])} images/s")
        if row.get("cifar_epoch_s"):
            extra.append(f"{_fmt(row['cifar_epoch_s'])} s per 50k-image epoch")
        if extra:
            status += " (" + ", ".join(extra) + ")"
        lines.append(
            "| "
            + " | ".join(
                [
                    part,
                    _fmt(row.get("batch_size")),
                    row.get("dtype", "-"),
                    _fmt(rate),
                    _fmt(row.get("achieved_tflop_per_s")),
                    _fmt(row.get("fraction_of_peak"), 2),
                    f"{peak / 2**30:.2f} GiB" if peak else "-",
                    _fmt(compile_s),
                    status,
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _limits() -> dict[str, float]:
    limits = dict(LIMITS)
    for item in filter(None, FLAGS.limits.split(",")):
        name, _, seconds = item.partition("=")
        if name not in LIMITS:
            raise app.UsageError(f"--limits: no part {name!r}; the parts are {sorted(LIMITS)}.")
        limits[name] = float(seconds)
    return limits


def plan(sizes: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every row of the check, in order: (part, settings)."""
    base = {"tiny": FLAGS.tiny, "steps": sizes["steps"], "repeats": sizes["repeats"]}
    rows = [
        ("step", {**base, "batch_size": batch, "dtype": dtype})
        for dtype in ("float32", "bfloat16")
        for batch in sizes["batches"]
    ]
    middle = sizes["batches"][len(sizes["batches"]) // 2]
    rows.append(
        (
            "deterministic",
            {**base, "batch_size": middle, "dtype": "bfloat16", "deterministic": True},
        )
    )
    rows.append(("input", {**base, "batch_size": sizes["batches"][-1]}))
    rows.append(
        (
            "main",
            {
                **base,
                "batch_size": middle,
                "dtype": "bfloat16",
                "main_images": sizes["main_images"],
            },
        )
    )
    for compiled in (False, True) if FLAGS.torch_compile else (False,):
        rows.append(
            ("torch", {**base, "batch_size": middle, "dtype": "bfloat16", "compiled": compiled})
        )
    return [row for row in rows if FLAGS.parts is None or row[0] in FLAGS.parts]


def check() -> dict[str, Any]:
    start = time.perf_counter()
    deadline = start + FLAGS.budget_s
    limits = _limits()
    out = pathlib.Path(FLAGS.out)
    out.mkdir(parents=True, exist_ok=True)
    # This process never starts jax's backends: a TPU admits one process, and on a GPU
    # jax would reserve most of the memory. Each part runs in a process of its own.
    found = run_part("machine", {}, limits["step"])
    result = {"machine": found, "budget_s": FLAGS.budget_s, "rows": [], "total_s": 0.0}
    for part, settings in plan(TINY if FLAGS.tiny else FULL):
        left = deadline - time.perf_counter()
        if left < 5:
            row = {"part": part, **settings, "status": "skipped: the budget is spent"}
        elif part == "main":
            row = run_main_part(settings, min(limits[part], left))
        else:
            row = run_part(part, settings, min(limits[part], left))
        result["rows"].append(row)
        result["total_s"] = time.perf_counter() - start
        print(f"{part}: {row['status']}", file=sys.stderr, flush=True)
        (out / "device_check.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / "device_check.md").write_text(markdown(result))
    return result


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    unknown = set(FLAGS.parts or ()) - set(LIMITS)
    if unknown:
        raise app.UsageError(f"--parts: no part {sorted(unknown)}; the parts are {list(LIMITS)}.")
    if FLAGS.part:
        from resnet_jax import cli

        cli.quiet_libraries()
        print(json.dumps(MEASURE[FLAGS.part](json.loads(FLAGS.part_settings))))
        return
    result = check()
    print(markdown(result), end="")


if __name__ == "__main__":
    app.run(main)
