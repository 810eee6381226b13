"""The speed-change switches: off inside a block, restored after it; unknown names refused."""

from __future__ import annotations

import pytest

from litpeft.speedups import SPEEDUPS, Speedups, speedups_off


def test_switches_are_off_inside_the_block_and_restored_after() -> None:
    assert all(getattr(SPEEDUPS, n) for n in Speedups.names())
    with speedups_off(["padding_mask", "frozen_bf16"]):
        assert not SPEEDUPS.padding_mask and not SPEEDUPS.frozen_bf16 and SPEEDUPS.cpu_sdpa
    assert all(getattr(SPEEDUPS, n) for n in Speedups.names())


def test_an_unknown_switch_is_refused() -> None:
    with (
        pytest.raises(ValueError, match="unknown speed change 'warp_drive'"),
        speedups_off(["padding_mask", "warp_drive"]),
    ):
        pass
    assert all(getattr(SPEEDUPS, n) for n in Speedups.names())
