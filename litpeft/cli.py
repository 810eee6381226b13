"""The ``litpeft`` command: LightningCLI for ``fit|validate|test|predict``, plus tool subcommands.

litpeft fit --config configs/lora.yaml [--model.method.init_args.r 16 ...]
litpeft fit --config configs/lora.yaml --print_config   # the full config, runnable as is
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from argparse import ArgumentError
from collections.abc import Callable
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import Callback, ProgressBar
from lightning.pytorch.cli import (
    LightningArgumentParser,
    LightningCLI,
    LRSchedulerTypeTuple,
    SaveConfigCallback,
)
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning.pytorch.utilities.imports import _RICH_AVAILABLE
from torch.optim import Optimizer

from litpeft.commands import COMMANDS
from litpeft.data import InstructionDataModule
from litpeft.errors import InvalidArgument, LitPeftError, find_cause, parse_error_line
from litpeft.method_switch import choose_switched
from litpeft.methods import METHODS
from litpeft.module import DEFAULT_OPTIMIZER, PeftLM
from litpeft.monitoring import SpeedMonitor, StepProgressBar, hyperparameters, quiet_lightning
from litpeft.preflight import check_checkpoint, check_config_files, check_fit
from litpeft.resume import STOPPED_BY_SIGTERM, lock_run, make_resumable, resolve_ckpt_path, run_dir
from litpeft.slurm import PreemptionCheckpoint, auto_resume_checkpoint, check_slurm_layout, is_slurm_job

log = logging.getLogger(__name__)

# Tool subcommands outside the Trainer (generate, merge, export, ...): name -> main(argv).
TOOLS: dict[str, Callable[[list[str]], None]] = {}
TOOLS.update(COMMANDS)  # generate, evaluate, merge, export, download, serve


class _Parser(LightningArgumentParser):
    """``--print_config`` prints the method's args and the LR the fit uses (method_switch), a config that
    runs as printed, not what jsonargparse kept from the method a config file set before the switch."""

    argv: list[str] = []

    def _parse_common(self, cfg: Any, *args: Any, **kwargs: Any) -> Any:
        request = getattr(self, "print_config", None)  # jsonargparse prints it (and exits) in there
        if request is not None:
            key = request["key"]  # the subcommand, None without one
            choose_switched(cfg[key] if key else cfg, self.argv, key)
        return super()._parse_common(cfg, *args, **kwargs)


class _SaveConfig(SaveConfigCallback):
    """Lightning's ``config.yaml``, in the run directory (:func:`litpeft.resume.run_dir`) instead of
    ``trainer.log_dir``: W&B's working directory, MLflow's ``./mlruns``, or ``None`` for MLflow with a
    database or a server (then Lightning's own callback fails with a bare ``AssertionError``)."""

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        directory = run_dir(trainer)
        if self.save_to_log_dir and not self.already_saved and directory != trainer.log_dir:
            if trainer.is_global_zero:
                os.makedirs(directory, exist_ok=True)
                path = os.path.join(directory, self.config_filename)
                self.parser.save(
                    self.config, path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile
                )
            self.save_to_log_dir = False  # written: Lightning's setup does the rest (save_config hook)
        super().setup(trainer, pl_module, stage)

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """The config as the hyperparameters of W&B, MLflow and other loggers (W&B's config panel, MLflow's
        params). TensorBoard's and CSV's run directories hold config.yaml already. Rank zero only."""
        config = self.config.clone()
        config.pop("config", None)  # the --config file paths: their values are logged
        params = hyperparameters(config.as_dict())
        for logger in trainer.loggers:
            if not isinstance(logger, TensorBoardLogger | CSVLogger):
                logger.log_hyperparams(params)


class LitPeftCLI(LightningCLI):
    """LightningCLI with PeftLM and InstructionDataModule as defaults (both replaceable by ``class_path``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        kwargs.setdefault("save_config_callback", _SaveConfig)
        kwargs.setdefault("parser_class", _Parser)
        self.argv = list(sys.argv[1:] if args is None else args)  # where an LR or a method arg came from
        super().__init__(
            PeftLM,
            InstructionDataModule,
            subclass_mode_model=True,
            subclass_mode_data=True,
            args=args,
            run=run,
            auto_configure_optimizers=True,
            **kwargs,
        )

    def add_arguments_to_parser(self, parser: Any) -> None:
        # also at the end of the 500 lines of --help (argparse reflows an epilog: one sentence)
        parser.epilog = (
            "The model's, the method's and the data's options: --model.help PeftLM, "
            "--model.method.help LoRA (or another method), --data.help InstructionDataModule."
        )
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
        parser.set_defaults(
            model={"class_path": "litpeft.module.PeftLM"},
            data={"class_path": "litpeft.data.InstructionDataModule"},
            optimizer=DEFAULT_OPTIMIZER,
        )

    def init_parser(self, **kwargs: Any) -> LightningArgumentParser:
        parser = super().init_parser(**kwargs)
        parser.argv = self.argv
        return parser

    def before_instantiate_classes(self) -> None:
        # a method switched on the command line: its own args and LR, not the previous method's
        config = self.config[self.subcommand] if self.subcommand else self.config
        choose_switched(config, self.argv, self.subcommand)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # A run you can watch (litpeft.monitoring): speed and memory at each log step, a bar over the
        # run's steps; each unless the config brings its own.
        given = [*(config.get("callbacks") or []), *callbacks]
        if not any(isinstance(c, SpeedMonitor) for c in given):
            callbacks = [*callbacks, SpeedMonitor()]
        bar = config.get("enable_progress_bar") is not False and not any(
            isinstance(c, ProgressBar) for c in given
        )
        if bar and _RICH_AVAILABLE:
            callbacks = [*callbacks, StepProgressBar()]
        return super()._instantiate_trainer(config, callbacks)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        try:
            trainer = super().instantiate_trainer(**kwargs)
        except (MisconfigurationException, ValueError) as e:  # Lightning checks its own arguments here
            raise LitPeftError(f"trainer: {str(e).strip().splitlines()[0]}") from None
        check_slurm_layout(trainer)  # a clear error instead of a DDP hang when the job and Trainer disagree
        if is_slurm_job() and not any(isinstance(c, PreemptionCheckpoint) for c in trainer.callbacks):
            trainer.callbacks.append(PreemptionCheckpoint())
        make_resumable(trainer)  # atomic checkpoints, one checkpoint dir per run, the run-directory lock
        return trainer

    def _parse_ckpt_path(self) -> None:
        # Lightning reads an explicit --ckpt_path here, before the run: an unreadable one is one line.
        try:
            super()._parse_ckpt_path()
        except Exception as e:
            if find_cause(e) is None:
                config = self.config.get(str(self.config.get("subcommand")), self.config)
                check_checkpoint(config.get("ckpt_path"))
            raise

    def before_fit(self) -> None:
        # Under SLURM, resume from the preemption checkpoint when this (requeued) job wrote one.
        config = self.config_init[self.subcommand]
        ckpt_path = auto_resume_checkpoint(self.trainer, config.get("ckpt_path"))
        ckpt_path = resolve_ckpt_path(self.trainer, ckpt_path)  # `last`: the run's newest
        check_fit(self.trainer, self.model, ckpt_path)  # bad input fails before anything is written
        lock_run(self.trainer)  # one fit per run directory; a second one stops here with one line
        config["ckpt_path"] = ckpt_path

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        # LightningCLI would build the optimizer now, from all parameters of a model that does not exist
        # yet (PeftLM builds its base in configure_model). Hand the configs to PeftLM instead, which
        # builds them over the trainable tensors when Lightning asks.
        if not self.auto_configure_optimizers or subcommand != "fit":
            return
        parser = self._parser(subcommand)
        opt_key = next(iter(parser._optimizers), None)
        sched_key = next(iter(parser._lr_schedulers), None)
        if opt_key and self._get(self.config_init, opt_key):
            self.model.optimizer_init = (
                self._get(self.config, opt_key).as_dict()
                if hasattr(self._get(self.config, opt_key), "as_dict")
                else self._get(self.config, opt_key)
            )
        if sched_key and self._get(self.config_init, sched_key):
            cfg = self._get(self.config, sched_key)
            self.model.lr_scheduler_init = cfg.as_dict() if hasattr(cfg, "as_dict") else cfg


def _user_error(exc: BaseException) -> str | None:
    """The one line to show for ``exc``: a LitPeftError anywhere in its chain, or a compact parse error."""
    found = find_cause(exc)
    if isinstance(found, InvalidArgument) and found.scope == "method":
        found = found.under("model.method.init_args.")  # where a fit's config holds the method's arguments
    if found is not None:
        return str(found)
    if isinstance(exc, ArgumentError):
        return parse_error_line(str(exc), sorted(METHODS))
    return None


TRAINER_COMMANDS = {
    "fit": "Train a PEFT method on instruction data (Lightning's Trainer.fit).",
    "validate": "One evaluation pass over the validation set.",
    "test": "One evaluation pass over the test set.",
    "predict": "Run the model's predict step over the data.",
}


def overview() -> str:
    """What ``litpeft``, ``litpeft -h`` print: every subcommand, the trainer's and the tools'."""
    rows = list(TRAINER_COMMANDS.items())
    rows += [(name, (tool.__doc__ or "").split(": ", 1)[-1].strip()) for name, tool in TOOLS.items()]
    width = max(len(name) for name, _ in rows)
    lines = [
        "usage: litpeft <command> [options]     (litpeft <command> --help: its options)",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, text in rows]
    lines += [
        "",
        "examples:",
        "  litpeft fit --config configs/lora.yaml --model.method.init_args.r 16",
        "  litpeft fit --config configs/lora.yaml --print_config     # the full config, runnable as is",
        "  litpeft generate --adapter runs/lora/adapter --prompt 'Name three colors.'",
        "  litpeft download Qwen/Qwen2.5-0.5B-Instruct     # then --model.init_args.model Qwen/Qwen2.5-0.5B-Instruct",
    ]
    return "\n".join(lines)


def hidden_options() -> str:
    """What ``litpeft fit --help`` prints first: how to see the options its list cannot show (the model,
    the method and the data are each chosen by ``class_path``, so their options hide behind ``.help``)."""
    methods = ", ".join(sorted({cls.__name__ for cls in METHODS.values()}))
    return "\n".join(
        [
            "The model's, the method's and the data's options are not in the list below; to see them:",
            "  litpeft fit --model.help PeftLM                 model, method, quantize, gradient_checkpointing, ...",
            "  litpeft fit --model.method.help LoRA            a method's options; methods: " + methods,
            "  litpeft fit --data.help InstructionDataModule   train_file, prompt_style, max_seq_length, ...",
            "and set them as --model.method.init_args.r 16, --data.init_args.train_file my.jsonl, ...",
            "",
        ]
    )


def main(argv: list[str] | None = None) -> None:
    from_command_line = argv is None
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv in ([], ["-h"], ["--help"]):
        print(overview())
        return
    if argv[0] in TRAINER_COMMANDS and {"-h", "--help"} & set(argv):
        print(hidden_options())
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    quiet_lightning()
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        check_config_files(argv)
        if argv and argv[0] in TOOLS:
            TOOLS[argv[0]](argv[1:])
        else:
            LitPeftCLI(args=None if from_command_line else argv, parser_kwargs={"exit_on_error": False})
    except SIGTERMException:  # a SystemExit without a code: exit 0, as if the run had finished
        print(STOPPED_BY_SIGTERM, file=sys.stderr)
        sys.exit(128 + signal.SIGTERM)
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as e:
        message = _user_error(e)
        if message is None:
            raise
        print(f"litpeft: error: {message}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
