"""resnet_jax.import_torch and resnet_jax.predict against PyTorch itself.

Each PyTorch net gets random weights and random BatchNorm statistics, goes through the
importer, and our eval-mode logits must match PyTorch's (float32, highest precision).
"""

import json
import os
import pickle

import jax
import ml_collections
import numpy as np
import pytest
import torch
from helpers import run_main, run_module
from PIL import Image

from resnet_jax import checkpointing, evaluate, import_torch
from resnet_jax import torch_resnet as tm
from resnet_jax.models import create_model

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def randomized(model, seed):
    """`model` in eval mode with random weights and BN statistics far from the defaults."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if name.endswith("num_batches_tracked"):
                continue
            if name.endswith("running_var"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif name.endswith("running_mean") or name.endswith("bias"):
                tensor.copy_(0.2 * torch.randn(tensor.shape, generator=generator))
            elif tensor.ndim == 1:  # BN scales.
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            else:  # He-scaled, so activations keep their size through the depth.
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * (2 / fan_in) ** 0.5)
    return model.eval()


def save_state_dict(model, path, wrap=False):
    state = model.state_dict()
    if wrap:  # As DataParallel training scripts save it.
        state = {"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3}
    torch.save(state, path)
    return path


def our_logits(workdir, images_nhwc):
    """Logits of the imported checkpoint for float32 images, in NHWC."""
    manager = checkpointing.create_manager(workdir, read_only=True)
    meta = checkpointing.read_meta(manager, 0)
    config = ml_collections.ConfigDict(meta["config"])
    model = create_model(config.model, config.model.num_classes)
    placement = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    variables = evaluate.restore_model(manager, 0, model, config.image_size, placement)
    with jax.default_matmul_precision("highest"):
        return np.asarray(model.apply(variables, images_nhwc, train=False))


def torch_logits(model, images_nhwc):
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc).permute(0, 3, 1, 2).contiguous()).numpy()


def test_the_reference_nets_have_the_published_parameter_counts():
    def count(model):
        return sum(p.numel() for p in model.parameters())

    # torchvision's documented counts, and the CIFAR repositories' ResNet-18 / ResNet-20.
    assert count(tm.ResNet(tm.BasicBlock, (2, 2, 2, 2), 1000)) == 11_689_512
    assert count(tm.ResNet(tm.Bottleneck, (3, 4, 6, 3), 1000)) == 25_557_032
    assert count(tm.ResNet(tm.BasicBlock, (2, 2, 2, 2), 10, "cifar")) == 11_173_962
    cifar20 = tm.ResNet(tm.BasicBlock, (3, 3, 3), 10, "cifar", (16, 32, 64), option_a=True)
    assert count(cifar20) == 269_722


CASES = {
    # name: (torch net, our model name, input size, expected preprocessing)
    "torchvision_basic": (
        lambda: tm.ResNet(tm.BasicBlock, (2, 2, 2, 2), 1000),
        "resnet18",
        224,
        (224, 256, IMAGENET_MEAN),
    ),
    "torchvision_bottleneck": (
        lambda: tm.ResNet(tm.Bottleneck, (3, 4, 6, 3), 7),
        "resnet50",
        64,
        (224, 256, IMAGENET_MEAN),
    ),
    "cifar_projection": (
        lambda: tm.ResNet(tm.BasicBlock, (2, 2, 2, 2), 100, "cifar"),
        "resnet18",
        32,
        (32, 0, CIFAR100_MEAN),
    ),
    "cifar_option_a": (
        lambda: tm.ResNet(tm.BasicBlock, (3, 3, 3), 10, "cifar", (16, 32, 64), option_a=True),
        "resnet20",
        32,
        (32, 0, (0.4914, 0.4822, 0.4465)),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_imported_logits_match_pytorch(case, tmp_path):
    make, name, size, (image_size, resize_size, mean) = CASES[case]
    model = randomized(make(), seed=len(case))
    path = save_state_dict(model, tmp_path / "weights.pth", wrap=case == "cifar_projection")
    summary = import_torch.import_state_dict(name, str(path), str(tmp_path / "run"))
    assert summary["num_params"] == sum(p.numel() for p in model.parameters())
    assert summary["preprocessing"]["image_size"] == image_size
    assert summary["preprocessing"]["resize_size"] == resize_size
    assert summary["preprocessing"]["mean"] == pytest.approx(mean)

    images = np.random.default_rng(0).normal(size=(3, size, size, 3)).astype(np.float32)
    expected = torch_logits(model, images)
    got = our_logits(tmp_path / "run", images)
    scale = np.abs(expected).max()
    assert scale > 1.0  # Logits that are not all tiny, so the comparison means something.
    np.testing.assert_array_less(np.abs(got - expected).max() / scale, 1e-4)


def torchvision_eval_transform(path):
    """torchvision's Resize(256) + CenterCrop(224) + ToTensor + Normalize, written out."""
    image = Image.open(path).convert("RGB")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short != 256:
        size = (256, int(256 * long / short))
        image = image.resize(size if width <= height else size[::-1], Image.Resampling.BILINEAR)
    width, height = image.size
    top, left = int(round((height - 224) / 2.0)), int(round((width - 224) / 2.0))
    pixels = np.asarray(image.crop((left, top, left + 224, top + 224)), np.float32) / 255.0
    return ((pixels - IMAGENET_MEAN) / IMAGENET_STD).astype(np.float32)


def write_photos(folder):
    """Image files of several sizes and colour modes, and one that is not an image."""
    rng = np.random.default_rng(5)
    folder.mkdir()

    def pixels(height, width):
        # Smooth content, as photos have: random noise would make resampling dominate.
        y, x = np.mgrid[0:height, 0:width] / max(height, width)
        phase = rng.uniform(0, 6, size=3)
        return np.stack([127 + 120 * np.sin(7 * x + 5 * y + p) for p in phase], -1).astype(np.uint8)

    files = [
        folder / "wide.jpg",
        folder / "gray.png",
        folder / "already256.png",
        folder / "palette.gif",
    ]
    Image.fromarray(pixels(300, 457)).save(files[0], quality=95)
    Image.fromarray(pixels(260, 260)[..., 0]).save(files[1])
    Image.fromarray(pixels(400, 256)).convert("RGBA").save(files[2])
    Image.fromarray(pixels(230, 240)).convert("P").save(files[3])
    broken = folder / "broken.jpg"
    broken.write_bytes(b"not a jpeg")
    return files, broken


@pytest.fixture(scope="module")
def imported_resnet18(tmp_path_factory):
    """A torchvision-layout resnet18 with random weights, imported by the command line."""
    folder = tmp_path_factory.mktemp("resnet18")
    model = randomized(tm.ResNet(tm.BasicBlock, (2, 2, 2, 2), 1000), seed=11)
    with torch.no_grad():
        # Logits with a spread of about 3: a top-5 with clear gaps, not saturated.
        spread = model(torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)))
        factor = 3.0 / float(spread.std())
        model.fc.weight.mul_(factor)
        model.fc.bias.mul_(factor)
    names = folder / "classes.txt"
    names.write_text("".join(f"name {i}\n" for i in range(1000)))
    path = save_state_dict(model, folder / "resnet18.pth")
    result = run_module(
        "resnet_jax.import_torch",
        "--model=resnet18",
        f"--state_dict={path}",
        f"--workdir={folder / 'run'}",
        f"--class_names={names}",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Imported 11,689,512 parameters of resnet18 (1000 classes)" in result.stdout
    return model, folder / "run"


def test_predict_agrees_with_pytorch_top5(imported_resnet18, tmp_path):
    model, workdir = imported_resnet18
    files, broken = write_photos(tmp_path / "photos")
    result = run_module(
        "resnet_jax.predict",
        f"--workdir={workdir}",
        "--json",
        "--batch_size=3",
        *map(str, [files[0], broken, *files[1:]]),
    )
    # The broken file is reported, the others are still classified, and the status says so.
    assert result.returncode == 1
    assert [line for line in result.stderr.splitlines() if line.startswith("error")] == [
        f"error: cannot read {broken} as an image (UnidentifiedImageError: cannot identify "
        f"image file '{broken}')"
    ]
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == list(map(str, [files[0], broken, *files[1:]]))
    assert "error" in lines[1] and "top5" not in lines[1]
    predicted = [line for line in lines if "top5" in line]

    inputs = np.stack([torchvision_eval_transform(f) for f in files])
    with torch.no_grad():
        probs = torch.softmax(torch.from_numpy(torch_logits(model, inputs)), -1)
    top_probs, top_labels = probs.topk(5)
    for line, row_probs, row_labels in zip(predicted, top_probs, top_labels, strict=True):
        assert [entry["label"] for entry in line["top5"]] == row_labels.tolist()
        assert [entry["class"] for entry in line["top5"]] == [f"name {i}" for i in row_labels]
        np.testing.assert_allclose([e["prob"] for e in line["top5"]], row_probs, atol=1e-4)


def test_a_mismatched_state_dict_is_listed_and_nothing_is_written(tmp_path):
    model = tm.ResNet(tm.BasicBlock, (3, 4, 6, 3), 10)  # resnet34's layout
    state = model.state_dict()
    state["layer3.0.conv1.weight"] = torch.zeros(256, 100, 3, 3)
    torch.save(state, tmp_path / "r34.pth")
    result = run_module(
        "resnet_jax.import_torch",
        "--model=resnet18",
        f"--state_dict={tmp_path / 'r34.pth'}",
        f"--workdir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert "error: The state_dict does not fit the model." in result.stderr
    assert "unexpected in the file" in result.stderr and "layer1.2.conv1.weight" in result.stderr
    assert "layer3.0.conv1.weight: file (256, 100, 3, 3), model (256, 128, 3, 3)" in result.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()

    # Same net, asked for as resnet50: its bottleneck keys are missing.
    with pytest.raises(
        import_torch.ConversionError, match=r"(?s)missing from the file:.*layer1\.0\.conv3\.weight"
    ):
        import_torch.import_state_dict("resnet50", str(tmp_path / "r34.pth"), str(tmp_path / "b"))
    assert not (tmp_path / "b" / "checkpoints").exists()


class _RunsCode:
    """Unpickling this would create `marker`: what weights_only=True must refuse to do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_pickled_code_is_never_run(tmp_path):
    marker = tmp_path / "code_ran"
    with open(tmp_path / "evil.pth", "wb") as f:
        pickle.dump({"conv1.weight": _RunsCode(marker)}, f)
    result = run_module(
        "resnet_jax.import_torch",
        "--model=resnet18",
        f"--state_dict={tmp_path / 'evil.pth'}",
        f"--workdir={tmp_path / 'run'}",
    )
    assert result.returncode == 1
    assert "weights_only=True" in result.stderr and "refused" in result.stderr
    assert not marker.exists()
    assert not (tmp_path / "run").exists()


def test_import_refuses_a_workdir_with_checkpoints(tmp_path):
    model = tm.ResNet(tm.BasicBlock, (3, 3, 3), 10, "cifar", (16, 32, 64), option_a=True)
    path = save_state_dict(model, tmp_path / "r20.pth")
    import_torch.import_state_dict("resnet20", str(path), str(tmp_path / "run"))
    before = sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir())
    with pytest.raises(checkpointing.CheckpointError, match="already holds checkpoints"):
        import_torch.import_state_dict("resnet20", str(path), str(tmp_path / "run"))
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == before
    (tmp_path / "a_file").write_text("kept")
    with pytest.raises(checkpointing.CheckpointError, match="a_file is a file, not a folder"):
        import_torch.import_state_dict("resnet20", str(path), str(tmp_path / "a_file"))
    assert (tmp_path / "a_file").read_text() == "kept"


def test_imported_cifar_weights_evaluate_as_in_pytorch(cifar, tmp_path):
    """--mode=eval with the run's own config, on CIFAR-100: PyTorch's accuracy, exactly."""
    root, written = cifar
    model = randomized(tm.ResNet(tm.BasicBlock, (2, 2, 2, 2), 100, "cifar", (8, 16, 32, 64)), 7)
    path = save_state_dict(model, tmp_path / "cifar.pth")
    summary = import_torch.import_state_dict(
        "resnet18", str(path), str(tmp_path / "run"), data_dir=str(root / "data")
    )
    assert summary["class_names"]  # From tfds's metadata of the prepared dataset.
    result = run_main(
        f"--config=configs/from_workdir.py:{tmp_path / 'run'}",
        f"--workdir={tmp_path / 'run'}",
        "--mode=eval",
        f"--config.data_dir={root / 'data'}",
        "--config.eval_batch_size=8",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])

    images = written["test"]["images"].astype(np.float32) / 255.0
    images = ((images - CIFAR100_MEAN) / CIFAR100_STD).astype(np.float32)
    logits = torch_logits(model, images)
    correct = (logits.argmax(-1) == written["test"]["fine_labels"]).sum()
    assert evaluated["num_examples"] == 37
    assert round(evaluated["top1"] * 37) == correct


def test_training_continues_from_imported_weights(toy_folder, tmp_path):
    model = tm.ResNet(tm.BasicBlock, (1, 1, 1), 10, "cifar", (4, 8, 16), option_a=True)
    path = save_state_dict(randomized(model, 3), tmp_path / "r8.pth")
    import_torch.import_state_dict("resnet8", str(path), str(tmp_path / "run"))
    imported = evaluate.load_trained_model(str(tmp_path / "run")).variables
    result = run_main(
        f"--config=configs/from_workdir.py:{tmp_path / 'run'}",
        f"--workdir={tmp_path / 'run'}",
        "--config.dataset=image_folder",
        f"--config.data_dir={toy_folder}",
        "--config.num_train_steps=2",
        "--config.batch_size=16",
        "--config.eval_batch_size=24",
        "--config.profile_num_steps=0",
        "--config.learning_rate=1e-9",  # Steps too small to move the weights visibly.
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Starting from the weights imported from" in result.stderr
    assert json.loads((tmp_path / "run" / "eval_results.json").read_text())["step"] == 2
    # Training started from the imported weights (a fresh initialisation would be far off)
    # and trained: the BatchNorm statistics moved with the two batches.
    trained = evaluate.load_trained_model(str(tmp_path / "run"))
    assert trained.step == 2
    for a, b in zip(
        jax.tree.leaves(imported["params"]),
        jax.tree.leaves(trained.variables["params"]),
        strict=True,
    ):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6)
    moved = [
        not np.array_equal(a, b)
        for a, b in zip(
            jax.tree.leaves(imported["batch_stats"]),
            jax.tree.leaves(trained.variables["batch_stats"]),
            strict=True,
        )
    ]
    assert all(moved)


@pytest.mark.parametrize(
    "name, stem, width, classes",
    [
        ("resnet18", "cifar", 1.0, 100),
        ("resnet50", "imagenet", 1.0, 1000),
        ("resnet56", "cifar", 1.0, 10),
        ("resnet8", "cifar", 0.25, 3),
    ],
)
def test_the_benchmarks_pytorch_twins_have_our_parameter_counts(name, stem, width, classes):
    from configs import default

    config = default.get_config().model
    config.name, config.stem, config.width_multiplier = name, stem, width
    model = create_model(config, classes)
    image = jax.ShapeDtypeStruct((1, 32, 32, 3), np.float32)
    params = jax.eval_shape(lambda x: model.init(jax.random.key(0), x), image)["params"]
    ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    assert sum(p.numel() for p in tm.from_config(config, classes).parameters()) == ours
