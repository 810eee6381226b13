"""Two nodes, simulated on one machine: DDP and FSDP across two node ranks over 127.0.0.1.

Each node is one process started here with the variables a multi-node launcher sets on every node
(``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK=0``, ``WORLD_SIZE=2``) and no
SLURM or torchelastic variables, so Lightning picks its ``LightningEnvironment`` for a run it did not
launch (``LOCAL_RANK`` set) with ``num_nodes=2, devices=1``. gloo is bound to the loopback interface
(``GLOO_SOCKET_IFNAME=lo``), so the two "nodes" talk over 127.0.0.1 as two hosts would over their
network. tests/multinode_worker.py trains with tests/distributed_worker.py's ``fit``; the single-process
references run here with the same global batch (4 = 2 nodes x 2), as in tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_worker import fit
from test_distributed import adapter, assert_same_adapter, write_equal_length_data

# Starts its own processes on fixed world sizes and times collectives: `make test` runs it alone, not on the xdist workers.
pytestmark = pytest.mark.serial

WORKER = Path(__file__).parent / "multinode_worker.py"
NODES = 2


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env(node_rank: int, port: int) -> dict[str, str]:
    """This process's environment as a launcher would set it on node ``node_rank``, nothing else."""
    drop = ("SLURM_", "TORCHELASTIC_", "PMI_", "OMPI_", "LSB_", "KUBERNETES_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    for var in ("GROUP_RANK", "RANK", "LOCAL_WORLD_SIZE", "JSM_NAMESPACE_RANK"):
        env.pop(var, None)
    root = str(WORKER.parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env |= {
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "NODE_RANK": str(node_rank),
        "LOCAL_RANK": "0",
        "WORLD_SIZE": str(NODES),
        "GLOO_SOCKET_IFNAME": "lo",
    }
    return env


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("nodes")
    write_equal_length_data(out / "data")
    port = free_port()
    logs = [out / f"node{n}.log" for n in range(NODES)]
    procs = []
    for n in range(NODES):
        with open(logs[n], "w") as log:
            cmd = [sys.executable, str(WORKER), str(out)]
            procs.append(subprocess.Popen(cmd, env=node_env(n, port), stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [p.wait(timeout=900) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    tails = "\n".join(f"--- {log.name}\n{log.read_text()[-3000:]}" for log in logs)
    assert codes == [0] * NODES, tails
    fit(out, "single_lora", "auto", 1, 4, 2)
    fit(out, "single_nf4", "auto", 1, 4, 4, "nf4")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("run", ["nodes_ddp", "nodes_fsdp"])
def test_each_process_is_one_node_of_one_run(runs: Path, run: str) -> None:
    for n in range(NODES):
        seen = json.loads((runs / run / f"node{n}.json").read_text())
        assert seen == {
            "cluster_environment": "LightningEnvironment",
            "creates_processes_externally": True,
            "num_nodes": NODES,
            "node_rank": n,
            "local_rank": 0,
            "global_rank": n,
            "world_size": NODES,
            "main_address": "127.0.0.1",
        }


@pytest.mark.slow
def test_ddp_on_two_nodes_equals_one_process(runs: Path) -> None:
    single = adapter(runs, "single_lora")
    assert all(v.abs().sum() > 0 for k, v in single.items() if "lora_B" in k)  # trained away from B = 0
    assert_same_adapter(adapter(runs, "nodes_ddp"), single, atol=2e-4)


@pytest.mark.slow
def test_qlora_fsdp_on_two_nodes_equals_one_process(runs: Path) -> None:
    assert_same_adapter(adapter(runs, "nodes_fsdp"), adapter(runs, "single_nf4"), atol=2e-4)
