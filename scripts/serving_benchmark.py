"""Inference speed of an export's formats, each in its own runtime, on this machine.

    python -m resnet_jax.export --workdir runs/resnet18 --format all --out exported/resnet18
    python scripts/serving_benchmark.py exported/resnet18 --batch_sizes 1,32 --repeats 5 \
        --json_out docs/serving_benchmark.json

For each format in the export's model.json and each batch size: the artifact is loaded
once (resnet_jax.export.LOADERS: jax for StableHLO, ONNX Runtime, TensorFlow, LiteRT),
called twice untimed (compilation, allocation), then --repeats times on random uint8
images; ms/batch is the median call, img/s the batch over it. Each runtime uses its
default threads (all cores). Prints a table, and the JSON as the last line.
"""

import argparse
import json
import pathlib
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))

import timing  # noqa: E402

from resnet_jax import export  # noqa: E402


def measure(run, images: np.ndarray, repeats: int) -> float:
    """Median seconds of `run(images)` over `repeats` calls, after the warm-up calls."""
    for _ in range(timing.WARMUP_STEPS):
        run(images)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "export_dir", type=pathlib.Path, help="Folder written by resnet_jax.export."
    )
    parser.add_argument("--batch_sizes", default="1,32", help="Comma-separated batch sizes.")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json_out", default=None, help="Also write the JSON here.")
    args = parser.parse_args()
    try:
        meta = json.loads((args.export_dir / export.METADATA).read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"error: {args.export_dir} is not an export folder ({e}).")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    size = meta["input"]["image_size"]
    rng = np.random.default_rng(0)
    rows = []
    for fmt, name in meta["files"].items():
        run = export.LOADERS[fmt](args.export_dir / name)
        for batch in batch_sizes:
            images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)
            seconds = measure(run, images, args.repeats)
            rows.append(
                {
                    "format": fmt,
                    "batch_size": batch,
                    "ms_per_batch": float(f"{seconds * 1e3:.4g}"),
                    "img_per_s": float(f"{batch / seconds:.4g}"),
                }
            )
    print(f"{meta['source']['model']}, {size}x{size} px, {args.repeats} repeats")
    print(f"{'format':<12}{'batch':>6}{'ms/batch':>11}{'img/s':>10}")
    for row in rows:
        print(
            f"{row['format']:<12}{row['batch_size']:>6}{row['ms_per_batch']:>11.2f}"
            f"{row['img_per_s']:>10.1f}"
        )
    result = {
        "model": meta["source"]["model"],
        "image_size": size,
        "repeats": args.repeats,
        "rows": rows,
    }
    timing.print_json(result, args.json_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
