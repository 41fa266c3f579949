"""Data-parallel training over several processes: PyTorch's DistributedDataParallel.

Launch with ``synthehr train --nproc N`` (which relaunches itself under ``torch.distributed.run``,
i.e. torchrun, with :func:`launch`), or with torchrun directly::

    torchrun --standalone --nproc-per-node 2 -m app.cli train --source uci --data D --out OUT

Every process (rank) runs :func:`training.trainer.train`; :func:`context` joins the process
group that torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``,
``MASTER_PORT``) describes, with gloo for a CPU run and NCCL for a CUDA one (rank r on GPU
``LOCAL_RANK``). What the trainer does with it:

- **Batches**: every rank builds the same batches from the seeded generator and collates each
  whole batch with it, so the corrupted examples are exactly those of a one-process run; a rank
  trains on its rows of the batch (rows ``rank, rank + N, ...`` of the length-sorted batch, so
  the ranks' shares are about equally long) and DDP averages the gradients, each rank's loss
  weighted by its share of the batch's target tokens. The token-mean NLL's gradient is then that
  of the whole batch (the regularisers, when on, are weighted by the same shares): one optimizer
  step per batch on every rank, so the number of steps, the learning-rate schedule and the
  effective batch are those of one process. A batch with fewer patients than ranks (a patient
  over the token budget is a batch of its own) leaves the last ranks a row at weight 0.
- **Randomness**: the batches and the corruption come from ``train.seed`` and the epoch as in
  one process; dropout draws from a per-rank seed (:meth:`Context.seed`). A run is reproducible
  for a given number of processes; with another number it differs by dropout and by float
  rounding only (same data, same steps).
- **Rank 0 decides**: validation, the fidelity sample, the plan of the time budget (rank 0's
  clock, :meth:`Context.share`), early stopping, the checkpoint, the test evaluation, the
  calibration, the bundle and the ONNX export happen on rank 0; the others take its decisions
  and return from ``train`` when training ends. Resuming reads rank 0's checkpoint on every rank.
- **Not supported**: DP-SGD (Opacus' per-sample clipping and accountant assume one process).

One process (``WORLD_SIZE`` unset or 1) gets :data:`SINGLE`, whose methods change nothing.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from training.dataset import TOKENS, Batch
from training.objective import LossOutput

__all__ = ["SINGLE", "Context", "LaunchError", "backend_for", "context", "launch", "session",
           "teardown"]

# Rank 0 validates, samples, calibrates and writes the bundle while the others wait on it; a
# rank that dies ends the run through torchrun, so the wait may be long
TIMEOUT = datetime.timedelta(hours=12)


def backend_for(device: str) -> str:
    """The process group's backend for a ``train.device``: NCCL on CUDA, else gloo."""
    return "nccl" if str(device).startswith("cuda") else "gloo"


class _GradScale(torch.autograd.Function):
    """Identity forward; the gradient times ``scale`` (the value stays the rank's own loss)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


class _Loss(torch.nn.Module):
    """The whole loss as one module, so DDP sees every parameter the loss uses."""

    def __init__(self, model: torch.nn.Module,
                 loss: Callable[[torch.nn.Module, Batch], LossOutput]) -> None:
        super().__init__()
        self.model = model
        self._loss = loss

    def forward(self, batch: Batch) -> tuple[torch.Tensor, LossOutput]:
        out = self._loss(self.model, batch)
        return out.loss, out


def shard_rows(n_rows: int, rank: int, world: int) -> np.ndarray:
    """The rows of an ``n_rows`` batch that ``rank`` trains on: ``rank, rank + world, ...``."""
    return np.arange(rank, n_rows, world)


@dataclasses.dataclass(frozen=True)
class Context:
    """This process's place in the run: ``rank`` of ``world`` processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check(self, dp_epsilon: float) -> None:
        """Refuse what does not run on several processes (DP-SGD)."""
        if self.active and dp_epsilon > 0:
            raise ValueError(f"differential privacy (DP-SGD) runs in one process only; "
                             f"train with --nproc 1 (this run has {self.world} processes)")

    def device(self, device: torch.device) -> torch.device:
        """``device``, or on CUDA this rank's GPU (``cuda:LOCAL_RANK``)."""
        if not self.active or device.type != "cuda":
            return device
        return torch.device("cuda", self.local_rank)

    def _tensor_device(self) -> torch.device:
        return torch.device("cuda", self.local_rank) if self.backend == "nccl" \
            else torch.device("cpu")

    def quiet(self, log: Callable[[str], None], progress: bool
              ) -> tuple[Callable[[str], None], bool]:
        """The log and progress bar of rank 0; the other ranks say nothing."""
        if self.is_main:
            return log, progress
        return (lambda message: None), False

    def seed(self, base: int) -> int:
        """The torch seed of this rank for ``base`` (``base`` itself on rank 0)."""
        if self.rank == 0:
            return base
        return int(np.random.SeedSequence([base, self.rank]).generate_state(1)[0])

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def share(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (one process: ``value``)."""
        if not self.active:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0, device=self._tensor_device())
        return box[0]

    def sum_all(self, *values: float) -> tuple:
        """Each value summed over the ranks (ints stay ints); one process: ``values``."""
        if not self.active:
            return values
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self._tensor_device())
        dist.all_reduce(t)
        return tuple(type(v)(x) for v, x in zip(values, t.tolist(), strict=True))

    def step_loss(self, model: torch.nn.Module,
                  loss: Callable[[torch.nn.Module, Batch], LossOutput]
                  ) -> Callable[[Batch], LossOutput]:
        """``batch -> loss(model, batch)``; on several ranks, this rank's rows of the batch
        through DistributedDataParallel, its gradient weighted by its share of the batch's
        target tokens (see the module docstring). The returned sums are this rank's."""
        if not self.active:
            return lambda batch: loss(model, batch)
        ids = [self.local_rank] if self.backend == "nccl" else None
        # find_unused_parameters: the age/sex heads exist but are unused at weight 0; the
        # buffers (masks, index maps) are equal on every rank, so they are not re-sent
        net = torch.nn.parallel.DistributedDataParallel(
            _Loss(model, loss), device_ids=ids, forward_sync_buffers=False,
            find_unused_parameters=True)

        def step(batch: Batch) -> LossOutput:
            rows = shard_rows(len(batch), self.rank, self.world)
            empty = rows.size == 0
            pick = torch.as_tensor(rows if not empty else [0], device=batch.labels.device)
            part = dataclasses.replace(batch, **{f.name: getattr(batch, f.name)[pick]
                                                 for f in dataclasses.fields(batch)})
            n_all = int((batch.labels != TOKENS.pad).sum())
            n_mine = 0 if empty else int((part.labels != TOKENS.pad).sum())
            value, out = net(part)
            value = _GradScale.apply(value, self.world * n_mine / max(n_all, 1))
            if empty:  # a row at weight 0, so that this rank takes part in the step
                return LossOutput(loss=value, nll_sum=0.0, n_tokens=0, code_nll_sum=0.0,
                                  n_codes=0)
            return dataclasses.replace(out, loss=value)

        return step

    def manifest(self) -> dict[str, Any]:
        """The manifest's record of the processes (nothing for one process)."""
        if not self.active:
            return {}
        return {"distributed": {"processes": self.world, "backend": self.backend,
                                "batch_split": "rows of each batch, gradients weighted by "
                                               "target tokens"}}


SINGLE = Context()


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1") or 1)


def context(device: str = "cpu") -> Context:
    """This process's :class:`Context`: the process group torchrun describes (joined here, with
    :func:`backend_for` ``device``, when not yet joined), or :data:`SINGLE`."""
    if not dist.is_available():
        return SINGLE
    if not dist.is_initialized():
        if _env_world() <= 1:
            return SINGLE
        backend = backend_for(device)
        if backend == "nccl":
            if not torch.cuda.is_available():
                raise ValueError("train.device=cuda, but torch sees no CUDA GPU; use cpu")
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=TIMEOUT)
    if dist.get_world_size() <= 1:
        return SINGLE
    return Context(rank=dist.get_rank(), world=dist.get_world_size(),
                   local_rank=int(os.environ.get("LOCAL_RANK", "0")),
                   backend=dist.get_backend())


def teardown() -> None:
    """Wait for every rank (rank 0 writes the bundle last), then leave the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextmanager
def session() -> Iterator[None]:
    """Leave the process group at the end (after a barrier; at once on an error, since the
    other ranks may be waiting elsewhere and torchrun ends them)."""
    try:
        yield
    except BaseException:
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        raise
    teardown()


class LaunchError(RuntimeError):
    """A process of :func:`launch` failed (its messages are on stderr)."""


def launch(nproc: int, target: str, kwargs: dict[str, Any], *, threads: int = 1,
           pythonpath: str | None = None) -> None:
    """Run ``target(**kwargs)`` (``"module:function"``, JSON-able ``kwargs``) in ``nproc``
    processes under torchrun on this machine, and wait for them.

    Each process gets ``OMP_NUM_THREADS=threads``; ``pythonpath`` is put before the
    ``PYTHONPATH`` of the processes. Raises :class:`LaunchError` when one fails.
    """
    if nproc < 1:
        raise ValueError(f"nproc must be at least 1, got {nproc}")
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, threads))}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pythonpath, env.get("PYTHONPATH")) if p)
    with tempfile.TemporaryDirectory(prefix="synthehr-ddp-") as tmp:
        spec = Path(tmp) / "spec.json"
        spec.write_text(json.dumps({"target": target, "kwargs": kwargs}))
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               f"--nproc-per-node={nproc}", "-m", "training.distributed", str(spec)]
        code = subprocess.run(cmd, env=env, check=False).returncode
    if code:
        raise LaunchError(f"training in {nproc} processes failed (exit code {code}); "
                          f"see the messages above")


def _worker(argv: list[str]) -> int:
    """One process of :func:`launch`: call the target inside the process group's session."""
    spec = json.loads(Path(argv[0]).read_text())
    module, _, name = spec["target"].partition(":")
    fn = getattr(importlib.import_module(module), name)
    try:
        with session():
            fn(**spec["kwargs"])
    except (ValueError, FileExistsError, FileNotFoundError) as err:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"error: {err}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    from training.distributed import _worker as _entry  # the module, not a second __main__ copy

    sys.exit(_entry(sys.argv[1:]))
