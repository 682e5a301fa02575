"""The optimizer: SGD with momentum, PyTorch semantics, and its learning-rate schedule.

The reference recipe steps the rate by `lr_gamma` at epoch milestones (`schedule="step"`);
the modern recipe's cosine decay (`schedule="cosine"`, to 0 at the last step) and a linear
warm-up (`warmup_epochs`, with either schedule) are options. The schedule is a pure function of
the step count, so a resumed run gets the same rates.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import optax

from idsnn_jax.checks import check_fields, is_int

SCHEDULES = ("step", "cosine")


@dataclasses.dataclass(frozen=True)
class OptimizerOptions:
    """SGD with momentum and a learning-rate schedule (the reference recipe's defaults).

    `schedule="step"`: the rate is multiplied by `lr_gamma` at each milestone epoch;
    `lr_interval > 0` steps it every `lr_interval` epochs and takes precedence over the
    explicit `lr_milestones`. `schedule="cosine"`: `lr * (1 + cos(pi * p)) / 2` with p the
    fraction of the post-warm-up steps done (0 at the first, 1 after the last).
    `warmup_epochs > 0`: the rate rises linearly over that many epochs, `lr * (s + 1) / W` at
    step s of W warm-up steps, before either schedule (the step schedule's milestones stay
    absolute epochs). Invalid values raise ValueError naming the field.
    """

    learning_rate: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_milestones: tuple[int, ...] = (60, 120, 160)
    lr_interval: int = 0
    lr_gamma: float = 0.1
    schedule: str = "step"
    warmup_epochs: int = 0

    def __post_init__(self) -> None:
        milestones = list(self.lr_milestones)
        checks = (
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("momentum", 0 <= self.momentum < 1, "in [0, 1)"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            (
                "lr_milestones",
                all(is_int(m) and m > 0 for m in milestones) and milestones == sorted(milestones),
                "increasing positive epochs",
            ),
            ("lr_interval", is_int(self.lr_interval) and self.lr_interval >= 0, "an int >= 0"),
            ("lr_gamma", 0 < self.lr_gamma <= 1, "in (0, 1]"),
            ("schedule", self.schedule in SCHEDULES, f"one of {list(SCHEDULES)}"),
            (
                "warmup_epochs",
                is_int(self.warmup_epochs) and self.warmup_epochs >= 0,
                "an int >= 0",
            ),
        )
        check_fields(self, checks)

    def milestones(self, num_epochs: int) -> list[int]:
        """Epochs at which the step schedule multiplies the learning rate by `lr_gamma`."""
        if self.lr_interval:
            return list(range(self.lr_interval, num_epochs, self.lr_interval))
        return [int(m) for m in self.lr_milestones if 0 < int(m) < num_epochs]


def lr_schedule(options: OptimizerOptions, steps_per_epoch: int, num_epochs: int) -> optax.Schedule:
    """The learning rate at each step count (see `OptimizerOptions`)."""
    lr, total = options.learning_rate, steps_per_epoch * num_epochs
    warmup = min(options.warmup_epochs * steps_per_epoch, total)
    if options.schedule == "cosine":
        span = max(total - warmup, 1)
        main = lambda s: lr * 0.5 * (1 + jnp.cos(math.pi * jnp.clip((s - warmup) / span, 0, 1)))
    else:
        main = optax.piecewise_constant_schedule(
            lr, {m * steps_per_epoch: options.lr_gamma for m in options.milestones(num_epochs)}
        )
    if not warmup:
        return main
    return lambda s: jnp.where(s < warmup, lr * (s + 1) / warmup, main(s))


def same_rates(
    options: OptimizerOptions, steps_per_epoch: int, trained: int, epochs: tuple[int, int]
) -> bool:
    """Whether steps 0 .. trained - 1 get the same learning rate in a run of `epochs[0]` epochs
    as in one of `epochs[1]` (up to the base rate, which a diverged run may lower)."""
    shape = dataclasses.replace(options, learning_rate=1.0)
    steps = np.arange(trained)
    rates = [
        np.broadcast_to(lr_schedule(shape, steps_per_epoch, n)(steps), steps.shape) for n in epochs
    ]
    return bool(np.array_equal(*rates))


def create_optimizer(
    options: OptimizerOptions, steps_per_epoch: int, num_epochs: int
) -> tuple[optax.GradientTransformation, optax.Schedule]:
    """SGD with momentum, PyTorch semantics: weight decay added to the gradient (of every
    parameter) before momentum; the rate from `lr_schedule`."""
    schedule = lr_schedule(options, steps_per_epoch, num_epochs)
    tx = optax.chain(
        optax.add_decayed_weights(options.weight_decay),
        optax.sgd(schedule, momentum=options.momentum),
    )
    return tx, schedule
