"""What one step computes: the train state, metrics, loss, schedule, optimizer, compiled steps.

`train_step` and `eval_step` are module-level pure functions; `compile_train_step` and
`compile_batch_fn` bind the config into them with `functools.partial` and compile them with
`jax.jit` over a mesh of every device (batch sharded, state replicated, carry donated).

Every step carries its metrics: it merges its own into a running clu collection and
returns it. With several processes an eager operation on arrays that span them is a
collective program of its own, which processes may launch in different orders and
deadlock; merging inside the compiled step keeps every such operation in it.
"""

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from clu import metrics
from flax.training import train_state

from resnet_jax import compile_options, data, sharding
from resnet_jax.data import augment

# FirstNonFinite's value while every loss was finite.
NO_STEP = np.iinfo(np.int32).max


class TrainState(train_state.TrainState):
    """Flax's TrainState plus the BatchNorm running statistics and, if kept, their EMA.

    `ema` is None, or {"params", "batch_stats"}: an exponential moving average of both
    (see `update_ema`).
    """

    batch_stats: Any
    ema: Any = None


@flax.struct.dataclass
class FirstNonFinite(metrics.Metric):
    """The first step whose loss was NaN or infinite (`NO_STEP` if none), kept on device."""

    step: jnp.ndarray

    @classmethod
    def from_model_output(cls, *, loss: jnp.ndarray, step: jnp.ndarray, **_) -> "FirstNonFinite":
        return cls(step=jnp.where(jnp.isfinite(loss), NO_STEP, step).astype(jnp.int32))

    def merge(self, other: "FirstNonFinite") -> "FirstNonFinite":
        return type(self)(step=jnp.minimum(self.step, other.step))

    def compute(self) -> jnp.ndarray:
        return self.step

    @classmethod
    def empty(cls) -> "FirstNonFinite":
        return cls(step=jnp.array(NO_STEP, jnp.int32))


@flax.struct.dataclass
class TrainMetrics(metrics.Collection):
    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")
    learning_rate: metrics.LastValue.from_output("learning_rate")
    first_nonfinite_step: FirstNonFinite


@flax.struct.dataclass
class EvalMetrics(metrics.Collection):
    """Averages over the unmasked examples; `loss.count` is how many there were."""

    loss: metrics.Average.from_output("loss")
    top1: metrics.Average.from_output("top1")
    top5: metrics.Average.from_output("top5")


def accuracies(logits: jnp.ndarray, labels: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Per-example top-1 and top-5 hits (top-k with k = number of classes if fewer than 5)."""
    top1 = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    _, top_k = jax.lax.top_k(logits, min(5, logits.shape[-1]))
    top5 = (top_k == labels[:, None]).any(-1).astype(jnp.float32)
    return top1, top5


def cross_entropy(logits: jnp.ndarray, labels: jnp.ndarray, label_smoothing: float = 0.0):
    """Per-example softmax cross-entropy against (optionally smoothed) one-hot labels."""
    targets = jax.nn.one_hot(labels, logits.shape[-1])
    if label_smoothing:
        targets = optax.smooth_labels(targets, label_smoothing)
    return optax.softmax_cross_entropy(logits, targets)


def ema_decay_at(step: jnp.ndarray, decay: float, warmup: bool) -> jnp.ndarray:
    """The EMA's decay after `step` updates: `decay`, or min(decay, (1 + step) / (10 + step)).

    The warm-up (TensorFlow's ExponentialMovingAverage with num_updates) lets the average
    forget its random initialisation within the first hundreds of steps; without it a
    decay of 0.9999 would carry the initial weights for tens of thousands.
    """
    if not warmup:
        return jnp.float32(decay)
    step = step.astype(jnp.float32)
    return jnp.minimum(jnp.float32(decay), (1.0 + step) / (10.0 + step))


def update_ema(ema: Any, model: Any, decay: jnp.ndarray) -> Any:
    """decay * ema + (1 - decay) * model, leaf by leaf, for params and BN statistics alike.

    The BatchNorm running statistics are averaged with the same decay as the weights
    (timm's ModelEmaV2 does the same), so the averaged statistics cover the same window
    of steps as the averaged weights. Recomputing them for the EMA weights would be exact
    but costs a pass over training data at every evaluation.
    """
    return optax.incremental_update(model, ema, step_size=1.0 - decay)


def train_step(
    state: TrainState,
    metrics: TrainMetrics,
    batch: dict[str, jnp.ndarray],
    *,
    learning_rate_fn: optax.Schedule,
    label_smoothing: float,
    normalize: Callable[[jnp.ndarray], jnp.ndarray],
    augmentation: augment.Settings | None = None,
    seed: int = 0,
    ema_decay: float = 0.0,
    ema_warmup: bool = True,
    sam: bool = False,
) -> tuple[TrainState, TrainMetrics]:
    """One step on a global batch of uint8 images; BatchNorm statistics are the whole batch's.

    The images go through `augment.augment_batch` (normalised there) when any of its
    augmentations is on, else straight through `normalize`. With mixup or CutMix the loss
    is the mixing weight's share of the loss against the labels plus the rest against
    those of the reversed batch (the cross-entropy is linear in the targets), and top-1
    and top-5 count against the unmixed labels. With `sam` the optimizer is
    `optax.contrib.sam` in opaque mode: it takes a second gradient at the adversarial
    point, of the same batch; the BatchNorm statistics are those of the first pass.

    Returns the new state and `metrics` merged with this step's.
    """
    labels = batch["label"]
    weight = None
    if augmentation is not None and augmentation.active:
        images, weight = augment.augment_batch(
            augmentation, seed, state.step, batch["image"], normalize
        )
    else:
        images = normalize(batch["image"])

    def loss_fn(params):
        logits, updates = state.apply_fn(
            {"params": params, "batch_stats": state.batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        per_example = cross_entropy(logits, labels, label_smoothing)
        if weight is not None:
            partner = cross_entropy(logits, labels[::-1], label_smoothing)
            per_example = weight * per_example + (1.0 - weight) * partner
        return per_example.mean(), (logits, updates["batch_stats"])

    (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    if sam:

        def adversarial_grad(params, _):
            return jax.grad(loss_fn, has_aux=True)(params)[0]

        updates, opt_state = state.tx.update(
            grads, state.opt_state, state.params, grad_fn=adversarial_grad
        )
        new_state = state.replace(
            step=state.step + 1,
            params=optax.apply_updates(state.params, updates),
            opt_state=opt_state,
            batch_stats=batch_stats,
        )
    else:
        new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
    if ema_decay:
        model = {"params": new_state.params, "batch_stats": new_state.batch_stats}
        decay = ema_decay_at(new_state.step, ema_decay, ema_warmup)
        new_state = new_state.replace(ema=update_ema(state.ema, model, decay))
    top1, top5 = accuracies(logits, labels)
    step_metrics = TrainMetrics.single_from_model_output(
        loss=loss,
        top1=top1,
        top5=top5,
        learning_rate=learning_rate_fn(state.step),
        step=state.step + 1,
    )
    return new_state, metrics.merge(step_metrics)


def predict_logits(
    apply_fn: Callable, variables: dict[str, Any], images: jnp.ndarray, flip: bool = False
) -> jnp.ndarray:
    """The model's logits for normalised images; with `flip`, flip test-time augmentation.

    Flip TTA returns the log of the mean softmax of the images and of their mirror
    images: softmax, argmax, top-k and the cross-entropy of it then all use the averaged
    probabilities.
    """
    logits = apply_fn(variables, images, train=False)
    if not flip:
        return logits
    mirrored = apply_fn(variables, images[:, :, ::-1], train=False)
    return jnp.log((jax.nn.softmax(logits) + jax.nn.softmax(mirrored)) / 2.0)


def eval_step(
    state: TrainState, metrics: EvalMetrics, batch: dict[str, jnp.ndarray], flip: bool = False
) -> EvalMetrics:
    """`metrics` merged with those of one padded batch; examples with mask False count nowhere."""
    logits = predict_logits(
        state.apply_fn,
        {"params": state.params, "batch_stats": state.batch_stats},
        batch["image"],
        flip,
    )
    top1, top5 = accuracies(logits, batch["label"])
    batch_metrics = EvalMetrics.single_from_model_output(
        loss=cross_entropy(logits, batch["label"]),
        top1=top1,
        top5=top5,
        mask=batch["mask"],
    )
    return metrics.merge(batch_metrics)


@functools.cache
def _empty_metrics_fn(cls: type[metrics.Collection], mesh: jax.sharding.Mesh) -> Callable:
    return jax.jit(cls.empty, out_shardings=sharding.replicated(mesh))


def empty_metrics(cls: type[metrics.Collection], mesh: jax.sharding.Mesh) -> Any:
    """An empty `cls` collection replicated over `mesh`, made by a compiled program."""
    return _empty_metrics_fn(cls, mesh)()


def read_metrics(collection: metrics.Collection) -> dict[str, float | int]:
    """Computes a replicated collection on this host: a local copy, no cross-process work."""
    return {k: np.asarray(v).item() for k, v in jax.device_get(collection).compute().items()}


def read_eval_metrics(collection: EvalMetrics) -> dict[str, float | int]:
    """top1, top5, loss and num_examples of an evaluation's merged collection."""
    local = jax.device_get(collection)  # One copy to the host; read_metrics reuses it.
    return {**read_metrics(local), "num_examples": int(local.loss.count)}


# The config keys that `schedule_settings` depends on; batch_size through the steps per
# epoch (as does the dataset's size). A refused resume names those that changed.
SCHEDULE_KEYS = (
    "batch_size",
    "num_epochs",
    "num_train_steps",
    "warmup_epochs",
    "warmup_kind",
    "warmup_factor",
    "lr_schedule",
    "learning_rate",
    "lr_decay_steps",
    "lr_decay_epochs",
    "lr_decay_factor",
)


def schedule_settings(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> dict[str, Any]:
    """Everything that decides the learning rate at each step, in steps.

    A checkpoint records it, so that a resume can tell whether the schedule changed.
    """
    settings = {
        "lr_schedule": config.lr_schedule,
        "learning_rate": config.learning_rate,
        "warmup_steps": int(round(config.warmup_epochs * steps_per_epoch)),
    }
    if config.warmup_kind == "constant" and settings["warmup_steps"]:
        # Only when set, so the records of linear warmups from before it stay equal.
        settings.update(warmup_kind="constant", warmup_factor=config.warmup_factor)
    if config.lr_schedule == "cosine":
        settings["num_train_steps"] = num_train_steps
    elif config.lr_schedule in ("multistep", "piecewise"):
        if config.lr_schedule == "multistep":
            boundaries = [int(s) for s in config.lr_decay_steps]
        else:
            boundaries = [int(round(e * steps_per_epoch)) for e in config.lr_decay_epochs]
        settings.update(decay_steps=boundaries, decay_factor=config.lr_decay_factor)
    return settings


def schedule_warnings(settings: dict[str, Any], num_train_steps: int) -> list[str]:
    """What of the schedule `settings` (`schedule_settings`) a run of `num_train_steps`
    never reaches.

    A recipe's decays and warmup are set for its own budget; a shorter run (fewer epochs
    or steps on the command line) keeps them unless they are changed too.
    """
    warnings = []
    late = [step for step in settings.get("decay_steps", []) if step >= num_train_steps]
    if late:
        key = "lr_decay_steps" if settings["lr_schedule"] == "multistep" else "lr_decay_epochs"
        warnings.append(
            f"The learning rate's decays at steps {late} come at or after the run's end "
            f"(step {num_train_steps}), so the rate is never divided there: set "
            f"--config.{key} to fit the budget if that is not meant."
        )
    if settings["warmup_steps"] >= num_train_steps:
        warnings.append(
            f"The warmup ({settings['warmup_steps']} steps) lasts the whole run of "
            f"{num_train_steps} steps, so the rate never reaches learning_rate: lower "
            "--config.warmup_epochs if that is not meant."
        )
    return warnings


def create_learning_rate_fn(
    config: ml_collections.ConfigDict, steps_per_epoch: int, num_train_steps: int
) -> optax.Schedule:
    """The warmup over `warmup_epochs` (`warmup_kind`), then the configured schedule.

    A linear warmup rises from 0 to the rate; a constant one holds the rate x
    `warmup_factor` and then steps up to it. Boundaries of "multistep" (steps) and
    "piecewise" (epochs) are absolute: they count from the start of training, warmup
    included. One that falls inside the warmup scales the rest of it too (the rate at step
    t is warmup(t) x decay(t)).
    """
    settings = schedule_settings(config, steps_per_epoch, num_train_steps)
    base, warmup = config.learning_rate, settings["warmup_steps"]
    factor = settings.get("warmup_factor")  # Set only for a constant warmup.
    if config.lr_schedule == "cosine":
        main = optax.cosine_decay_schedule(base, max(1, num_train_steps - warmup))
    elif config.lr_schedule == "constant":
        main = optax.constant_schedule(base)
    else:
        decay = optax.piecewise_constant_schedule(
            base, {b: settings["decay_factor"] for b in settings["decay_steps"]}
        )
        if not warmup:
            return decay
        if factor is not None:
            return lambda step: decay(step) * jnp.where(step < warmup, factor, 1.0)
        return lambda step: decay(step) * jnp.minimum(1.0, step / warmup)
    if not warmup:
        return main
    if factor is not None:
        start = optax.constant_schedule(base * factor)
    else:
        start = optax.linear_schedule(0.0, base, warmup)
    return optax.join_schedules([start, main], [warmup])


def create_optimizer(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule
) -> optax.GradientTransformation:
    """SGD with momentum and L2 weight decay added to the gradient (as PyTorch's SGD does).

    Unless `weight_decay_all`, BatchNorm scales/biases and biases (every 1-D parameter)
    are not decayed. With `sam_rho` > 0 it is the outer optimizer of SAM (Foret et al.
    2021, `optax.contrib.sam` in opaque mode): each step first moves the weights by
    sam_rho along the normalised gradient of the loss (weight decay not included), takes
    the gradient there, and applies that one from the original weights. Two forward and
    backward passes per step: about twice the time of a step without it.
    """

    def decay_mask(params):
        return jax.tree.map(lambda p: config.weight_decay_all or p.ndim > 1, params)

    sgd = optax.chain(
        optax.add_decayed_weights(config.weight_decay, mask=decay_mask),
        optax.sgd(learning_rate_fn, momentum=config.momentum or None, nesterov=config.nesterov),
    )
    if not config.sam_rho:
        return sgd
    ascent = optax.chain(optax.contrib.normalize(), optax.sgd(config.sam_rho))
    return optax.contrib.sam(sgd, ascent, opaque_mode=True)


def init_variables(model: nn.Module, image_size: int, rng: jax.Array) -> dict[str, Any]:
    """The model's params and batch_stats for image_size x image_size RGB inputs."""
    image = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
    return model.init(rng, image, train=False)


def variables_template(
    model: nn.Module, image_size: int, placement: jax.sharding.Sharding | None = None
) -> dict[str, Any]:
    """Shapes and dtypes of the model's variables (nothing computed), placed on `placement`."""
    template = jax.eval_shape(
        functools.partial(init_variables, model, image_size), jax.random.key(0)
    )
    if placement is None:
        return template
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), template
    )


def create_train_state(
    config: ml_collections.ConfigDict,
    model: nn.Module,
    tx: optax.GradientTransformation,
    mesh: jax.sharding.Mesh,
) -> TrainState:
    """Initialises parameters from `config.seed`, replicated over the mesh.

    With `ema_decay` > 0 the state keeps an EMA of the model, starting at the initial one.
    """

    def init(rng):
        variables = init_variables(model, config.image_size, rng)
        return TrainState.create(
            apply_fn=model.apply,
            params=variables["params"],
            batch_stats=variables["batch_stats"],
            tx=tx,
            # A copy: the EMA must not share buffers with the params the step donates.
            ema=jax.tree.map(jnp.copy, variables) if config.ema_decay else None,
        )

    return jax.jit(
        init,
        out_shardings=sharding.replicated(mesh),
        compiler_options=compile_options.run_once_options(),
    )(jax.random.key(config.seed))


def with_normalized_images(step_fn: Callable, config: ml_collections.ConfigDict) -> Callable:
    """`step_fn(state, carry, batch)` fed uint8 images, normalised inside the compiled step."""
    mean, std = data.normalization(config)

    def step(state: Any, carry: Any, batch: dict[str, jnp.ndarray]) -> Any:
        return step_fn(state, carry, {**batch, "image": data.normalize(batch["image"], mean, std)})

    return step


def compile_batch_fn(
    step_fn: Callable, mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict
) -> Callable:
    """`carry = step_fn(state, carry, batch)` jitted over `mesh`, for folding over eval batches.

    The batch (uint8 images, normalised inside) is sharded, the state and the carry are
    replicated, and the carry is donated. Evaluation, the report's confusion matrix and the
    layer statistics all fold such a function over `evaluate.eval_loop`'s batches.
    """
    replicated = sharding.replicated(mesh)
    return jax.jit(
        with_normalized_images(step_fn, config),
        in_shardings=(replicated, replicated, sharding.batch_sharding(mesh)),
        out_shardings=replicated,
        donate_argnums=1,
        compiler_options=compile_options.cpu_options(config.cpu_convolutions),
    )


def compile_eval_step(mesh: jax.sharding.Mesh, config: ml_collections.ConfigDict) -> Callable:
    """The jitted eval step for `mesh` (batch sharded, state and metrics replicated).

    With `config.eval_flip`, predictions are flip test-time augmented (`predict_logits`).
    """
    return compile_batch_fn(functools.partial(eval_step, flip=config.eval_flip), mesh, config)


def compile_train_step(
    config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule, mesh: jax.sharding.Mesh
) -> Callable:
    """The jitted train step for `mesh`: (state, metrics, batch) -> (state, metrics), both donated."""
    replicated, batch = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    mean, std = data.normalization(config)
    step = functools.partial(
        train_step,
        learning_rate_fn=learning_rate_fn,
        label_smoothing=config.label_smoothing,
        normalize=functools.partial(data.normalize, mean=mean, std=std),
        augmentation=augment.Settings.from_config(config),
        seed=config.seed,
        ema_decay=config.ema_decay,
        ema_warmup=config.ema_warmup,
        sam=bool(config.sam_rho),
    )
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, batch),
        out_shardings=(replicated, replicated),
        donate_argnums=(0, 1),
        compiler_options=compile_options.cpu_options(config.cpu_convolutions),
    )
