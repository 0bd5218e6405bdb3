"""Export a trained run for serving: StableHLO, ONNX, TF SavedModel and TFLite.

    python -m resnet_jax.export --workdir runs/resnet18 --format all --out exported/resnet18

Every artifact takes uint8 images [batch, H, W, 3] (RGB, NHWC, any batch size) that the
caller has decoded and resized as the run's evaluation does (model.json says how), applies
the run's normalisation inside, and returns float32 probabilities [batch, classes] (or
logits, with --outputs=logits). Beside the artifacts, model.json records the class names,
the input size and preparation, the normalisation, the checkpoint step and the source run.

Formats (--format: one, a comma-separated list, or all):
- stablehlo: model.stablehlo, `jax.export` with a symbolic batch size, lowered for cpu,
  cuda and tpu in one artifact. Runs with jax alone: scripts/serve_stablehlo.py.
- onnx: model.onnx, converted by jax2onnx (the export extra: pip install -e ".[export]").
- savedmodel: saved_model/, by jax2tf (native serialization, for cpu, cuda and tpu), with
  the signature serving_default(images) -> {"probabilities" or "logits"}.
- tflite: model.tflite, converted from that SavedModel by the TFLite converter.

Before the command succeeds, each artifact is read back from disk and run on random
images at two batch sizes; the largest difference from the JAX model is written to
model.json, and more than TOLERANCE x max(1, largest |output|) fails the export. Nothing
is left at --out unless every requested format passed: the files are written to a
temporary folder beside it and renamed into place.

The network computes in float32, also for runs trained with half_precision (ONNX Runtime
and TFLite have no bfloat16 convolutions on CPU).
"""

import contextlib
import datetime
import importlib
import io
import json
import logging as std_logging
import os
import pathlib
import shutil
import sys
import tempfile
from collections.abc import Callable
from typing import Any

from absl import app, flags

# The TFLite converter's C++ warnings restate its defaults ("Ignored output_format").
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax
import jax.numpy as jnp
import numpy as np

from resnet_jax import cli, data, evaluate
from resnet_jax.models import create_model

FORMATS = ("stablehlo", "onnx", "savedmodel", "tflite")
FILES = {
    "stablehlo": "model.stablehlo",
    "onnx": "model.onnx",
    "savedmodel": "saved_model",
    "tflite": "model.tflite",
}
METADATA = "model.json"
OUTPUTS = ("probabilities", "logits")
# The platforms the StableHLO artifact and the SavedModel are lowered for.
PLATFORMS = ("cpu", "cuda", "tpu")
# Largest allowed |artifact - JAX| as a fraction of max(1, largest |JAX output|).
TOLERANCE = 1e-4
# The self-check's batch sizes: one image, and a batch of several.
CHECK_BATCH_SIZES = (1, 3)
INSTALL_HINT = 'pip install -e ".[export]"'

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defines the command's flags, only when it runs: other commands share their names."""
    flags.DEFINE_string("workdir", None, "Directory of the run (its checkpoints/ folder).")
    cli.define_checkpoint_flag()
    cli.define_weights_flag()
    flags.DEFINE_string(
        "format", None, f"What to write: {', '.join(FORMATS)}, a comma-separated list, or all."
    )
    flags.DEFINE_string("out", None, "Folder to create for the artifacts and model.json.")
    flags.DEFINE_enum("outputs", "probabilities", OUTPUTS, "What the exported model returns.")
    flags.DEFINE_bool("overwrite", False, "Replace --out if it exists (only once all succeed).")
    cli.require_flag(
        "workdir", "the run folder whose checkpoint is exported (e.g. --workdir runs/resnet18)"
    )
    cli.require_flag("format", f"what to write: {', '.join(FORMATS)}, a list of them, or all")
    cli.require_flag("out", "the folder to create for the export (e.g. --out exports/resnet18)")


class ExportError(Exception):
    """The export cannot be made as asked: an unknown format, a missing package, --out taken."""


def parse_formats(value: str) -> list[str]:
    """`value` ("all" or a comma-separated list) as formats in FORMATS order.

    Raises:
      ExportError: a name is not a format, or none is given.
    """
    names = [name.strip().lower() for name in value.split(",") if name.strip()]
    if names == ["all"]:
        return list(FORMATS)
    unknown = [name for name in names if name not in FORMATS]
    if unknown or not names:
        raise ExportError(
            f"--format={value}: unknown format {', '.join(unknown) or '(none given)'}. "
            f"Choose from {', '.join(FORMATS)}, a comma-separated list, or all."
        )
    return [name for name in FORMATS if name in names]


def _optional_import(module: str, fmt: str, package: str) -> Any:
    """`module`, or an ExportError naming the package `fmt` needs and how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ExportError(
            f"--format={fmt} needs the Python package {package}, which is not installed "
            f"({e}). Install the export extra: {INSTALL_HINT}"
        ) from e


def check_dependencies(formats: list[str]) -> None:
    """Fails before anything is computed if a requested format's converter is missing."""
    if "onnx" in formats:
        # jax2onnx 0.13 logs a traceback for each of its optional dm-pix plugins that
        # does not import with this jax: they are not used here.
        std_logging.getLogger("jax2onnx").setLevel(std_logging.ERROR)
        for module, package in (("onnx", "onnx"), ("jax2onnx", "jax2onnx"), ("onnxruntime",) * 2):
            _optional_import(module, "onnx", package)


def serving_function(
    trained: evaluate.TrainedModel, outputs: str
) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """uint8 images [N, H, W, 3] -> float32 probabilities (or logits) [N, classes]."""
    model = create_model(trained.config.model, trained.num_classes, half_precision=False)
    mean, std = trained.preprocessing["mean"], trained.preprocessing["std"]
    variables = trained.variables

    def serve(images: jnp.ndarray) -> jnp.ndarray:
        logits = model.apply(variables, data.normalize(images, mean, std), train=False)
        return jax.nn.softmax(logits) if outputs == "probabilities" else logits

    return serve


def _input_spec(image_size: int) -> jax.ShapeDtypeStruct:
    shape = jax.export.symbolic_shape(f"batch, {image_size}, {image_size}, 3")
    return jax.ShapeDtypeStruct(shape, jnp.uint8)


def write_stablehlo(serve: Callable, image_size: int, path: pathlib.Path) -> None:
    exported = jax.export.export(jax.jit(serve), platforms=PLATFORMS)(_input_spec(image_size))
    path.write_bytes(exported.serialize())


def load_stablehlo(path: pathlib.Path) -> Callable[[np.ndarray], np.ndarray]:
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return lambda images: np.asarray(exported.call(images))


def write_onnx(serve: Callable, image_size: int, path: pathlib.Path, output_name: str) -> None:
    import jax2onnx
    import onnx

    # jax2onnx 0.13 prints debug lines for every convolution it converts.
    with contextlib.redirect_stdout(io.StringIO()):
        model = jax2onnx.to_onnx(
            serve,
            [_input_spec(image_size)],
            model_name="resnet_jax",
            input_names=["images"],
            output_names=[output_name],
        )
    # The converter records NHWC shapes for tensors it lays out as NCHW; runtimes warn
    # about each mismatch and infer the shapes themselves, so leave the records out.
    del model.graph.value_info[:]
    onnx.checker.check_model(model)
    path.write_bytes(model.SerializeToString())


def load_onnx(path: pathlib.Path) -> Callable[[np.ndarray], np.ndarray]:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda images: session.run(None, {"images": images})[0]


def write_savedmodel(
    serve: Callable, image_size: int, path: pathlib.Path, output_name: str
) -> None:
    import tensorflow as tf
    from jax.experimental import jax2tf

    converted = jax2tf.convert(
        serve,
        polymorphic_shapes=[f"(batch, {image_size}, {image_size}, 3)"],
        native_serialization_platforms=PLATFORMS,
        with_gradient=False,
    )
    signature = tf.TensorSpec([None, image_size, image_size, 3], tf.uint8, name="images")

    @tf.function(autograph=False, input_signature=[signature])
    def serving_default(images):
        return {output_name: converted(images)}

    module = tf.Module()
    module.serving_default = serving_default
    tf.saved_model.save(module, str(path), signatures={"serving_default": serving_default})


def load_savedmodel(path: pathlib.Path) -> Callable[[np.ndarray], np.ndarray]:
    import tensorflow as tf

    signature = tf.saved_model.load(str(path)).signatures["serving_default"]

    def run(images: np.ndarray) -> np.ndarray:
        (result,) = signature(images=tf.constant(images)).values()
        return result.numpy()

    return run


def write_tflite(saved_model: pathlib.Path, path: pathlib.Path) -> None:
    import tensorflow as tf

    path.write_bytes(tf.lite.TFLiteConverter.from_saved_model(str(saved_model)).convert())


def tflite_interpreter(path: pathlib.Path) -> Any:
    """A TFLite interpreter of `path`: LiteRT's (ai-edge-litert) if installed, else TF's."""
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:
        import tensorflow as tf

        Interpreter = tf.lite.Interpreter  # noqa: N806 - a class, as LiteRT's import names it.
    return Interpreter(model_path=str(path))


def load_tflite(path: pathlib.Path) -> Callable[[np.ndarray], np.ndarray]:
    interpreter = tflite_interpreter(path)
    interpreter.allocate_tensors()
    index = interpreter.get_input_details()[0]["index"]
    output = interpreter.get_output_details()[0]["index"]

    def run(images: np.ndarray) -> np.ndarray:
        if tuple(interpreter.get_input_details()[0]["shape"]) != images.shape:
            interpreter.resize_tensor_input(index, images.shape)
            interpreter.allocate_tensors()
        interpreter.set_tensor(index, images)
        interpreter.invoke()
        return interpreter.get_tensor(output).copy()

    return run


# Each format's runtime: load the artifact once, then call it on uint8 image batches.
LOADERS = {
    "stablehlo": load_stablehlo,
    "onnx": load_onnx,
    "savedmodel": load_savedmodel,
    "tflite": load_tflite,
}


def check_batches(
    serve: Callable, image_size: int, seed: int = 0
) -> list[tuple[np.ndarray, np.ndarray]]:
    """(random uint8 images, the JAX model's outputs) at each of CHECK_BATCH_SIZES."""
    rng = np.random.default_rng(seed)
    reference = jax.jit(serve)
    batches = []
    for batch in CHECK_BATCH_SIZES:
        images = rng.integers(0, 256, (batch, image_size, image_size, 3), dtype=np.uint8)
        batches.append((images, np.asarray(reference(images))))
    return batches


def check_artifact(
    fmt: str, path: pathlib.Path, batches: list[tuple[np.ndarray, np.ndarray]]
) -> float:
    """The largest |artifact - JAX| over `batches` (from check_batches).

    Raises:
      ExportError: the difference exceeds TOLERANCE x max(1, largest |JAX output|).
    """
    run = LOADERS[fmt](path)
    worst = 0.0
    for images, expected in batches:
        got = np.asarray(run(images))
        if got.shape != expected.shape:
            raise ExportError(
                f"The {fmt} export returned shape {got.shape} for {len(images)} images, "
                f"expected {expected.shape}; nothing was written to --out."
            )
        difference = float(np.max(np.abs(got - expected)))
        limit = TOLERANCE * max(1.0, float(np.max(np.abs(expected))))
        if not difference <= limit:
            raise ExportError(
                f"The {fmt} export differs from the JAX model by {difference:.3g} (more than "
                f"{limit:.3g}) on {len(images)} random images; nothing was written to --out."
            )
        worst = max(worst, difference)
    return worst


def metadata(
    trained: evaluate.TrainedModel,
    which: str,
    outputs: str,
    formats: list[str],
    differences: dict[str, float],
) -> dict[str, Any]:
    """model.json: what a server needs to feed the artifacts and read their outputs."""
    p = trained.preprocessing
    size, resize = p["image_size"], p["resize_size"]
    if resize:
        preparation = (
            f"decode as RGB, resize (bilinear) so the shorter side is {resize}, take the "
            f"central {size}x{size} square"
        )
    else:
        preparation = f"decode as RGB, resize (bilinear) the whole image to {size}x{size}"
    return {
        "format_version": 1,
        "source": {
            "workdir": str(trained.directory.parent),
            "checkpoint": str(which),
            "step": trained.step,
            "weights": trained.weights,
            "model": trained.config.model.name,
            "dataset": trained.config.dataset,
        },
        "exported": {
            "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "jax": jax.__version__,
            "platforms": list(PLATFORMS),
        },
        "input": {
            "name": "images",
            "dtype": "uint8",
            "layout": "NHWC",
            "shape": [None, size, size, 3],
            "image_size": size,
            "resize_size": resize,
            "preparation": preparation,
        },
        "normalization": {
            "mean": p["mean"],
            "std": p["std"],
            "applied": "inside the model: (x / 255 - mean) / std per RGB channel",
        },
        "output": {
            "name": outputs,
            "dtype": "float32",
            "shape": [None, trained.num_classes],
        },
        "class_names": trained.class_names,
        "files": {fmt: FILES[fmt] for fmt in formats},
        "check": {
            "batch_sizes": list(CHECK_BATCH_SIZES),
            "tolerance": f"{TOLERANCE} x max(1, largest |output|)",
            "max_abs_difference": differences,
        },
    }


def _claim_out(out: pathlib.Path, overwrite: bool) -> None:
    """Refuses an --out that holds something, unless `overwrite` and it is an earlier export.

    --overwrite replaces the whole folder, so it only ever replaces an export (a folder
    with model.json): never a run's workdir, a folder of runs or the current folder.
    """
    if out.is_file() or out.is_symlink():
        raise ExportError(f"--out={out} is a file or a link; give a folder to create.")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ExportError(
                f"--out={out} already exists and is not empty. Choose another folder, or pass "
                "--overwrite to replace it (once the new export has passed its check)."
            )
        if not (out / METADATA).is_file():
            raise ExportError(
                f"--out={out} is not an earlier export (it has no {METADATA}), so --overwrite "
                "will not replace it: it may hold a run or other files. Nothing was changed; "
                "choose a new folder for the export."
            )


def _move_into_place(staging: pathlib.Path, out: pathlib.Path) -> None:
    """Renames `staging` to `out`; an old `out` is removed only after the new one is there."""
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.replaced-{os.getpid()}")
        out.rename(old)
    staging.rename(out)
    if old is not None:
        shutil.rmtree(old)


def _write(
    fmt: str, serve: Callable, size: int, path: pathlib.Path, outputs: str, with_savedmodel: bool
) -> None:
    """Writes the `fmt` artifact at `path`; a converter's failure becomes an ExportError."""
    try:
        if fmt == "stablehlo":
            write_stablehlo(serve, size, path)
        elif fmt == "onnx":
            write_onnx(serve, size, path, outputs)
        elif fmt == "savedmodel":
            write_savedmodel(serve, size, path, outputs)
        else:
            # TFLite converts the SavedModel: the exported one, or one made for it here.
            saved_model = path.with_name(FILES["savedmodel"])
            if not with_savedmodel:
                saved_model = path.with_name(".saved_model_for_tflite")
                write_savedmodel(serve, size, saved_model, outputs)
            write_tflite(saved_model, path)
            if not with_savedmodel:
                shutil.rmtree(saved_model)
    except (OSError, ExportError):
        raise
    except Exception as e:  # noqa: BLE001 - converters raise many kinds; each is reported.
        lines = [line for line in str(e).splitlines() if line.strip()] or [type(e).__name__]
        raise ExportError(
            f"The {fmt} converter failed on this model ({type(e).__name__}: {lines[0][:300]}); "
            "nothing was written to --out. The other formats may still export: leave "
            f"{fmt} out of --format."
        ) from e


def export(
    workdir: str,
    which: str,
    formats: list[str],
    out: str | os.PathLike,
    outputs: str = "probabilities",
    overwrite: bool = False,
    weights: str = "raw",
) -> dict[str, Any]:
    """Writes the artifacts of `formats` and model.json to the new folder `out`.

    `weights` is "raw" (the trained weights) or "ema" (their moving average).

    Returns:
      The contents of model.json.

    Raises:
      ExportError: a converter is missing, `out` is taken, or an artifact fails its check.
      CheckpointError: no checkpoint (or none that `which` names) in `workdir`.
    """
    out = pathlib.Path(out).absolute()
    _claim_out(out, overwrite)
    check_dependencies(formats)
    trained = evaluate.load_trained_model(workdir, which, weights)
    serve = serving_function(trained, outputs)
    size = trained.preprocessing["image_size"]
    if {"savedmodel", "tflite"} & set(formats):
        data.hide_accelerators_from_tensorflow()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    except OSError as e:
        raise ExportError(f"Cannot write to {out.parent} ({e}): choose another --out.") from e
    try:
        staging.chmod(0o755)  # mkdtemp's folder is private; an export is meant to be shared.
        batches = check_batches(serve, size)
        differences = {}
        for fmt in formats:
            path = staging / FILES[fmt]
            _write(fmt, serve, size, path, outputs, "savedmodel" in formats)
            differences[fmt] = check_artifact(fmt, path, batches)
            print(f"{fmt}: {path.name} (largest difference from JAX {differences[fmt]:.2g})")
        meta = metadata(trained, which, outputs, formats, differences)
        (staging / METADATA).write_text(json.dumps(meta, indent=2) + "\n")
        _move_into_place(staging, out)
    except OSError as e:
        raise ExportError(f"Cannot write the export to {out.parent} ({e}).") from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return meta


def main(argv: list[str]) -> None:
    cli.start_command(argv)

    def run() -> None:
        formats = parse_formats(FLAGS.format)
        export(
            FLAGS.workdir,
            FLAGS.checkpoint,
            formats,
            FLAGS.out,
            FLAGS.outputs,
            FLAGS.overwrite,
            FLAGS.weights,
        )
        print(f"Wrote {', '.join(formats)} and {METADATA} to {FLAGS.out}", file=sys.stderr)

    cli.exit_on_user_error(run, extra=(ExportError,), step_flag="--checkpoint=STEP")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
