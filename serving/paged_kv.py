"""Paged KV memory for the serving engine: the three strategies of `looplm.model.kv_cache`, in blocks.

One preallocated pool per cache slot: per_step has N*T slots (one per (step, layer)), last_step and average N
(one per layer). A pool is [num_blocks, block_size, kv_heads, head_dim] for keys and the same for values, all
slots in two tensors allocated once. A sequence owns a list of block ids (its block table), the same ids in
every slot; position p lives at block table[p // block_size], offset p % block_size. Writing a token's keys
is one indexed store per slot; nothing is concatenated, reallocated or copied as a sequence grows.

Reading for attention gathers a batch's blocks into [rows, kv_heads, positions, head_dim] (padded to whole
blocks; the caller masks positions past each row's length). A fused paged-attention kernel would read the
blocks in place; on CPU the gather is the read, and it never writes the cache.

The semantics are the reference's (`model/kv_cache.py`), slot by slot:
- per_step: a token at step t attends to earlier tokens' step-t keys; a token that exited at step e < T has
  its step-e keys written into its deeper slots e+1..T, which is what later tokens read there;
- last_step: one slot per layer holds the last step each token ran (step T for prompt tokens);
- average: one slot per layer holds the mean over the steps each token ran (a running mean while decoding).
"""

from __future__ import annotations

import torch

STRATEGIES = ("per_step", "last_step", "average")


class OutOfBlocksError(RuntimeError):
    """More blocks asked for than are free: admission control should have refused the request."""


class PagedKV:
    def __init__(
        self,
        strategy: str,
        *,
        num_layers: int,
        max_steps: int,
        num_blocks: int,
        block_size: int,
        kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown KV cache strategy {strategy!r}; known: {', '.join(STRATEGIES)}")
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need at least one block of at least one position, got {num_blocks} x {block_size}")
        self.strategy, self.num_layers, self.max_steps = strategy, num_layers, max_steps
        self.num_blocks, self.block_size = num_blocks, block_size
        self.num_slots = num_layers * (max_steps if strategy == "per_step" else 1)
        shape = (self.num_slots, num_blocks, block_size, kv_heads, head_dim)
        self.keys = torch.zeros(shape, dtype=dtype, device=device)
        self.values = torch.zeros(shape, dtype=dtype, device=device)
        self._free = list(range(num_blocks - 1, -1, -1))  # a stack: freed blocks are reused first

    # ---------------------------------------------------------------- sizes and allocation

    def slot(self, step: int, layer: int) -> int:
        """Slot of (1-indexed step, layer): (t-1)*N + l for per_step, l when shared."""
        return (step - 1) * self.num_layers + layer if self.strategy == "per_step" else layer

    def blocks_for(self, positions: int) -> int:
        return -(-positions // self.block_size)

    @property
    def free_blocks(self) -> int:
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def bytes_per_token(self) -> int:
        """KV bytes one position costs across all slots (keys and values)."""
        per_slot = self.keys[0, 0, 0].numel() * self.keys.element_size()
        return 2 * self.num_slots * per_slot

    def nbytes(self) -> int:
        return self.keys.untyped_storage().nbytes() + self.values.untyped_storage().nbytes()

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise OutOfBlocksError(f"asked for {count} KV blocks, {len(self._free)} free")
        return [self._free.pop() for _ in range(count)]

    def release(self, blocks: list[int]) -> None:
        self._free.extend(reversed(blocks))

    # ---------------------------------------------------------------- writes

    def locate(self, table: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(block ids, offsets) of positions: table is one row's block ids, or [rows, blocks] with positions
        [rows] (one position per row)."""
        if table.dim() == 1:
            return table[positions // self.block_size], positions % self.block_size
        return table.gather(1, (positions // self.block_size)[:, None])[:, 0], positions % self.block_size

    def prefill(self, table: torch.Tensor, kv: list[list[tuple[torch.Tensor, torch.Tensor]]]) -> None:
        """Store one prompt's keys and values kv[t][l], each [1, kv_heads, seq, head_dim], all T steps run."""
        steps, seq = len(kv), kv[0][0][0].shape[2]
        blocks, offsets = self.locate(table, torch.arange(seq, device=table.device))
        for layer in range(self.num_layers):
            if self.strategy == "per_step":
                pairs = [(t + 1, kv[t][layer]) for t in range(steps)]
            elif self.strategy == "last_step":
                pairs = [(1, kv[-1][layer])]
            else:  # the same reduction as the reference cache, so the numbers match bit for bit
                k = torch.stack([kv[t][layer][0] for t in range(steps)]).mean(0)
                v = torch.stack([kv[t][layer][1] for t in range(steps)]).mean(0)
                pairs = [(1, (k, v))]
            for step, (k, v) in pairs:
                slot = self.slot(step, layer)
                self.keys[slot, blocks, offsets] = k[0].transpose(0, 1)
                self.values[slot, blocks, offsets] = v[0].transpose(0, 1)

    def record(
        self, step: int, layer: int, where: tuple[torch.Tensor, torch.Tensor], kv: tuple[torch.Tensor, torch.Tensor]
    ) -> None:
        """New tokens' keys and values [rows, kv_heads, 1, head_dim] at (step, layer), at `where` = `locate(...)`.

        Every row at step t has run exactly steps 1..t of its token, which is what average's running mean
        divides by.
        """
        slot = self.slot(step, layer)
        blocks, offsets = where
        for pool, new in ((self.keys, kv[0]), (self.values, kv[1])):
            new = new[:, :, 0]
            if self.strategy == "average" and step > 1:
                old = pool[slot, blocks, offsets]
                pool[slot, blocks, offsets] = old + (new - old) / step
            else:
                pool[slot, blocks, offsets] = new

    def fill_deeper(
        self,
        exit_step: int,
        last_steps: torch.Tensor,
        where: tuple[torch.Tensor, torch.Tensor],
        step_kv: list[tuple[torch.Tensor, torch.Tensor]],
    ) -> None:
        """per_step only: rows that exited at exit_step get its keys in their slots exit_step+1..last_steps[row]."""
        if self.strategy != "per_step":
            return
        blocks, offsets = where
        for deeper in range(exit_step + 1, int(last_steps.max()) + 1):
            rows = last_steps >= deeper
            if not bool(rows.any()):
                continue
            for layer, (k, v) in enumerate(step_kv):
                slot = self.slot(deeper, layer)
                self.keys[slot, blocks[rows], offsets[rows]] = k[rows, :, 0]
                self.values[slot, blocks[rows], offsets[rows]] = v[rows, :, 0]

    # ---------------------------------------------------------------- reads

    def gather(self, step: int, layer: int, tables: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of (step, layer) for rows with block tables [rows, blocks]: [rows, kv_heads, blocks *
        block_size, head_dim] each; positions past a row's length are whatever the blocks hold (mask them)."""
        slot = self.slot(step, layer)
        rows, count = tables.shape

        def read(pool: torch.Tensor) -> torch.Tensor:
            return pool[slot][tables].reshape(rows, count * self.block_size, *pool.shape[-2:]).transpose(1, 2)

        return read(self.keys), read(self.values)
