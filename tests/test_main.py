"""The command line: summary mode and bad input, through a real `python -m resnet_jax.main`."""

import json

from helpers import ROOT, run_main


def summary(*args):
    result = run_main("--mode=summary", *args)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_summary_of_the_headline_config():
    info = summary("--config", "configs/resnet18.py")
    assert info["model"] == "resnet18"
    assert info["num_classes"] == 100
    assert info["total_params"] == 11_220_132
    # ../shared/REFERENCE.md: about 0.556 GMAC = 1.11 GFLOP per 32x32 image.
    assert round(info["flops_per_example"] / 1e9, 2) == 1.11
    assert 0 < info["xla_flops_per_example"] < info["flops_per_example"]


def test_summary_of_torchvision_resnet18():
    info = summary(
        "--config", "configs/resnet18.py", "--config.model.stem=imagenet",
        "--config.model.num_classes=1000", "--config.image_size=224",
    )  # fmt: skip
    assert info["total_params"] == 11_689_512
    # torchvision's 1.814 GMAC at 224x224.
    assert abs(info["flops_per_example"] / 2e9 - 1.814) < 0.002


def test_summary_of_the_paper_cifar10_net_and_its_plain_twin():
    resnet = summary("--config", "configs/paper_cifar10.py:56")
    plain = summary("--config", "configs/paper_cifar10.py:56", "--config.model.name=plain56")
    assert resnet["num_classes"] == 10
    assert resnet["total_params"] == plain["total_params"] == 853_018
    # Option A shortcuts add no multiply-adds: same convolutions, same FLOPs.
    assert resnet["flops_per_example"] == plain["flops_per_example"]


def test_bad_config_value_fails_fast_with_the_valid_choices():
    result = run_main("--config", "configs/resnet18.py", "--config.model.name=vgg16",
                      "--workdir", "/tmp/unused")  # fmt: skip
    assert result.returncode == 1
    assert "Unknown model name 'vgg16'" in result.stderr
    assert "resnet18" in result.stderr and "plain56" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_dataset_fails_fast():
    result = run_main("--config", "configs/smoke.py", "--config.dataset=imagenet21k",
                      "--mode=summary")  # fmt: skip
    assert result.returncode == 1
    assert "Unknown dataset 'imagenet21k'" in result.stderr
    assert "cifar100" in result.stderr and "image_folder" in result.stderr


def test_runs_from_any_working_directory(tmp_path):
    result = run_main("--config", str(ROOT / "configs" / "paper_cifar10.py") + ":20",
                      "--mode=summary", cwd=tmp_path)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["total_params"] == 269_722
