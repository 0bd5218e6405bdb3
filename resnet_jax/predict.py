"""Classify image files with a trained run.

    python -m resnet_jax.predict --workdir runs/resnet18 photo.jpg more/photos/

Each image is preprocessed as evaluation preprocesses it (the settings are read from the
checkpoint, not from a config file): any size or colour mode is converted, then resized
(and centre-cropped, for ImageNet-style runs) and normalised with the run's statistics.
Prints the top-5 classes of each image with their probabilities, or with --json one
object per line: {"path": ..., "top5": [{"label": 3, "class": "cat", "prob": 0.91}, ...]}.

A file that cannot be decoded is reported in one line (on stderr, and with --json as
{"path": ..., "error": ...}) and the others are still classified; the exit status is then
1. A path that does not exist stops the command before any is classified. Folders given
as arguments are searched for image files.
"""

import concurrent.futures
import functools
import json
import os
import pathlib
import sys
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from resnet_jax import cli, compile_options, data, evaluate, steps

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags, only when it runs: other commands share their names."""
    flags.DEFINE_string("workdir", None, "Directory of the run (its checkpoints/ folder).")
    cli.define_checkpoint_flag()
    cli.define_weights_flag()
    flags.DEFINE_bool(
        "flip", False, "Flip test-time augmentation: average with each image's mirror image."
    )
    flags.DEFINE_bool("json", False, "One JSON object per line per image.")
    flags.DEFINE_integer("batch_size", 64, "Images per forward pass.")
    cli.require_flag(
        "workdir",
        "the run folder whose checkpoint classifies the images (e.g. --workdir runs/resnet18)",
    )


TOP_K = 5


class Classifier:
    """A checkpoint's model with its preprocessing and class names, ready to classify."""

    def __init__(
        self, workdir: str, which: str = "latest", weights: str = "raw", flip: bool = False
    ):
        trained = evaluate.load_trained_model(workdir, which, weights)
        self.step, self.class_names = trained.step, trained.class_names
        self.preprocessing = trained.preprocessing
        mean, std = self.preprocessing["mean"], self.preprocessing["std"]
        k = min(TOP_K, trained.num_classes)

        # Checkpoints written before cpu_convolutions existed get the default.
        options = compile_options.cpu_options(trained.config.cpu_convolutions)

        @functools.partial(jax.jit, compiler_options=options)
        def top_k(images: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
            inputs = data.normalize(images, mean, std)
            logits = steps.predict_logits(trained.model.apply, trained.variables, inputs, flip)
            return jax.lax.top_k(jax.nn.softmax(logits), k)

        self._top_k = top_k

    def read(self, path: str | os.PathLike) -> np.ndarray:
        """The image file as the model's input (uint8); DatasetError if it is unreadable."""
        p = self.preprocessing
        return data.read_image(path, p["image_size"], p["resize_size"])

    def classify(self, images: np.ndarray, batch_size: int) -> list[list[dict[str, Any]]]:
        """The top classes of each uint8 image [N, H, W, 3], best first."""
        results = []
        for start in range(0, len(images), batch_size):
            # Every batch has the same shape, so the model compiles once.
            batch = data.pad_batch({"image": images[start : start + batch_size]}, batch_size)
            probs, labels = jax.device_get(self._top_k(batch["image"]))
            mask = batch["mask"]
            for row_probs, row_labels in zip(probs[mask], labels[mask], strict=True):
                results.append(
                    [
                        {"label": int(label), "class": self.class_names[label], "prob": float(prob)}
                        for prob, label in zip(row_probs, row_labels, strict=True)
                    ]
                )
        return results


def expand_paths(arguments: list[str]) -> list[pathlib.Path]:
    """Files as given; folders replaced by the image files under them, sorted.

    Raises:
      cli.FlagError: an argument that does not exist (a mistyped path), or no image file.
    """
    missing = [argument for argument in arguments if not os.path.exists(argument)]
    if missing:
        raise cli.FlagError(f"no such file or folder: {', '.join(missing)}")
    paths = []
    for argument in arguments:
        path = pathlib.Path(argument)
        if path.is_dir():
            paths.extend(
                sorted(
                    p
                    for p in path.rglob("*")
                    if p.is_file() and p.suffix.lower() in data.IMAGE_EXTENSIONS
                )
            )
        else:
            paths.append(path)
    if not paths:
        raise cli.FlagError(f"no image files in {' '.join(arguments)}.")
    return paths


def _read_chunk(
    classifier: Classifier, paths: list[pathlib.Path], pool: concurrent.futures.Executor
) -> Iterator[tuple[pathlib.Path, np.ndarray | None, str | None]]:
    def read(path: pathlib.Path) -> tuple[np.ndarray | None, str | None]:
        try:
            return classifier.read(path), None
        except data.DatasetError as e:
            # The decoder's own words: the DatasetError's advice is for a dataset's files.
            cause = e.__cause__
            why = f"{type(cause).__name__}: {cause}" if cause else str(e)
            return None, f"cannot read {path} as an image ({why})"

    for path, (image, error) in zip(paths, pool.map(read, paths), strict=True):
        yield path, image, error


def predict_files(
    classifier: Classifier, paths: list[pathlib.Path], batch_size: int, as_json: bool
) -> int:
    """Classifies `paths` in order, printing each result; returns how many failed."""
    failed = 0
    progress = cli.Progress(len(paths), "predict", "images") if len(paths) > batch_size else None
    # PIL releases the GIL while decoding and resizing: threads use every core.
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count() or 1) as pool:
        for start in range(0, len(paths), batch_size):
            chunk = list(_read_chunk(classifier, paths[start : start + batch_size], pool))
            good = [image for _, image, _ in chunk if image is not None]
            tops = iter(classifier.classify(np.stack(good), batch_size) if good else [])
            for path, image, error in chunk:
                if image is None:
                    failed += 1
                    print(f"error: {error}", file=sys.stderr)
                    if as_json:
                        print(json.dumps({"path": str(path), "error": error}))
                    continue
                top = next(tops)
                if as_json:
                    print(json.dumps({"path": str(path), "top5": top}))
                else:
                    print(path)
                    for entry in top:
                        print(f"  {entry['prob']:.4f}  {entry['class']} ({entry['label']})")
            sys.stdout.flush()
            if progress:
                progress.update(start + len(chunk))
    return failed


def main(argv: list[str]) -> None:
    cli.start_command(argv, takes_arguments=True)
    failed = 0

    def run() -> None:
        nonlocal failed
        if len(argv) < 2:
            raise cli.FlagError(
                "give one or more image files (or folders) to classify, e.g. python -m "
                "resnet_jax.predict --workdir runs/resnet18 photo.jpg"
            )
        if FLAGS.batch_size <= 0:
            raise cli.FlagError(f"--batch_size={FLAGS.batch_size} must be positive.")
        paths = expand_paths(argv[1:])
        classifier = Classifier(FLAGS.workdir, FLAGS.checkpoint, FLAGS.weights, FLAGS.flip)
        failed = predict_files(classifier, paths, FLAGS.batch_size, FLAGS.json)

    cli.exit_on_user_error(run, step_flag="--checkpoint=STEP")
    if failed:
        sys.exit(1)  # Each file that failed has its error line above.


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
