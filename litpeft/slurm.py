"""SLURM support: preemption checkpoint + requeue, resume-if-present, and a job-layout check.

Lightning's built-in SLURM auto-requeue (``SLURMEnvironment(auto_requeue=True)``, the default) saves the
checkpoint *inside* the signal handler, which can hang on a collective or leave a truncated file
(lightning#21406); ``ckpt_path="hpc"`` fails on a first run that has no checkpoint yet (lightning#20347);
and a mismatch between ``--ntasks-per-node`` and ``Trainer(devices=...)`` hangs instead of failing.
This module replaces those pieces:

* :class:`PreemptionCheckpoint` -- a callback whose signal handler only sets a flag; at the next
  optimizer step all ranks agree on the flag, write ``<dirpath>/last.ckpt`` atomically, rank 0 runs
  ``scontrol requeue $SLURM_JOB_ID`` and the trainer stops. It switches Lightning's own auto-requeue
  off (also available explicitly via :func:`slurm_plugins`) so that two handlers never fight.
* :func:`find_resume_checkpoint` / :func:`auto_resume_checkpoint` -- ``ckpt_path`` for
  resume-if-present: ``None`` on a first run, the callback's checkpoint on a requeued one.
* :func:`check_slurm_layout` -- raises :class:`SlurmLayoutError` naming both numbers when the SLURM
  job's tasks disagree with ``devices x num_nodes``.

Wiring into a LightningCLI subclass::

    def instantiate_trainer(self, **kwargs):
        trainer = super().instantiate_trainer(**kwargs)
        check_slurm_layout(trainer)  # fail fast instead of hanging in the DDP setup
        if is_slurm_job() and not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):
            trainer.callbacks.append(PreemptionCheckpoint())
        return trainer

    def before_fit(self):
        cfg = self.config_init[self.subcommand]
        if cfg.get("ckpt_path") is None:  # no --ckpt_path given: resume if a checkpoint is there
            cfg["ckpt_path"] = auto_resume_checkpoint(self.trainer)

Submit with ``#SBATCH --signal=USR1@90 --requeue --open-mode=append`` (see scripts/slurm/*.sbatch).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal as _signal
import subprocess
import threading
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any

import lightning.pytorch as pl
from lightning.fabric.plugins.environments import ClusterEnvironment, SLURMEnvironment
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn

from litpeft.errors import LitPeftError

__all__ = [
    "PreemptionCheckpoint",
    "SlurmLayoutError",
    "SlurmResumeError",
    "atomic_save_checkpoint",
    "auto_resume_checkpoint",
    "check_slurm_layout",
    "find_resume_checkpoint",
    "is_slurm_job",
    "slurm_job_id",
    "slurm_layout_error",
    "slurm_plugins",
]

log = logging.getLogger(__name__)

DEFAULT_FILENAME = "last.ckpt"
DEFAULT_REQUEUE_COMMAND: tuple[str, ...] = ("scontrol", "requeue", "{job_id}")
_TMP_SUFFIX = ".tmp"
_JOB_SUFFIX = ".slurm_job"  # next to the checkpoint: the SLURM job that wrote it
_INTERACTIVE_JOB_NAMES = ("bash", "interactive")


# --------------------------------------------------------------------------------------------------
# SLURM environment helpers
# --------------------------------------------------------------------------------------------------


def is_slurm_job(environ: Mapping[str, str] | None = None) -> bool:
    """Whether this process is a SLURM task that Lightning treats as such (same rule as Lightning).

    Interactive allocations (job name ``bash`` or ``interactive``) are excluded, like in Lightning.
    """
    env = os.environ if environ is None else environ
    return "SLURM_NTASKS" in env and env.get("SLURM_JOB_NAME") not in _INTERACTIVE_JOB_NAMES


def slurm_job_id(environ: Mapping[str, str] | None = None) -> str | None:
    """The id to requeue: ``<array job>_<task>`` for array jobs, else ``SLURM_JOB_ID``; ``None`` outside SLURM."""
    env = os.environ if environ is None else environ
    array_job, array_task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array_job and array_task:
        return f"{array_job}_{array_task}"
    return env.get("SLURM_JOB_ID") or None


def _parse_signal(value: str | int | _signal.Signals) -> _signal.Signals:
    """Accept ``"SIGUSR1"``, ``"USR1"``, ``10`` or a ``signal.Signals``."""
    if isinstance(value, _signal.Signals):
        return value
    if isinstance(value, int) or (isinstance(value, str) and value.isdigit()):
        return _signal.Signals(int(value))
    name = value.upper()
    return _signal.Signals[name if name.startswith("SIG") else f"SIG{name}"]


def slurm_plugins(
    plugins: Sequence[Any] | Any | None = None,
    requeue_signal: str | int = "SIGUSR1",
    environ: Mapping[str, str] | None = None,
) -> list[Any]:
    """Return ``plugins`` (as a list) with Lightning's SLURM auto-requeue disabled.

    Under SLURM, a ``SLURMEnvironment(auto_requeue=False)`` is appended unless a cluster environment is
    already given; a given ``SLURMEnvironment`` gets ``auto_requeue=False``. Outside SLURM nothing is added
    (a ``SLURMEnvironment`` there would fail reading ``SLURM_NTASKS``). Use as
    ``Trainer(plugins=slurm_plugins(...))``. :class:`PreemptionCheckpoint` also does this at ``setup``.
    """
    if plugins is None:
        out: list[Any] = []
    elif isinstance(plugins, (list, tuple)):
        out = list(plugins)
    else:
        out = [plugins]
    envs = [p for p in out if isinstance(p, ClusterEnvironment)]
    for env in envs:
        if isinstance(env, SLURMEnvironment):
            env.auto_requeue = False
    if not envs and is_slurm_job(environ):
        out.append(SLURMEnvironment(auto_requeue=False, requeue_signal=_parse_signal(requeue_signal)))
    return out


# --------------------------------------------------------------------------------------------------
# Layout check
# --------------------------------------------------------------------------------------------------


class SlurmLayoutError(LitPeftError, ValueError):
    """The SLURM job's task layout does not match the Trainer's ``devices`` x ``num_nodes``."""


def _parse_tasks_per_node(value: str) -> list[int]:
    """Expand SLURM's compressed counts: ``"2"``, ``"2(x3)"``, ``"2(x2),1"`` -> per-node task counts."""
    counts: list[int] = []
    for part in value.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if m is None:
            raise ValueError(f"cannot parse SLURM tasks-per-node value {value!r}")
        counts += [int(m.group(1))] * int(m.group(2) or 1)
    return counts


def slurm_layout_error(devices: int, num_nodes: int, environ: Mapping[str, str] | None = None) -> str | None:
    """Return why ``devices`` x ``num_nodes`` cannot run in this SLURM job step, or ``None`` if it fits.

    Outside SLURM (or in an interactive ``bash``/``interactive`` allocation) this returns ``None``.
    """
    env = os.environ if environ is None else environ
    if not is_slurm_job(env):
        return None
    ntasks = int(env.get("SLURM_STEP_NUM_TASKS") or env["SLURM_NTASKS"])
    nnodes_raw = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_NNODES") or env.get("SLURM_JOB_NUM_NODES")
    nnodes = int(nnodes_raw) if nnodes_raw else None
    per_node_raw = (
        env.get("SLURM_STEP_TASKS_PER_NODE")
        or env.get("SLURM_NTASKS_PER_NODE")
        or env.get("SLURM_TASKS_PER_NODE")
    )
    per_node = _parse_tasks_per_node(per_node_raw) if per_node_raw else None
    expected = devices * num_nodes
    fix = (
        "Each Lightning process is one SLURM task, so --ntasks-per-node must equal trainer.devices and "
        "--nodes must equal trainer.num_nodes."
    )
    if ntasks > 1 and "SLURM_STEP_ID" not in env and "SLURM_STEPID" not in env:
        return (
            f"This process runs in the SLURM batch step of a job with {ntasks} tasks, but it was not started by "
            f"`srun`, so only 1 of the {ntasks} processes exists and DDP would wait for the others forever. "
            "Launch it as `srun litpeft fit ...` inside the sbatch script."
        )
    if per_node is not None and len(set(per_node)) > 1:
        return (
            f"SLURM placed an uneven number of tasks per node ({per_node_raw}); Lightning needs the same number on "
            "every node. Use `#SBATCH --ntasks-per-node=N` instead of `--ntasks`. " + fix
        )
    tasks_per_node = per_node[0] if per_node else None
    if (
        ntasks != expected
        or (tasks_per_node is not None and tasks_per_node != devices)
        or (nnodes is not None and nnodes != num_nodes)
    ):
        job = f"{ntasks} tasks"
        if nnodes is not None and tasks_per_node is not None:
            job += f" (--nodes={nnodes} x --ntasks-per-node={tasks_per_node})"
        want_nodes = nnodes if nnodes is not None else num_nodes
        want_devices = tasks_per_node if tasks_per_node is not None else max(ntasks // max(want_nodes, 1), 1)
        return (
            f"SLURM job layout does not match the Trainer: the job step has {job}, but the Trainer expects "
            f"devices={devices} x num_nodes={num_nodes} = {expected} processes. {fix} Either set "
            f"trainer.devices={want_devices} and trainer.num_nodes={want_nodes}, or submit with "
            f"#SBATCH --nodes={num_nodes} --ntasks-per-node={devices}."
        )
    return None


def _cluster_environment(trainer: pl.Trainer) -> ClusterEnvironment | None:
    """The Trainer's cluster environment (single-device strategies keep it on the accelerator connector)."""
    env = getattr(trainer.strategy, "cluster_environment", None)
    if env is None:
        env = getattr(getattr(trainer, "_accelerator_connector", None), "cluster_environment", None)
    return env if isinstance(env, ClusterEnvironment) else None


def check_slurm_layout(trainer: pl.Trainer, environ: Mapping[str, str] | None = None) -> None:
    """Raise :class:`SlurmLayoutError` if the Trainer does not fit the SLURM job it runs in.

    Call it right after building the Trainer, before ``fit``: the mismatch otherwise shows up as a hang in
    the process-group setup. A no-op outside SLURM or when the Trainer does not use ``SLURMEnvironment``.
    """
    env = _cluster_environment(trainer)
    if env is not None and not isinstance(env, SLURMEnvironment):
        return
    msg = slurm_layout_error(trainer.num_devices, trainer.num_nodes, environ)
    if msg is not None:
        raise SlurmLayoutError(msg)


# --------------------------------------------------------------------------------------------------
# Resume-if-present
# --------------------------------------------------------------------------------------------------


def find_resume_checkpoint(
    dirpath: str | os.PathLike[str] | None, filename: str = DEFAULT_FILENAME
) -> str | None:
    """Return ``<dirpath>/<filename>`` if a complete checkpoint is there, else ``None`` (start fresh).

    Pass the result as ``ckpt_path``: the first run gets ``None`` and starts from scratch, a requeued run
    resumes (Lightning restores global_step, epoch and the loops' progress). Left-over ``*.tmp`` files from
    an interrupted save are never returned: :func:`atomic_save_checkpoint` only renames complete files.
    """
    if dirpath is None:
        return None
    path = os.path.join(os.fspath(dirpath), filename)
    if os.path.isfile(path):
        return path if os.path.getsize(path) > 0 else None
    if os.path.isdir(path):  # sharded (distributed) checkpoints are directories
        return path if os.listdir(path) else None
    return None


class SlurmResumeError(LitPeftError, RuntimeError):
    """The resume checkpoint in the run directory belongs to another SLURM job."""


def _check_same_job(path: str) -> None:
    """Raise :class:`SlurmResumeError` if ``path`` was written by another SLURM job than this one.

    A requeued job keeps its job id, so it resumes its own checkpoint. A *new* job that finds another
    job's checkpoint (the same config submitted twice, another learning rate on the command line) would
    otherwise silently continue -- or, for a finished run, end at once and hand back the old adapter.
    A checkpoint without the marker file (put there by hand) is resumed.
    """
    try:
        with open(path + _JOB_SUFFIX, encoding="utf-8") as f:
            owner = f.read().strip()
    except FileNotFoundError:
        return
    current = slurm_job_id() or ""
    if owner != current:
        raise SlurmResumeError(
            f"{path} was written by SLURM job {owner or '(none: not a SLURM job)'}, not by this job "
            f"({current or 'not a SLURM job'}); only a requeued job resumes by itself. To continue that run, "
            f"pass --ckpt_path {path} (or, for chained jobs, set resume_other_jobs: true on "
            "litpeft.slurm.PreemptionCheckpoint); to start a new run, set another trainer.default_root_dir."
        )


def _write_job_marker(path: str) -> None:
    tmp = path + _JOB_SUFFIX + _TMP_SUFFIX
    with open(tmp, "w", encoding="utf-8") as f:
        f.write((slurm_job_id() or "") + "\n")
    os.replace(tmp, path + _JOB_SUFFIX)


def _written_by_this_requeued_job(path: str) -> bool:
    """Whether this is a requeued SLURM job (``SLURM_RESTART_COUNT`` > 0) and it wrote ``path`` itself."""
    job = slurm_job_id()
    if not job or int(os.environ.get("SLURM_RESTART_COUNT") or 0) == 0:
        return False
    try:
        with open(path + _JOB_SUFFIX, encoding="utf-8") as f:
            return f.read().strip() == job
    except FileNotFoundError:
        return False


def auto_resume_checkpoint(trainer: pl.Trainer, ckpt_path: str | None = None) -> str | None:
    """The ``ckpt_path`` to pass to ``fit``: resume-if-present for the :class:`PreemptionCheckpoint` file.

    Without an explicit ``ckpt_path``: the callback's checkpoint if present, else ``None`` (start fresh).
    Raises :class:`SlurmResumeError` when that checkpoint was written by another SLURM job (a requeued
    job keeps its id) unless the callback has ``resume_other_jobs``. With an explicit ``ckpt_path`` (a
    fine-tune that starts from some checkpoint): that path, except in a requeued job that has written its
    own preemption checkpoint since -- the requeued job's command line still names the old starting point,
    and resuming from it would throw away the work done before the preemption.
    Auto-resume is opt-in (a Trainer without a :class:`PreemptionCheckpoint` gets ``ckpt_path`` back) and
    off for a ``fast_dev_run``.
    """
    if trainer.fast_dev_run:
        return ckpt_path
    for cb in trainer.callbacks:
        if isinstance(cb, PreemptionCheckpoint):
            path = find_resume_checkpoint(cb.resolve_dirpath(trainer), cb.filename)
            if path is None:
                return ckpt_path
            if ckpt_path is not None:
                if not _written_by_this_requeued_job(path) or os.path.abspath(ckpt_path) == os.path.abspath(
                    path
                ):
                    return ckpt_path
                rank_zero_info(
                    f"[litpeft.slurm] requeued job: resuming from {path}, not --ckpt_path {ckpt_path}"
                )
                return path
            if not cb.resume_other_jobs:
                _check_same_job(path)
            rank_zero_info(f"[litpeft.slurm] resuming from {path}")
            return path
    return ckpt_path


# --------------------------------------------------------------------------------------------------
# Atomic checkpoint write
# --------------------------------------------------------------------------------------------------


def _fsync_path(path: str) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


def atomic_save_checkpoint(trainer: pl.Trainer, filepath: str | os.PathLike[str]) -> str:
    """Write a checkpoint to ``filepath`` via a temp file + ``os.replace``; call on all ranks.

    ``trainer.save_checkpoint`` (a collective for sharded strategies) writes ``<filepath>.tmp``; then global
    rank 0 fsyncs it and renames it over ``filepath``. A crash or kill at any point leaves either the old
    complete checkpoint or the new one, never a partial file under ``filepath``. Returns ``filepath``.
    Local filesystems only (``os.replace``); use a shared filesystem for multi-node jobs.
    """
    path = os.fspath(filepath)
    if "://" in path:
        raise ValueError(f"atomic_save_checkpoint needs a local/shared filesystem path, got {path!r}")
    tmp = path + _TMP_SUFFIX
    strategy = trainer.strategy
    if trainer.is_global_zero:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        _remove(tmp)  # stale temp file of an interrupted save
    strategy.barrier("litpeft_atomic_save_pre")
    try:
        trainer.save_checkpoint(tmp, weights_only=False)
        if trainer.is_global_zero:
            if os.path.isdir(tmp):
                # Sharded checkpoint (a directory): os.replace cannot replace a non-empty directory, so move
                # the old one aside first. A crash in between leaves only `<path>.old`, never a partial one.
                old = path + ".old"
                _remove(old)
                if os.path.lexists(path):
                    os.replace(path, old)
                os.replace(tmp, path)
                _remove(old)
            else:
                _fsync_path(tmp)
                os.replace(tmp, path)
            _fsync_path(os.path.dirname(path) or ".")
    except BaseException:
        if trainer.is_global_zero:
            with contextlib.suppress(OSError):
                _remove(tmp)
        raise
    strategy.barrier("litpeft_atomic_save_post")
    return path


# --------------------------------------------------------------------------------------------------
# The callback
# --------------------------------------------------------------------------------------------------


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
        self.signum = _parse_signal(requeue_signal)
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
        env = _cluster_environment(trainer)
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
            _write_job_marker(path)
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
