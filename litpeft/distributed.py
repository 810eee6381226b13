"""FSDP for PeftLM: the frozen base (quantized or not) and the adapter sharded across ranks.

Lightning's ``FSDPStrategy`` (FSDP1) refuses a CPU accelerator and does not shard a quantized base.
:class:`PeftFSDPStrategy` is Lightning's ``ModelParallelStrategy`` with a data-parallel mesh only, and
``PeftLM.configure_model`` applies FSDP2 ``fully_shard`` to each decoder layer and then to the whole model
(:func:`shard_model`). The same YAML runs on CPU (gloo) and on GPUs (nccl)::

    trainer:
      strategy: {class_path: litpeft.distributed.PeftFSDPStrategy}
      devices: 2

Building without a full copy on every rank: rank 0 loads the base (and quantizes it, and applies the
method with its seed); every other rank builds the same modules on the meta device (no memory, no disk
read). After sharding, the other ranks allocate only their shards, and rank 0's tensors are broadcast
and sliced into them. Peak memory: one full copy on rank 0, one shard elsewhere.

Quantized bases shard too: :class:`~litpeft.quantize.QuantizedLinear` keeps its 4/8-bit data and
absmaxes as plain parameters, which FSDP2 shards along the first dimension and all-gathers before use.

Checkpoints hold full tensors: with ``save_distributed_checkpoint=False`` (the default here) the trainable
tensors are gathered to rank 0 and written to one file, which loads under the same strategy (resume) or
on a single device; the frozen base is never gathered into a checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from litpeft.adapter_dir import FINGERPRINT_ELEMENTS, base_fingerprint
from litpeft.methods.layout import decoder_layers

if TYPE_CHECKING:
    from torch.distributed.device_mesh import DeviceMesh

    from litpeft.module import PeftLM

try:
    from torch.distributed.constants import default_pg_timeout
except ImportError:  # pragma: no cover
    default_pg_timeout = timedelta(minutes=30)


class PeftFSDPStrategy(ModelParallelStrategy):
    """Fully sharded data parallel (FSDP2) over all devices, for :class:`~litpeft.module.PeftLM`.

    Args:
        save_distributed_checkpoint: write one shard file per rank instead of one full checkpoint
            (default ``False``: the adapter is small, and a full file loads anywhere).
        process_group_backend: ``gloo`` or ``nccl``; default: by device.
        timeout: collective timeout.
    """

    def __init__(
        self,
        save_distributed_checkpoint: bool = False,
        process_group_backend: str | None = None,
        timeout: timedelta | None = default_pg_timeout,
    ) -> None:
        super().__init__(
            data_parallel_size="auto",
            tensor_parallel_size=1,
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timeout,
        )

    def setup_environment(self) -> None:
        # ModelParallelStrategy's "auto" puts the data-parallel dimension across nodes only.
        self._data_parallel_size = self.num_nodes * self.num_processes
        super().setup_environment()

    def lightning_module_state_dict(self) -> dict[str, Any]:
        """Full trainable tensors on rank 0 (an all-gather of each shard); the frozen base is left out."""
        if self._save_distributed_checkpoint:
            return super().lightning_module_state_dict()

        state = {}
        for name, p in self.lightning_module.named_parameters():
            if p.requires_grad:
                full = p.full_tensor() if isinstance(p, DTensor) else p
                if self.global_rank == 0:
                    state[name] = full.detach().cpu()
        return state


def data_parallel_mesh(module: PeftLM) -> DeviceMesh | None:
    """The data-parallel mesh when ``module`` runs under :class:`PeftFSDPStrategy`, else ``None``."""
    trainer = module._trainer
    if trainer is None or not isinstance(trainer.strategy, PeftFSDPStrategy):
        return None
    return trainer.strategy.device_mesh["data_parallel"]


def shard_model(build: Callable[..., nn.Module], mesh: DeviceMesh) -> nn.Module:
    """``build()`` on rank 0, ``build(meta=True)`` elsewhere; FSDP2 per decoder layer; weights from rank 0."""
    rank = dist.get_rank()
    model = build(meta=rank != 0)
    full_state = model.state_dict() if rank == 0 else {}
    layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    device = (
        torch.device(mesh.device_type, torch.cuda.current_device()) if mesh.device_type == "cuda" else "cpu"
    )
    if rank != 0:
        model.to_empty(device=device)
    set_model_state_dict(
        model, full_state, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    )
    del full_state
    for buffer in model.buffers():  # e.g. rotary inv_freq: not in the state dict, so not broadcast above
        dist.broadcast(buffer.data, src=0)
    return model


def full_adapter(module: PeftLM) -> tuple[dict[str, torch.Tensor] | None, str | None]:
    """The adapter tensors and base fingerprint as full tensors, when the model is FSDP-sharded.

    A collective: every rank must call it (``PeftLM.on_fit_end`` does, then rank 0 writes). Returns
    ``(None, None)`` for a model that is not sharded, where ``save_adapter`` reads the model directly.
    """
    state = module.method.adapter_state_dict(module.model)
    emb = module.model.get_input_embeddings().weight
    if not isinstance(emb, DTensor) and not any(isinstance(v, DTensor) for v in state.values()):
        return None, None
    tensors = {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().cpu() for k, v in state.items()}
    if isinstance(emb, DTensor):
        # Only the leading elements are hashed: rank 0's shard holds them unless the table is tiny.
        rows_on_rank0 = -(-emb.shape[0] // emb.device_mesh.size())
        enough = rows_on_rank0 * emb[0].numel() >= FINGERPRINT_ELEMENTS
        emb = emb.to_local() if enough else emb.full_tensor()
    return tensors, base_fingerprint(module.model, embedding=emb.detach())
