"""KV caches for decoding a looped model: one strategy per memory/accuracy trade-off (ouro-spec.md §5.2).

A looped model computes keys and values at every (step t, layer l). Prefill always runs all T steps; the
strategies differ in what they keep of them and what a decoded token attends to:

- `per_step` (exact): one cache per (step, layer), N*T slots. A token at step t, layer l attends to the
  earlier tokens' step-t keys. A token that exited early at step e never computed steps e+1..T; its slots
  for those deeper steps hold its step-e keys and values (the deepest it computed). This is what later tokens
  see there, and it is exactly what a full recomputation gives when every token runs all T steps.
- `last_step`: one cache per layer, N slots. Each token keeps the keys and values of the last step it ran
  (step T for prompt tokens); every step of a later token attends to those.
- `average`: one cache per layer, N slots. Each token keeps the mean of its keys and values over the steps it
  ran (steps 1..T for prompt tokens).

The shared strategies hold 1/T of `per_step`'s bytes. Buffers are preallocated for the whole generation,
[batch, kv_heads, capacity, head_dim] per slot, so that writing one position never copies the cache.
"""

from __future__ import annotations

import torch

KV = tuple[torch.Tensor, torch.Tensor]
STRATEGIES = ("per_step", "last_step", "average")


class KVCache:
    def __init__(
        self,
        strategy: str,
        *,
        num_layers: int,
        num_steps: int,
        batch: int,
        kv_heads: int,
        head_dim: int,
        capacity: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown KV cache strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        self.strategy, self.num_layers, self.num_steps = strategy, num_layers, num_steps
        slots = num_layers * (num_steps if strategy == "per_step" else 1)
        shape = (batch, kv_heads, capacity, head_dim)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(slots)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(slots)]
        self.length = 0  # positions written so far; the next decoded token goes to this position

    def _slot(self, step: int, layer: int) -> int:
        """Slot of (1-indexed step, layer): t*N + l as in the official cache, or l when shared."""
        return (step - 1) * self.num_layers + layer if self.strategy == "per_step" else layer

    def nbytes(self) -> int:
        """Bytes of the storage this cache holds, measured on the tensors themselves."""
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in self.keys + self.values}
        return sum(storages.values())

    def prefill(self, kv: list[list[KV]]) -> None:
        """Store a prompt's keys and values, kv[t][l] each [batch, kv_heads, seq, head_dim] (all T steps)."""
        if len(kv) != self.num_steps:
            raise ValueError(f"prefill has {len(kv)} steps, the cache was built for {self.num_steps}")
        seq = kv[0][0][0].shape[2]
        for layer in range(self.num_layers):
            if self.strategy == "per_step":
                pairs = [(t + 1, kv[t][layer]) for t in range(self.num_steps)]
            elif self.strategy == "last_step":
                pairs = [(1, kv[-1][layer])]
            else:
                k = torch.stack([kv[t][layer][0] for t in range(self.num_steps)]).mean(0)
                v = torch.stack([kv[t][layer][1] for t in range(self.num_steps)]).mean(0)
                pairs = [(1, (k, v))]
            for step, (k, v) in pairs:
                slot = self._slot(step, layer)
                self.keys[slot][:, :, :seq] = k
                self.values[slot][:, :, :seq] = v
        self.length = seq

    def past(self, step: int, layer: int, rows: torch.Tensor | None) -> KV:
        """Earlier positions' keys and values for step `step`, layer `layer`; rows=None means all rows."""
        slot = self._slot(step, layer)
        k, v = self.keys[slot][:, :, : self.length], self.values[slot][:, :, : self.length]
        return (k, v) if rows is None else (k[rows], v[rows])

    def record(self, step: int, layer: int, rows: torch.Tensor | None, kv: KV) -> None:
        """The new token's keys and values [rows, kv_heads, 1, head_dim] at (step, layer).

        A row that is active at step t has run exactly steps 1..t for this token, which is what the running
        mean of `average` divides by.
        """
        slot, pos = self._slot(step, layer), self.length
        index = slice(None) if rows is None else rows
        for buffer, new in ((self.keys[slot], kv[0]), (self.values[slot], kv[1])):
            if self.strategy == "average" and step > 1:
                old = buffer[index, :, pos : pos + 1]
                buffer[index, :, pos : pos + 1] = old + (new - old) / step
            else:
                buffer[index, :, pos : pos + 1] = new

    def commit(self, exit_steps: torch.Tensor, rows: torch.Tensor | None) -> None:
        """Close the new position once every row has exited; exit_steps is 1-indexed, per row of `rows`."""
        if self.strategy == "per_step":
            pos = self.length
            row_ids = torch.arange(exit_steps.shape[0], device=exit_steps.device) if rows is None else rows
            for exit_step in range(1, self.num_steps):
                exited = row_ids[exit_steps == exit_step]
                if exited.numel() == 0:
                    continue
                for layer in range(self.num_layers):
                    source = self._slot(exit_step, layer)
                    for deeper in range(exit_step + 1, self.num_steps + 1):
                        target = self._slot(deeper, layer)
                        self.keys[target][exited, :, pos] = self.keys[source][exited, :, pos]
                        self.values[target][exited, :, pos] = self.values[source][exited, :, pos]
        self.length += 1
