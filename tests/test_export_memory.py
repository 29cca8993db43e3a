"""Scaled-down streamed-export memory check: peak RSS must not grow with the model's size."""

from auraflow_edge.bench.export_memory import export_peak
from auraflow_edge.engine.model.config import AuraFlowConfig  # noqa: E402
from auraflow_edge.engine.tiny.random_model import write_random_transformer  # noqa: E402


def test_peak_rss_does_not_grow_with_model_size(tmp_path):
    base = AuraFlowConfig(
        num_attention_heads=4,
        attention_head_dim=256,
        joint_attention_dim=256,
        caption_projection_dim=1024,
        pos_embed_max_size=256,
        num_mmdit_layers=1,
    )
    small, big = base.with_(num_single_dit_layers=1), base.with_(num_single_dit_layers=11)
    peaks, sizes = {}, {}
    for name, cfg in (("small", small), ("big", big)):
        src = write_random_transformer(tmp_path / name, cfg, "bf16")
        sizes[name] = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        peaks[name] = export_peak(src, tmp_path / f"out-{name}", "int8", 256, 256)["peak_rss"]
    grown_weights = sizes["big"] - sizes["small"]  # ~380 MB of bf16 weights more (~760 MB as fp32)
    grown_rss = peaks["big"] - peaks["small"]
    print(
        f"weights +{grown_weights / 2**20:.0f} MiB, peak RSS {peaks['small'] / 2**20:.0f} -> {peaks['big'] / 2**20:.0f} MiB"
    )
    assert grown_weights > 300 * 2**20
    assert grown_rss < 0.15 * grown_weights, (grown_rss, grown_weights)
