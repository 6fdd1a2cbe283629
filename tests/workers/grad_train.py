"""Worker: data-parallel training of a small transformer with average_gradients.

Every rank trains the same model (same seed) on its share of each batch and
averages the gradients; every rank also trains the model alone on the full
batches (the single-process reference). After STEPS steps of Adam:

- float32 on the wire: parameters equal the reference within PARAM_TOLERANCE
  (max absolute difference), and the losses within LOSS_TOLERANCE;
- bfloat16 on the wire: the loss curve stays within BF16_LOSS_BOUND of the
  float32 one at every step, and training still learns;
- without averaging, the parameters drift far from the reference (the check
  above can fail).

Exits non-zero (an assertion) on failure.
"""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_flatten

import mlxdist
from mlxdist.nn.gradients import average_gradients

STEPS = 25
BATCH = 16
SEQUENCE = 12
VOCAB = 32
PARAM_TOLERANCE = 1e-5
LOSS_TOLERANCE = 1e-5
BF16_LOSS_BOUND = 0.05


class TinyTransformer(nn.Module):
    """A one-layer causal transformer language model."""

    def __init__(self, vocab: int = VOCAB, dims: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab, dims)
        self.position = nn.Embedding(SEQUENCE, dims)
        self.encoder = nn.TransformerEncoder(num_layers=1, dims=dims, num_heads=heads, mlp_dims=64)
        self.head = nn.Linear(dims, vocab)

    def __call__(self, tokens: mx.array) -> mx.array:
        length = tokens.shape[1]
        x = self.embedding(tokens) + self.position(mx.arange(length))
        mask = nn.MultiHeadAttention.create_additive_causal_mask(length)
        return self.head(self.encoder(x, mask))


def batches() -> list[mx.array]:
    """Arithmetic sequences modulo VOCAB: the next token is learnable from the context."""
    rng = np.random.default_rng(7)
    out = []
    for _ in range(STEPS):
        start = rng.integers(0, VOCAB, (BATCH, 1))
        stride = rng.integers(1, 4, (BATCH, 1))
        out.append(mx.array((start + stride * np.arange(SEQUENCE + 1)) % VOCAB))
    return out


def loss_fn(model: TinyTransformer, tokens: mx.array) -> mx.array:
    """Mean next-token cross-entropy over the rows given."""
    logits = model(tokens[:, :-1])
    return nn.losses.cross_entropy(logits, tokens[:, 1:], reduction="mean")


def train(
    rows: slice, group: mlxdist.Group | None, communication_type: mx.Dtype | None = None
) -> tuple[list[tuple[str, mx.array]], list[float]]:
    """Train from the same initialisation on ``rows`` of every batch.

    Args:
        rows: This process's rows of each batch.
        group: Average gradients (and report losses) over this group; None
            trains alone.
        communication_type: average_gradients' wire dtype.

    Returns:
        The final parameters (flattened) and the loss at each step.
    """
    mx.random.seed(0)
    model = TinyTransformer()
    optimizer = optim.Adam(learning_rate=3e-3)
    step = nn.value_and_grad(model, loss_fn)
    losses = []
    for tokens in batches():
        loss, grads = step(model, tokens[rows])
        if group is not None:
            grads = average_gradients(grads, group, communication_type=communication_type)
            loss = group.all_sum(loss) / group.size()
        optimizer.update(model, grads)
        mx.eval(model.parameters(), optimizer.state)
        losses.append(loss.item())
    return tree_flatten(model.parameters()), losses


def max_difference(a: list[tuple[str, mx.array]], b: list[tuple[str, mx.array]]) -> float:
    """The largest absolute difference between two flattened parameter trees."""
    assert [k for k, _ in a] == [k for k, _ in b]
    return max(mx.abs(x - y).max().item() for (_, x), (_, y) in zip(a, b))


def main() -> None:
    """Train three ways and compare with the single-process reference."""
    group = mlxdist.init()
    size, rank = group.size(), group.rank()
    assert size > 1 and BATCH % size == 0, f"cannot split a batch of {BATCH} over {size} ranks"
    share = slice(rank * BATCH // size, (rank + 1) * BATCH // size)
    reference, reference_losses = train(slice(None), None)

    parallel, losses = train(share, group)
    param_error = max_difference(parallel, reference)
    loss_error = max(abs(a - b) for a, b in zip(losses, reference_losses))
    assert param_error <= PARAM_TOLERANCE, f"parameters differ by {param_error}"
    assert loss_error <= LOSS_TOLERANCE, f"losses differ by {loss_error}"
    assert losses[-1] < 0.5 * losses[0], f"the model did not learn: {losses}"

    _, bf16_losses = train(share, group, mx.bfloat16)
    bf16_gap = max(abs(a - b) for a, b in zip(bf16_losses, losses))
    assert bf16_gap <= BF16_LOSS_BOUND, f"bfloat16 loss curve off by {bf16_gap}"
    assert bf16_losses[-1] < 0.5 * bf16_losses[0], f"bfloat16 run did not learn: {bf16_losses}"

    alone, _ = train(share, None)
    drift = max_difference(alone, reference)
    assert drift > 100 * PARAM_TOLERANCE, f"training without averaging matched too: {drift}"

    print(
        f"grad_train rank {rank}/{size} {group.backend.value}: {STEPS} steps, loss "
        f"{losses[0]:.3f} -> {losses[-1]:.3f}; max |param - reference| {param_error:.2e} "
        f"(tolerance {PARAM_TOLERANCE:.0e}), max loss gap {loss_error:.2e}; bfloat16 wire: "
        f"max loss gap {bf16_gap:.4f} (bound {BF16_LOSS_BOUND}); unaveraged drift {drift:.2e}",
        flush=True,
    )


if __name__ == "__main__":
    main()
