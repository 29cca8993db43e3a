"""AuraFlow transformer configuration and presets (torch-free: the ONNX runtime reads it too)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from ..errors import UserError


@dataclass(frozen=True)
class AuraFlowConfig:
    in_channels: int = 4
    out_channels: int = 4
    patch_size: int = 2
    num_mmdit_layers: int = 4
    num_single_dit_layers: int = 32
    attention_head_dim: int = 256
    num_attention_heads: int = 12
    joint_attention_dim: int = 2048
    caption_projection_dim: int = 3072
    pos_embed_max_size: int = 9216
    num_register_tokens: int = 8
    timestep_channels: int = 256
    eps: float = 1e-5
    # latent side the checkpoint was trained at (diffusers' default image side is this x the VAE
    # scale factor: 128 x 8 = 1024 px for v0.3)
    sample_size: int = 64

    @property
    def hidden(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def ff_hidden(self) -> int:
        # diffusers' AuraFlowFeedForward: int(2 * 4 * dim / 3) rounded up to a multiple of 256.
        h = int(2 * (4 * self.hidden) / 3)
        return h if h % 256 == 0 else h + 256 - h % 256

    @property
    def grid(self) -> int:
        """Side of the square positional grid, in patches."""
        return int(self.pos_embed_max_size**0.5)

    @property
    def max_pixels_side(self) -> int:
        return self.grid * self.patch_size * 8

    @property
    def num_modulations(self) -> int:
        """Rows of the modulation table: 12 per joint block, 6 per single block, 2 final."""
        return 12 * self.num_mmdit_layers + 6 * self.num_single_dit_layers + 2

    @classmethod
    def from_diffusers(cls, cfg: dict) -> AuraFlowConfig:
        names = {f for f in cls.__dataclass_fields__}
        kw = {k: v for k, v in cfg.items() if k in names}
        return cls(**kw)

    def to_dict(self) -> dict:
        return asdict(self)

    def with_(self, **kw) -> AuraFlowConfig:
        return replace(self, **kw)


AURAFLOW_V02 = AuraFlowConfig(pos_embed_max_size=4096)
AURAFLOW_V01 = AURAFLOW_V02
AURAFLOW_V03 = AuraFlowConfig(pos_embed_max_size=9216, sample_size=128)
PRESETS = {"v0.1": AURAFLOW_V01, "v0.2": AURAFLOW_V02, "v0.3": AURAFLOW_V03}


def default_image_side(cfg: AuraFlowConfig, vae_scale_factor: int = 8) -> int:
    """diffusers' AuraFlowPipeline default: ``transformer.config.sample_size * vae_scale_factor``,
    kept inside the positional grid."""
    return min(cfg.sample_size * vae_scale_factor, cfg.max_pixels_side)


def check_latent_size(cfg: AuraFlowConfig, h_lat: int, w_lat: int) -> None:
    """Refuse latents the positional table cannot cover (the reference silently wraps or crashes)."""
    p = cfg.patch_size
    if h_lat % p or w_lat % p:
        raise UserError(f"latent {h_lat}x{w_lat} is not a multiple of the patch size {p}")
    if h_lat // p > cfg.grid or w_lat // p > cfg.grid:
        side = cfg.max_pixels_side
        raise UserError(
            f"image {w_lat * 8}x{h_lat * 8} exceeds the positional grid of this checkpoint "
            f"({cfg.grid}x{cfg.grid} patches = {side} px); use sides <= {side} px"
            + (" or a v0.3 checkpoint" if side < 1536 else "")
        )


def check_size(height: int, width: int) -> None:
    for name, v in (("height", height), ("width", width)):
        if not isinstance(v, int) or v < 16 or v % 16:
            raise UserError(f"{name} must be a positive multiple of 16, got {v}")
