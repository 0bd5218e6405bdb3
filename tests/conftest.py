"""Test set-up: four simulated CPU devices, and a persistent compilation cache.

XLA reads the device-count flag once, when jax initialises its backends, so it has to
be in the environment before anything imports jax. The variables are inherited by the
`python -m resnet_jax.main` subprocesses that the tests start.

XLA:CPU compiles slowly on a 2-core machine (a tiny ResNet's jitted init alone takes
over 10 s, mostly its random initialisers), and many tests build the same programs, in
this process and in subprocesses: the persistent cache compiles each of them once.
"""

import os
import pathlib

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4"
).strip()
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    str(pathlib.Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax_compilation_cache"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import pytest  # noqa: E402  (after the environment is set)

# The files that take longest (half a minute or more each on 2 cores: the seconds of their
# slowest tests in a fresh-clone run on a 2-core EPYC, 2026-12-07, pytest --durations=80),
# run first: the parallel workers (pyproject.toml) take whole files in this order, and a
# long file taken last would leave the other workers idle while it runs. Without
# --no-loadscope-reorder, xdist would order the files by their number of tests, which put
# the one-test test_multiprocess.py last.
LONGEST_FIRST = (
    "test_readme.py",  # 307
    "test_checkpoints.py",  # 214
    "test_topology.py",  # 117
    "test_recipes.py",  # 109
    "test_device_check.py",  # 81
    "test_layer_responses.py",  # 65
    "test_multiprocess.py",  # 64
    "test_torch_import.py",  # 60
    "test_full_disk.py",  # 58
    "test_report.py",  # 49
    "test_degradation.py",  # 43
    "test_compile_cache.py",  # 38
    "test_densenet.py",  # 37
    "test_predict.py",  # 35
    "test_benchmark.py",  # 33
    "test_quick_start.py",  # 32
    "test_export.py",  # 32
    "test_train.py",  # 31
)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # Stable: the order within a file, and of the other files, stays.


@pytest.fixture(scope="session")
def toy_folder(tmp_path_factory):
    """A learnable image folder: three classes of distinct colours, 64 train / 21 test each."""
    from data_fixtures import write_image_folder

    root = tmp_path_factory.mktemp("toy")
    colors = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
    write_image_folder(root, colors, num_train_per_class=64, num_test_per_class=21, size=16, seed=1)
    return root


@pytest.fixture(scope="session")
def cifar(tmp_path_factory):
    """tfds's cifar100 prepared from a 64-train, 37-test archive in the official format.

    Returns (root, written): root/data is the tfds data_dir, root/manual the archive's
    folder; written holds the archive's images and labels.
    """
    from data_fixtures import prepare_cifar100, write_cifar100_archive

    root = tmp_path_factory.mktemp("cifar")
    written = write_cifar100_archive(root / "manual", num_train=64, num_test=37, seed=3)
    prepare_cifar100(root / "data", root / "manual")
    return root, written
