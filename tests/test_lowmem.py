"""Low-memory runtime: tiled VAE decode, the stage planner, and measured peaks against the plan."""

import numpy as np
import pytest
from conftest import GEN

from auraflow_edge.engine.errors import UserError
from auraflow_edge.engine.runtime.pipeline import Pipeline
from auraflow_edge.engine.runtime.planner import GiB, MiB, make_plan, parse_bytes
from auraflow_edge.engine.runtime.vae_tiling import decode_tiled, tile_starts


def local_decoder(z):
    """A decoder whose every output pixel depends on one latent: tiling must be exact."""
    w = np.array([[0.3, -0.2, 0.5, 0.1], [0.1, 0.4, -0.3, 0.2], [-0.5, 0.1, 0.2, 0.3]], np.float32)
    y = np.einsum("oc,bchw->bohw", w, z)
    return np.repeat(np.repeat(y, 8, axis=2), 8, axis=3)


@pytest.mark.parametrize("tiles,shape", [(2, (24, 40)), (3, (33, 17)), (4, (64, 64))])
def test_tiling_is_exact_for_a_local_decoder(tiles, shape):
    z = np.random.default_rng(0).standard_normal((1, 4, *shape)).astype(np.float32)
    np.testing.assert_allclose(
        decode_tiled(local_decoder, z, tiles, overlap=4), local_decoder(z), rtol=1e-5, atol=1e-5
    )


def test_tile_starts_cover_everything():
    for size, tile, ov in [(100, 40, 8), (64, 64, 8), (65, 33, 4)]:
        s = tile_starts(size, tile, ov)
        assert s[0] == 0 and s[-1] + tile == max(size, tile)
        assert all(b - a <= tile - ov for a, b in zip(s, s[1:]))


def test_tiled_real_vae_close_to_untiled(tiny_dir):
    """The SDXL-style VAE's mid-block attention is global, so tiling changes pixels slightly:
    stated tolerance on the tiny VAE: mean <= 2 levels, 99th percentile <= 12 levels."""
    from auraflow_edge.engine.backends.torch_backend import TorchVAEDecoder

    vae = TorchVAEDecoder(tiny_dir / "vae")
    z = np.random.default_rng(1).standard_normal((1, 4, 32, 48)).astype(np.float32)
    full = vae(z, tiles=1).astype(int)
    tiled = vae(z, tiles=2).astype(int)
    d = np.abs(full - tiled)
    print(f"tiled vs untiled: mean {d.mean():.2f} levels, p99 {np.percentile(d, 99):.1f}, max {d.max()}")
    assert d.mean() <= 2 and np.percentile(d, 99) <= 12


def test_parse_bytes():
    assert parse_bytes("8GiB") == 8 * GiB and parse_bytes("512MiB") == 512 * MiB
    assert parse_bytes("7.5GB") == int(7.5 * 1024**3) and parse_bytes(1000) == 1000
    with pytest.raises(UserError):
        parse_bytes("lots")


def _sizes(tiny_dir, precision="fp32"):
    from auraflow_edge.engine.model.checkpoint import open_model
    from auraflow_edge.engine.runtime.planner import sizes_from_model

    return sizes_from_model(open_model(tiny_dir), precision, "cuda")


def test_full_size_plan_fits_8gib_in_int8_and_not_in_bf16():
    from dataclasses import replace

    from auraflow_edge.engine.model.config import AURAFLOW_V03
    from auraflow_edge.engine.runtime.planner import ModelSizes

    lin, rest = 4.53e9, 0.03e9  # v0.3 without the modulation: linears and the rest
    full = ModelSizes(
        cfg=AURAFLOW_V03,
        transformer_weights=int(lin * 1 + rest * 2),
        text_encoder_weights=int(1.2e9 * 2),
        text_dims=(2048, 5120, 32),
        vae_weights=int(50e6 * 4),
        vae_channels=128,
        act_bytes=2,
        fused_attention=True,
        overhead=64 * MiB,
        transformer_weights_by_precision={
            "bf16": int((lin + rest) * 2),
            "int8": int(lin + rest * 2),
            "int4": int(lin * 0.56 + rest * 2),
        },
    )
    plan = make_plan(full, 1024, 1024, 8 * GiB)
    assert plan.peak < 7.5 * GiB
    with pytest.raises(UserError, match="--precision int8") as e:
        make_plan(replace(full, transformer_weights=int((lin + rest) * 2)), 1024, 1024, 8 * GiB)
    assert "transformer" in str(e.value) and "GiB" in str(e.value)
    small = replace(full, transformer_weights=200 * MiB, text_encoder_weights=200 * MiB)
    tight = make_plan(small, 1024, 1024, int(1.5 * GiB))
    assert tight.vae_tiles > 1 and "tiles" in tight.stage("vae_decode").action  # VAE at 1024^2 tiled to fit
    assert make_plan(small, 1024, 1024, 8 * GiB).vae_tiles == 1


def test_plan_refuses_when_nothing_fits(tiny_dir):
    with pytest.raises(UserError, match="budget"):
        make_plan(_sizes(tiny_dir), 256, 256, 1 * MiB)


def test_plan_cli(tiny_dir, capsys):
    from auraflow_edge.engine.cli.main import main

    assert main(["plan", str(tiny_dir), "--height", "64", "--width", "96", "--vram-budget", "4GiB"]) == 0
    out = capsys.readouterr().out
    assert "transformer" in out and "vae_decode" in out and "budget 4.00 GiB" in out
    assert main(["plan", str(tiny_dir), "--height", "64", "--width", "96", "--vram-budget", "1MiB"]) == 2


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_measured_peaks_within_plan(backend, tiny_dir, tiny_noise, tmp_path):
    """Peak RSS per stage (CPU) never exceeds the plan by more than 5%."""
    path = tiny_dir
    if backend == "onnxruntime":
        from auraflow_edge.export.build import build_engine

        path = build_engine(str(tiny_dir), tmp_path / "e", precision="int8", height=64, width=96, quiet=True)
    res = Pipeline.load(path).generate(**GEN, noise=tiny_noise, vae_tiles=2)
    names = {"vae": "vae_decode"}
    for s in res.stages:
        planned = res.plan.baseline + res.plan.stage(names.get(s.name, s.name)).peak
        assert s.peak_bytes <= 1.05 * planned, (s.name, s.peak_bytes, planned)
