"""A test-only callback for scripts/slurm/test_requeue.sh: prints what every optimizer step sees.

Added to a ``litpeft fit`` on the command line (``--trainer.callbacks+=requeue_probe.StepProbe``) with this
directory on ``PYTHONPATH``. Each rank prints one line per optimizer step::

    STEP rank=0 restart=0 global_step=3 epoch=0 lr=0.00133333 batch=5d41402abc4b

``batch`` is a hash of the batch's token ids, so comparing the lines of an interrupted + requeued job with
those of an uninterrupted one checks the same data order and the same learning rate at every step.

``block_at_step``: in the first run of the job (``SLURM_RESTART_COUNT`` unset or 0), after that step the
probe writes ``<ready_file>`` and waits until litpeft's PreemptionCheckpoint has received the signal that
the test sends with ``scancel --signal=USR1``. The signal is real; the wait only makes the step at which
it is acted on independent of how fast this machine is.
"""

from __future__ import annotations

import hashlib
import os
import resource
import time
from typing import Any

from lightning.pytorch import Callback, LightningModule, Trainer

from litpeft.slurm import PreemptionCheckpoint


class StepProbe(Callback):
    def __init__(
        self, block_at_step: int | None = None, ready_file: str | None = None, timeout: float = 120.0
    ):
        self.block_at_step, self.ready_file, self.timeout = block_at_step, ready_file, timeout
        self.rank = int(os.environ.get("SLURM_PROCID", "0"))
        self.restart = int(os.environ.get("SLURM_RESTART_COUNT") or 0)

    def _say(self, text: str) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)  # CPU seconds of this process so far
        print(
            f"{text} rank={self.rank} restart={self.restart} cpu_s={usage.ru_utime + usage.ru_stime:.1f}",
            flush=True,
        )

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        done = trainer.fit_loop.epoch_loop.batch_progress.total.ready
        self._say(f"TRAIN_START global_step={trainer.global_step} batches_done={done}")

    def on_train_batch_start(
        self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int
    ) -> None:
        digest = hashlib.sha256(batch["input_ids"].cpu().numpy().tobytes()).hexdigest()[:12]
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        print(
            f"STEP rank={self.rank} restart={self.restart} global_step={trainer.global_step} "
            f"epoch={trainer.current_epoch} lr={lr:.8f} batch={digest}",
            flush=True,
        )

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.block_at_step is None or self.restart != 0 or trainer.global_step != self.block_at_step:
            return
        preemption = next(c for c in trainer.callbacks if isinstance(c, PreemptionCheckpoint))
        if self.ready_file and trainer.is_global_zero:
            with open(self.ready_file, "w") as f:
                f.write(str(trainer.global_step))
        self._say(f"WAITING_FOR_SIGNAL global_step={trainer.global_step}")
        deadline = time.monotonic() + self.timeout
        while not preemption.signal_received and time.monotonic() < deadline:
            time.sleep(0.05)
        self._say(f"SIGNAL_RECEIVED={preemption.signal_received} global_step={trainer.global_step}")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._say(f"TRAIN_END global_step={trainer.global_step}")
