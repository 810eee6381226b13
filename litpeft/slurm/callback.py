"""The :class:`PreemptionCheckpoint` callback: checkpoint atomically and requeue when SLURM's signal comes.

Its signal handler only sets a flag; the checkpoint is written at the next optimizer step, on all ranks
together (:mod:`litpeft.slurm.checkpoint`), and rank 0 requeues the job. :func:`was_preempted` tells
whether it stopped a run that way.
"""

from __future__ import annotations

import logging
import os
import signal as _signal
import subprocess
import threading
from collections.abc import Sequence
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from litpeft.slurm.checkpoint import DEFAULT_FILENAME, atomic_save_checkpoint, write_job_marker
from litpeft.slurm.environment import cluster_environment, parse_signal, slurm_job_id

log = logging.getLogger("litpeft.slurm")  # the package's logger, as before the split into modules

DEFAULT_REQUEUE_COMMAND: tuple[str, ...] = ("scontrol", "requeue", "{job_id}")


class PreemptionCheckpoint(Callback):
    """Checkpoint atomically and requeue the SLURM job when the preemption/time-limit signal arrives.

    Submit with ``#SBATCH --signal=USR1@90`` (no ``B:``, so every task gets it) and ``#SBATCH --requeue``.

    * The signal handler only sets a flag (no I/O, no collectives, no locks inside a handler).
    * At the end of the next training batch that finished an optimizer step, all ranks reduce the flag
      ("any" over ranks), so every rank takes the same branch even if only some got the signal.
    * Then ``<dirpath>/<filename>`` is written atomically (see :func:`atomic_save_checkpoint`), global
      rank 0 runs ``scontrol requeue <job>`` (only under SLURM by default) and ``trainer.should_stop`` is
      set, so the run leaves the loop and exits; validation is skipped on that stop by default.
    * With ``save_on_train_end`` the same file is also written when training ends normally, so an extra
      requeue of a finished job resumes at ``max_steps`` and stops at once instead of redoing work.
    * Next to the checkpoint, ``<filename>.slurm_job`` names the job that wrote it: a requeued job (same
      id) resumes by itself; a new job finding another job's checkpoint stops with a clear error.

    Lightning's own SLURM auto-requeue is switched off at ``setup`` (it would save inside the handler).
    Resume with ``trainer.fit(model, ckpt_path=auto_resume_checkpoint(trainer))``. The signal is only
    acted on after training-batch ends, so keep the ``--signal`` lead time above one step + one save (plus
    any validation run that may be in progress). ``fast_dev_run`` never writes the checkpoint.

    Args:
        dirpath: Directory of the checkpoint; default ``<trainer.default_root_dir>/resume``. It must be the
            same across restarts (do not use a logger's ``version_N`` dir). Give it its own directory, not
            the one of a ``ModelCheckpoint(save_last=True)``, to avoid ``last-v1.ckpt`` renames.
        filename: Checkpoint file name inside ``dirpath``.
        requeue_signal: Signal to handle (``"SIGUSR1"``, ``"USR2"``, ``10``...). Must match ``--signal``.
        requeue: ``None``: requeue iff running in a SLURM job; ``True``/``False``: always/never.
        requeue_command: Command run by global rank 0; ``{job_id}`` is replaced by the SLURM job id.
        check_every_n_steps: Reduce the flag across ranks every n optimizer steps (one tiny all-reduce each).
        save_on_train_end: Also write the checkpoint when training finishes normally.
        skip_validation_on_stop: Skip the validation that Lightning runs when ``should_stop`` is set.
        resume_other_jobs: Also resume a checkpoint written by another SLURM job (jobs chained with
            ``sbatch --dependency`` on clusters that do not allow requeueing). By default only a requeued
            job (same job id) resumes by itself, so a new run in an old directory fails instead of silently
            continuing the old run.
    """

    def __init__(
        self,
        dirpath: str | None = None,
        filename: str = DEFAULT_FILENAME,
        requeue_signal: str | int = "SIGUSR1",
        requeue: bool | None = None,
        requeue_command: Sequence[str] | None = None,
        check_every_n_steps: int = 1,
        save_on_train_end: bool = True,
        skip_validation_on_stop: bool = True,
        resume_other_jobs: bool = False,
    ) -> None:
        super().__init__()
        if check_every_n_steps < 1:
            raise ValueError(f"check_every_n_steps must be >= 1, got {check_every_n_steps}")
        self.dirpath = dirpath
        self.filename = filename
        self.signum = parse_signal(requeue_signal)
        self.requeue = requeue
        self.requeue_command = (
            tuple(requeue_command) if requeue_command is not None else DEFAULT_REQUEUE_COMMAND
        )
        self.check_every_n_steps = check_every_n_steps
        self.save_on_train_end = save_on_train_end
        self.skip_validation_on_stop = skip_validation_on_stop
        self.resume_other_jobs = resume_other_jobs
        self.signal_received = False
        self.preempted = False
        self.requeued = False
        self._prev_handler: Any = None
        self._installed = False
        self._last_checked_step: int | None = None
        self._saved_limit_val_batches: Any = None

    # -- public helpers ---------------------------------------------------------------------------

    def resolve_dirpath(self, trainer: pl.Trainer) -> str:
        """The checkpoint directory: ``dirpath`` or ``<default_root_dir>/resume``."""
        return self.dirpath if self.dirpath is not None else os.path.join(trainer.default_root_dir, "resume")

    def checkpoint_path(self, trainer: pl.Trainer) -> str:
        """Full path of the checkpoint this callback writes."""
        return os.path.join(self.resolve_dirpath(trainer), self.filename)

    # -- signal handling --------------------------------------------------------------------------

    def _handler(self, signum: int, frame: FrameType | None) -> None:
        # Only set a flag: anything else (I/O, logging, collectives) can deadlock inside a handler.
        self.signal_received = True

    def _install(self) -> None:
        if self._installed:
            return
        if threading.current_thread() is not threading.main_thread():
            rank_zero_warn(f"PreemptionCheckpoint: not in the main thread, cannot handle {self.signum.name}.")
            return
        self._prev_handler = _signal.signal(self.signum, self._handler)
        self._installed = True

    def _uninstall(self) -> None:
        if not self._installed:
            return
        # Restore what was there before us, unless someone replaced our handler meanwhile.
        if (
            threading.current_thread() is threading.main_thread()
            and _signal.getsignal(self.signum) == self._handler
        ):
            _signal.signal(
                self.signum, self._prev_handler if self._prev_handler is not None else _signal.SIG_DFL
            )
        self._installed = False

    # -- hooks ------------------------------------------------------------------------------------

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Install the flag-only handler and switch Lightning's own auto-requeue off."""
        if stage != "fit":
            return
        env = cluster_environment(trainer)
        if isinstance(env, SLURMEnvironment) and env.auto_requeue:
            # Runs before Trainer registers its signal handlers, so Lightning's save-in-handler never runs.
            env.auto_requeue = False
            rank_zero_info(
                "[litpeft.slurm] PreemptionCheckpoint handles requeue; Lightning's auto_requeue is off."
            )
        self.signal_received = False
        self.preempted = False
        self.requeued = False
        self._last_checked_step = None
        self._install()

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remember the starting step, so the first check comes after this run's first optimizer step."""
        self._last_checked_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        """After each optimizer step: agree on the flag; if set, checkpoint, requeue and stop."""
        step = trainer.global_step
        # Only at optimizer-step boundaries (not inside gradient accumulation); global_step is equal on
        # all ranks, so every rank makes the same decision about entering the collective below.
        if self.preempted or trainer.fast_dev_run or step == self._last_checked_step:
            return
        self._last_checked_step = step
        if step % self.check_every_n_steps != 0:
            return
        if not trainer.strategy.reduce_boolean_decision(self.signal_received, all=False):
            return
        if trainer.max_steps not in (-1, None) and step >= trainer.max_steps:
            rank_zero_info(
                "[litpeft.slurm] preemption signal at the last step: finishing instead of requeueing."
            )
            return
        self.preempted = True
        path = self._save(trainer)
        rank_zero_info(f"[litpeft.slurm] preemption signal: saved {path} at global_step={step}.")
        if trainer.is_global_zero:
            self.requeued = self._requeue()
        trainer.should_stop = True
        if self.skip_validation_on_stop:
            self._saved_limit_val_batches = trainer.limit_val_batches
            trainer.limit_val_batches = 0

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Write the final state to the same file so a requeue of a finished job is a no-op."""
        if self.save_on_train_end and not self.preempted and not trainer.fast_dev_run:
            self._save(trainer)

    def _save(self, trainer: pl.Trainer) -> str:
        """Atomic checkpoint + a marker naming this SLURM job (see :func:`auto_resume_checkpoint`)."""
        path = atomic_save_checkpoint(trainer, self.checkpoint_path(trainer))
        if trainer.is_global_zero:
            write_job_marker(path)
        return path

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Restore the previous signal handler."""
        self._uninstall()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        """Restore the previous signal handler and ``limit_val_batches``."""
        if stage != "fit":
            return
        self._uninstall()
        if self._saved_limit_val_batches is not None:
            trainer.limit_val_batches = self._saved_limit_val_batches
            self._saved_limit_val_batches = None

    # -- requeue ----------------------------------------------------------------------------------

    def _requeue(self) -> bool:
        job_id = slurm_job_id()
        if self.requeue is False or (self.requeue is None and job_id is None):
            log.info("[litpeft.slurm] not requeueing (not a SLURM job or requeue=False).")
            return False
        if job_id is None:
            rank_zero_warn("PreemptionCheckpoint(requeue=True) but SLURM_JOB_ID is not set; not requeueing.")
            return False
        cmd = [part.replace("{job_id}", job_id) for part in self.requeue_command]
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=120, check=False)
        except (OSError, subprocess.SubprocessError) as err:
            rank_zero_warn(f"PreemptionCheckpoint: `{' '.join(cmd)}` failed: {err}")
            return False
        if result.returncode != 0:
            rank_zero_warn(
                f"PreemptionCheckpoint: `{' '.join(cmd)}` exited {result.returncode}: {result.stderr.strip()}"
            )
            return False
        rank_zero_info(f"[litpeft.slurm] requeued SLURM job {job_id}.")
        return True


def was_preempted(trainer: pl.Trainer) -> bool:
    """Whether a :class:`PreemptionCheckpoint` stopped this run for a requeue (it is not finished)."""
    return any(isinstance(c, PreemptionCheckpoint) and c.preempted for c in trainer.callbacks)
