"""Layer responses (He et al. 2015, figure 7) and per-layer gradient norms of trained runs.

    python -m resnet_jax.experiments.layer_responses --workdir runs/degradation_fmnist

reads the runs of a degradation experiment (resnet_jax/experiments/degradation.py: one
subfolder per run, plain20, resnet20, ...; --runs picks some, by default every
plain<d>/resnet<d> folder there), each with its own config.json, and computes from each:

- the response of every 3x3 layer: the output of each BatchNorm applied to a 3x3
  convolution (the stem's and both of each basic block's; not a projection shortcut's),
  "after BN and before other nonlinearity (ReLU/addition)", in eval mode (running
  statistics), over every image of the run's test split, each counted once, for the
  checkpoint --checkpoint (latest, best or a step). A layer's std is that of its whole
  response tensor, over all examples, positions and channels (what most reproductions of
  figure 7 plot); the JSON also holds the mean over channels of each channel's own std,
  which BN's running statistics pin near |gamma|. Both come from per-channel moments
  merged batch by batch in float32 (Chan et al.'s pairwise update, so no cancellation),
  combined in float64 at the end.
- the L2 norm of the gradient of the training loss (the run's cross-entropy, without
  weight decay) w.r.t. each 3x3 convolution kernel, in layer order, in train mode (BN on
  batch statistics): each batch's norm, averaged over the first --gradient_batches
  training batches (those training's first steps see, augmented: the same for every run
  of one experiment), at initialisation (training's own init from the run's seed) and at
  the checkpoint. The paper
  argues that with BN the plain nets' gradients do not vanish: the table's first/last
  layer ratio lets a reader check that, plain against residual. On the same batches, the
  loss and the std of the logits, at initialisation and at the checkpoint: how far from
  chance (ln of the class count) each net starts.

It writes into --out (default WORKDIR/layer_responses):
- layer_responses.png: figure 7, std by layer in network order (top) and sorted in
  descending order (bottom), plain nets dashed, ResNets solid, one colour per depth;
- gradient_norms.png: gradient norm by layer, at initialisation and at the checkpoint;
- layer_responses.md: a table, one row per run; layer_responses.json: every number.
Run it from the folder training ran in: a run's config.json may hold a relative data_dir.
"""

import functools
import json
import pathlib
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging

from resnet_jax import cli
from resnet_jax.experiments import degradation

FLAGS = flags.FLAGS
OUT_DIR = "layer_responses"
_RUN_NAME = re.compile(r"(plain|resnet)(\d+)")


def define_flags() -> None:
    """Defines the command's flags, only when it runs: other commands share their names."""
    flags.DEFINE_string(
        "workdir", None, "Folder of the degradation experiment: one subfolder per run."
    )
    flags.DEFINE_string(
        "out", None, f"Where the figures and table go (default: WORKDIR/{OUT_DIR})."
    )
    flags.DEFINE_list(
        "runs", None, "Runs (subfolders of --workdir); default: every plain<d>/resnet<d>."
    )
    cli.define_checkpoint_flag("Checkpoint of each run: latest, best or a step.")
    flags.DEFINE_integer(
        "gradient_batches", 4, "First training batches the gradient norms average over."
    )
    cli.require_flag(
        "workdir",
        "the degradation experiment's folder, whose runs are analysed (e.g. --workdir "
        "runs/degradation)",
    )


class LayerResponsesError(Exception):
    """Runs that cannot be analysed (missing, untrained, not a ResNet): says what to do."""


class Layer(NamedTuple):
    """A 3x3 layer: its convolution's module path, its response's shape."""

    conv: tuple[str, ...]
    pixels: int  # Height x width of the response at the run's image size.
    channels: int

    @property
    def name(self) -> str:
        return "/".join(self.conv)


class Moments(NamedTuple):
    """Per-channel moments of each layer's response over the examples seen so far."""

    examples: jnp.ndarray  # Scalar: examples counted (each spans `pixels` positions).
    mean: tuple[jnp.ndarray, ...]  # Per layer, [channels]: mean over examples and positions.
    m2: tuple[jnp.ndarray, ...]  # Per layer, [channels]: sum of squared deviations from it.


def forward_with_responses(
    apply_fn: Callable, variables: dict[str, Any], images: jnp.ndarray
) -> tuple[jnp.ndarray, list[tuple[nn.Module, jnp.ndarray]]]:
    """Eval-mode logits, and (conv, response) for each BN applied to a 3x3 conv's output.

    The layers are found by what the forward pass does, not by their names: a BatchNorm
    whose input is the very array a 3x3 convolution just returned. They come in the
    order the forward pass runs them.
    """
    found = []
    last_conv: list[Any] = [None, None]  # The last convolution called, and its output.

    def interceptor(next_fun, args, kwargs, context):
        out = next_fun(*args, **kwargs)
        if context.method_name != "__call__":
            return out
        module = context.module
        if isinstance(module, nn.Conv):
            last_conv[:] = [module, out]
        elif isinstance(module, nn.BatchNorm) and args and args[0] is last_conv[1]:
            conv = last_conv[0]
            if tuple(conv.kernel_size) == (3, 3):
                found.append((conv, out))
        return out

    with nn.intercept_methods(interceptor):
        logits = apply_fn(variables, images, train=False)
    return logits, found


def find_layers(apply_fn: Callable, variables: dict[str, Any], image_size: int) -> list[Layer]:
    """The 3x3 layers of a model, in network order (traced for shapes only: nothing is computed)."""
    paths = []

    def responses(variables, images):
        _, found = forward_with_responses(apply_fn, variables, images)
        paths.extend(conv.path for conv, _ in found)
        return [out for _, out in found]

    image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
    shapes = jax.eval_shape(responses, variables, image)
    return [
        Layer(tuple(conv), int(s.shape[1] * s.shape[2]), int(s.shape[3]))
        for conv, s in zip(paths, shapes, strict=True)
    ]


def empty_moments(layers: Sequence[Layer]) -> Moments:
    # Separate buffers for every leaf: the compiled step donates the whole carry.
    def zeros() -> tuple[jnp.ndarray, ...]:
        return tuple(jnp.zeros((layer.channels,), jnp.float32) for layer in layers)

    return Moments(jnp.zeros((), jnp.float32), zeros(), zeros())


def response_step(state: Any, moments: Moments, batch: dict[str, jnp.ndarray]) -> Moments:
    """`moments` merged with those of one padded eval batch; examples with mask False count nowhere.

    Each batch's moments are taken about its own mean (two passes over the batch), then
    merged with Chan et al.'s update, so float32 keeps its precision however large the
    responses' means are next to their spread.
    """
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    _, found = forward_with_responses(state.apply_fn, variables, batch["image"])
    weights = batch["mask"].astype(jnp.float32)[:, None, None, None]
    count = jnp.sum(weights)
    total = moments.examples + count
    means, m2s = [], []
    for (_, response), mean, m2 in zip(found, moments.mean, moments.m2, strict=True):
        response = response.astype(jnp.float32)
        pixels = response.shape[1] * response.shape[2]
        batch_mean = jnp.sum(weights * response, (0, 1, 2)) / jnp.maximum(count * pixels, 1.0)
        batch_m2 = jnp.sum(weights * jnp.square(response - batch_mean), (0, 1, 2))
        delta = batch_mean - mean
        means.append(mean + delta * (count / jnp.maximum(total, 1.0)))
        m2s.append(
            m2
            + batch_m2
            + jnp.square(delta) * (pixels * moments.examples * count / jnp.maximum(total, 1.0))
        )
    return Moments(total, tuple(means), tuple(m2s))


def response_stds(moments: Moments, layers: Sequence[Layer]) -> tuple[list[float], list[float]]:
    """Per layer: the std of the whole response tensor, and the mean of its channels' stds.

    Both are population stds (divided by the count, not the count - 1).
    """
    examples = float(moments.examples)
    stds, channel_stds = [], []
    for layer, mean, m2 in zip(layers, moments.mean, moments.m2, strict=True):
        mean, m2 = np.asarray(mean, np.float64), np.asarray(m2, np.float64)
        per_channel = examples * layer.pixels
        # Every channel has the same count: the tensor's mean is the mean of the channels'.
        total_m2 = m2.sum() + per_channel * np.square(mean - mean.mean()).sum()
        stds.append(float(np.sqrt(total_m2 / (per_channel * len(mean)))))
        channel_stds.append(float(np.sqrt(m2 / per_channel).mean()))
    return stds, channel_stds


def gradient_step(
    state: Any,
    norms: jnp.ndarray,
    batch: dict[str, jnp.ndarray],
    *,
    kernels: Sequence[tuple[str, ...]],
    loss_fn: Callable,
) -> jnp.ndarray:
    """`norms` plus, on one train batch, the L2 norm of the loss gradient w.r.t. each of
    `kernels`, then the loss and the std of the logits (2 more entries).

    BatchNorm normalises with the statistics of the (global) batch, as in a training step.
    """

    def loss(params):
        variables = {"params": params, "batch_stats": state.batch_stats}
        logits, _ = state.apply_fn(variables, batch["image"], train=True, mutable=["batch_stats"])
        return loss_fn(logits, batch["label"]).mean(), jnp.std(logits)

    (value, logit_std), grads = jax.value_and_grad(loss, has_aux=True)(state.params)
    kernel_grads = [
        functools.reduce(lambda tree, key: tree[key], path, grads)["kernel"] for path in kernels
    ]
    return norms + jnp.stack(
        [jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)))) for g in kernel_grads]
        + [value, logit_std]
    )


class _OpenedRun(NamedTuple):
    state: Any  # The checkpoint's model.
    initial: Any  # A fresh initialisation from the run's seed.
    train_batches: list[dict[str, jax.Array]]
    loss_fn: Callable
    compile: Callable  # step_fn(state, carry, batch) -> jitted (uint8 images, batch sharded).
    fold_test_set: Callable  # (compiled step, carry) -> carry folded over every test batch.


def open_run(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, which: str, num_batches: int
) -> _OpenedRun:
    """Everything of the project's checkpoint, evaluation and input code that a run needs.

    The one place that calls it: the checkpoint's model, a fresh one, the training batches
    and the compiled folds over the test set.
    """
    import optax

    from resnet_jax import data, evaluate, sharding, steps
    from resnet_jax.models import create_model

    state, mesh, inputs = evaluate.checkpoint_state(config, workdir, which)
    model = create_model(config.model, state.params["fc"]["bias"].shape[0], config.half_precision)
    # Training's own initialisation. Only its params and BN statistics are used; with the
    # run's optimizer (its rate never used) the compiled init is the one training compiled.
    tx = steps.create_optimizer(config, optax.constant_schedule(0.0))
    initial = steps.create_train_state(config, model, tx, mesh)
    per_process = sharding.per_process_batch_size(config.batch_size, mesh)
    batches = data.open_input(config, mesh).train_batches(per_process, 0)
    try:
        train_batches = [next(batches) for _ in range(num_batches)]
    finally:
        batches.close()

    def fold_test_set(step_fn: Callable, carry: Any) -> Any:
        try:
            return evaluate.eval_loop(step_fn, carry, state, inputs, config, mesh)
        finally:
            inputs.close()  # The streaming path's evaluation workers: one pass is all.

    return _OpenedRun(
        state=state,
        initial=initial,
        train_batches=train_batches,
        loss_fn=functools.partial(steps.cross_entropy, label_smoothing=config.label_smoothing),
        compile=lambda step_fn: steps.compile_batch_fn(step_fn, mesh, config),
        fold_test_set=fold_test_set,
    )


def analyse_run(
    config: ml_collections.ConfigDict, workdir: pathlib.Path, which: str, num_batches: int
) -> dict:
    """Responses and gradient norms of one run's checkpoint `which` (see the module docstring)."""
    run = open_run(config, workdir, which, num_batches)
    variables = {"params": run.state.params, "batch_stats": run.state.batch_stats}
    layers = find_layers(run.state.apply_fn, variables, config.image_size)
    if not layers:
        raise LayerResponsesError(
            f"{config.model.name} in {workdir} has no BatchNorm after a 3x3 convolution: "
            "figure 7 is for the paper's ResNets and plain nets."
        )
    moments = run.fold_test_set(run.compile(response_step), empty_moments(layers))
    stds, channel_stds = response_stds(jax.device_get(moments), layers)
    kernels = [layer.conv for layer in layers]
    step_fn = run.compile(functools.partial(gradient_step, kernels=kernels, loss_fn=run.loss_fn))

    def gradient_norms(state: Any) -> tuple[list[float], float, float]:
        """Per-kernel gradient norms, loss and logit std, each averaged over the batches."""
        sums = jnp.zeros((len(layers) + 2,), jnp.float32)
        for batch in run.train_batches:
            sums = step_fn(state, sums, batch)
        means = (np.asarray(jax.device_get(sums), np.float64) / len(run.train_batches)).tolist()
        return means[:-2], means[-2], means[-1]

    (at_init, loss_init, logits_init), (at_end, loss_end, logits_end) = (
        gradient_norms(run.initial),
        gradient_norms(run.state),
    )
    return {
        "step": int(run.state.step),
        "test_examples": int(moments.examples),
        "num_layers": len(layers),
        "layers": [layer.name for layer in layers],
        "std": stds,
        "std_sorted": sorted(stds, reverse=True),
        "channel_std": channel_stds,
        "mean_std": float(np.mean(stds)),
        "gradient_batches": {
            "count": num_batches,
            "batch_size": config.batch_size,
            "seed": config.seed,
        },
        "grad_norm_init": at_init,
        "grad_norm_end": at_end,
        "grad_ratio_init": at_init[0] / at_init[-1],
        "grad_ratio_end": at_end[0] / at_end[-1],
        # A deep ResNet's residual sums grow with depth at initialisation, and so do its
        # first logits and loss; the plain nets' do not.
        "loss_init": loss_init,
        "logit_std_init": logits_init,
        "loss_end": loss_end,
        "logit_std_end": logits_end,
    }


def run_names(root: pathlib.Path, names: Sequence[str] | None) -> list[str]:
    """`names`, or every plain<d>/resnet<d> subfolder of `root` (plain first, by depth).

    Raises:
      LayerResponsesError: a run folder, its config.json or its checkpoints are missing.
    """
    if not root.is_dir():
        raise LayerResponsesError(
            f"--workdir {root} is not a directory: give the degradation experiment's folder."
        )
    if not names:
        found = [p.name for p in root.iterdir() if p.is_dir() and _RUN_NAME.fullmatch(p.name)]
        if not found:
            raise LayerResponsesError(
                f"{root} has no run folders (plain<d>, resnet<d>): run "
                f"python -m resnet_jax.experiments.degradation --workdir {root} first, or name the runs with --runs."
            )
        order = {kind: i for i, kind in enumerate(degradation.KINDS)}
        names = sorted(
            found, key=lambda n: (order[_RUN_NAME.fullmatch(n)[1]], int(_RUN_NAME.fullmatch(n)[2]))
        )
    from resnet_jax import checkpointing

    for name in names:
        folder = root / name
        if not folder.is_dir():
            raise LayerResponsesError(
                f"No run {name} in {root} ({folder} does not exist): train it with "
                f"python -m resnet_jax.experiments.degradation --workdir {root} (its --depths), "
                "or leave it out of --runs."
            )
        for needed, what in (
            ("config.json", "config.json"),
            (checkpointing.CHECKPOINT_DIR, "checkpoints"),
        ):
            if not (folder / needed).exists():
                raise LayerResponsesError(
                    f"Run {name} has no {what} ({folder / needed} does not exist): it has not been "
                    f"trained; rerun python -m resnet_jax.experiments.degradation --workdir {root}, "
                    "or leave it out of --runs."
                )
    return list(names)


def run_config(folder: pathlib.Path) -> ml_collections.ConfigDict:
    """The config a run was trained with (its config.json over the defaults)."""
    from resnet_jax import defaults

    try:
        config = defaults.from_workdir(str(folder))
    except ValueError as e:
        raise LayerResponsesError(f"Cannot read the config of {folder}: {e}.") from e
    if not _RUN_NAME.fullmatch(config.model.name):
        raise LayerResponsesError(
            f"{folder} trained {config.model.name}: figure 7 is for the paper's ResNets and "
            "plain nets (resnet<d>, plain<d>); leave it out of --runs."
        )
    return config


def analyse_runs(
    root: pathlib.Path, names: Sequence[str], which: str = "latest", num_batches: int = 4
) -> list[dict]:
    """`analyse_run` of each run, with its name, kind and depth."""
    runs = []
    for index, name in enumerate(names):
        config = run_config(root / name)
        logging.info("Run %d of %d, %s: checkpoint %s.", index + 1, len(names), name, which)
        kind, depth = _RUN_NAME.fullmatch(config.model.name).groups()
        result = analyse_run(config, root / name, which, num_batches)
        runs.append(
            {"run": name, "model": config.model.name, "kind": kind, "depth": int(depth), **result}
        )
        logging.info(
            "%s, step %d: %d 3x3 layers, mean std %.4g; gradient norm first / last layer "
            "%.3g at initialisation, %.3g at the checkpoint.",
            name,
            result["step"],
            result["num_layers"],
            result["mean_std"],
            result["grad_ratio_init"],
            result["grad_ratio_end"],
        )
    settings = {json.dumps(r["gradient_batches"], sort_keys=True) for r in runs}
    if len(settings) > 1:
        logging.warning(
            "The runs' gradient batches differ (seed or batch size): %s.", sorted(settings)
        )
    return runs


def _styles(runs: Sequence[dict]) -> list[dict]:
    import matplotlib.pyplot as plt

    depths = sorted({r["depth"] for r in runs})
    colors = {d: plt.get_cmap("tab10")(i % 10) for i, d in enumerate(depths)}
    return [
        {
            "color": colors[r["depth"]],
            "linestyle": "--" if r["kind"] == "plain" else "-",
            "label": f"{'plain' if r['kind'] == 'plain' else 'ResNet'}-{r['depth']}",
        }
        for r in runs
    ]


def responses_figure(runs: Sequence[dict]) -> Any:
    """Figure 7: std by layer in network order (top), sorted in descending order (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 1, figsize=(8, 7.5))
    for ax, key, xlabel in (
        (axes[0], "std", "layer index (original)"),
        (axes[1], "std_sorted", "layer index (sorted by magnitude)"),
    ):
        for run, style in zip(runs, _styles(runs), strict=True):
            ax.plot(range(1, run["num_layers"] + 1), run[key], lw=1.6, marker=".", ms=4, **style)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("std")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=9)
    axes[0].set_title("Responses of the 3x3 layers (after BN, before ReLU/addition), test set")
    fig.tight_layout()
    return fig


def plot_responses(runs: Sequence[dict], path: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig = responses_figure(runs)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_gradients(runs: Sequence[dict], path: pathlib.Path) -> None:
    """Gradient norm of each 3x3 kernel by layer: at initialisation (left), at the checkpoint (right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    for ax, key, title in (
        (axes[0], "grad_norm_init", "at initialisation"),
        (axes[1], "grad_norm_end", "at the checkpoint"),
    ):
        for run, style in zip(runs, _styles(runs), strict=True):
            ax.plot(range(1, run["num_layers"] + 1), run[key], lw=1.6, marker=".", ms=4, **style)
        ax.set_yscale("log")
        ax.set_title(f"Gradient norm of each 3x3 kernel, {title}")
        ax.set_xlabel("layer index (input to output)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=9)
    axes[0].set_ylabel("||dL/dW||, mean over the training batches")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(runs: Sequence[dict]) -> str:
    """Markdown: one row per run."""
    lines = [
        "| run | step | 3x3 layers | mean std | grad norm first / last, init | ratio "
        "| grad norm first / last, end | ratio | loss / logit std, init |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        init, end = r["grad_norm_init"], r["grad_norm_end"]
        lines.append(
            f"| {r['run']} | {r['step']} | {r['num_layers']} | {r['mean_std']:.4g} "
            f"| {init[0]:.3g} / {init[-1]:.3g} | {r['grad_ratio_init']:.3g} "
            f"| {end[0]:.3g} / {end[-1]:.3g} | {r['grad_ratio_end']:.3g} "
            f"| {r['loss_init']:.3g} / {r['logit_std_init']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def write_outputs(runs: Sequence[dict], out: pathlib.Path, root: pathlib.Path, which: str) -> None:
    """layer_responses.{png,md,json} and gradient_norms.png in `out`."""
    out.mkdir(parents=True, exist_ok=True)
    plot_responses(runs, out / "layer_responses.png")
    plot_gradients(runs, out / "gradient_norms.png")
    batches = runs[0]["gradient_batches"]
    (out / "layer_responses.md").write_text(
        f"# Layer responses and gradient norms: {root}, checkpoint {which}\n\n"
        "std: of each 3x3 layer's response (after BN, before ReLU/addition) over the test set; "
        "mean std: its mean over the layers. Gradient norms: of the training loss w.r.t. the "
        f"first and the last 3x3 kernel, mean over the first {batches['count']} training batches "
        f"of {batches['batch_size']}; ratio: first / last. A plain net and its ResNet twin have "
        "the same layer shapes: a plain ratio far below the ResNet's would mean vanishing "
        "gradients.\n\n" + table(runs)
    )
    (out / "layer_responses.json").write_text(
        json.dumps({"workdir": str(root), "checkpoint": which, "runs": list(runs)}, indent=1) + "\n"
    )


def _run() -> None:
    root = pathlib.Path(FLAGS.workdir).expanduser().absolute()
    out = pathlib.Path(FLAGS.out) if FLAGS.out else root / OUT_DIR
    if FLAGS.gradient_batches < 1:
        raise LayerResponsesError(f"--gradient_batches={FLAGS.gradient_batches}: give at least 1.")
    names = run_names(root, FLAGS.runs)
    from resnet_jax import data

    data.hide_accelerators_from_tensorflow()
    runs = analyse_runs(root, names, FLAGS.checkpoint, FLAGS.gradient_batches)
    write_outputs(runs, out, root, FLAGS.checkpoint)
    print(table(runs), end="")
    logging.info("Wrote %s, gradient_norms.png, .md and .json.", out / "layer_responses.png")


def main(argv: list[str]) -> None:
    cli.start_command(argv)
    cli.use_checkout_configs()
    cli.exit_on_user_error(_run, extra=(LayerResponsesError,), step_flag="--checkpoint=STEP")


if __name__ == "__main__":
    define_flags()
    app.run(main, flags_parser=cli.parse_flags)
