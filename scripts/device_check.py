"""One command that measures a GPU or TPU host within minutes: a JSON and a markdown table.

    python scripts/device_check.py                   # <= 8 minutes (--budget_s=480)
    python scripts/device_check.py --budget_s=300 --out=/tmp/check
    python scripts/device_check.py --tiny            # CPU-sized, for tests/test_device_check.py

Parts, in this order, each in a subprocess of its own with a hard time limit (LIMITS:
killed when it runs over, recorded as such, and the check goes on); no part starts once
--budget_s is spent, and each part's limit is cut to what is left of it, so the whole
check ends within --budget_s (plus a second or two of writing):

- step: the train step of ResNet-18 (CIFAR stem, 100 classes, 32 px) at batch 128, 512
  and 1024, in float32 and bfloat16: images/s, time per step and its compute floor (the
  step's FLOPs at the chip's peak), achieved TFLOP/s and the fraction of the chip's peak
  (known chips, scripts/timing.py), the device's peak memory, the compile time; and the
  eval step's images/s at the same batch. FLOPs are counted from the model (3 x the
  forward's FLOPs of --mode=summary, timing.FLOP_COUNT), not by XLA's cost analysis,
  which on GPUs leaves out the convolutions run by cuDNN. The bfloat16 step at the
  largest batch (the headline) is also traced: a jax.profiler trace of TRACE_STEPS steps,
  OUT/profile_resnet18.*, under timing.TRACE_MAX_BYTES;
- deterministic: that headline step with config.deterministic=True (XLA's deterministic
  GPU kernels);
- resnet20: the paper's CIFAR-10 ResNet-20 (configs/paper_cifar10.py:20, float32) at
  its batch of 128, traced as well (OUT/profile_resnet20.*): so small a step is bound by
  launches and latency rather than arithmetic, and the trace shows where it goes;
- resnet50: ResNet-50 at 224 px, bfloat16, 1000 classes (configs/resnet50_imagenet.py)
  at batch 256;
- stream: the streaming input at 224 px (scripts/input_benchmark.py: ImageNet-like
  500x375 JPEGs, random-resized crop and flip, OpenCV) with one grain worker per host
  core, at ResNet-50's batch: images/s and per CPU-second, and the ratio to the resnet50
  row's step, so a host shows whether its cores keep up with its chip (with --tiny: 64 px,
  two workers);
- input: the device-resident training input (crop + flip drawn on the device) at 32 px;
- main: `python -m resnet_jax.main --config configs/resnet18.py` (bfloat16, the largest
  batch) on a generated CIFAR-shaped image folder for two epochs: time to the first step
  (input, initialisation, compilation) and time per epoch, scaled to CIFAR's 50,000 images;
- torch: the ResNet-18 step in PyTorch at the largest batch when it sees a GPU
  (channels_last, bfloat16 autocast; then torch.compile, which may not finish in its
  limit); on a CPU only with --tiny.

Time on one H200, estimated from a run of 234 s for seven rows at batches 512 and 1024
(issue 38): 25 to 33 s per step row (a process start, two compilations, the timing), 60
to 90 s for resnet50 (ResNet-50's convolutions autotuned), 60 s for main and for
torch.compile, 15 to 20 s for input and torch: 440 to 520 s for the 13 rows, plus the
stream row (not yet timed on a GPU host: writing 256 JPEGs, starting one worker per core,
two timed rounds; its limit is 120 s). The 480 s budget stops it: the rows that may not
fit are the last, torch.compile's (measured already, docs/benchmarks.md).

Writes OUT/device_check.json (every row, with its status and the machine) and
OUT/device_check.md, after every part, so a check cut short keeps what it measured; the
traces beside them, OUT/profile_<net>.xplane.pb and .trace.json.gz (under 6 MB each
pair; Perfetto's UI opens the .trace.json.gz, TensorBoard's profile tab the .xplane.pb
once it is copied to LOGDIR/plugins/profile/RUN/; each traced row's JSON also sums the
trace per line in trace_ms_per_step). Record the table in docs/benchmarks.md with the
command that made it.
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
LIMITS = {
    "step": 75,
    "deterministic": 75,
    "resnet20": 75,
    "resnet50": 150,
    "stream": 120,
    "input": 45,
    "main": 150,
    "torch": 90,
}
# What is measured at full size and with --tiny.
FULL = {"batches": (128, 512, 1024), "steps": 20, "repeats": 3, "main_images": 8192}
TINY = {"batches": (8,), "steps": 2, "repeats": 1, "main_images": 64}
# The stream row: input_benchmark's files and image size, at full size and with --tiny.
STREAM = {"full": {"px": 224, "files": 256}, "tiny": {"px": 64, "files": 16, "workers": 2}}
# The nets of the rows at full size: (config, its argument, classes, batch, dtype).
NETS = {
    "resnet18": ("resnet18", None, 100, None, None),
    "resnet20": ("paper_cifar10", "20", 10, 128, "float32"),
    "resnet50": ("resnet50_imagenet", None, 1000, 256, "bfloat16"),
}
# Traced steps of the traced rows (the headline step and resnet20).
TRACE_STEPS = 3


def _config(settings: dict[str, Any]):
    """The row's net (or, with --tiny, configs/smoke.py's) at its batch size and dtype."""
    import importlib

    module, argument, num_classes, _, _ = NETS[settings.get("net", "resnet18")]
    if settings["tiny"]:
        config = importlib.import_module("configs.smoke").get_config()
    else:
        get_config = importlib.import_module(f"configs.{module}").get_config
        config = get_config(argument) if argument else get_config()
        config.model.num_classes = num_classes
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
    timing.flop_rates(result, config, mesh, _num_classes(config))
    result["model"], result["image_size"] = config.model.name, config.image_size
    if settings.get("trace"):
        print(json.dumps(result), flush=True)  # Kept if the trace overruns the part's limit.
        result.update(timing.trace_steps(train_round, TRACE_STEPS, settings["trace"]))
    return result


def count_flops(settings: dict[str, Any]) -> dict[str, Any]:
    """The row's FLOPs per image, as measure_step counts them, without running anything."""
    config = _config(settings)
    return {
        "model": config.model.name,
        "image_size": config.image_size,
        "train_gflop_per_image": timing.train_flops_per_image(config, _num_classes(config)) / 1e9,
        "flop_count": timing.FLOP_COUNT,
    }


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
    peaks = {
        dtype: timing.peak_flops(device, dtype == "bfloat16") for dtype in ("bfloat16", "float32")
    }
    return {
        "device_kind": device.device_kind,
        "peak_tflop_per_s": {dtype: peak and peak / 1e12 for dtype, peak in peaks.items()},
        "platform": device.platform,
        "devices": jax.device_count(),
        "host_cores": len(os.sched_getaffinity(0)),
        "jax": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }


MEASURE = {
    "step": measure_step,
    "deterministic": measure_step,
    "resnet20": measure_step,
    "resnet50": measure_step,
    "flops": count_flops,  # For tests/test_device_check.py: a row's FLOPs, nothing run.
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
    if found:  # Also from a part cut short: it prints its figures before a trace.
        row.update(json.loads(found[-1]))
    if status != "ok" and "timed out" not in status:
        row["note"] = _last_line(output)
    return row


def run_stream_part(settings: dict[str, Any], limit: float) -> dict[str, Any]:
    """The streaming input at ImageNet size on every host core, by scripts/input_benchmark.py."""
    sizes = STREAM["tiny" if settings["tiny"] else "full"]
    workers = sizes.get("workers", len(os.sched_getaffinity(0)))
    batch = settings["batch_size"]
    command = [
        sys.executable,
        str(_CHECKOUT / "scripts" / "input_benchmark.py"),
        f"--sizes={sizes['px']}",
        f"--workers={workers}",
        "--decoders=opencv",
        "--jpegs=imagenet",
        f"--num_files={max(sizes['files'], batch)}",
        f"--batch_size={batch}",
        # Each window covers two rounds of the workers (a worker makes whole batches).
        f"--batches={2 * workers}",
        f"--repeats={settings['repeats']}",
    ]
    status, output, seconds = timing.run_limited(command, dict(os.environ), limit)
    row = {"part": "stream", **settings, "status": status, "seconds": round(seconds, 1)}
    found = [line for line in output.splitlines() if line.startswith("{")]
    if status == "ok" and found:
        result = json.loads(found[-1])
        (stream,) = [r for r in result["rows"] if r["path"] == "stream"]
        (files,) = result["files"]
        row.update(
            image_size=stream["image_size"],
            workers=workers,
            decoder=stream["decoder"],
            input_img_per_s=stream["img_per_s"],
            input_img_per_cpu_s=stream["img_per_cpu_s"],
            cores_busy=stream["cores_busy"],
            files=f"{files['width']}x{files['height']} JPEGs, {files['mean_bytes'] / 1e3:.0f} KB",
        )
    elif status != "ok" and "timed out" not in status:
        row["note"] = _last_line(output)
    return row


def feeds(rows: list[dict[str, Any]]) -> float | None:
    """The stream row's images/s over the resnet50 row's step (> 1: the host keeps up)."""
    rates = {row["part"]: row.get("input_img_per_s", row.get("train_img_per_s")) for row in rows}
    if rates.get("stream") and rates.get("resnet50"):
        return rates["stream"] / rates["resnet50"]
    return None


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
    rate = re.search(rf"\] step {2 * steps_per_epoch}/\d+ .* \| ([\d.]+) img/s \|", output)
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


def _net(row: dict[str, Any]) -> str:
    """The row's net: as measured, else as planned (with --tiny, every row is the tiny net)."""
    return row.get("model") or ("-" if row.get("tiny") else row.get("net", "-"))


def _size(nbytes: float | None) -> str:
    return f"{nbytes / 2**20:.1f} MB" if nbytes else "-"


def markdown(check: dict[str, Any]) -> str:
    machine = {
        key: check["machine"].get(key, "?")
        for key in ("devices", "device_kind", "platform", "host_cores", "jax", "date")
    }
    peaks = check["machine"].get("peak_tflop_per_s") or {}
    peak = (
        f"{_fmt(peaks['bfloat16'])} TFLOP/s bfloat16 and {_fmt(peaks['float32'])} float32 "
        "(TF32 on NVIDIA GPUs), dense, vendor figures (scripts/timing.py PEAK_FLOPS)"
        if peaks.get("bfloat16")
        else "unknown for this device"
    )
    lines = [
        f"Device check: {machine['devices']} x {machine['device_kind']} ({machine['platform']}), "
        f"{machine['host_cores']} host cores, jax {machine['jax']}, {machine['date']}; "
        f"{check['total_s']:.0f} s of a {check['budget_s']:.0f} s budget.",
        "",
        "| part | net | batch | px | dtype | images/s | ms per step (floor) | GFLOP per image "
        "| TFLOP/s | of peak | peak memory | compile s | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    traces = []
    for row in check["rows"]:
        part = row["part"] + (" (torch.compile)" if row.get("compiled") else "")
        if row.get("deterministic"):
            part += " (deterministic=True)"
        peak_bytes = row.get("device_peak_bytes")
        compile_s = row.get("compile_s", row.get("first_step_s"))
        status = row["status"] + (f": {row['note']}" if row.get("note") else "")
        rate = row.get("train_img_per_s", row.get("input_img_per_s"))
        step_ms = _fmt(row.get("step_ms"))
        if row.get("floor_ms"):
            step_ms += f" ({_fmt(row['floor_ms'])})"
        extra = []
        if row.get("eval_img_per_s"):
            extra.append(f"eval {_fmt(row['eval_img_per_s'])} images/s")
        if row.get("workers"):
            extra.append(
                f"{row['workers']} workers, {_fmt(row['input_img_per_cpu_s'])} images per "
                f"CPU-second, {row['cores_busy']:.1f} cores busy, {row['files']}"
            )
        if row.get("feeds_resnet50"):
            ratio = row["feeds_resnet50"]
            keeps = "keeps up with" if ratio >= 1 else "falls short of"
            extra.append(f"{keeps} the resnet50 step: {ratio:.2f}x its images/s")
        if row.get("cifar_epoch_s"):
            extra.append(f"{_fmt(row['cifar_epoch_s'])} s per 50k-image epoch")
        if row.get("trace_note"):
            extra.append(f"trace: {row['trace_note']}")
        if row.get("trace_files"):
            where = pathlib.Path(row["trace"]).name
            extra.append(f"traced: {where}")
            traces.append(
                f"{where}.* ({row['trace_steps']} steps of {_net(row)}, "
                f"{_size(row['trace_bytes'])}, {_fmt(row['traced_step_ms'])} ms per traced step)"
            )
        if extra:
            status += " (" + ", ".join(extra) + ")"
        cells = [
            part,
            _net(row),
            _fmt(row.get("batch_size")),
            _fmt(row.get("image_size")),
            row.get("dtype", "-"),
            _fmt(rate),
            step_ms,
            _fmt(row.get("train_gflop_per_image")),
            _fmt(row.get("achieved_tflop_per_s")),
            _fmt(row.get("fraction_of_peak"), 2),
            f"{peak_bytes / 2**30:.2f} GiB" if peak_bytes else "-",
            _fmt(compile_s),
            status,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"FLOPs: {timing.FLOP_COUNT}; XLA's own count of the step (train_step_gflop in the "
        "JSON) leaves out the convolutions that GPUs run as cuDNN calls. The floor is the "
        f"step's FLOPs at the peak. Peak: {peak}.",
    ]
    if traces:
        lines.append(f"Traces, beside this table: {'; '.join(traces)}.")
    return "\n".join(lines) + "\n"


def _limits() -> dict[str, float]:
    limits = dict(LIMITS)
    for item in filter(None, FLAGS.limits.split(",")):
        name, _, seconds = item.partition("=")
        if name not in LIMITS:
            raise app.UsageError(f"--limits: no part {name!r}; the parts are {sorted(LIMITS)}.")
        limits[name] = float(seconds)
    return limits


def plan(sizes: dict[str, Any], out: pathlib.Path) -> list[tuple[str, dict[str, Any]]]:
    """Every row of the check, in order: (part, settings)."""
    base = {"tiny": FLAGS.tiny, "steps": sizes["steps"], "repeats": sizes["repeats"]}
    largest = sizes["batches"][-1]
    headline = {**base, "net": "resnet18", "batch_size": largest, "dtype": "bfloat16"}
    rows = [
        ("step", {**base, "net": "resnet18", "batch_size": batch, "dtype": dtype})
        for dtype in ("float32", "bfloat16")
        for batch in sizes["batches"]
    ]
    assert rows[-1][1] == headline
    rows[-1][1]["trace"] = str(out / "profile_resnet18")
    rows.append(("deterministic", {**headline, "deterministic": True}))
    for net in ("resnet20", "resnet50"):
        _, _, _, batch, dtype = NETS[net]
        settings = {**base, "net": net, "dtype": dtype}
        settings["batch_size"] = sizes["batches"][0] if FLAGS.tiny else batch
        if net == "resnet20":
            settings["trace"] = str(out / "profile_resnet20")
        rows.append((net, settings))
    stream_batch = sizes["batches"][0] if FLAGS.tiny else NETS["resnet50"][3]
    rows.append(("stream", {**base, "batch_size": stream_batch}))
    rows.append(("input", {**base, "batch_size": largest}))
    rows.append(("main", {**headline, "main_images": sizes["main_images"]}))
    for compiled in (False, True) if FLAGS.torch_compile else (False,):
        rows.append(("torch", {**headline, "compiled": compiled}))
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
    for part, settings in plan(TINY if FLAGS.tiny else FULL, out.resolve()):
        left = deadline - time.perf_counter()
        if left < 5:
            row = {"part": part, **settings, "status": "skipped: the budget is spent"}
        elif part == "main":
            row = run_main_part(settings, min(limits[part], left))
        elif part == "stream":
            row = run_stream_part(settings, min(limits[part], left))
            row["feeds_resnet50"] = feeds([*result["rows"], row])
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
