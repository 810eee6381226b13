"""A method's own training term (AdaLoRA's orthogonality regulariser) is part of the preference loss too."""

from __future__ import annotations

import pytest
import torch
from preference_helpers import batch, policy

from litpeft.methods import AdaLoRA


def test_dpo_with_adalora_adds_the_orthogonality_regulariser() -> None:
    """Hand-computed R(P, Q) (peft's form: the mean Frobenius norm of P^T P - I and Q Q^T - I over the
    adapted layers), scaled by orth_reg_weight, is what the DPO training step adds to the DPO loss."""
    module = policy("dpo", method=AdaLoRA(init_r=4, target_r=2, orth_reg_weight=0.3, total_step=10))
    data = batch(module)
    params = dict(module.model.named_parameters())
    qs = sorted(n for n in params if n.endswith("lora_A"))  # Q: r x in
    assert qs and all(n[: -len("lora_A")] + "lora_B" in params for n in qs)
    norms = []
    for name in qs:
        q, p = params[name], params[name[: -len("lora_A")] + "lora_B"]
        norms.append(torch.linalg.norm(q @ q.T - torch.eye(q.shape[0])))
        norms.append(torch.linalg.norm(p.T @ p - torch.eye(p.shape[1])))
    regulariser = 0.3 * torch.stack(norms).mean()
    assert regulariser.item() > 0.1  # noise on P and Q: the term is not negligible here
    dpo, _, _ = module.preference_loss(data)
    with pytest.warns(UserWarning, match="self.log"):  # no trainer here
        loss = module.training_step(data, 0)
    torch.testing.assert_close(loss, dpo + regulariser, rtol=1e-5, atol=1e-5)
