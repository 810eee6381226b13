"""Tests of litpeft.slurm on CPU with a tiny BoringModel: flag-only signal handler, atomic checkpoint
write, resume-if-present keeping global_step/epoch, and the SLURM layout check."""

from __future__ import annotations

import os
import signal
import sys
import time
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from lightning.fabric.plugins.environments import SLURMEnvironment
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch.utils.data import DataLoader

from litpeft.slurm import (
    PreemptionCheckpoint,
    SlurmLayoutError,
    SlurmResumeError,
    atomic_save_checkpoint,
    auto_resume_checkpoint,
    check_slurm_layout,
    find_resume_checkpoint,
    slurm_job_id,
    slurm_layout_error,
    slurm_plugins,
)

BATCHES_PER_EPOCH = 4  # RandomDataset(32, 16) with batch_size 4
MAX_STEPS = 10

SLURM_VARS = [k for k in os.environ if k.startswith("SLURM")]


@pytest.fixture(autouse=True)
def _no_slurm_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run as if outside SLURM even when pytest itself runs inside a job."""
    for key in SLURM_VARS:
        monkeypatch.delenv(key, raising=False)


class TinyModel(BoringModel):
    """BoringModel that can send itself a signal at a given global step and records what it ran."""

    def __init__(self, signal_at_step: int | None = None, signum: int = signal.SIGUSR1) -> None:
        super().__init__()
        self.signal_at_step = signal_at_step
        self.signum = signum
        self.steps_seen: list[tuple[int, int, int]] = []  # (global_step, epoch, batch_idx)
        self.val_batches_after_signal = 0
        self.sent = False
        self.handler_checks: dict[str, Any] = {}

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.steps_seen.append((self.trainer.global_step, self.trainer.current_epoch, batch_idx))
        if (
            self.signal_at_step is not None
            and self.trainer.global_step == self.signal_at_step
            and not self.sent
        ):
            cb = next(c for c in self.trainer.callbacks if isinstance(c, PreemptionCheckpoint))
            path = cb.checkpoint_path(self.trainer)
            os.kill(os.getpid(), self.signum)
            self.sent = True
            for _ in range(
                1000
            ):  # the handler runs at the interpreter's next check (immediately in practice)
                if cb.signal_received:
                    break
                time.sleep(0.001)
            # The handler has run by now (CPython runs it before the next bytecode): it must have
            # only set the flag -- nothing saved, nothing stopped, from inside the handler.
            self.handler_checks = {
                "flag": cb.signal_received,
                "file_exists": os.path.exists(path),
                "should_stop": self.trainer.should_stop,
                "preempted": cb.preempted,
            }
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch: Any, batch_idx: int) -> Any:
        if self.sent:
            self.val_batches_after_signal += 1
        return super().validation_step(batch, batch_idx)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 16), batch_size=4)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(RandomDataset(32, 8), batch_size=4)


def make_trainer(root: Path, cb: PreemptionCheckpoint, max_steps: int = MAX_STEPS, **kw: Any) -> Trainer:
    return Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        callbacks=[cb],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        deterministic=True,
        **kw,
    )


def run(
    root: Path, signal_at_step: int | None, **cb_kw: Any
) -> tuple[Trainer, TinyModel, PreemptionCheckpoint]:
    """One 'job': build trainer + model, resume if a checkpoint exists, fit."""
    seed_everything(7, verbose=False)
    cb = PreemptionCheckpoint(**cb_kw)
    trainer = make_trainer(root, cb)
    model = TinyModel(signal_at_step=signal_at_step)
    trainer.fit(model, ckpt_path=auto_resume_checkpoint(trainer))
    return trainer, model, cb


def test_signal_handler_only_sets_flag_then_saves_requeues_and_stops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = signal.getsignal(signal.SIGUSR1)
    marker = tmp_path / "requeued.txt"
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    requeue_cmd = [sys.executable, "-c", f"open({str(marker)!r}, 'w').write('{{job_id}}')"]
    trainer, model, cb = run(tmp_path, signal_at_step=3, requeue_command=requeue_cmd)

    assert model.handler_checks == {
        "flag": True,
        "file_exists": False,
        "should_stop": False,
        "preempted": False,
    }
    # Acted at the end of the batch that got the signal: step 3 -> 4, then stopped.
    assert cb.preempted and cb.requeued
    assert trainer.global_step == 4
    assert trainer.should_stop
    assert [s for s, _, _ in model.steps_seen] == [0, 1, 2, 3]
    assert model.val_batches_after_signal == 0  # validation skipped on the preemption stop
    assert marker.read_text() == "4242"  # rank 0 ran the requeue command with the job id
    ckpt = torch.load(cb.checkpoint_path(trainer), weights_only=False)
    assert ckpt["global_step"] == 4
    assert ckpt["epoch"] == 0  # saved at the end of the 4th batch, i.e. still inside epoch 0
    assert signal.getsignal(signal.SIGUSR1) == before  # handler restored after fit


def test_no_requeue_outside_slurm_and_custom_signal(tmp_path: Path) -> None:
    seed_everything(7, verbose=False)
    cb = PreemptionCheckpoint(requeue_signal="USR2", filename="preempt.ckpt", dirpath=str(tmp_path / "ck"))
    trainer = make_trainer(tmp_path, cb)
    model = TinyModel(signal_at_step=1, signum=signal.SIGUSR2)
    trainer.fit(model)
    assert cb.preempted and not cb.requeued  # no SLURM_JOB_ID: save and stop only
    assert trainer.global_step == 2
    assert find_resume_checkpoint(tmp_path / "ck", "preempt.ckpt") == str(tmp_path / "ck" / "preempt.ckpt")


def test_ranks_agree_a_signal_on_another_rank_stops_this_one(tmp_path: Path) -> None:
    """The flag is reduced with "any" over ranks: a rank that got no signal still saves and stops."""

    class OtherRankSignalled(Callback):
        def on_train_start(self, trainer: Trainer, pl_module: Any) -> None:
            calls: list[tuple[bool, bool]] = []

            def reduce_any(decision: bool, all: bool = True) -> bool:
                calls.append((decision, all))
                return trainer.global_step >= 3 and not all  # "rank 1" got the signal before step 3 ended

            trainer.strategy.reduce_boolean_decision = reduce_any  # type: ignore[method-assign]
            pl_module.reduce_calls = calls

    seed_everything(7, verbose=False)
    cb = PreemptionCheckpoint()
    trainer = make_trainer(tmp_path, cb)
    trainer.callbacks.insert(0, OtherRankSignalled())
    model = TinyModel()
    trainer.fit(model)
    assert not cb.signal_received  # this rank never got the signal ...
    assert cb.preempted and trainer.global_step == 3  # ... but saved and stopped with the others
    assert os.path.isfile(cb.checkpoint_path(trainer))
    assert model.reduce_calls == [(False, False)] * 3  # one collective per optimizer step, "any" semantics


def test_atomic_write_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seed_everything(7, verbose=False)
    cb = PreemptionCheckpoint(save_on_train_end=False)
    trainer = make_trainer(tmp_path, cb, max_steps=2)
    trainer.fit(TinyModel())
    target = tmp_path / "ck" / "last.ckpt"
    atomic_save_checkpoint(trainer, target)
    good = target.read_bytes()
    assert sorted(os.listdir(target.parent)) == ["last.ckpt"]  # no temp file left behind

    # A save that dies half-way (killed, disk full, ...) must leave the previous checkpoint untouched.
    def broken_save(filepath: str, *args: Any, **kwargs: Any) -> None:
        Path(filepath).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trainer, "save_checkpoint", broken_save)
    with pytest.raises(OSError, match="disk full"):
        atomic_save_checkpoint(trainer, target)
    assert target.read_bytes() == good
    assert sorted(os.listdir(target.parent)) == ["last.ckpt"]

    # A stale temp file of a killed save is never taken as a checkpoint.
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / "last.ckpt.tmp").write_bytes(b"partial")
    assert find_resume_checkpoint(stale) is None
    (stale / "last.ckpt").write_bytes(b"")
    assert find_resume_checkpoint(stale) is None  # empty file: not a checkpoint


def test_atomic_write_of_a_sharded_checkpoint_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Sharded strategies save a directory: it replaces the old one whole (moved aside to ``.old`` first)."""
    trainer = make_trainer(tmp_path, PreemptionCheckpoint(save_on_train_end=False), max_steps=1)
    target = tmp_path / "ck" / "last.ckpt"

    def sharded_save(filepath: str, *args: Any, **kwargs: Any) -> None:
        assert filepath == str(target) + ".tmp"  # the same fixed name on every rank (a collective)
        os.makedirs(filepath)
        Path(filepath, "shard0").write_text(f"save {len(saves)}")
        saves.append(filepath)

    saves: list[str] = []
    monkeypatch.setattr(trainer, "save_checkpoint", sharded_save)
    for n in range(2):
        assert atomic_save_checkpoint(trainer, target) == str(target)
        assert sorted(os.listdir(target.parent)) == ["last.ckpt"]  # no .tmp or .old left behind
        assert os.listdir(target) == ["shard0"] and (target / "shard0").read_text() == f"save {n}"
    assert find_resume_checkpoint(target.parent) == str(target)


def test_public_names_and_the_class_path_stay_in_the_package() -> None:
    from jsonargparse._util import get_import_path

    import litpeft.slurm

    before_the_split = {  # litpeft/slurm.py's __all__, plus was_preempted (litpeft.module imports it)
        "PreemptionCheckpoint", "SlurmLayoutError", "SlurmResumeError", "atomic_save_checkpoint",
        "auto_resume_checkpoint", "check_slurm_layout", "find_resume_checkpoint", "is_slurm_job",
        "slurm_job_id", "slurm_layout_error", "slurm_plugins", "was_preempted",
    }  # fmt: skip
    assert before_the_split <= set(litpeft.slurm.__all__)
    assert all(hasattr(litpeft.slurm, name) for name in litpeft.slurm.__all__)
    # configs name it litpeft.slurm.PreemptionCheckpoint; a saved config.yaml keeps writing that path
    assert get_import_path(PreemptionCheckpoint) == "litpeft.slurm.PreemptionCheckpoint"


@pytest.mark.parametrize(
    ("signal_at", "saved_step", "saved_epoch", "next_batch"),
    [(5, 6, 1, 2), (3, 4, 0, 0)],  # preempted mid-epoch 1 / on the last batch of epoch 0
)
def test_first_run_starts_fresh_and_requeued_run_resumes_to_max_steps(
    tmp_path: Path, signal_at: int, saved_step: int, saved_epoch: int, next_batch: int
) -> None:
    # First run: nothing to resume (ckpt_path="hpc" would fail here, lightning#20347).
    assert find_resume_checkpoint(tmp_path / "resume") is None
    trainer1, model1, cb1 = run(tmp_path, signal_at_step=signal_at)
    assert model1.steps_seen[0] == (0, 0, 0)
    assert cb1.preempted and trainer1.global_step == saved_step
    ckpt = torch.load(cb1.checkpoint_path(trainer1), weights_only=False)
    assert (ckpt["global_step"], ckpt["epoch"]) == (saved_step, saved_epoch)

    # "Requeued" run: same config, no ckpt_path given -> resumes from the preemption checkpoint.
    trainer2, model2, cb2 = run(tmp_path, signal_at_step=None)
    assert not cb2.preempted
    # global_step and epoch continue where they were; no epoch restart (lightning#4265).
    assert model2.steps_seen[0] == (saved_step, saved_step // BATCHES_PER_EPOCH, next_batch)
    assert len(model2.steps_seen) == MAX_STEPS - saved_step  # only the remaining steps run
    assert trainer2.global_step == MAX_STEPS  # never past max_steps
    # Same (global_step, epoch, batch_idx) sequence and final counters as one uninterrupted run.
    ref_trainer, ref_model, _ = run(tmp_path / "reference", signal_at_step=None)
    assert model1.steps_seen + model2.steps_seen == ref_model.steps_seen
    assert (trainer2.global_step, trainer2.current_epoch) == (
        ref_trainer.global_step,
        ref_trainer.current_epoch,
    )
    if saved_step % BATCHES_PER_EPOCH == 0:
        # Preempted at an epoch boundary: bit-identical to the uninterrupted run (weights + optimizer
        # state restored). Mid-epoch, this test's plain DataLoader restarts its epoch's data order on
        # resume (Lightning warns: not resumable), so only the step/epoch counters are compared there.
        # litpeft's InstructionDataModule does continue mid-epoch (ResumableSampler); that is checked
        # end to end, batch by batch, by scripts/slurm/test_requeue.sh.
        for a, b in zip(model2.state_dict().values(), ref_model.state_dict().values(), strict=True):
            assert torch.equal(a, b)

    # The finished state was written too: one more requeue/rerun is a no-op, not a repeat.
    ckpt = torch.load(cb2.checkpoint_path(trainer2), weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS
    trainer3, model3, _ = run(tmp_path, signal_at_step=None)
    assert model3.steps_seen == []
    assert trainer3.global_step == MAX_STEPS


def test_signal_on_last_step_finishes_instead_of_requeueing(tmp_path: Path) -> None:
    trainer, model, cb = run(tmp_path, signal_at_step=MAX_STEPS - 1)
    assert not cb.preempted and not cb.requeued
    assert trainer.global_step == MAX_STEPS
    ckpt = torch.load(cb.checkpoint_path(trainer), weights_only=False)
    assert ckpt["global_step"] == MAX_STEPS  # saved by save_on_train_end


def test_auto_resume_is_opt_in_and_off_for_fast_dev_run(tmp_path: Path) -> None:
    run(tmp_path, signal_at_step=None)
    assert find_resume_checkpoint(tmp_path / "resume") is not None
    trainer = Trainer(default_root_dir=str(tmp_path), logger=False, enable_progress_bar=False)
    assert auto_resume_checkpoint(trainer) is None  # no PreemptionCheckpoint callback: never resume

    # A fast_dev_run neither resumes nor leaves a checkpoint that a real run would resume from.
    cb = PreemptionCheckpoint(dirpath=str(tmp_path / "fdr"))
    trainer = make_trainer(tmp_path, cb, fast_dev_run=True)
    assert auto_resume_checkpoint(trainer) is None
    trainer.fit(TinyModel(signal_at_step=0))
    assert not cb.preempted and not (tmp_path / "fdr").exists()


def test_setup_disables_lightning_auto_requeue() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        env = SLURMEnvironment()
    assert env.auto_requeue
    cb = PreemptionCheckpoint()
    fake_trainer = SimpleNamespace(strategy=SimpleNamespace(cluster_environment=env))
    before = signal.getsignal(signal.SIGUSR1)
    try:
        cb.setup(fake_trainer, None, "fit")  # type: ignore[arg-type]
        assert env.auto_requeue is False
        assert signal.getsignal(signal.SIGUSR1) == cb._handler
    finally:
        cb.teardown(fake_trainer, None, "fit")  # type: ignore[arg-type]
    assert signal.getsignal(signal.SIGUSR1) == before


SLURM_2X1 = {
    "SLURM_JOB_ID": "17",
    "SLURM_JOB_NAME": "train",
    "SLURM_NTASKS": "2",
    "SLURM_NTASKS_PER_NODE": "2",
    "SLURM_TASKS_PER_NODE": "2",
    "SLURM_NNODES": "1",
    "SLURM_STEP_ID": "0",
    "SLURM_STEP_NUM_TASKS": "2",
    "SLURM_STEP_NUM_NODES": "1",
    "SLURM_STEP_TASKS_PER_NODE": "2",
}


def test_layout_check_matches_and_mismatches() -> None:
    assert slurm_layout_error(2, 1, {}) is None  # not under SLURM
    assert slurm_layout_error(2, 1, SLURM_2X1) is None
    assert slurm_layout_error(4, 1, {**SLURM_2X1, "SLURM_JOB_NAME": "interactive"}) is None

    msg = slurm_layout_error(4, 1, SLURM_2X1)
    assert msg is not None
    assert "2 tasks (--nodes=1 x --ntasks-per-node=2)" in msg
    assert "devices=4 x num_nodes=1 = 4 processes" in msg
    assert "trainer.devices=2" in msg and "--ntasks-per-node=4" in msg

    two_nodes = {
        **SLURM_2X1,
        "SLURM_NTASKS": "8",
        "SLURM_STEP_NUM_TASKS": "8",
        "SLURM_NNODES": "2",
        "SLURM_STEP_NUM_NODES": "2",
        "SLURM_NTASKS_PER_NODE": "4",
        "SLURM_STEP_TASKS_PER_NODE": "4(x2)",
    }
    assert slurm_layout_error(4, 2, two_nodes) is None
    msg = slurm_layout_error(4, 1, two_nodes)
    assert msg is not None and "num_nodes=1" in msg and "trainer.num_nodes=2" in msg

    uneven = {
        **SLURM_2X1,
        "SLURM_NTASKS": "3",
        "SLURM_STEP_NUM_TASKS": "3",
        "SLURM_STEP_TASKS_PER_NODE": "2,1",
    }
    uneven.pop("SLURM_NTASKS_PER_NODE")
    msg = slurm_layout_error(2, 2, uneven)
    assert msg is not None and "uneven" in msg


def test_layout_check_detects_missing_srun() -> None:
    batch_step = {k: v for k, v in SLURM_2X1.items() if not k.startswith("SLURM_STEP")}
    msg = slurm_layout_error(2, 1, batch_step)
    assert msg is not None and "srun" in msg and "1 of the 2" in msg


def test_check_slurm_layout_raises_on_trainer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    trainer = Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False)
    check_slurm_layout(trainer)  # outside SLURM: fine

    # Rank 0 of a 2-task step whose Trainer was (mis)configured for 1 device.
    for key, value in {**SLURM_2X1, "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():
        monkeypatch.setenv(key, value)
    trainer = Trainer(default_root_dir=str(tmp_path), accelerator="cpu", devices=1, logger=False)
    with pytest.raises(SlurmLayoutError, match=r"2 tasks .* devices=1 x num_nodes=1 = 1 processes"):
        check_slurm_layout(trainer)
    trainer = Trainer(
        default_root_dir=str(tmp_path), accelerator="cpu", devices=2, strategy="ddp", logger=False
    )
    check_slurm_layout(trainer)  # 2 tasks x 1 node == devices=2 x num_nodes=1


def test_slurm_plugins_and_job_id() -> None:
    assert slurm_plugins(environ={}) == []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plugins = slurm_plugins(environ=SLURM_2X1)
        given = SLURMEnvironment()
    assert len(plugins) == 1 and isinstance(plugins[0], SLURMEnvironment)
    assert plugins[0].auto_requeue is False
    assert slurm_plugins([given], environ=SLURM_2X1) == [given] and given.auto_requeue is False
    assert slurm_job_id({"SLURM_JOB_ID": "5"}) == "5"
    assert slurm_job_id({"SLURM_JOB_ID": "9", "SLURM_ARRAY_JOB_ID": "8", "SLURM_ARRAY_TASK_ID": "3"}) == "8_3"
    assert slurm_job_id({}) is None


def test_auto_resume_only_resumes_this_jobs_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A requeued job keeps its SLURM job id and resumes; a new job must not silently take over the old run."""
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    trainer1, _, cb1 = run(tmp_path, signal_at_step=3, requeue=False)
    path = cb1.checkpoint_path(trainer1)
    assert cb1.preempted and Path(path + ".slurm_job").read_text().strip() == "100"

    trainer = make_trainer(tmp_path, PreemptionCheckpoint())
    assert auto_resume_checkpoint(trainer) == path  # same job (requeued): resume

    monkeypatch.setenv("SLURM_JOB_ID", "200")  # another job with the same default_root_dir
    with pytest.raises(SlurmResumeError, match=r"written by SLURM job 100, not by this job \(200\)"):
        auto_resume_checkpoint(trainer)
    assert find_resume_checkpoint(tmp_path / "resume") == path  # the file itself is still there

    chained = make_trainer(
        tmp_path, PreemptionCheckpoint(resume_other_jobs=True)
    )  # sbatch --dependency chains
    assert auto_resume_checkpoint(chained) == path

    os.remove(path + ".slurm_job")  # a checkpoint put there by hand (no marker) is resumed
    assert auto_resume_checkpoint(trainer) == path


def test_requeued_job_prefers_its_own_checkpoint_over_an_explicit_ckpt_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A fine-tune started with --ckpt_path and then preempted: the requeued job (same command line) must
    resume from its preemption checkpoint, not from the old starting point."""
    start = tmp_path / "start.ckpt"
    start.write_bytes(b"not read here")
    monkeypatch.setenv("SLURM_JOB_ID", "100")
    trainer = make_trainer(tmp_path, PreemptionCheckpoint())
    assert auto_resume_checkpoint(trainer, str(start)) == str(start)  # nothing saved yet

    _, _, cb = run(tmp_path, signal_at_step=3, requeue=False)  # job 100 preempted, checkpoint written
    own = cb.checkpoint_path(trainer)
    assert auto_resume_checkpoint(trainer, str(start)) == str(start)  # first run of the job: as given
    monkeypatch.setenv("SLURM_RESTART_COUNT", "1")
    assert auto_resume_checkpoint(trainer, str(start)) == own  # requeued: its own, newer checkpoint
    monkeypatch.setenv("SLURM_JOB_ID", "200")  # another job, explicit path: as given, no error
    assert auto_resume_checkpoint(trainer, str(start)) == str(start)
