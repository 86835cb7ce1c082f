"""Data-parallel learning: K processes in one torch.distributed group take every training step together.

    init_group(rank, world_size, "tcp://127.0.0.1:29500")   # gloo on the CPU, nccl on GPUs (or torchrun's env://)
    learner = DataParallelLearner(model_cfg, train_cfg)      # same configs on every rank: joins the group
    learner.observe_items(item_events_this_rank_read)        # every rank, every round, in the same order ...
    metrics = learner.learn(feedback_of_my_partitions, histories)   # ... with or without events of its own
    leave_group()                                            # at the end: a barrier, then the group goes

One step of K ranks is one step of a single learner on the ranks' batches concatenated in rank order, within float
rounding (tests/test_distributed.py):
  - every rank takes part in every step, with or without examples of its own (it contributes zeros), so all ranks
    call the same collectives in the same order and none waits for a rank that skipped;
  - the loss is normalised by the step's GLOBAL example count M: a rank with M_r examples back-propagates
    loss_r * M_r / M and the gradients are summed (one all-reduce), which is the gradient of the whole batch's
    mean loss; every rank then applies the same Adam step to the same sum, so the parameters stay identical
    (rank 0's are broadcast once, when a learner joins or restores);
  - the codebooks' update (EMA sums and counts, k-means initialisation, dead-code revival) and the item counts
    behind logQ read the items consumed by the WHOLE step: the ranks' targets (M ids) are gathered in rank order
    and every rank runs the single-process update on them. That is the additive all-reduce of the EMA statistics
    and more: k-means and revival need the vectors themselves, and M ids are fewer bytes than L x C x D sums.
    Rank 0's resulting codebook buffers are then broadcast, so a draw or a rounding that differs between ranks
    (attribute dropout, GPU atomics) can never split the codebooks;
  - every rank holds the same vocabulary and item table: item events are applied by every rank in one order (each
    rank's events, gathered in rank order), and so are the step's feedback targets (each rank's item ids,
    gathered in rank order) before any rank maps its own examples to rows.
Only approximated by K ranks, as by any data-parallel trainer: terms that are not sums over examples (in-batch
negatives of retrieval_loss="sampled", shuffle BPR: a rank's negatives come from its own rows) and dropout (a
rank draws masks for its own rows). Collectives carry tensors (and JSON bytes for item events), never pickles.
"""

from __future__ import annotations

import json
import math
from collections.abc import Hashable, Iterable, Mapping, Sequence
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

from trainer.batches import Batch
from trainer.config import CatalogueConfig, SparcConfig, TrainConfig
from trainer.online import Observed, OnlineLearner, next_item_batch
from trainer.step import Trainer, finite_gradients


def init_group(rank: int, world_size: int, init_method: str = "env://", backend: str | None = None,
               timeout_s: float = 300.0) -> None:
    """Join the default process group: gloo for CPU learners, nccl when this process has a GPU (backend None;
    with nccl, give each rank's learner its own GPU: device cuda:LOCAL_RANK). `timeout_s` bounds every
    collective: a rank that stops answering fails the others instead of hanging them."""
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and dist.is_nccl_available() else "gloo"
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))


def leave_group() -> None:
    """Leave the default process group: wait for every rank first (a barrier), so that no rank tears its
    connections down while another still uses them (gloo can abort the process then), and destroy it."""
    try:
        dist.barrier()
    finally:
        dist.destroy_process_group()


class DataParallel:
    """The collectives of a data-parallel step over one process group (the default group if None).

    Every method is a collective: every rank of the group calls it, in the same order, with tensors of the
    same kind. Tensors travel on `device` (the model's: cpu for gloo, cuda for nccl).
    """

    def __init__(self, device: torch.device, group: dist.ProcessGroup | None = None):
        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call trainer.distributed.init_group first")
        self.device, self.group = torch.device(device), group
        if self.device.type == "cuda":  # nccl runs its collectives on the current device
            torch.cuda.set_device(self.device)
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.src = dist.get_global_rank(group, 0) if group is not None else 0  # the group's rank 0

    # ------------------------------------------------------------------ primitives
    def gather_ints(self, values: Sequence[int]) -> torch.Tensor:
        """Each rank's `values` (same length everywhere) -> (K, n) int64 on the CPU, row r = rank r's."""
        mine = torch.tensor(list(values), dtype=torch.long, device=self.device)
        rows = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(rows, mine, group=self.group)
        return torch.stack(rows).cpu()

    def gather_rows(self, x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
        """Each rank's rows x (n_r, ...) concatenated in rank order; `sizes` = every rank's n_r (gather_ints)."""
        width = max(sizes)
        padded = x.new_zeros(width, *x.shape[1:])
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])

    def gather_json(self, value) -> list:
        """Each rank's JSON-able `value`, as a list in rank order (UTF-8 JSON bytes on the wire, not pickles)."""
        data = torch.frombuffer(bytearray(json.dumps(value).encode()), dtype=torch.uint8).to(self.device)
        sizes = self.gather_ints([data.numel()])[:, 0].tolist()
        joined = self.gather_rows(data, sizes).cpu().numpy().tobytes()
        out, start = [], 0
        for n in sizes:
            out.append(json.loads(joined[start : start + n]))
            start += n
        return out

    def broadcast_(self, tensors: Iterable[torch.Tensor]) -> None:
        """Overwrite `tensors` with rank 0's (one flat message per dtype)."""
        by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
        for t in tensors:
            by_dtype.setdefault(t.dtype, []).append(t)
        for group in by_dtype.values():
            flat = torch.cat([t.reshape(-1) for t in group])
            if flat.dtype == torch.bool:  # flags travel as bytes (not every backend reduces or sends bool)
                flat = flat.to(torch.uint8)
            dist.broadcast(flat, src=self.src, group=self.group)
            offset = 0
            for t in group:
                t.copy_(flat[offset : offset + t.numel()].view(t.shape))
                offset += t.numel()

    # ------------------------------------------------------------------ model state
    def join(self, module: nn.Module) -> None:
        """Make every rank's parameters and buffers rank 0's (after building or restoring a model). Raises
        ValueError on every rank when the ranks' tensors differ in shape (another snapshot, another catalogue)."""
        tensors = [*module.parameters(), *module.buffers()]
        counts = self.gather_ints([len(tensors)])  # first: the sizes below are gathered only if they line up
        shapes = self.gather_ints([t.numel() for t in tensors]) if bool((counts == counts[0]).all()) else counts
        if not bool((shapes == shapes[0]).all()):
            differ = (shapes != shapes[0]).any(dim=0).nonzero().flatten().tolist()
            raise ValueError(f"the ranks' models differ in shape (tensors {differ}): ranks must start from the "
                             "same config and snapshot")
        with torch.no_grad():
            self.broadcast_(tensors)

    def in_sync(self, module: nn.Module) -> bool:
        """Whether every rank's parameters and buffers equal rank 0's bit for bit (a check, not a repair)."""
        with torch.no_grad():
            mine = [t.detach().clone() for t in (*module.parameters(), *module.buffers())]
            theirs = [t.clone() for t in mine]
            self.broadcast_(theirs)
            same = all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))
        return bool(self.gather_ints([int(same)]).all())

    # ------------------------------------------------------------------ the step
    def step(self, trainer: Trainer, batch: Batch | None) -> dict:
        """One training step of the group (see the module doc); batch None: no examples on this rank. Returns
        the step's global "loss" and "step_examples", this rank's loss terms (when it had examples), "revived"
        and "step". Raises FloatingPointError on every rank when the global loss or a summed gradient is not finite
        (nothing changes)."""
        model = trainer.model
        model.train()
        y = batch.targets[batch.targets > 0] if batch is not None else torch.zeros(0, dtype=torch.long,
                                                                                   device=trainer.device)
        sizes = self.gather_ints([y.numel()])[:, 0].tolist()
        total = sum(sizes)
        if not total:
            raise ValueError("a data-parallel step needs an example on some rank")
        trainer.optimizer.zero_grad(set_to_none=True)
        metrics: dict = {}
        loss_part = 0.0
        if y.numel():
            loss, metrics = model.loss(batch)
            share = y.numel() / total
            (loss * share).backward()
            loss_part = metrics["loss"] * share
        global_loss = self._sum_gradients(list(model.parameters()), loss_part)
        if not math.isfinite(global_loss):
            raise FloatingPointError(f"non-finite loss at step {trainer.steps} (rank {self.rank}: {metrics})")
        if not finite_gradients(list(model.parameters())):  # all-reduced: every rank refuses together
            trainer.optimizer.zero_grad(set_to_none=True)
            raise FloatingPointError(f"non-finite gradient at step {trainer.steps} under a finite loss "
                                     f"(rank {self.rank}: {metrics})")
        trainer.optimizer.step()
        consumed = self.gather_rows(y.to(self.device), sizes).to(trainer.device)
        metrics.update(model.update_from_items_(consumed, trainer.generator))
        self.broadcast_(model.rq.buffers())
        trainer.steps += 1
        return {**metrics, "loss": global_loss, "step_examples": total, "step": trainer.steps}

    def _sum_gradients(self, params: list[nn.Parameter], loss_part: float) -> float:
        """All-reduce (sum) every parameter's gradient and the loss parts in one message; a parameter no rank
        gave a gradient keeps None (as in a single process, Adam then leaves it alone). Returns the loss sum."""
        flat = torch.cat([
            *(p.grad.reshape(-1) if p.grad is not None else p.new_zeros(p.numel()) for p in params),
            torch.tensor([float(p.grad is not None) for p in params] + [loss_part], device=self.device),
        ])
        dist.all_reduce(flat, group=self.group)
        offset, n = 0, len(params)
        has_grad = flat[-n - 1 : -1].tolist()
        for p, had in zip(params, has_grad, strict=True):
            p.grad = flat[offset : offset + p.numel()].view_as(p) if had else None
            offset += p.numel()
        return float(flat[-1])


class DataParallelLearner(OnlineLearner):
    """An OnlineLearner that takes every step together with the other ranks of its process group.

    Every rank builds it with the same configs (and restores the same snapshot, if any); its `learn` and
    `observe_items` are collectives: each round, every rank calls them in the same order, with its own events
    (possibly none). Rank 0 captures and publishes; every rank holds the same model.
    """

    def __init__(self, model_cfg: SparcConfig, train_cfg: TrainConfig, device: str | torch.device = "cpu",
                 group: dist.ProcessGroup | None = None, catalogue: CatalogueConfig | None = None):
        super().__init__(model_cfg, train_cfg, device, catalogue)
        self.parallel = DataParallel(self.trainer.device, group)
        self._attach()

    def _attach(self) -> None:
        self.trainer.parallel = self.parallel
        self.parallel.join(self.model)

    def restore(
        self,
        config: Mapping,
        weights: Mapping[str, torch.Tensor],
        steps: int = 0,
        item_ids: Sequence[int | str] | None = None,
    ) -> list[str]:
        """OnlineLearner.restore on every rank (the same snapshot), then rank 0's model everywhere."""
        bridged = super().restore(config, weights, steps, item_ids)
        self._attach()
        return bridged

    def observe_items(self, item_events: Iterable[Mapping]) -> Observed:
        """OnlineLearner.observe_items with every rank's item events (JSON-able mappings), in rank order."""
        everyone = self.parallel.gather_json([dict(e) for e in item_events])
        return super().observe_items(e for events in everyone for e in events)

    def learn(self, events: Sequence[Mapping], histories: Mapping[Hashable, Sequence[int | str]]) -> dict:
        """OnlineLearner.learn for the group: this rank's events and histories, one step of all ranks' examples.
        Every rank's targets are admitted on every rank, in rank order, so the vocabularies stay one. Returns
        this rank's "examples", "skipped", "unlearnt", "evicted" and "history_dropped", the step's
        "step_examples" and the step's metrics (no step when no rank has an example)."""
        everyone = self.parallel.gather_json([e["item_id"] for e in events])
        evicted = self._admit_targets([item for targets in everyone for item in targets])
        examples, out = self._examples(events, histories)
        out["evicted"] = len(evicted)
        if not int(self.parallel.gather_ints([len(examples)]).sum()):
            return {**out, "step_examples": 0, "step": self.steps}
        return {**self._step(next_item_batch(examples, self.max_len) if examples else None), **out}
