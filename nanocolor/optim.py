"""Adam (Kingma & Ba, 2015) with bias correction, updating every parameter in place."""
from __future__ import annotations

import math

from typing import Callable

from .backend import array_module, on_host


class Adam:
    """One optimizer for all layers: it walks each layer's `params` and `grads` dicts.

    `map_tasks(task, n)` runs task(0) .. task(n - 1), one per parameter array: in turn by default,
    or over CPU threads (engine.map_tasks()) for parameters on the host.
    """

    def __init__(self, layers: list, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8,
                 map_tasks: Callable[[Callable[[int], None], int], None] | None = None):
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.map_tasks = map_tasks
        self.slots = [(layer.params, layer.grads, name) for layer in layers for name in layer.params]
        self.m = [array_module(p[name]).zeros_like(p[name]) for p, _, name in self.slots]
        self.v = [array_module(p[name]).zeros_like(p[name]) for p, _, name in self.slots]
        self._tmp: list = [None] * len(self.slots)  # one scratch array per parameter, made on first step
        self.t = 0

    def step(self) -> None:
        self.t += 1
        beta1, beta2 = self.betas
        # Fold both bias corrections into the step size: lr * sqrt(1-b2^t) / (1-b1^t).
        step_size = self.lr * (1 - beta2 ** self.t) ** 0.5 / (1 - beta1 ** self.t)
        eps_hat = self.eps * (1 - beta2 ** self.t) ** 0.5

        def update(i: int) -> None:
            params, grads, name = self.slots[i]
            m, v, g = self.m[i], self.v[i], grads[name]
            xp = array_module(m)
            tmp = self._tmp[i]
            if tmp is None or tmp.shape != m.shape or tmp.dtype != m.dtype or array_module(tmp) is not xp:
                tmp = self._tmp[i] = xp.empty_like(m)
            # In place, no temporaries: m += (1 - b1)(g - m), v += (1 - b2)(g^2 - v).
            xp.subtract(g, m, out=tmp)
            tmp *= 1 - beta1
            m += tmp
            xp.multiply(g, g, out=tmp)
            tmp -= v
            tmp *= 1 - beta2
            v += tmp
            # p -= step_size * m / (sqrt(v) + eps_hat)
            xp.sqrt(v, out=tmp)
            tmp += eps_hat
            xp.divide(m, tmp, out=tmp)
            tmp *= step_size
            params[name] -= tmp

        if self.map_tasks is not None and all(on_host(m) for m in self.m):  # threads for host arrays only
            self.map_tasks(update, len(self.slots))
        else:
            for i in range(len(self.slots)):
                update(i)

    def state_dict(self) -> dict:
        state = {"t": self.t}
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            state[f"m{i}"], state[f"v{i}"] = m, v
        return state

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        for i, (m, v) in enumerate(zip(self.m, self.v)):
            if state[f"m{i}"].shape != m.shape:
                raise ValueError(f"optimizer state m{i} has shape {state[f'm{i}'].shape}, expected {m.shape}")
            xp = array_module(m)  # a checkpoint's state is host data: copy it onto the parameters' device
            m[...] = xp.asarray(state[f"m{i}"], dtype=m.dtype)
            v[...] = xp.asarray(state[f"v{i}"], dtype=v.dtype)


SCHEDULES = ("constant", "cosine")
COSINE_FLOOR = 0.01  # cosine decays to this share of the peak lr, never to zero


def scheduled_lr(lr: float, step: int, total_steps: int, schedule: str = "constant", warmup: int = 0) -> float:
    """The learning rate of global step `step` (0-based) of `total_steps`.

    constant: lr throughout. cosine: half a cosine from lr down to COSINE_FLOOR * lr at the last
    step. Either way the first `warmup` steps ramp linearly up to lr (Adam's first steps are big
    when its second-moment estimate is still small).
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    span = max(total_steps - warmup - 1, 1)
    progress = min((step - warmup) / span, 1.0)
    return lr * (COSINE_FLOOR + (1 - COSINE_FLOOR) * 0.5 * (1 + math.cos(math.pi * progress)))
