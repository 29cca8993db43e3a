"""The AuraFlow transformer: typed config, modules and forward pass, and nothing else.

Parameter names equal those of diffusers' ``AuraFlowTransformer2DModel`` so a diffusers
checkpoint is assigned without renaming. Unlike the reference, the timestep-only modulation can
be supplied precomputed (``modulation=``): the exported graph takes it as an input and the
modulation linears stay on the CPU (see ``engine/runtime/modulation.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import AuraFlowConfig


def fp32_layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """LayerNorm over the last dim in fp32, no affine, cast back (diffusers' FP32LayerNorm)."""
    return F.layer_norm(x.float(), (x.shape[-1],), None, None, eps).to(x.dtype)


def timestep_sinusoid(t: torch.Tensor, channels: int = 256) -> torch.Tensor:
    """diffusers Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0, scale=1000)."""
    half = channels // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = 1000 * emb
    return torch.cat([torch.cos(emb), torch.sin(emb)], dim=-1)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: AuraFlowConfig):
        super().__init__()
        self.cfg = cfg
        self.proj = nn.Linear(cfg.patch_size**2 * cfg.in_channels, cfg.hidden)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_embed_max_size, cfg.hidden))

    def pos_crop(self, h_lat: int, w_lat: int) -> torch.Tensor:
        """Centre crop of the positional grid, flattened: (1, H/p * W/p, D). Slices only (export-friendly)."""
        p, g = self.cfg.patch_size, self.cfg.grid
        hp, wp = h_lat // p, w_lat // p
        r0, c0 = g // 2 - hp // 2, g // 2 - wp // 2
        grid = self.pos_embed[:, : g * g].reshape(1, g, g, -1)
        return grid[:, r0 : r0 + hp, c0 : c0 + wp].reshape(1, hp * wp, -1)

    def forward(self, x: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
        """``pos``: the crop of the positional grid computed outside, (1, H/p, W/p, D) (the exported
        graph takes it as an input, so it has no image size baked in)."""
        b, c, h, w = x.shape
        p = self.cfg.patch_size
        # (B, C, H, W) -> (B, H/p * W/p, C*p*p), patch vector ordered (c, py, px)
        x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
        x = x.reshape(b, (h // p) * (w // p), c * p * p)
        if pos is None:
            return self.proj(x) + self.pos_crop(h, w)
        return self.proj(x) + pos.reshape(1, (h // p) * (w // p), -1).to(x.dtype)


class TimestepProj(nn.Module):
    def __init__(self, cfg: AuraFlowConfig):
        super().__init__()
        self.linear_1 = nn.Linear(cfg.timestep_channels, cfg.hidden)
        self.linear_2 = nn.Linear(cfg.hidden, cfg.hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class AdaLNZero(nn.Module):
    """Only the linear: the norm and modulation are applied in the block."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 6 * dim, bias=False)


class FeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim, hidden, bias=False)
        self.linear_2 = nn.Linear(dim, hidden, bias=False)
        self.out_projection = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_projection(F.silu(self.linear_1(x)) * self.linear_2(x))


def attention_ref(q, k, v, eps: float, scale: float) -> torch.Tensor:
    """Per-head qk LayerNorm then softmax attention; q/k/v (B, heads, tokens, head_dim)."""
    q = fp32_layer_norm(q, eps)
    k = fp32_layer_norm(k, eps)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


class Attention(nn.Module):
    def __init__(self, cfg: AuraFlowConfig, joint: bool):
        super().__init__()
        d = cfg.hidden
        self.heads, self.head_dim, self.eps = cfg.num_attention_heads, cfg.attention_head_dim, cfg.eps
        self.to_q = nn.Linear(d, d, bias=False)
        self.to_k = nn.Linear(d, d, bias=False)
        self.to_v = nn.Linear(d, d, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(d, d, bias=False)])
        if joint:
            self.add_q_proj = nn.Linear(d, d, bias=False)
            self.add_k_proj = nn.Linear(d, d, bias=False)
            self.add_v_proj = nn.Linear(d, d, bias=False)
            self.to_add_out = nn.Linear(d, d, bias=False)
        # Swappable attention core (the torch backend installs the fused Triton kernel here).
        self.core = attention_ref

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.heads, self.head_dim).transpose(1, 2)  # (B, heads, N, hd)

    def forward(self, x: torch.Tensor, ctx: torch.Tensor | None = None):
        q, k, v = self._heads(self.to_q(x)), self._heads(self.to_k(x)), self._heads(self.to_v(x))
        if ctx is not None:
            # Joint attention over [context, image] tokens.
            q = torch.cat([self._heads(self.add_q_proj(ctx)), q], dim=2)
            k = torch.cat([self._heads(self.add_k_proj(ctx)), k], dim=2)
            v = torch.cat([self._heads(self.add_v_proj(ctx)), v], dim=2)
        o = self.core(q, k, v, self.eps, self.head_dim**-0.5)  # (B, heads, N, hd)
        b, _, n, _ = o.shape
        o = o.transpose(1, 2).reshape(b, n, self.heads * self.head_dim)
        if ctx is None:
            return self.to_out[0](o)
        nc = ctx.shape[1]
        return self.to_out[0](o[:, nc:]), self.to_add_out(o[:, :nc])


def norm_modulate_ref(x, scale, shift, res=None, gate=None, eps: float = 1e-5):
    """LN(x) * (1 + scale) + shift, or LN(res + gate * x) * (1 + scale) + shift; vectors (Bm, D)."""
    h = x if res is None else res + gate[:, None] * x
    return fp32_layer_norm(h, eps) * (1 + scale[:, None]) + shift[:, None]


def _stream(res, a, mod, ff, eps, nm):
    """AuraFlow's residual structure: out = res + g_mlp*FF(LN(res + g_msa*a)*(1+s_mlp)+b_mlp).

    ``mod`` holds the 6 vectors (Bm, 6, D): shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp.
    """
    h = nm(a, mod[:, 4], mod[:, 3], res=res, gate=mod[:, 2], eps=eps)
    return res + mod[:, 5, None] * ff(h)


def _modulate_in(x, mod, eps, nm):
    return nm(x, mod[:, 1], mod[:, 0], eps=eps)


class JointBlock(nn.Module):
    def __init__(self, cfg: AuraFlowConfig):
        super().__init__()
        self.eps = cfg.eps
        self.norm1 = AdaLNZero(cfg.hidden)
        self.norm1_context = AdaLNZero(cfg.hidden)
        self.attn = Attention(cfg, joint=True)
        self.ff = FeedForward(cfg.hidden, cfg.ff_hidden)
        self.ff_context = FeedForward(cfg.hidden, cfg.ff_hidden)
        self.norm_modulate = norm_modulate_ref  # swappable: the fused Triton kernel on CUDA

    def forward(self, x, ctx, mod_x, mod_c):
        nm, eps = self.norm_modulate, self.eps
        a, ac = self.attn(_modulate_in(x, mod_x, eps, nm), _modulate_in(ctx, mod_c, eps, nm))
        return _stream(x, a, mod_x, self.ff, eps, nm), _stream(ctx, ac, mod_c, self.ff_context, eps, nm)


class SingleBlock(nn.Module):
    def __init__(self, cfg: AuraFlowConfig):
        super().__init__()
        self.eps = cfg.eps
        self.norm1 = AdaLNZero(cfg.hidden)
        self.attn = Attention(cfg, joint=False)
        self.ff = FeedForward(cfg.hidden, cfg.ff_hidden)
        self.norm_modulate = norm_modulate_ref

    def forward(self, x, mod):
        nm = self.norm_modulate
        return _stream(x, self.attn(_modulate_in(x, mod, self.eps, nm)), mod, self.ff, self.eps, nm)


class PreFinal(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.linear = nn.Linear(dim, 2 * dim, bias=False)


class AuraFlowTransformer(nn.Module):
    def __init__(self, cfg: AuraFlowConfig):
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden
        self.pos_embed = PatchEmbed(cfg)
        self.context_embedder = nn.Linear(cfg.joint_attention_dim, cfg.caption_projection_dim, bias=False)
        self.time_step_proj = TimestepProj(cfg)
        self.joint_transformer_blocks = nn.ModuleList(JointBlock(cfg) for _ in range(cfg.num_mmdit_layers))
        self.single_transformer_blocks = nn.ModuleList(
            SingleBlock(cfg) for _ in range(cfg.num_single_dit_layers)
        )
        self.norm_out = PreFinal(d)
        self.proj_out = nn.Linear(d, cfg.patch_size**2 * cfg.out_channels, bias=False)
        self.register_tokens = nn.Parameter(torch.zeros(1, cfg.num_register_tokens, d))

    def modulation_linears(self) -> list[nn.Linear]:
        """The timestep-only linears, in modulation-table row order (6 rows each, final: 2)."""
        out = []
        for blk in self.joint_transformer_blocks:
            out += [blk.norm1.linear, blk.norm1_context.linear]
        out += [blk.norm1.linear for blk in self.single_transformer_blocks]
        return out + [self.norm_out.linear]

    def compute_modulation(self, timestep: torch.Tensor) -> torch.Tensor:
        """Timestep (B,) in [0, 1] -> modulation table (B, num_modulations, hidden)."""
        dtype = self.proj_out.weight.dtype
        temb = self.time_step_proj(timestep_sinusoid(timestep, self.cfg.timestep_channels).to(dtype))
        s = F.silu(temb)
        rows = [lin(s).reshape(s.shape[0], -1, self.cfg.hidden) for lin in self.modulation_linears()]
        return torch.cat(rows, dim=1)

    def forward(
        self,
        latents: torch.Tensor,
        context: torch.Tensor,
        timestep: torch.Tensor | None = None,
        modulation: torch.Tensor | None = None,
        pos: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """latents (B, C, H, W), context (B, L, joint_dim), timestep (B,) or modulation (1|B, M, D);
        ``pos`` (1, H/p, W/p, D) replaces the built-in positional crop."""
        cfg = self.cfg
        b, _, h, w = latents.shape
        if modulation is None:
            modulation = self.compute_modulation(timestep)
        modulation = modulation.to(self.proj_out.weight.dtype)
        x = self.pos_embed(latents, pos)  # (B, N_img, D)
        ctx = self.context_embedder(context)
        ctx = torch.cat([self.register_tokens.to(ctx.dtype).expand(b, -1, -1), ctx], dim=1)
        r = 0
        for blk in self.joint_transformer_blocks:
            x, ctx = blk(x, ctx, modulation[:, r : r + 6], modulation[:, r + 6 : r + 12])
            r += 12
        nc = ctx.shape[1]
        xc = torch.cat([ctx, x], dim=1)
        for blk in self.single_transformer_blocks:
            xc = blk(xc, modulation[:, r : r + 6])
            r += 6
        x = xc[:, nc:]
        # Final: scale, shift (this order), no LayerNorm before it.
        x = x * (1 + modulation[:, r, None]) + modulation[:, r + 1, None]
        x = self.proj_out(x)  # (B, N_img, p*p*C_out) ordered (py, px, c)
        p, co = cfg.patch_size, cfg.out_channels
        x = x.reshape(b, h // p, w // p, p, p, co).permute(0, 5, 1, 3, 2, 4)
        return x.reshape(b, co, h, w)
