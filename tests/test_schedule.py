import numpy as np
import pytest
import torch

from auraflow_edge.engine.errors import UserError
from auraflow_edge.engine.runtime.schedule import flow_match_schedule


@pytest.mark.parametrize("n", [1, 2, 4, 28, 50])
@pytest.mark.parametrize("shift", [1.73, 3.0])
def test_sigmas_bit_equal_to_diffusers(n, shift):
    from diffusers import FlowMatchEulerDiscreteScheduler

    s = FlowMatchEulerDiscreteScheduler(shift=shift)
    s.set_timesteps(n)
    ours = flow_match_schedule(n, shift)
    np.testing.assert_array_equal(ours.sigmas, s.sigmas.numpy())
    # what the pipeline feeds the transformer: torch.tensor([t / 1000])
    ref_t = np.array([torch.tensor([t / 1000]).item() for t in s.timesteps], dtype=np.float32)
    np.testing.assert_array_equal(ours.timesteps, ref_t)
    assert ours.sigmas[-1] == 0 and ours.sigmas.dtype == np.float32


def test_last_sigma_is_double_shifted_for_parity():
    a = flow_match_schedule(4, 1.73)
    b = flow_match_schedule(4, 1.73, double_shift_last=False)
    assert a.sigmas[-2] > b.sigmas[-2]


@pytest.mark.parametrize("bad", [0, -3, 2.5])
def test_bad_steps(bad):
    with pytest.raises(UserError):
        flow_match_schedule(bad)
