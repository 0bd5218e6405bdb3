"""Training input throughput of both input paths, per image size: a table and JSON.

    python scripts/input_benchmark.py                  # 32 and 224 px; 0 and 2 workers
    python scripts/input_benchmark.py --sizes 224 --workers 0,4,8 --json_out input.json

For each of --sizes, after warm-up, as medians over --repeats windows of --batches global
batches of --batch_size images each:
- device: data.device.DeviceTrainBatches over --num_files random uint8 images held on the
  devices (pad 4, random crop, random flip, drawn in compiled code), timed until the last
  batch is ready;
- stream: data.stream.train_batches over an image folder of --num_files files written once
  into a temporary folder, for each of --workers (0: in this process, 2 threads), each
  batch put on the devices as the training loop does it (sharding.global_batch). Sizes
  below 64 px are CIFAR-like: PNGs of that size, augment=crop_flip (pad 4, crop, flip).
  Larger ones are ImageNet-like: JPEGs (quality 90) of (400 x 350) * size / 224 px, a
  smooth colour field with shapes and pixel noise so that they compress like photos
  (~90 KB at 224; ImageNet's training files average ~110 KB), resized by the pipeline's
  augment=random_resized_crop (the Inception crop, then a flip). After the first pass the
  files come from the page cache: this measures decoding and augmenting, not the disk.
  The split the stream path shuffles holds --records records, the files over and over,
  as many as CIFAR's or ImageNet's training split by default: grain's index shuffle
  costs ~0.005 ms a record at ImageNet's size but 0.3 ms at 128 (it is not the
  pipeline's cost on a real dataset).

Images per CPU second divide the images by the CPU time (user + system) of every process
involved, over the same window: this process (all its threads; on a CPU backend that
includes XLA's work for the device path) and all its descendants, i.e. the grain worker
processes (and multiprocessing's resource tracker). This process's own time is
`time.process_time`; each descendant's is read with psutil (a dependency of
orbax-checkpoint and tensorflow-datasets) as its own plus its reaped children's time, and
descendants this process reaped are counted through its own reaped-children time. The
warm-up waits for two batches from every worker, so their start-up (imports) is not
timed. Images per CPU second is the rate that one fully busy host core sustains (images/s
per host core); "cores busy" is CPU seconds per wall second.

The last line printed is a JSON object (also written to --json_out): "rows" (path,
image_size, workers (null for device), augment, images (per timed window), img_per_s,
img_per_cpu_s, cores_busy), "files" (per size: format, count, width, height, mean bytes),
and the machine: cpu_model, host_cores, devices, device_kind, platform, load averages
before and after, jax version, date, command.
"""

import dataclasses
import math
import os
import pathlib
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

_CHECKOUT = pathlib.Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_CHECKOUT)]

# Only light imports here: grain's worker processes are spawned, and each one imports
# this file again (as __mp_main__) before it starts.
import timing  # noqa: E402  (scripts/timing.py, beside this file)
from absl import app, flags  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("sizes", ["32", "224"], "Image sizes (px); < 64: CIFAR-like, else ImageNet-like.")
flags.DEFINE_list("workers", ["0", "2"], "Worker processes of the stream path (0: in-process).")
flags.DEFINE_list(
    "decoders",
    ["opencv"],
    "At ImageNet sizes, side by side: opencv and pil (config.stream_decoder), and before "
    "(the stream path of commit f951dea: per-record grain elements, PIL, numpy's flip).",
)
flags.DEFINE_list(
    "jpegs",
    ["generated"],
    "ImageNet-size files to read: generated (400x350 at 224 px, ~90 KB), imagenet "
    "(500x375, ~110 KB, ImageNet's average) and photo (2400x1800, reduced-size decoding).",
)
flags.DEFINE_bool(
    "breakdown",
    False,
    "Also time each stage of one image's way (header, decode, resize, flip, grain and "
    "batching, transfer) in this process, per decoder and file kind.",
)
flags.DEFINE_integer("batch_size", 128, "Global batch size.")
flags.DEFINE_integer("batches", 20, "Batches per timed window.")
flags.DEFINE_integer("repeats", 3, "Timed windows; the median is reported.")
flags.DEFINE_integer("num_files", 512, "Images in the split (in memory, and files written).")
flags.DEFINE_integer(
    "records",
    0,
    "Records in the stream path's split: the --num_files files repeated (record i is file "
    "i % num_files), so that the index shuffle costs what it costs on a real dataset. "
    "0: CIFAR's 50,000 below 64 px, ImageNet's 1,281,167 from 64 px.",
)
flags.DEFINE_string("json_out", None, "Also write the JSON result to this file.")

# From this size on, the stream path reads ImageNet-like JPEGs with the Inception crop.
_IMAGENET_FROM = 64
# ImageNet-size files, (width, height) at 224 px (scaled with the size) and the standard
# deviation of their pixel noise, which sets how large they compress.
_JPEGS = {
    "generated": ((400, 350), 32.0),
    "imagenet": ((500, 375), 28.0),
    "photo": ((2400, 1800), 12.0),
}
_CROP_PADDING = 4
# Training records of CIFAR and ImageNet: the size of the index space the stream shuffles.
_CIFAR_RECORDS, _IMAGENET_RECORDS = 50_000, 1_281_167
_CLASSES = 4


def _cpu_seconds() -> float:
    """CPU seconds so far of this process, its reaped children and its live descendants."""
    import psutil

    me = psutil.Process()
    times = me.cpu_times()
    total = time.process_time() + times.children_user + times.children_system
    for child in me.children(recursive=True):
        try:
            t = child.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue  # Gone since the listing: if this process reaped it, counted above.
        total += t.user + t.system + t.children_user + t.children_system
    return total


def _timed(next_batch: Callable[[], Any], warmup: int, batch_size: int) -> dict[str, Any]:
    """Rates of `next_batch` (global batches of `batch_size`) after `warmup` untimed calls."""
    import jax

    for _ in range(warmup):
        batch = next_batch()
    jax.block_until_ready(batch)
    images = FLAGS.batches * batch_size
    wall, cpu = [], []
    for _ in range(FLAGS.repeats):
        start, start_cpu = time.perf_counter(), _cpu_seconds()
        for _ in range(FLAGS.batches):
            batch = next_batch()
        jax.block_until_ready(batch)
        wall.append(time.perf_counter() - start)
        cpu.append(_cpu_seconds() - start_cpu)
    img_per_s = statistics.median(images / w for w in wall)
    img_per_cpu_s = statistics.median(images / c for c in cpu)
    return {
        "images": images,
        "img_per_s": img_per_s,
        "img_per_cpu_s": img_per_cpu_s,
        "cores_busy": img_per_s / img_per_cpu_s,
    }


@dataclasses.dataclass(frozen=True)
class Repeated(Sequence):
    """`length` records: the records of `files` over and over."""

    files: Sequence
    length: int

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> Any:
        from resnet_jax.data import stream

        stream._check_index(index, self.length)
        return self.files[index % len(self.files)]


@dataclasses.dataclass(frozen=True)
class BeforeDecode:
    """Commit f951dea's training transform: PIL's Inception crop, numpy's flip, a dict."""

    image_size: int

    def __call__(self, record: Any, rng: Any) -> dict[str, Any]:
        import numpy as np

        from resnet_jax.data import decode

        image = decode.random_resized_crop(record, self.image_size, rng, "pil")
        if rng.random() < 0.5:
            image = image[:, ::-1]
        return {"image": np.ascontiguousarray(image), "label": np.int32(record.label)}


def before_batches(split: Any, batch: int, image_size: int, workers: int) -> Any:
    """Commit f951dea's stream pipeline (seed 0): one grain element per record, then batched."""
    import grain

    from resnet_jax.data import splits, stream

    steps = splits.steps_per_epoch(split.num_examples, batch)
    batches = (
        grain.MapDataset.source(split.records)
        .shuffle(seed=stream._seed(0, splits.SHUFFLE_TAG))
        .slice(slice(0, steps * batch))
        .repeat()
        .random_map(
            BeforeDecode(image_size),
            seed=stream._seed(0, splits.CROP_FLIP_TAG),
        )
        .batch(batch, drop_remainder=True)
    )
    return stream.TrainIterator(batches, start_step=0, num_workers=workers, data_settings={})


def bench_device(size: int, mesh: Any) -> dict[str, Any]:
    batches = timing.device_input(
        mesh, FLAGS.num_files, size, FLAGS.batch_size, _CROP_PADDING, random_flip=True
    )
    rates = _timed(lambda: next(batches)["image"], 2, FLAGS.batch_size)
    return {"path": "device", "image_size": size, "workers": None, "augment": "crop_flip", **rates}


def _picture(rng: Any, width: int, height: int, noise: float) -> Any:
    """A photo-like uint8 image: a smooth colour field, a few shapes, pixel noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    field = rng.integers(0, 256, (3, 4, 3), np.uint8)
    image = Image.fromarray(field).resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(8):
        x0, x1 = sorted(int(v) for v in rng.integers(0, width, 2))
        y0, y1 = sorted(int(v) for v in rng.integers(0, height, 2))
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        shape = draw.ellipse if rng.random() < 0.5 else draw.rectangle
        shape((x0, y0, x1, y1), fill=fill)
    pixels = np.asarray(image, np.float32) + rng.normal(0, noise, (height, width, 3))
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def write_folder(
    root: pathlib.Path, size: int, count: int, jpegs: str = "generated"
) -> dict[str, Any]:
    """root/train/class<k>/: `count` CIFAR-like PNGs or ImageNet-size JPEGs; what they are."""
    import numpy as np

    rng = np.random.default_rng(size)
    if size < _IMAGENET_FROM:
        kind, width, height, noise = "png", size, size, 8.0
    else:
        kind = "jpeg"
        base, noise = _JPEGS[jpegs]
        width, height = (round(side * size / 224) for side in base)
    total = 0
    for i in range(count):
        folder = root / "train" / f"class{i % _CLASSES}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"{i:05d}.{kind}"
        image = _picture(rng, width, height, noise)
        if kind == "png":
            image.save(path)
        else:
            image.save(path, quality=90)
        total += path.stat().st_size
    return {
        "image_size": size,
        "jpegs": jpegs if kind == "jpeg" else None,
        "format": kind,
        "count": count,
        "width": width,
        "height": height,
        "mean_bytes": total / count,
    }


def _train_iterator(root: pathlib.Path, size: int, batch: int, workers: int, decoder: str) -> Any:
    """The stream path's train iterator over the folder `root` (seed 0), as `decoder` makes it."""
    from resnet_jax import defaults
    from resnet_jax.data import stream

    config = defaults.saved_config({"dataset": "image_folder", "data_dir": str(root)}, "bench")
    split = stream.open_split(config, "train")
    records = FLAGS.records or (_CIFAR_RECORDS if size < _IMAGENET_FROM else _IMAGENET_RECORDS)
    split = dataclasses.replace(
        split, num_examples=records, records=Repeated(split.records, records)
    )
    if decoder == "before":
        return before_batches(split, batch, size, workers)
    augment = "crop_flip" if size < _IMAGENET_FROM else "random_resized_crop"
    return stream.train_batches(
        split,
        global_batch_size=batch,  # one process: its batch is the global one
        seed=0,
        start_step=0,
        image_size=size,
        augment=augment,
        crop_padding=_CROP_PADDING if augment == "crop_flip" else 0,
        random_flip=True,
        num_workers=workers,
        decoder=decoder,
    )


def bench_stream(
    root: pathlib.Path, size: int, workers: int, mesh: Any, decoder: str
) -> dict[str, Any]:
    from resnet_jax import sharding

    augment = "crop_flip" if size < _IMAGENET_FROM else "random_resized_crop"
    local = sharding.per_process_batch_size(FLAGS.batch_size, mesh)
    iterator = _train_iterator(root, size, local, workers, decoder)
    try:
        # Batch i comes from worker i % workers: two rounds have started every worker.
        rates = _timed(
            lambda: sharding.global_batch(next(iterator), mesh)["image"],
            2 * max(1, workers),
            FLAGS.batch_size,
        )
    finally:
        iterator.close()
    return {
        "path": "stream",
        "image_size": size,
        "workers": workers,
        "augment": augment,
        "decoder": decoder if augment == "random_resized_crop" else "pil",
        **rates,
    }


def _cpu_model() -> str:
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _print_table(result: dict[str, Any]) -> None:
    print(
        f"{result['devices']} x {result['device_kind']}; host: {result['host_cores']} cores "
        f"of {result['cpu_model']}; batch {result['batch_size']}"
    )
    print(
        f"  {'path':<7} {'px':>4} {'files':<9} {'workers':>7}  {'augment':<19} {'decoder':<7} "
        f"{'img/s':>9} {'img per CPU-s':>13} {'cores busy':>10}"
    )
    for row in result["rows"]:
        workers = "-" if row["workers"] is None else str(row["workers"])
        print(
            f"  {row['path']:<7} {row['image_size']:>4} {row['files'] or '-':<9} {workers:>7}  "
            f"{row['augment']:<19} {row['decoder'] or '-':<7} {row['img_per_s']:>9,.0f} "
            f"{row['img_per_cpu_s']:>13,.0f} {row['cores_busy']:>10.2f}"
        )
    for f in result["files"]:
        print(
            f"  files at {f['image_size']} px{' (' + f['jpegs'] + ')' if f['jpegs'] else ''}: "
            f"{f['count']} {f['format']}, {f['width']}x{f['height']}, "
            f"{f['mean_bytes'] / 1e3:,.1f} KB on average"
        )
    for b in result.get("breakdown", []):
        stages = ", ".join(f"{name} {ms:.3f}" for name, ms in b["ms_per_image"].items())
        print(f"  ms of CPU per image, {b['image_size']} px {b['jpegs']}, {b['decoder']}: {stages}")


def _cpu_ms(work: Callable[[], Any], count: int, repeats: int = 3) -> float:
    """Least CPU milliseconds of this process per item over `repeats` runs of `work`."""
    best = math.inf
    for _ in range(repeats):
        start = time.process_time()
        work()
        best = min(best, time.process_time() - start)
    return 1e3 * best / count


def breakdown(root: pathlib.Path, size: int, jpegs: str, decoder: str, mesh: Any) -> dict:
    """Where one image's CPU time goes, in this process, over the first --batch_size files.

    Stages are timed on the library calls the decoder makes (the same crops, drawn from
    seed 0): reading the file and its header with the crop drawn, the JPEG decode
    (at reduced size where the crop allows), the crop and resize (with PIL's EXIF and mode
    conversions for pil), and the flip of half the images. "grain and batching" is the
    pipeline's time per image (one whole batch, no threads) minus those stages: per-record
    Python, grain's elements and stacking (before), the copy into the batch. "transfer" is
    sharding.global_batch of one batch.
    """
    import io

    import cv2
    import numpy as np
    from PIL import Image, ImageOps

    from resnet_jax import sharding
    from resnet_jax.data import decode

    cv2.setNumThreads(1)
    paths = sorted((root / "train").glob("*/*.jpeg"))[: FLAGS.batch_size]
    count = len(paths)
    rng = np.random.default_rng(0)
    prepared = []  # (bytes, crop box, flip)
    for path in paths:
        data = path.read_bytes()
        with Image.open(io.BytesIO(data)) as image:
            box = decode._inception_crop_box(*image.size, rng)
        prepared.append((data, box, rng.random() < 0.5))

    def header() -> None:
        r = np.random.default_rng(0)
        for path in paths:
            with Image.open(io.BytesIO(path.read_bytes())) as image:
                image.getexif()
                decode._inception_crop_box(*image.size, r)

    def wanted(image_size: tuple[int, int], box: tuple[int, int, int, int]) -> tuple[int, int]:
        return (math.ceil(image_size[0] * size / box[2]), math.ceil(image_size[1] * size / box[3]))

    def pil_decoded() -> list:
        out = []
        for data, box, _ in prepared:
            image = Image.open(io.BytesIO(data))
            stored_width = image.size[0]
            drafted = image.draft("RGB", wanted(image.size, box))
            image.load()
            scale = 1.0 if drafted is None else drafted[1][2] / stored_width
            out.append((image, [v * scale for v in box]))
        return out

    def cv2_decoded() -> list:
        out = []
        for data, box, _ in prepared:
            factor = decode._reduction(box[2], box[3], size)
            flags = cv2.IMREAD_COLOR_RGB | cv2.IMREAD_IGNORE_ORIENTATION
            pixels = cv2.imdecode(
                np.frombuffer(data, np.uint8), flags | decode._OPENCV_REDUCTION_BITS[factor]
            )
            out.append((pixels, [round(v / factor) for v in box]))
        return out

    stages = {"read and header": _cpu_ms(header, count)}
    if decoder == "opencv":
        stages["decode"] = _cpu_ms(cv2_decoded, count)
        decoded = cv2_decoded()

        slots = np.empty((count, size, size, 3), np.uint8)

        def resize() -> None:
            for slot, (p, b) in zip(slots, decoded, strict=True):
                cv2.resize(p[b[1] : b[1] + b[3], b[0] : b[0] + b[2]], (size, size), dst=slot)

        stages["crop and resize"] = _cpu_ms(resize, count)

        def flip() -> None:
            for slot, (_, _, flipped) in zip(slots, prepared, strict=True):
                if flipped:
                    cv2.flip(slot, 1, dst=slot)
    else:
        stages["decode"] = _cpu_ms(pil_decoded, count)
        decoded = pil_decoded()

        def resize() -> list:
            out = []
            for image, (left, top, w, h) in decoded:
                image = ImageOps.exif_transpose(image).convert("RGB")
                image = image.resize(
                    (size, size), Image.Resampling.BILINEAR, box=(left, top, left + w, top + h)
                )
                out.append(np.asarray(image, dtype=np.uint8))
            return out

        stages["crop and resize"] = _cpu_ms(resize, count)
        images = resize()

        def flip() -> None:
            for image, (_, _, flipped) in zip(images, prepared, strict=True):
                if flipped and decoder == "before":
                    np.ascontiguousarray(image[:, ::-1])
                elif flipped:
                    cv2.flip(image, 1)

    stages["flip"] = _cpu_ms(flip, count)
    pipeline = _train_iterator(root, size, count, 0, decoder)._batches
    total = _cpu_ms(lambda: pipeline[0], count)
    stages["grain and batching"] = max(0.0, total - sum(stages.values()))
    batch = pipeline[0]
    stages["transfer"] = _cpu_ms(
        lambda: sharding.global_batch(batch, mesh)["image"].block_until_ready(), count
    )
    stages["total"] = total + stages["transfer"]
    return {"image_size": size, "jpegs": jpegs, "decoder": decoder, "ms_per_image": stages}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    load_before = os.getloadavg()
    from resnet_jax import cli  # First: TensorFlow's logging settings.

    cli.quiet_libraries()
    import jax

    from resnet_jax import sharding
    from resnet_jax.data import decode

    try:
        sizes = [int(s) for s in FLAGS.sizes]
        worker_counts = [int(w) for w in FLAGS.workers]
    except ValueError as e:
        raise app.UsageError(f"--sizes and --workers take integers, e.g. 32,224: {e}") from e
    decoders, jpegs = list(FLAGS.decoders), list(FLAGS.jpegs)
    if not decoders or set(decoders) - {*decode.DECODERS, "before"}:
        raise app.UsageError(
            f"--decoders={','.join(decoders)}: each must be one of {', '.join(decode.DECODERS)}, "
            "before."
        )
    if not jpegs or set(jpegs) - set(_JPEGS):
        raise app.UsageError(f"--jpegs={','.join(jpegs)}: each must be one of {', '.join(_JPEGS)}.")
    if min(sizes) <= 0 or min(worker_counts) < 0:
        raise app.UsageError(f"--sizes={FLAGS.sizes} must be positive, --workers >= 0.")
    if FLAGS.batches <= 0 or FLAGS.repeats <= 0:
        raise app.UsageError("--batches and --repeats must be positive.")
    mesh = sharding.make_mesh()
    local = sharding.per_process_batch_size(FLAGS.batch_size, mesh)
    if FLAGS.num_files < local:
        raise app.UsageError(
            f"--num_files={FLAGS.num_files} is smaller than a batch ({local} per process): "
            f"raise --num_files or lower --batch_size."
        )
    device = mesh.devices.flat[0]
    rows, files, stages = [], [], []
    for size in sizes:
        row = bench_device(size, mesh)
        rows.append({**row, "files": None, "decoder": None})
        imagenet = size >= _IMAGENET_FROM
        for kind in jpegs if imagenet else ["png"]:
            with tempfile.TemporaryDirectory(prefix="input_benchmark_") as tmp:
                root = pathlib.Path(tmp)
                files.append(write_folder(root, size, FLAGS.num_files, kind if imagenet else ""))
                for workers in worker_counts:
                    for decoder in decoders if imagenet else ["pil"]:
                        row = bench_stream(root, size, workers, mesh, decoder)
                        rows.append({**row, "files": kind, "decoder": row["decoder"]})
                if FLAGS.breakdown and imagenet:
                    for decoder in decoders:
                        stages.append(breakdown(root, size, kind, decoder, mesh))
    result = {
        "rows": rows,
        "files": files,
        "batch_size": FLAGS.batch_size,
        "batches": FLAGS.batches,
        "repeats": FLAGS.repeats,
        "cpu_model": _cpu_model(),
        "host_cores": len(os.sched_getaffinity(0)),
        "devices": mesh.devices.size,
        "device_kind": device.device_kind,
        "platform": device.platform,
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "jax_version": jax.__version__,
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "command": shlex.join(["python", *sys.argv]),
    }
    if stages:
        result["breakdown"] = stages
    _print_table(result)
    timing.print_json(result, FLAGS.json_out)


if __name__ == "__main__":
    app.run(main)
