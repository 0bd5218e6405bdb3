"""The command line: summary mode and bad input, through a real `python -m resnet_jax.main`."""

import json
import os
import re

from helpers import ROOT, run_main, run_module


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
        "--config",
        "configs/resnet18.py",
        "--config.model.stem=imagenet",
        "--config.model.num_classes=1000",
        "--config.image_size=224",
    )
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
    result = run_main(
        "--config", "configs/resnet18.py", "--config.model.name=vgg16", "--workdir", "/tmp/unused"
    )
    assert result.returncode == 1
    assert result.stderr.count("Unknown model name 'vgg16'") == 1  # Said once, not twice.
    assert "resnet18" in result.stderr and "plain56" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_misspelt_key_and_a_missing_config_file_are_one_line_each():
    misspelt = run_main("--config", "configs/smoke.py", "--config.batchsize=64", "--mode=summary")
    assert misspelt.returncode == 1
    assert misspelt.stderr.strip().splitlines() == [
        "error: no config key 'batchsize'. Did you mean \"batch_size\" instead of "
        '"batchsize"? Every key, with its meaning, is in resnet_jax/defaults.py.'
    ]
    missing = run_main("--config", "configs/nope.py", "--mode=summary")
    assert missing.returncode == 1
    assert missing.stderr.strip().splitlines() == [
        "error: cannot load the config: [Errno 2] No such file or directory: 'configs/nope.py'."
        " Check the --config path (relative to the working directory) and the file, for "
        "example --config configs/resnet18.py from the checkout."
    ]


def test_deterministic_gpu_kernels_are_asked_for_and_a_users_choice_is_kept(monkeypatch):
    from resnet_jax import main

    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    main._deterministic_gpu()
    assert os.environ["XLA_FLAGS"] == (
        "--xla_force_host_platform_device_count=2 --xla_gpu_deterministic_ops=true"
    )
    monkeypatch.setenv("XLA_FLAGS", "--xla_gpu_deterministic_ops=false")
    main._deterministic_gpu()
    assert os.environ["XLA_FLAGS"] == "--xla_gpu_deterministic_ops=false"


def test_unknown_dataset_fails_fast():
    result = run_main(
        "--config", "configs/smoke.py", "--config.dataset=imagenet21k", "--mode=summary"
    )
    assert result.returncode == 1
    assert "Unknown dataset 'imagenet21k'" in result.stderr
    assert "cifar100" in result.stderr and "image_folder" in result.stderr


def test_distributed_without_a_coordinator_is_one_line_and_writes_nothing(tmp_path):
    # On a machine where jax cannot find the processes itself (not a TPU VM or SLURM job).
    workdir = tmp_path / "run"
    result = run_main("--config", "configs/smoke.py", f"--workdir={workdir}", "--distributed")
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    last = result.stderr.strip().splitlines()[-1]
    # jax's own reason (today "coordinator_address should be defined") in the parentheses.
    assert last.startswith("error: --distributed could not start jax.distributed ("), last
    assert last.endswith(
        "). On a TPU VM or a SLURM job jax finds the processes itself; elsewhere give "
        "every process --coordinator_address=HOST:PORT (process 0's) --num_processes=N "
        "--process_id=I, or leave out --distributed for one process."
    )
    assert not workdir.exists()


def test_runs_from_any_working_directory(tmp_path):
    result = run_main(
        "--config",
        str(ROOT / "configs" / "paper_cifar10.py") + ":20",
        "--mode=summary",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.strip().splitlines()[-1])["total_params"] == 269_722


def test_a_missing_required_flag_is_one_line_saying_what_it_is_for():
    example = "(e.g. --workdir runs/resnet18)."
    cases = [
        (
            ["resnet_jax.predict", "photo.jpg"],
            "error: --workdir is required: the run folder whose checkpoint classifies the "
            f"images {example}",
        ),
        (
            ["resnet_jax.export", "--workdir=runs/x", "--format=all"],
            "error: --out is required: the folder to create for the export (e.g. --out "
            "exports/resnet18).",
        ),
        (
            ["resnet_jax.main"],
            "error: --config is required: the config file of the run (e.g. --config "
            "configs/resnet18.py).",
        ),
        (
            ["resnet_jax.main", "--config=configs/smoke.py", "--mode=eval"],
            "error: --workdir is required for --mode=eval: the run folder, for its "
            f"checkpoints, logs and results {example}",
        ),
    ]
    for (module, *args), line in cases:
        result = run_module(module, *args)
        assert result.returncode == 1
        assert result.stderr.strip().splitlines() == [line], (module, args)


def test_help_lists_the_commands_own_flags_defined_in_cli():
    for module, own in (
        ("resnet_jax.predict", ("workdir", "batch_size", "json", "flip")),
        ("resnet_jax.export", ("workdir", "format", "out")),
    ):
        result = run_module(module, "--help")
        listed = set(re.findall(r"^  --(?:\[no\])?(\w+)", result.stdout, re.MULTILINE))
        assert {*own, "checkpoint", "weights", "compilation_cache"} <= listed, result.stdout
