"""Run by tests/test_multinode.py once per simulated node (not a test module)::

    MASTER_ADDR=127.0.0.1 MASTER_PORT=<port> NODE_RANK=<0|1> LOCAL_RANK=0 WORLD_SIZE=2 \\
        python tests/multinode_worker.py OUT

Two such processes are two nodes of one Lightning run (``num_nodes=2, devices=1``): ``LOCAL_RANK`` in the
environment tells Lightning's ``LightningEnvironment`` that the processes were started externally, so it
spawns none; the global rank is ``NODE_RANK x devices + LOCAL_RANK``. With tests/distributed_worker.py's
``fit`` (the same seed, model and data as the other distributed tests) it trains

- ``nodes_ddp``: LoRA under DDP, 2 steps of 2 samples per node;
- ``nodes_fsdp``: LoRA on an nf4 base under PeftFSDPStrategy with gradient checkpointing, 4 steps of 2
  samples per node;

and writes what each Trainer saw of the cluster to OUT/<run>/node<NODE_RANK>.json.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed_worker import fit  # noqa: E402

from litpeft.distributed import PeftFSDPStrategy  # noqa: E402


def main(out: Path) -> None:
    runs = {
        "nodes_ddp": lambda: fit(out, "nodes_ddp", "ddp", 1, 2, 2, num_nodes=2),
        "nodes_fsdp": lambda: fit(out, "nodes_fsdp", PeftFSDPStrategy(), 1, 2, 4, "nf4", True, num_nodes=2),
    }
    for name, run in runs.items():
        trainer = run()
        strategy = trainer.strategy
        seen = {
            "cluster_environment": type(strategy.cluster_environment).__name__,
            "creates_processes_externally": strategy.cluster_environment.creates_processes_externally,
            "num_nodes": trainer.num_nodes,
            "node_rank": trainer.node_rank,
            "local_rank": trainer.local_rank,
            "global_rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "main_address": strategy.cluster_environment.main_address,
        }
        (out / name).mkdir(exist_ok=True)  # only rank 0 writes the adapter there
        (out / name / f"node{os.environ['NODE_RANK']}.json").write_text(json.dumps(seen))
    # Leave together: a node that exits while its peer still tears down gloo's connections aborts the
    # peer ("terminate called without an active exception", exit -6).
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
