"""Time to the first step with jax's persistent compilation cache off, cold and warm.

    python scripts/cache_benchmark.py                       # configs/resnet18.py: ResNet-18, 32 px
    python scripts/cache_benchmark.py --config configs/smoke.py --json_out cache.json

Runs `python -m resnet_jax.main` for one training step on a generated image folder at the
config's image size, batch and class count (noise images: the programs, not the data,
are what is timed), five times:

- train with --compilation_cache=none, then with a fresh cache folder (cold: it compiles
  and stores), then again with that folder (warm: it reads);
- --mode=eval of the run's checkpoint without the cache, then with the warm folder.

For each: the time to the first step that train logs ("Step 1 done ... s after the run
started": input, initialisation, compilation and the step; eval has no steps, so its row is
the whole command), the command's wall time, and the programs read and compiled. Prints a
table; the last line is the JSON (also --json_out).
"""

import os
import pathlib
import re
import sys
import tempfile
from typing import Any

_CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_CHECKOUT), str(_CHECKOUT / "scripts")]

import timing  # noqa: E402  (scripts/timing.py, beside this file)
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", str(_CHECKOUT / "configs" / "resnet18.py"), "Config file.", lock_config=False
)
flags.DEFINE_integer("num_classes", 100, "Classes of the generated folder.")
flags.DEFINE_float("limit_s", 900, "Seconds each command may take.")
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")

_FIRST_STEP = re.compile(r"Step 1 done ([\d.]+) s after the run started")
_COUNTS = re.compile(r"ompilation cache \S+: (\d+) programs read, (\d+) compiled")


def _command(config_path: str, workdir: pathlib.Path, data: pathlib.Path, *extra) -> list[str]:
    config = FLAGS.config
    return [
        sys.executable,
        "-m",
        "resnet_jax.main",
        "--config",
        config_path,
        f"--workdir={workdir}",
        "--config.dataset=image_folder",
        f"--config.data_dir={data}",
        f"--config.batch_size={config.batch_size}",
        f"--config.eval_batch_size={config.batch_size}",
        f"--config.model.name={config.model.name}",
        f"--config.half_precision={config.half_precision}",
        "--config.num_train_steps=1",
        "--config.eval_resize_size=0",
        *extra,
    ]


def measure() -> list[dict[str, Any]]:
    config = FLAGS.config
    config_path = config_flags.get_config_filename(FLAGS["config"])
    rows = []
    with tempfile.TemporaryDirectory(prefix="cache_benchmark_") as tmp:
        tmp = pathlib.Path(tmp)
        timing.write_noise_folder(
            tmp / "data", config.batch_size, config.batch_size, config.image_size, FLAGS.num_classes
        )
        cache = tmp / "cache"
        runs = [
            ("train", "off", "none", "off"),
            ("train", "cold", str(cache), "cold"),
            ("train", "warm", str(cache), "warm"),
            ("eval", "off", "none", "cold"),
            ("eval", "warm", str(cache), "cold"),
        ]
        for mode, label, location, workdir in runs:
            command = _command(
                config_path,
                tmp / workdir,
                tmp / "data",
                f"--mode={mode}",
                f"--compilation_cache={location}",
            )
            status, output, seconds = timing.run_limited(command, dict(os.environ), FLAGS.limit_s)
            if status != "ok":
                sys.exit(f"error: {mode} with the cache {label}: {status}\n{output[-3000:]}")
            first = _FIRST_STEP.search(output)
            counts = _COUNTS.findall(output)
            read, compiled = map(int, counts[-1]) if counts else (None, None)
            rows.append(
                {
                    "mode": mode,
                    "cache": label,
                    "first_step_s": float(first.group(1)) if first else None,
                    "command_s": seconds,
                    "programs_read": read,
                    "programs_compiled": compiled,
                }
            )
    return rows


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    config = FLAGS.config
    rows = measure()
    print(
        f"{config.model.name}, batch {config.batch_size}, {config.image_size} px, "
        f"{FLAGS.num_classes} classes: one step, compilation cache off / cold / warm"
    )
    print(
        f"  {'command':<8} {'cache':<6} {'first step s':>13} {'command s':>10} {'read':>5} {'compiled':>9}"
    )
    for row in rows:
        first = f"{row['first_step_s']:.1f}" if row["first_step_s"] is not None else "-"
        read = "-" if row["programs_read"] is None else row["programs_read"]
        compiled = "-" if row["programs_compiled"] is None else row["programs_compiled"]
        print(
            f"  {row['mode']:<8} {row['cache']:<6} {first:>13} {row['command_s']:>10.1f} "
            f"{read:>5} {compiled:>9}"
        )
    cold, warm = rows[1], rows[2]
    result = {
        "model": config.model.name,
        "batch_size": config.batch_size,
        "image_size": config.image_size,
        "rows": rows,
        "warm_vs_cold_first_step": warm["first_step_s"] / cold["first_step_s"],
    }
    timing.print_json(result, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
