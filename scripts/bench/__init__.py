"""The pieces of ``scripts/benchmark.py`` (the driver) and ``scripts/ab_speed.py``.

- :mod:`bench.config`: what is compared (:data:`~bench.config.METHODS`), the shared hyperparameters, the
  speed changes that can be switched off (:data:`~bench.config.SPEED_CHANGES`, from
  :class:`litpeft.speedups.Speedups`);
- :mod:`bench.data`: the demo files, the benchmark models, the batches every side trains on;
- :mod:`bench.measure`: step timer, resident memory, model FLOPs, matmul peak, machine facts;
- :mod:`bench.run_litpeft`, :mod:`bench.run_peft`, :mod:`bench.run_trainer`: one comparison each;
- :mod:`bench.worker`: one configuration in its own process (ablation switches, the runner, the figures);
- :mod:`bench.report`, :mod:`bench.plots`: docs/benchmark.md and its SVG/PNG charts;
- :mod:`bench.profiling`: ``--profile``.

The scripts put ``scripts/`` on ``sys.path`` (Python does, running a file from it), so these import as
``bench.*``.
"""
