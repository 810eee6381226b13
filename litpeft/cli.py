"""The ``litpeft`` command: LightningCLI for ``fit|validate|test|predict``, plus tool subcommands.

litpeft fit --config configs/lora.yaml [--model.method.init_args.r 16 ...]
litpeft fit --config configs/lora.yaml --print_config   # the full config, runnable as is
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

from lightning.pytorch.cli import LightningCLI, LRSchedulerTypeTuple
from torch.optim import Optimizer

from litpeft.commands import COMMANDS
from litpeft.data import InstructionDataModule
from litpeft.errors import LitPeftError
from litpeft.module import PeftLM

# Tool subcommands outside the Trainer (generate, merge, export, ...): name -> main(argv).
TOOLS: dict[str, Callable[[list[str]], None]] = {}
TOOLS.update(COMMANDS)  # generate, evaluate, merge, export


class LitPeftCLI(LightningCLI):
    """LightningCLI with PeftLM and InstructionDataModule as defaults (both replaceable by ``class_path``)."""

    def __init__(self, args: list[str] | None = None, run: bool = True, **kwargs: Any) -> None:
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
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
        parser.add_optimizer_args((Optimizer,))
        parser.add_lr_scheduler_args(LRSchedulerTypeTuple)
        parser.set_defaults(
            model={"class_path": "litpeft.module.PeftLM"},
            data={"class_path": "litpeft.data.InstructionDataModule"},
            optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 2e-4, "weight_decay": 0.0}},
        )

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


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        if argv and argv[0] in TOOLS:
            TOOLS[argv[0]](argv[1:])
        else:
            LitPeftCLI(args=argv)
    except LitPeftError as e:
        print(f"litpeft: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
