"""resnet_jax.predict on a small checkpoint: the evaluation's preprocessing, and bad input."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import run_module, save_trained, tiny_state
from PIL import Image

from configs import smoke
from resnet_jax import checkpointing, data, predict, sharding

CLASSES = ["ant", "bee", "cat"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A smoke-config checkpoint at step 5 with class names, as training saves it."""
    workdir = tmp_path_factory.mktemp("run")
    config = smoke.get_config()
    config.image_size = 20
    state, _ = tiny_state(config, sharding.make_mesh(), num_classes=3)
    state = state.replace(step=jnp.asarray(5, jnp.int32))
    save_trained(workdir, state, config, CLASSES)
    return workdir, config, state


def write_images(folder, count):
    rng = np.random.default_rng(1)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        size = (int(rng.integers(10, 60)), int(rng.integers(10, 60)))
        pixels = rng.integers(0, 256, size=(*size[::-1], 3), dtype=np.uint8)
        paths.append(folder / f"{i:03d}.png")
        Image.fromarray(pixels).save(paths[-1])
    return paths


def test_classifies_as_the_evaluation_preprocesses(run, tmp_path):
    workdir, config, state = run
    paths = write_images(tmp_path / "images", 7)
    classifier = predict.Classifier(str(workdir))
    assert classifier.step == 5 and classifier.class_names == CLASSES
    tops = classifier.classify(np.stack([classifier.read(p) for p in paths]), batch_size=4)

    # The expected input built without our data code: PIL's bilinear resize of the whole
    # image to 20 x 20, then ImageNet's published mean and std (an image folder's).
    mean, std = np.array([0.485, 0.456, 0.406]), np.array([0.229, 0.224, 0.225])
    pixels = [
        np.asarray(Image.open(p).convert("RGB").resize((20, 20), Image.Resampling.BILINEAR))
        for p in paths
    ]
    inputs = ((np.stack(pixels) / 255.0 - mean) / std).astype(np.float32)
    logits = state.apply_fn(
        {"params": state.params, "batch_stats": state.batch_stats}, inputs, train=False
    )
    probs = np.asarray(jax.nn.softmax(logits))
    for top, row in zip(tops, probs, strict=True):
        assert [entry["label"] for entry in top] == list(np.argsort(-row))  # 3 classes: all
        assert [entry["class"] for entry in top] == [CLASSES[i] for i in np.argsort(-row)]
        np.testing.assert_allclose([entry["prob"] for entry in top], np.sort(row)[::-1], atol=1e-6)


def run_predict(*args):
    return run_module("resnet_jax.predict", *args, timeout=300)


def test_many_files_in_batches_with_progress(run, tmp_path):
    workdir, config, state = run
    paths = write_images(tmp_path / "many" / "sub", 45)
    (tmp_path / "many" / "notes.txt").write_text("not an image, and not picked up")
    result = run_predict(f"--workdir={workdir}", "--json", "--batch_size=8", tmp_path / "many")
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [
        str(tmp_path / "many" / "sub" / f"{i:03d}.png") for i in range(45)
    ]
    assert all(len(line["top5"]) == 3 for line in lines)  # Only 3 classes to rank.
    assert "predict: 45/45 images (100%)" in result.stderr
    # Batches of 8 (the last one of 5) give each image what all 45 at once give.
    mean, std = data.normalization(config)
    images = np.stack([data.read_image(p, config.image_size) for p in paths])
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    logits = state.apply_fn(variables, data.normalize(images, mean, std), train=False)
    probs = np.asarray(jax.nn.softmax(logits))
    for line, row in zip(lines, probs, strict=True):
        assert [e["class"] for e in line["top5"]] == [CLASSES[i] for i in np.argsort(-row)]
        np.testing.assert_allclose([e["prob"] for e in line["top5"]], np.sort(row)[::-1], atol=1e-5)


def test_bad_input_is_one_clear_error(run, tmp_path):
    workdir, _, _ = run
    image = write_images(tmp_path / "images", 1)[0]
    empty = run_predict(f"--workdir={tmp_path / 'none'}", image)
    assert empty.returncode == 1 and "error: No checkpoint in" in empty.stderr
    best = run_predict(f"--workdir={workdir}", "--checkpoint=best", image)
    assert best.returncode == 1 and best.stderr.strip().splitlines()[-1] == (
        f"error: No checkpoint in {workdir / 'checkpoints'} has eval metrics to pick the best "
        "by. Ask for latest or one of its steps ([5]) instead of best."
    )
    missing = run_predict(f"--workdir={workdir}", "--checkpoint=7", image)
    assert missing.returncode == 1 and "No checkpoint step 7" in missing.stderr
    (tmp_path / "nothing").mkdir()
    no_images = run_predict(f"--workdir={workdir}", tmp_path / "nothing")
    assert no_images.returncode == 1 and "error: no image files in" in no_images.stderr
    typo = run_predict(f"--workdir={workdir}", "--checkpoint=lastest", image)
    assert typo.returncode == 1 and "must be latest, best or a step number" in typo.stderr
    assert all("Traceback" not in r.stderr for r in (empty, best, missing, no_images, typo))


def error_lines(result):
    return [line for line in result.stderr.splitlines() if line.startswith("error")]


def test_a_mistyped_path_stops_and_an_undecodable_file_is_one_line(run, tmp_path):
    workdir, _, _ = run
    image = write_images(tmp_path / "images", 1)[0]
    typo = tmp_path / "imgaes" / "000.png"
    result = run_predict(f"--workdir={workdir}", image, typo)
    assert result.returncode == 1 and result.stdout == ""  # Before classifying any.
    assert error_lines(result) == [f"error: no such file or folder: {typo}"]
    # A file that is there but is no image: its line, and the others are classified.
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    result = run_predict(f"--workdir={workdir}", broken, image)
    assert result.returncode == 1
    assert error_lines(result) == [
        f"error: cannot read {broken} as an image (UnidentifiedImageError: cannot identify "
        f"image file '{broken}')"
    ]
    assert result.stdout.splitlines()[0] == str(image)


def test_a_corrupt_checkpoint_names_the_others(run, tmp_path):
    workdir, config, state = run
    copy = tmp_path / "run"
    manager = checkpointing.create_manager(copy)
    for step in (5, 6):
        checkpointing.save(manager, state.replace(step=jnp.asarray(step, jnp.int32)), config, {})
    manager.wait_until_finished()
    for path in (copy / "checkpoints" / "6" / "model").rglob("*"):
        if path.is_file():
            path.write_bytes(b"\x00garbage" * 10)
    image = write_images(tmp_path / "images", 1)[0]
    result = run_predict(f"--workdir={copy}", image)
    assert result.returncode == 1
    assert (
        "Checkpoint step 6" in result.stderr
        and "--checkpoint=STEP (available: [5])" in result.stderr
    )
    # Saved without class names (as older runs were): the labels are named by number.
    result = run_predict(f"--workdir={copy}", "--checkpoint=5", image)
    assert result.returncode == 0 and "class 0" in result.stdout
