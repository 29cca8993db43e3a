"""Our transformer against diffusers' AuraFlowTransformer2DModel (fp32, tiny random weights)."""

import pytest
import torch

from auraflow_edge.engine.backends.torch_backend import load_transformer
from auraflow_edge.engine.errors import UserError
from auraflow_edge.engine.model.checkpoint import open_model
from auraflow_edge.engine.model.config import AURAFLOW_V02, AURAFLOW_V03, check_latent_size
from auraflow_edge.engine.model.transformer import AuraFlowTransformer


@pytest.fixture(scope="module")
def models(tiny_dir):
    from diffusers import AuraFlowTransformer2DModel

    ref = AuraFlowTransformer2DModel.from_pretrained(tiny_dir / "transformer").eval()
    ours = load_transformer(open_model(tiny_dir), torch.float32, torch.device("cpu"))
    return ours, ref


@pytest.mark.parametrize("hw", [(8, 8), (8, 12), (14, 6)])
def test_matches_diffusers(models, hw):
    ours, ref = models
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, *hw, generator=g)
    ctx = torch.randn(2, 7, ref.config.joint_attention_dim, generator=g)
    t = torch.tensor([0.93, 0.21])
    with torch.no_grad():
        a = ours(x, ctx, timestep=t)
        b = ref(x, encoder_hidden_states=ctx, timestep=t).sample
    assert a.shape == b.shape == x.shape
    assert (a - b).abs().max().item() < 1e-5
    assert b.abs().max().item() > 0.1  # the comparison is not between two near-zero tensors


def test_precomputed_modulation_equals_timestep_path(models):
    ours, _ = models
    x, ctx, t = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 32), torch.tensor([0.5, 0.5])
    with torch.no_grad():
        mod = ours.compute_modulation(t[:1])  # (1, M, D), shared across the CFG batch
        assert mod.shape == (1, ours.cfg.num_modulations, ours.cfg.hidden)
        torch.testing.assert_close(
            ours(x, ctx, modulation=mod), ours(x, ctx, timestep=t), rtol=1e-6, atol=1e-6
        )


def test_full_size_parameter_count():
    with torch.device("meta"):
        m = AuraFlowTransformer(AURAFLOW_V03)
    n = sum(p.numel() for p in m.parameters())
    assert abs(n / 1e9 - 6.86) < 0.01
    mod = sum(lin.weight.numel() for lin in m.modulation_linears()) + sum(
        p.numel() for p in m.time_step_proj.parameters()
    )
    assert abs(mod / 1e9 - 2.29) < 0.01
    assert AURAFLOW_V03.num_modulations == 242 and AURAFLOW_V03.ff_hidden == 8192


def test_latent_beyond_positional_grid_is_refused():
    check_latent_size(AURAFLOW_V02, 128, 128)  # 1024 px fits v0.2
    with pytest.raises(UserError, match="1024 px"):
        check_latent_size(AURAFLOW_V02, 130, 128)
    check_latent_size(AURAFLOW_V03, 192, 192)
    with pytest.raises(UserError, match="1536 px"):
        check_latent_size(AURAFLOW_V03, 194, 64)
