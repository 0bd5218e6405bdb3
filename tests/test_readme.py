"""Every `python -m resnet_jax.<command>` command of the README and docs/guide.md, as written.

Each runs from a fresh working directory that holds nothing but `configs/` (as a new
user's checkout would, for the parts these commands read), so relative paths such as
`--workdir runs/resnet18` are relative there. Commands that train get overrides appended
that shrink the model and the budget and point at a small dataset in the official
format; everything the documents wrote stays as it is. The README and the guide are read as
one: a command moved from one to the other is still run, and one dropped fails the counts.
"""

import json
import re
import shlex
import subprocess
import sys

import pytest
from helpers import ROOT, main_environment, run_main, run_script
from PIL import Image

SHRINK = [
    "--config.model.name=resnet8",
    "--config.model.width_multiplier=0.25",
    "--config.batch_size=16",
    "--config.eval_batch_size=8",
    "--config.lr_schedule=constant",
    "--config.log_every_steps=2",
    "--config.eval_every_steps=4",
    "--config.checkpoint_every_steps=2",
    "--config.profile_num_steps=0",
]


# The documents whose commands run here, read as one.
DOCUMENTS = ("README.md", "docs/guide.md")


def blocks(language):
    """The ```<language> blocks of the README and the guide, in that order."""
    texts = [(ROOT / name).read_text() for name in DOCUMENTS]
    return [b for text in texts for b in re.findall(rf"```{language}\n(.*?)```", text, re.S)]


def readme_commands(module="main"):
    """The documents' `python -m resnet_jax.<module>` commands, continuation lines joined."""
    commands = []
    for block in blocks("bash"):
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("python3 -m venv"):  # The set-up command ends in the job.
                line = line.split("&& ")[-1]
            if line.startswith(f"python -m resnet_jax.{module} "):
                commands.append(shlex.split(line)[3:])
    return commands


def readme_scripts(name):
    """The documents' `python scripts/<name> ...` commands, as argument lists."""
    lines = [line for block in blocks("bash") for line in block.replace("\\\n", " ").splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith(f"python scripts/{name} ")]


def serving_snippet():
    """The documents' python block that loads each exported format into `probs`."""
    (block,) = [b for b in blocks("python") if "export.deserialize" in b]
    return block


COMMANDS = readme_commands()
PREDICTS = readme_commands("predict")
IMPORTS = readme_commands("import_torch")
REPORTS = readme_commands("report")
DEGRADATIONS = readme_commands("experiments.degradation")
RECIPES = readme_commands("experiments.recipes")
LAYER_RESPONSES = readme_commands("experiments.layer_responses")
EXPORTS = readme_commands("export")


def test_the_readme_has_the_commands_this_file_runs():
    workdirs = [c[c.index("--workdir") + 1] for c in COMMANDS if "--workdir" in c]
    assert "runs/resnet18" in workdirs and "runs/mine" in workdirs and "runs/resnet50" in workdirs
    assert any("--mode=eval" in c for c in COMMANDS)
    assert any("--mode=summary" in c for c in COMMANDS)
    assert len(PREDICTS) == 2 and len(IMPORTS) == 1
    assert len(REPORTS) == 1 and len(DEGRADATIONS) == 1 and len(LAYER_RESPONSES) == 1
    assert len(RECIPES) == 1
    assert sum("configs/resnet18_cifar100_modern.py" in c for c in COMMANDS) == 1
    assert len(EXPORTS) == 1
    # Every main command, the quick start's included: the twelve the README had before the
    # guide took most of them, and the quick start's. One dropped in a move fails here.
    assert len(COMMANDS) == 13
    configs = [c[c.index("--config") + 1] for c in COMMANDS]
    assert configs.count("configs/fashion_mnist.py:quick") == 1
    assert configs.count("configs/fashion_mnist.py") == 1
    assert (
        len(readme_scripts("export_idx.py")) == 1 and len(readme_scripts("serve_stablehlo.py")) == 1
    )


@pytest.fixture(scope="module")
def user_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("user")
    (folder / "configs").symlink_to(ROOT / "configs")
    (folder / "scripts").symlink_to(ROOT / "scripts")
    return folder


def run_as_written(args, user_dir, *extra, module="main"):
    if module == "main":
        result = run_main(*args, *extra, cwd=user_dir)
    else:
        result = subprocess.run(
            [sys.executable, "-m", f"resnet_jax.{module}", *args, *extra],
            cwd=user_dir,
            env=main_environment(),
            capture_output=True,
            text=True,
            timeout=600,
        )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def evaluations(workdir_name):
    """The README's --mode=eval commands of `workdir_name`: (with its config file, with its own)."""
    found = [
        c for c in COMMANDS if "--mode=eval" in c and c[c.index("--workdir") + 1] == workdir_name
    ]
    own = [c for c in found if any(a.startswith("configs/from_workdir.py:") for a in c)]
    return [c for c in found if c not in own], own


def test_summary_commands(user_dir):
    # torchvision's ResNet-18 with a CIFAR stem and 100 classes; the DenseNet-BC paper's 0.8M.
    expected = {"configs/resnet18.py": 11_220_132, "configs/densenet_bc100.py": 800_032}
    found = {}
    for args in (c for c in COMMANDS if "--mode=summary" in c):
        result = run_as_written(args, user_dir)
        summary = json.loads(result.stdout.strip().splitlines()[-1])
        found[args[args.index("--config") + 1]] = summary["total_params"]
    assert found == expected


def test_train_resume_evaluate_and_predict_commands(user_dir, cifar, toy_folder):
    root, written = cifar
    cifar_data = [f"--config.data_dir={root / 'data'}"]
    trains = [c for c in COMMANDS if "--workdir" in c and "--mode=eval" not in c]
    first, *others = [c for c in trains if c[c.index("--workdir") + 1] == "runs/resnet18"]
    run_as_written(first, user_dir, *SHRINK, *cifar_data, "--config.num_train_steps=2")
    workdir = user_dir / "runs" / "resnet18"
    assert (workdir / "checkpoints" / "2").is_dir()
    # The same command again continues the run (here, to a longer budget).
    for args in others or [first]:
        result = run_as_written(args, user_dir, *SHRINK, *cifar_data, "--config.num_train_steps=4")
        assert "Resumed from checkpoint step 2" in result.stderr
    assert not (workdir / "corrupt_checkpoints").exists()
    trained = json.loads((workdir / "eval_results.json").read_text())
    assert trained["step"] == 4 and trained["num_examples"] == 37

    (evaluate,), (own_config,) = evaluations("runs/resnet18")
    result = run_as_written(evaluate, user_dir, *SHRINK, *cifar_data)
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["step"] == 4 and evaluated["num_examples"] == 37
    assert evaluated["top1"] == trained["top1"]
    # With the run's own config.json: no settings repeated, the same result.
    result = run_as_written(own_config, user_dir)
    assert json.loads(result.stdout.strip().splitlines()[-1]) == evaluated

    # predict, as written, on an image file of another size and mode.
    (predict,) = [c for c in PREDICTS if c[c.index("--workdir") + 1] == "runs/resnet18"]
    Image.new("L", (50, 40), 128).save(user_dir / "photo.jpg")
    result = run_as_written(predict, user_dir, module="predict")
    assert result.stdout.splitlines()[0] == "photo.jpg"
    assert [line.split()[1] for line in result.stdout.splitlines()[1:]] == [
        "fine_{:02d}".format(int(line.split("(")[-1].rstrip(")")))
        for line in result.stdout.splitlines()[1:]
    ] and len(result.stdout.splitlines()) == 6  # The top 5, named from tfds's metadata.

    # Predict preprocesses as evaluation does: on the test split written as image files,
    # its top-1 is right exactly as often as the evaluation found.
    test = written["test"]
    files = []
    for i, image in enumerate(test["images"]):
        files.append(user_dir / "test_images" / f"{i:02d}.png")
        files[-1].parent.mkdir(exist_ok=True)
        Image.fromarray(image).save(files[-1])
    result = run_as_written(
        ["--workdir", "runs/resnet18", "--json", "--batch_size=16", "test_images"],
        user_dir,
        module="predict",
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["path"] for line in lines] == [f"test_images/{i:02d}.png" for i in range(37)]
    hits = sum(
        line["top5"][0]["label"] == label
        for line, label in zip(lines, test["fine_labels"], strict=True)
    )
    assert hits == round(trained["top1"] * 37)

    # The report, as written: its evaluation agrees with training's, class by class.
    (report,) = REPORTS
    run_as_written(report, user_dir, module="report")
    summary = json.loads((workdir / "report" / "report.json").read_text())
    assert summary["step"] == 4 and summary["num_examples"] == 37
    assert summary["top1"] == pytest.approx(trained["top1"], abs=1e-6)
    assert len(summary["per_class"]) == 100 and summary["per_class"][7]["class"] == "fine_07"
    assert sum(row["examples"] for row in summary["per_class"]) == 37

    # Export, as written, then the StableHLO loader and the loading snippets on photo.jpg:
    # each gives predict's top-1 (and the loader its top 5, same order, same probabilities).
    (export,) = EXPORTS
    run_as_written(export, user_dir, module="export")
    predicted = run_as_written(["--json", *predict], user_dir, module="predict")
    top5 = json.loads(predicted.stdout)["top5"]
    (serve,) = readme_scripts("serve_stablehlo.py")
    served = subprocess.run(
        [sys.executable, *serve], cwd=user_dir, capture_output=True, text=True, timeout=300
    )
    assert served.returncode == 0, served.stderr[-3000:]
    served = json.loads(served.stdout)["top5"]
    assert [e["class"] for e in served] == [e["class"] for e in top5]
    assert [e["prob"] for e in served] == pytest.approx([e["prob"] for e in top5], abs=1e-4)
    # Each format's snippet, its top-1 printed after it.
    prelude = (
        "import numpy as np\nfrom PIL import Image\n"
        "images = np.asarray(Image.open('photo.jpg').convert('RGB').resize((32, 32), "
        "Image.Resampling.BILINEAR))[None]\n"
    )
    parts = re.split(r"\n(?=# )", serving_snippet().strip())
    script = prelude + "".join(f"{part}\nprint(int(np.argmax(probs[0])))\n" for part in parts)
    ran = subprocess.run(
        [sys.executable, "-c", script], cwd=user_dir, capture_output=True, text=True, timeout=300
    )
    assert ran.returncode == 0, ran.stderr[-3000:]
    assert ran.stdout.split() == [str(top5[0]["label"])] * 4

    (folder,) = [c for c in trains if "image_folder" in " ".join(c)]
    folder = [arg.replace("PATH", str(toy_folder)) for arg in folder]
    run_as_written(folder, user_dir, *SHRINK, "--config.num_train_steps=4")
    mine = json.loads((user_dir / "runs" / "mine" / "eval_results.json").read_text())
    assert mine["num_examples"] == 63 and mine["step"] == 4


def test_modern_recipe_commands(user_dir, cifar):
    """The modern recipe trains with SAM, Cutout and an EMA; its EMA evaluation reads back."""
    root, _ = cifar
    (train,) = [c for c in COMMANDS if "configs/resnet18_cifar100_modern.py" in c]
    cifar_data = [f"--config.data_dir={root / 'data'}"]
    run_as_written(train, user_dir, *SHRINK, *cifar_data, "--config.num_train_steps=4")
    workdir = user_dir / train[train.index("--workdir") + 1]
    trained = json.loads((workdir / "eval_results.json").read_text())
    config = json.loads((workdir / "config.json").read_text())
    assert (config["sam_rho"], config["cutout_size"], config["ema_decay"]) == (0.2, 16, 0.9999)
    assert trained["step"] == 4 and "ema_top1" in trained
    _, (evaluate,) = evaluations(train[train.index("--workdir") + 1])
    result = run_as_written(evaluate, user_dir)
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert (evaluated["weights"], evaluated["flip"], evaluated["num_examples"]) == ("ema", True, 37)
    assert (workdir / "evaluations" / "step_4_ema_flip.json").is_file()


def test_imagenet_recipe_command_streams(user_dir, toy_folder):
    """The ImageNet command as written, on a small image folder instead of ImageNet.

    What stays is the recipe's input: grain streaming with worker processes, the
    random-resized crop, the resize-then-centre-crop evaluation, bfloat16.
    """
    (imagenet,) = [c for c in COMMANDS if "configs/resnet50_imagenet.py" in c]
    result = run_as_written(
        imagenet,
        user_dir,
        *SHRINK,
        "--config.dataset=image_folder",
        f"--config.data_dir={toy_folder}",
        "--config.eval_split=test",
        "--config.image_size=16",
        "--config.eval_resize_size=20",
        "--config.num_train_steps=4",
        "--config.input_workers=1",
    )
    assert "stream input" in result.stderr
    # On one CPU device jax kept grain's shared-memory batches as its arrays: Python warned
    # at exit of leaked shared memory until the stream path copied them.
    assert "leaked shared_memory" not in result.stderr
    results = json.loads((user_dir / "runs" / "resnet50" / "eval_results.json").read_text())
    assert results["num_examples"] == 63 and results["step"] == 4
    # The recipe's own settings ran (those the command above did not override).
    config = json.loads((user_dir / "runs" / "resnet50" / "config.json").read_text())
    assert config["augment"] == "random_resized_crop" and config["half_precision"] is True
    assert config["label_smoothing"] == 0.1 and config["eval_resize_size"] == 20


def test_import_predict_and_evaluate_commands(user_dir, toy_folder):
    """Import a torchvision-layout resnet18 (random weights), classify, evaluate: as written."""
    import torch

    from resnet_jax import torch_resnet

    (args,) = IMPORTS
    state_dict = user_dir / args[args.index("--state_dict") + 1]
    torch.save(
        torch_resnet.ResNet(torch_resnet.BasicBlock, (2, 2, 2, 2), 1000).state_dict(), state_dict
    )
    names = user_dir / args[args.index("--class_names") + 1]
    names.write_text("".join(f"imagenet class {i}\n" for i in range(1000)))
    result = run_as_written(args, user_dir, module="import_torch")
    assert "Imported 11,689,512 parameters of resnet18 (1000 classes)" in result.stdout
    workdir = args[args.index("--workdir") + 1]

    (predict,) = [c for c in PREDICTS if c[c.index("--workdir") + 1] == workdir]
    Image.new("RGB", (300, 260), (200, 120, 40)).save(user_dir / "photo.jpg")
    result = run_as_written(predict, user_dir, module="predict")
    (line,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert line["path"] == "photo.jpg" and len(line["top5"]) == 5
    assert line["top5"][0]["class"] == f"imagenet class {line['top5'][0]['label']}"

    _, (evaluate,) = evaluations(workdir)
    evaluate = [arg.replace("PATH", str(toy_folder)) for arg in evaluate]
    result = run_as_written(evaluate, user_dir, "--config.eval_batch_size=8")
    evaluated = json.loads(result.stdout.strip().splitlines()[-1])
    assert evaluated["num_examples"] == 63 and evaluated["step"] == 0


def test_degradation_command(user_dir, cifar):
    """The experiment as written, shrunk: one depth, two steps, the test archive."""
    root, _ = cifar
    (args,) = DEGRADATIONS
    run_as_written(
        args,
        user_dir,
        *SHRINK,
        "--depths=8",
        "--config.dataset=cifar100",
        f"--config.data_dir={root / 'data'}",
        "--config.num_train_steps=2",
        module="experiments.degradation",
    )
    workdir = user_dir / args[args.index("--workdir") + 1]
    runs = json.loads((workdir / "degradation.json").read_text())["runs"]
    assert [r["model"] for r in runs] == ["plain8", "resnet8"]
    for run in runs:
        final = json.loads((workdir / run["model"] / "eval_results.json").read_text())
        assert final["num_examples"] == 37 and final["step"] == run["steps"] == 2
    assert (workdir / "degradation.png").is_file() and (workdir / "degradation.md").is_file()

    # Figure 7 from the experiment's checkpoints, as written.
    (responses,) = LAYER_RESPONSES
    assert responses[responses.index("--workdir") + 1] == args[args.index("--workdir") + 1]
    run_as_written(responses, user_dir, module="experiments.layer_responses")
    analysed = json.loads((workdir / "layer_responses" / "layer_responses.json").read_text())
    assert [r["run"] for r in analysed["runs"]] == ["plain8", "resnet8"]
    assert [r["num_layers"] for r in analysed["runs"]] == [7, 7]  # Stem + 2 per block x 3.
    assert (workdir / "layer_responses" / "layer_responses.png").is_file()


def readme_script_commands(script):
    """The documents' `python scripts/<script> ...` commands, continuation lines joined."""
    lines = [line for b in blocks("bash") for line in b.replace("\\\n", " ").splitlines()]
    return [shlex.split(line)[2:] for line in lines if line.startswith(f"python scripts/{script} ")]


def test_fashion_mnist_commands(user_dir, tmp_path):
    """Export idx files and train on them, as written: tiny idx files stand in for Debian's."""
    from data_fixtures import write_idx_dataset

    (export,) = readme_script_commands("export_idx.py")
    assert export[0] == "/usr/share/datasets/fashion-mnist"
    written = write_idx_dataset(tmp_path / "idx", num_train=60, num_test=30)
    args = [str(tmp_path / "idx"), *export[1:]]
    args[args.index("--train_subset") + 1] = "20"  # The tiny training split has 60 images.
    result = run_script("export_idx.py", *args, cwd=user_dir)
    assert result.returncode == 0, result.stderr
    out = user_dir / export[1]
    assert len(list((out / "train").glob("*/*.png"))) == 60
    assert len(list((out / "train20").glob("*/*.png"))) == 20

    # The full recipe, not the quick start's `configs/fashion_mnist.py:quick` (its own test).
    (train,) = [c for c in COMMANDS if c[c.index("--config") + 1] == "configs/fashion_mnist.py"]
    run_as_written(train, user_dir, *SHRINK, "--config.num_train_steps=4")
    workdir = user_dir / train[train.index("--workdir") + 1]
    results = json.loads((workdir / "eval_results.json").read_text())
    assert results["num_examples"] == len(written["test"]["labels"]) == 30
    assert results["step"] == 4
    config = json.loads((workdir / "config.json").read_text())
    assert config["image_size"] == 28 and config["model"]["name"] == "resnet8"  # SHRINK's.

    # The recipe ablation, as written, on the same folder: two variants, one seed, 4 steps.
    (ablation,) = RECIPES
    run_as_written(
        ablation,
        user_dir,
        *SHRINK,
        "--config.num_train_steps=4",
        "--config.train_split=train20",
        "--variants=baseline,cutout",
        "--seeds=0",
        module="experiments.recipes",
    )
    root = user_dir / ablation[ablation.index("--workdir") + 1]
    rows = json.loads((root / "recipes.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["baseline", "cutout"]
    assert rows[1]["changes"] == {"cutout_size": 14}  # Half of the 28-pixel side.
    assert all(r["ema_top1"] is not None for r in rows)
    for r in rows:  # The flip TTA column is each run's flip evaluation of its final step.
        flipped = root / f"{r['variant']}_seed0" / "evaluations" / "step_4_flip.json"
        evaluation = json.loads(flipped.read_text())
        assert evaluation["flip"] and evaluation["num_examples"] == 30
        assert r["flip_top1"] == evaluation["top1"]
    assert "| cutout |" in (root / "recipes.md").read_text()


def heading_anchors(text):
    """The anchors GitHub gives a markdown file's headings (a repeated heading gets -1, -2)."""
    anchors = set()
    for heading in re.findall(r"^#+ (.+)$", re.sub(r"```.*?```", "", text, flags=re.S), re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, n = slug, 0
        while anchor in anchors:
            n += 1
            anchor = f"{slug}-{n}"
        anchors.add(anchor)
    return anchors


def test_local_links_point_at_what_exists():
    """Every markdown link to a local path in the README and docs/ names a file or folder that
    exists, and a link to a heading of a markdown file names one of its headings."""
    documents = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    broken, checked = [], 0
    for document in documents:
        text = re.sub(r"```.*?```", "", document.read_text(), flags=re.S)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):  # https:, mailto:
                continue
            checked += 1
            path, _, anchor = target.partition("#")
            file = (document.parent / path).resolve() if path else document
            if not file.exists():
                broken.append(f"{document.relative_to(ROOT)}: {target} (no such file)")
            elif (
                anchor and file.suffix == ".md" and anchor not in heading_anchors(file.read_text())
            ):
                broken.append(f"{document.relative_to(ROOT)}: {target} (no such heading)")
    assert checked > 50 and not broken, broken
