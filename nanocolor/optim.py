"""Adam (Kingma & Ba, 2015) with bias correction, updating every parameter in place."""
from __future__ import annotations

from .backend import array_module


class Adam:
    """One optimizer for all layers: it walks each layer's `params` and `grads` dicts."""

    def __init__(self, layers: list, lr: float = 1e-3, betas: tuple = (0.9, 0.999), eps: float = 1e-8):
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.slots = [(layer.params, layer.grads, name) for layer in layers for name in layer.params]
        self.m = [array_module(p[name]).zeros_like(p[name]) for p, _, name in self.slots]
        self.v = [array_module(p[name]).zeros_like(p[name]) for p, _, name in self.slots]
        self.t = 0

    def step(self) -> None:
        self.t += 1
        beta1, beta2 = self.betas
        # Fold both bias corrections into the step size: lr * sqrt(1-b2^t) / (1-b1^t).
        step_size = self.lr * (1 - beta2 ** self.t) ** 0.5 / (1 - beta1 ** self.t)
        eps_hat = self.eps * (1 - beta2 ** self.t) ** 0.5
        for (params, grads, name), m, v in zip(self.slots, self.m, self.v):
            xp = array_module(m)
            g = grads[name]
            m *= beta1
            m += (1 - beta1) * g
            v *= beta2
            v += (1 - beta2) * (g * g)
            denom = xp.sqrt(v)
            denom += eps_hat
            params[name] -= step_size * (m / denom)

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
            m[...] = state[f"m{i}"]
            v[...] = state[f"v{i}"]
