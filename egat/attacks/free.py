"""Free adversarial training's perturbation: Shafahi et al., "Adversarial Training for Free!",
NeurIPS 2019.
"""

from __future__ import annotations

import torch
from torch import nn

from egat.attacks.base import Attack, attack_registry


@attack_registry.register("free")
class FreePerturbation(Attack):
    """A persistent perturbation delta, updated by the gradient of the training step itself.

    ``attack(x, y)`` returns ``clip(x + delta, 0, 1)`` as a graph leaf and costs no extra pass: the
    training loss's backward delivers d loss / d x', and a hook on x' then takes the FGSM step
    ``delta <- clip(delta + eps * sign(d loss / d x'), -eps, eps)``. With the Trainer replaying each
    minibatch ``replays`` (m) times in a row, delta grows over the replays of a batch and carries on
    to the next batch (the paper's "warm start"); ``train.steps`` counts optimizer steps, so a run
    sees steps / m distinct minibatches, the paper's epochs / m. delta restarts at zero when the
    batch shape changes. ``model_mode`` plays no part: the model runs as the training step has it.

    Shapes: x (B, C, H, W) in [0, 1], y (B,) (unused) -> x' (B, C, H, W), requiring grad.

    Example::

        free = FreePerturbation(model, eps=8 / 255, replays=4)
        for _ in range(free.replays):              # the Trainer does this through its sampler
            loss = F.cross_entropy(model(free(x, y)), y)
            loss.backward()                        # updates the weights' .grad and delta
            optimizer.step(); optimizer.zero_grad()
    """

    training_only = True

    def __init__(self, model: nn.Module, eps: float, replays: int = 4):
        super().__init__(model, eps)
        if replays < 1:
            raise ValueError(f"{type(self).__name__}: replays must be >= 1, got {replays}")
        self.replays = int(replays)
        self.delta: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = x.detach()
        if self.delta is not None and self.delta.device != x.device:  # restored from a checkpoint
            self.delta = self.delta.to(x.device)
        if self.delta is None or self.delta.shape != x.shape:
            self.delta = torch.zeros_like(x)
        x_adv = (x + self.delta).clamp_(0.0, 1.0)
        if torch.is_grad_enabled() and self.eps > 0:
            x_adv.requires_grad_(True).register_hook(self._ascend)
        return x_adv

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {} if self.delta is None else {"delta": self.delta.detach().clone()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.delta = state.get("delta")

    @classmethod
    def reshard(
        cls, states: list[dict[str, torch.Tensor]], world_size: int
    ) -> list[dict[str, torch.Tensor]]:
        """The global batch's perturbation split among ``world_size`` ranks: rank r of W trains on
        examples r, r + W, ... of each global batch (``StepBatchSampler``), so the old ranks'
        deltas interleave back into one delta of the global batch and new rank r takes its rows
        r::world_size. Every example keeps its perturbation, as a run of the new size would have
        it. Ranks that saved none, or shards that do not tile one batch: delta restarts at zero."""
        deltas = [state.get("delta") for state in states]
        fresh = [{} for _ in range(world_size)]
        if not deltas or any(d is None for d in deltas):
            return fresh
        old, total = len(deltas), sum(len(d) for d in deltas)
        if (len({tuple(d.shape[1:]) for d in deltas}) != 1
                or any(len(d) != len(range(r, total, old)) for r, d in enumerate(deltas))):
            return fresh
        whole = deltas[0].new_empty((total, *deltas[0].shape[1:]))
        for r, d in enumerate(deltas):
            whole[r::old] = d
        return [{"delta": whole[r::world_size].clone()} for r in range(world_size)]

    def _ascend(self, grad: torch.Tensor) -> None:
        with torch.no_grad():
            self.delta.add_(grad.sign(), alpha=self.eps).clamp_(-self.eps, self.eps)
