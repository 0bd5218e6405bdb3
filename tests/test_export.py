"""resnet_jax.export: each format against predict on image files, the loader example, bad input."""

import ast
import json
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import ROOT, run_module, save_trained, tiny_state
from PIL import Image

from configs import smoke
from resnet_jax import data, export, predict, sharding

CLASSES = ["ant", "bee", "cat", "dog"]
STEP = 7


def save_run(workdir, model_name, image_size, **model):
    """A checkpoint of `model_name` with random weights and BN statistics, as training saves it."""
    config = smoke.get_config()
    config.model.name = model_name
    for key, value in model.items():
        config.model[key] = value
    config.image_size = image_size
    state, _ = tiny_state(config, sharding.make_mesh(), num_classes=len(CLASSES))
    # Random statistics, so that a format that ignored them (or the normalisation) fails.
    rng = np.random.default_rng(3)
    stats = jax.tree.map(
        lambda x: jnp.asarray(rng.uniform(0.5, 1.5, x.shape) * rng.choice([1, -1], x.shape)),
        state.batch_stats,
    )
    stats = jax.tree_util.tree_map_with_path(
        lambda path, x: jnp.abs(x) if "var" in jax.tree_util.keystr(path) else x, stats
    )
    state = state.replace(step=jnp.asarray(STEP, jnp.int32), batch_stats=stats)
    save_trained(workdir, state, config, CLASSES)
    return config


def write_images(folder, count):
    """PNG files of assorted sizes and modes: predict and the caller resize them."""
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        size = (int(rng.integers(10, 50)), int(rng.integers(10, 50)))
        pixels = rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8)
        image = Image.fromarray(pixels)
        paths.append(folder / f"{i:02d}.png")
        (image.convert("L") if i == 2 else image).save(paths[-1])
    return paths


MODELS = {
    # The CIFAR ResNet with option-A shortcuts (strided slices, zero padding).
    "resnet": ("resnet8", 20, {"width_multiplier": 0.25}),
    # DenseNet-BC: concatenations and average-pooling transitions.
    "densenet": ("densenet10", 16, {"growth_rate": 4}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def exported(request, tmp_path_factory):
    name, image_size, model = MODELS[request.param]
    workdir = tmp_path_factory.mktemp(f"{request.param}_run")
    config = save_run(workdir, name, image_size, **model)
    out = tmp_path_factory.mktemp(f"{request.param}_export") / "served"
    meta = export.export(str(workdir), "latest", list(export.FORMATS), out)
    return workdir, config, out, meta


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images"), 5)


def test_every_format_equals_predict_on_image_files(exported, images):
    workdir, _, out, _ = exported
    classifier = predict.Classifier(str(workdir))
    pixels = np.stack([classifier.read(path) for path in images])
    expected = classifier.classify(pixels, batch_size=8)
    for fmt in export.FORMATS:
        run = export.LOADERS[fmt](out / export.FILES[fmt])
        # The larger batch first: a runtime that keeps buffers must resize them.
        for batch in (len(images), 1):
            probs = run(pixels[:batch])
            assert probs.shape == (batch, len(CLASSES)) and probs.dtype == np.float32, fmt
            for row, top in zip(probs, expected[:batch], strict=True):
                # 4 classes: predict's top 5 is every class, best first.
                assert [entry["label"] for entry in top] == list(np.argsort(-row)), fmt
                np.testing.assert_allclose(
                    row[[entry["label"] for entry in top]],
                    [entry["prob"] for entry in top],
                    atol=export.TOLERANCE,
                    err_msg=fmt,
                )


def test_model_json_describes_the_run(exported):
    workdir, config, out, meta = exported
    assert json.loads((out / export.METADATA).read_text()) == meta
    assert meta["source"]["workdir"] == str(workdir) and meta["source"]["step"] == STEP
    assert meta["source"]["model"] == config.model.name
    assert meta["class_names"] == CLASSES
    assert meta["input"]["shape"] == [None, config.image_size, config.image_size, 3]
    assert meta["input"]["dtype"] == "uint8" and meta["output"]["name"] == "probabilities"
    expected = data.preprocessing(config)
    assert [meta["normalization"]["mean"], meta["normalization"]["std"]] == [
        expected["mean"],
        expected["std"],
    ]
    assert meta["files"] == export.FILES
    assert sorted(p.name for p in out.iterdir()) == sorted([*export.FILES.values(), "model.json"])
    for fmt, difference in meta["check"]["max_abs_difference"].items():
        assert 0 <= difference <= export.TOLERANCE, fmt
    assert out.stat().st_mode & 0o777 == 0o755  # readable by the server's user
    # No staging or temporary folder is left beside the export.
    assert [p.name for p in out.parent.iterdir()] == [out.name]


def test_logits_are_the_probabilities_before_softmax(exported, tmp_path):
    workdir, config, out, _ = exported
    logits_out = tmp_path / "logits"
    meta = export.export(str(workdir), "latest", ["stablehlo"], logits_out, outputs="logits")
    assert meta["output"]["name"] == "logits" and meta["files"] == {"stablehlo": "model.stablehlo"}
    pixels = np.random.default_rng(0).integers(0, 256, (4, *meta["input"]["shape"][1:]), np.uint8)
    logits = export.load_stablehlo(logits_out / "model.stablehlo")(pixels)
    probs = export.load_stablehlo(out / "model.stablehlo")(pixels)
    np.testing.assert_allclose(jax.nn.softmax(logits), probs, atol=1e-6)
    assert np.abs(logits).max() > 0.1  # logits, not probabilities again


LOADER = ROOT / "scripts" / "serve_stablehlo.py"


def test_loader_example_needs_jax_alone_and_agrees_with_predict(exported, images):
    workdir, _, out, _ = exported
    imported = set()
    for node in ast.walk(ast.parse(LOADER.read_text())):
        if isinstance(node, ast.Import):
            imported.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            imported.add(node.module.split(".")[0])
    assert imported <= {"argparse", "json", "pathlib", "sys", "jax", "numpy", "PIL"}, imported

    result = subprocess.run(
        [sys.executable, str(LOADER), str(out), *map(str, images)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    classifier = predict.Classifier(str(workdir))
    expected = classifier.classify(np.stack([classifier.read(p) for p in images]), batch_size=8)
    assert [line["path"] for line in lines] == [str(p) for p in images]
    for line, top in zip(lines, expected, strict=True):
        assert [e["class"] for e in line["top5"]] == [e["class"] for e in top]
        np.testing.assert_allclose(
            [e["prob"] for e in line["top5"]], [e["prob"] for e in top], atol=export.TOLERANCE
        )


def test_loader_example_says_what_is_wrong_in_one_line(exported, images, tmp_path):
    _, _, out, _ = exported
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    cases = [
        ([str(tmp_path), str(images[0])], f"error: {tmp_path} has no model.json or "),
        ([str(out), str(not_an_image)], f"error: cannot read {not_an_image} as an image ("),
    ]
    for args, start in cases:
        result = subprocess.run(
            [sys.executable, str(LOADER), *args], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert result.stderr.strip().startswith(start), result.stderr


@pytest.mark.parametrize("image_size,resize_size", [(16, 0), (16, 16), (16, 19), (15, 22)])
def test_loader_prepares_each_image_as_evaluation_does(tmp_path, image_size, resize_size):
    # The loader repeats data.read_image's geometry so that it needs no resnet_jax code; the
    # checkpoints above are CIFAR-sized (resize_size 0), so the ImageNet-style resize of
    # the shorter side and central crop is compared here, on portrait, landscape and
    # square images, one of them stored sideways with an EXIF rotation.
    import importlib.util

    spec = importlib.util.spec_from_file_location("serve_stablehlo", LOADER)
    loader = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loader)
    rng = np.random.default_rng(5)
    for i, (width, height) in enumerate([(37, 23), (23, 37), (24, 24), (16, 40), (61, 16)]):
        image = Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8))
        path = tmp_path / f"{i}.png"
        exif = image.getexif()
        if i == 0:
            exif[0x0112] = 6  # Orientation: rotated 90 degrees.
        image.save(path, exif=exif)
        expected = data.read_image(path, image_size, resize_size)
        assert expected.shape == (image_size, image_size, 3)
        np.testing.assert_array_equal(loader.prepare(path, image_size, resize_size), expected)


def test_command_as_the_readme_gives_it_and_its_errors(tmp_path):
    workdir = tmp_path / "run"
    save_run(workdir, "resnet8", 16, width_multiplier=0.25)
    out = tmp_path / "exported"
    command = ["--workdir", str(workdir), "--format", "stablehlo,onnx", "--out", str(out)]
    result = run_module("resnet_jax.export", *command, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.onnx", "model.stablehlo"]
    assert result.stdout.splitlines()[0].startswith("stablehlo: model.stablehlo")
    # Exporting again into the same folder is refused, and the export is kept.
    before = (out / "model.onnx").read_bytes()
    result = run_module("resnet_jax.export", *command, timeout=300)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: --out={out} already exists and is not empty. Choose another folder, or pass "
        "--overwrite to replace it (once the new export has passed its check)."
    )
    assert (out / "model.onnx").read_bytes() == before
    # No checkpoint: one line, and no folder created.
    empty = tmp_path / "empty"
    empty.mkdir()
    result = run_module(
        "resnet_jax.export", f"--workdir={empty}", "--format=stablehlo", f"--out={tmp_path / 'x'}"
    )
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: No checkpoint in {empty}"), result.stderr[-2000:]
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize(
    "value,expected",
    [
        ("all", list(export.FORMATS)),
        ("tflite, StableHLO", ["stablehlo", "tflite"]),
        ("onnx,onnx", ["onnx"]),
    ],
)
def test_format_lists(value, expected):
    assert export.parse_formats(value) == expected


@pytest.mark.parametrize("value", ["torchscript", "onnx,pb", ",", ""])
def test_unknown_formats_are_one_clear_line(value):
    with pytest.raises(export.ExportError, match=r"unknown format .*Choose from stablehlo, onnx"):
        export.parse_formats(value)


def test_missing_converter_says_what_to_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "jax2onnx", None)  # import jax2onnx -> ImportError
    with pytest.raises(export.ExportError) as error:
        export.export(str(tmp_path), "latest", ["onnx"], tmp_path / "out")
    assert str(error.value).startswith("--format=onnx needs the Python package jax2onnx")
    assert str(error.value).endswith('Install the export extra: pip install -e ".[export]"')
    assert not (tmp_path / "out").exists()


def test_failed_check_keeps_the_previous_export(exported, monkeypatch, tmp_path):
    workdir, _, _, _ = exported
    out = tmp_path / "served"
    export.export(str(workdir), "latest", ["stablehlo"], out)
    before = (out / "model.json").read_text()

    def wrong(path):
        return lambda images: np.zeros((len(images), len(CLASSES)), np.float32)

    monkeypatch.setitem(export.LOADERS, "stablehlo", wrong)
    with pytest.raises(export.ExportError, match="differs from the JAX model"):
        export.export(str(workdir), "latest", ["stablehlo"], out, overwrite=True)
    assert (out / "model.json").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["served"]


def test_overwrite_replaces_only_an_earlier_export(exported, tmp_path):
    # --overwrite into the run's own workdir (or a folder of runs) would have deleted it.
    workdir = tmp_path / "runs" / "run"
    shutil.copytree(exported[0], workdir)
    before = sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*"))
    for out in (workdir, workdir.parent):
        result = run_module(
            "resnet_jax.export",
            f"--workdir={workdir}",
            "--format=stablehlo",
            f"--out={out}",
            "--overwrite",
        )
        assert result.returncode == 1
        assert result.stderr.strip().splitlines()[-1] == (
            f"error: --out={out} is not an earlier export (it has no model.json), so "
            "--overwrite will not replace it: it may hold a run or other files. Nothing was "
            "changed; choose a new folder for the export."
        )
    assert sorted(str(p.relative_to(workdir)) for p in workdir.rglob("*")) == before


def test_serving_benchmark_times_every_format(exported, tmp_path, monkeypatch, capsys):
    _, _, out, _ = exported
    monkeypatch.syspath_prepend(str(ROOT / "scripts"))
    import serving_benchmark

    json_out = tmp_path / "serving.json"
    argv = ["serving_benchmark.py", str(out), "--batch_sizes=1,2", "--repeats=2"]
    monkeypatch.setattr(sys, "argv", [*argv, f"--json_out={json_out}"])
    assert serving_benchmark.main() == 0
    printed = capsys.readouterr().out.splitlines()
    result = json.loads(printed[-1])
    assert json.loads(json_out.read_text()) == result
    assert [(row["format"], row["batch_size"]) for row in result["rows"]] == [
        (fmt, batch) for fmt in export.FORMATS for batch in (1, 2)
    ]
    for row in result["rows"]:
        assert row["img_per_s"] == pytest.approx(
            row["batch_size"] / row["ms_per_batch"] * 1e3, rel=0.01
        )
    assert len(printed) == 2 + len(result["rows"]) + 1  # title, header, rows, JSON


def test_a_converter_failure_is_one_line_and_leaves_nothing(monkeypatch, tmp_path):
    workdir = tmp_path / "run"
    save_run(workdir, "resnet8", 16, width_multiplier=0.25)

    def unsupported(*args):
        raise NotImplementedError("No ONNX handler for primitive 'fancy_op'\nmore detail")

    monkeypatch.setattr(export, "write_onnx", unsupported)
    with pytest.raises(export.ExportError) as error:
        export.export(str(workdir), "latest", ["stablehlo", "onnx"], tmp_path / "out")
    assert str(error.value) == (
        "The onnx converter failed on this model (NotImplementedError: No ONNX handler for "
        "primitive 'fancy_op'); nothing was written to --out. The other formats may still "
        "export: leave onnx out of --format."
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (tmp_path / "taken").write_text("a file")
    with pytest.raises(export.ExportError, match="is a file or a link; give a folder"):
        export.export(str(workdir), "latest", ["stablehlo"], tmp_path / "taken")
