"""Memory planner: peak memory of each stage, decided before anything is loaded.

Stages run one at a time (text encoder -> transformer -> VAE decode), each loaded, run and freed,
so the peak of a run is the largest stage. A stage's peak is its resident weights plus its largest
live activations, from the component sizes (manifest or checkpoint header) and the shapes. When
the VAE does not fit, the planner tiles it; when the transformer does not fit, it refuses and
names the options that would.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from ..errors import UserError
from ..model.config import AuraFlowConfig
from ..model.spec import TEXT_LENGTH, keeps_float

MiB, GiB = 2**20, 2**30
ORT_SESSION_OVERHEAD = 48 * MiB  # ONNX Runtime session: graph, kernels, allocator bookkeeping
TORCH_STAGE_OVERHEAD = 64 * MiB  # cuBLAS/Triton workspaces, allocator rounding
# On the CPU, RSS also grows by the code the stages import (transformers, diffusers): ~240 MiB measured.
TORCH_CPU_LIBRARIES = 256 * MiB


def parse_bytes(s: str | int | float) -> int:
    """'8GiB', '7.5G', '512MiB', '8e9' -> bytes."""
    if isinstance(s, (int, float)):
        return int(s)
    m = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([KMGT]?)(i?)B?\s*", s, re.IGNORECASE)
    if not m:
        raise UserError(f"cannot read memory size {s!r}; write e.g. 8GiB, 7.5GB or 512MiB")
    v, unit, binary = float(m.group(1)), m.group(2).upper(), m.group(3)
    base = 1024 if binary or unit else 1
    return int(v * base ** " KMGT".index(unit or " "))


def fmt_bytes(n: float) -> str:
    if n >= GiB:
        return f"{n / GiB:.2f} GiB"
    if n >= MiB:
        return f"{n / MiB:.0f} MiB"
    return f"{n / 1024:.1f} KiB" if n >= 1024 else f"{n:.0f} B"


@dataclass
class StagePlan:
    name: str
    weights: int
    activations: int
    overhead: int
    action: str = "load, run, free"

    @property
    def peak(self) -> int:
        return self.weights + self.activations + self.overhead


@dataclass
class Plan:
    budget: int
    baseline: int
    stages: list[StagePlan]
    vae_tiles: int = 1
    notes: list[str] = field(default_factory=list)

    @property
    def peak(self) -> int:
        return self.baseline + max(s.peak for s in self.stages)

    def stage(self, name: str) -> StagePlan:
        return next(s for s in self.stages if s.name == name)

    def table(self) -> str:
        rows = [("stage", "weights", "activations", "overhead", "planned peak", "action")]
        for s in self.stages:
            rows.append(
                (
                    s.name,
                    fmt_bytes(s.weights),
                    fmt_bytes(s.activations),
                    fmt_bytes(s.overhead),
                    fmt_bytes(self.baseline + s.peak),
                    s.action,
                )
            )
        w = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(c.ljust(w[i]) for i, c in enumerate(r)) for r in rows]
        lines.insert(1, "  ".join("-" * x for x in w))
        lines.append(
            f"budget {fmt_bytes(self.budget)}; baseline {fmt_bytes(self.baseline)}; run peak {fmt_bytes(self.peak)}"
            + (f"; VAE decoded in {self.vae_tiles}x{self.vae_tiles} tiles" if self.vae_tiles > 1 else "")
        )
        return "\n".join(lines + self.notes)


@dataclass
class ModelSizes:
    """What the planner needs to know about a model, in bytes as resident on the device."""

    cfg: AuraFlowConfig
    transformer_weights: int
    text_encoder_weights: int
    text_dims: tuple[int, int, int]  # d_model, d_ff, heads
    vae_weights: int
    vae_channels: int  # decoder channels at full resolution (block_out_channels[0])
    act_bytes: int  # bytes per activation element in the transformer
    fused_attention: bool  # False: the (heads, N, N) scores are materialised (ONNX Runtime CPU)
    overhead: int
    transformer_weights_by_precision: dict = field(default_factory=dict)


def block_activations(
    c: AuraFlowConfig, height: int, width: int, batch: int, act_bytes: int, fused_attention: bool = True
) -> int:
    """Bytes live inside one transformer block (the peak between layers)."""
    n = TEXT_LENGTH + c.num_register_tokens + (height // 16) * (width // 16)
    # live in a block: residual, normed input, q/k/v/attn-out (4), FF pair + SwiGLU output
    act = batch * n * (8 * c.hidden + 3 * c.ff_hidden) * act_bytes
    if not fused_attention:
        act += 2 * batch * c.num_attention_heads * n * n * 4  # scores + softmax, fp32
    return act


def transformer_activations(s: ModelSizes, height: int, width: int, batch: int) -> int:
    return block_activations(s.cfg, height, width, batch, s.act_bytes, s.fused_attention)


def vae_activations(s: ModelSizes, height: int, width: int) -> int:
    # full-resolution decoder blocks: ~4 live fp32 tensors of C0 channels, plus the mid-block's
    # (h*w)^2 attention scores when not fused
    act = 4 * s.vae_channels * height * width * 4
    if not s.fused_attention:
        hw = (height // 8) * (width // 8)
        act += hw * hw * 4
    return act


def make_plan(
    s: ModelSizes,
    height: int,
    width: int,
    budget: int,
    batch: int = 2,
    baseline: int = 0,
    vae_tiles: int | None = None,
) -> Plan:
    d, ff, heads = s.text_dims
    te_act = TEXT_LENGTH * (6 * d + 2 * ff) * 4 + 2 * heads * TEXT_LENGTH * TEXT_LENGTH * 4
    stages = [
        StagePlan("text_encoder", s.text_encoder_weights, te_act, s.overhead),
        StagePlan(
            "transformer", s.transformer_weights, transformer_activations(s, height, width, batch), s.overhead
        ),
    ]
    avail = budget - baseline
    tiles = vae_tiles
    if tiles is None:
        tiles = 1
        while (
            tiles < 8
            and s.vae_weights + vae_activations(s, height // tiles + 64, width // tiles + 64) + s.overhead
            > avail
        ):
            tiles += 1
    th, tw = (height, width) if tiles == 1 else (height // tiles + 64, width // tiles + 64)  # + overlap
    vae = StagePlan(
        "vae_decode",
        s.vae_weights,
        vae_activations(s, th, tw),
        s.overhead,
        "load, run, free" if tiles == 1 else f"load, run in {tiles}x{tiles} tiles, free",
    )
    plan = Plan(budget, baseline, stages + [vae], tiles)
    over = [st for st in plan.stages if baseline + st.peak > budget]
    if over:
        st = over[0]
        opts = []
        for p, wb in sorted(s.transformer_weights_by_precision.items(), key=lambda kv: kv[1]):
            if baseline + wb + stages[1].activations + s.overhead <= budget:
                opts.append(f"--precision {p}")
        for side in (1024, 768, 512, 256):
            if (
                side < max(height, width)
                and baseline
                + s.transformer_weights
                + transformer_activations(s, side, side, batch)
                + s.overhead
                <= budget
            ):
                opts.append(f"--height {side} --width {side}")
                break
        raise UserError(
            f"the {st.name} stage needs {fmt_bytes(baseline + st.peak)} (weights {fmt_bytes(st.weights)}, "
            f"activations {fmt_bytes(st.activations)}) but the budget is {fmt_bytes(budget)}; "
            + ("options that fit: " + ", ".join(opts) if opts else "nothing fits this budget")
        )
    return plan


def sizes_from_manifest(m) -> ModelSizes:
    """An ONNX Runtime engine folder: weights as ORT holds them (DequantizeLinear fp8 expands to fp32)."""

    cfg = AuraFlowConfig(**m["transformer_config"])
    tr = m.component("transformer")
    resident = sum(
        b * (4 if f == "fp8" else 1)
        for f, b in tr.get("bytes_by_format", {"float": tr["weight_bytes"]}).items()
    )
    te = m.component("text_encoder")
    vae = m.component("vae_decoder")
    n_params = resident / {"fp32": 4, "fp16": 2}.get(m["precision"], 1)
    graph = max(m.path(c["file"]).stat().st_size for c in (tr, te, vae))
    return ModelSizes(
        cfg=cfg,
        transformer_weights=resident,
        text_encoder_weights=te["weight_bytes"],
        text_dims=tuple(te.get("dims", (2048, 5120, 32))),
        vae_weights=vae["weight_bytes"],
        vae_channels=int(vae.get("channels", 128)),
        act_bytes=4 if tr["dtype"] == "fp32" else 2,
        fused_attention=False,
        overhead=ORT_SESSION_OVERHEAD + graph,
        transformer_weights_by_precision={
            p: int(n_params * b) for p, b in BYTES_PER_PARAM.items() if p != "bf16"
        },
    )


BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp16": 2.0, "fp8": 1.0, "int8": 1.0, "int4": 0.5 + 4 / 64}


def sizes_from_model(mf, precision: str, device: str, transformer_bytes: int | None = None) -> ModelSizes:
    """A checkpoint on the torch backend: quantized runs keep the modulation on the CPU.
    ``transformer_bytes``: the transformer as a torch engine folder holds it (already quantized)."""
    import json

    act = "fp32" if device == "cpu" else "bf16"
    if transformer_bytes is None:
        tr, by_prec = _transformer_bytes(mf, precision, act)
    else:
        tr, by_prec = transformer_bytes, {precision: transformer_bytes}
    te_dir, vae_dir = mf.component("text_encoder"), mf.component("vae")
    te_cfg = json.loads((te_dir / "config.json").read_text())
    vae_cfg = json.loads((vae_dir / "config.json").read_text())
    te_params = sum(f.stat().st_size for f in te_dir.glob("*.safetensors")) / _stored_bytes(te_cfg)
    vae_params = sum(f.stat().st_size for f in vae_dir.glob("*.safetensors")) / _stored_bytes(vae_cfg)
    return ModelSizes(
        cfg=mf.transformer_cfg,
        transformer_weights=int(tr),
        text_encoder_weights=int(te_params * BYTES_PER_PARAM[act]),
        text_dims=(te_cfg.get("d_model", 2048), te_cfg.get("d_ff", 5120), te_cfg.get("num_heads", 32)),
        vae_weights=int(vae_params * 4),
        vae_channels=int(vae_cfg.get("block_out_channels", [128])[0]),
        act_bytes=4 if act == "fp32" else 2,
        fused_attention=device != "cpu",
        overhead=TORCH_STAGE_OVERHEAD + (TORCH_CPU_LIBRARIES if device == "cpu" else 0),
        transformer_weights_by_precision=by_prec,
    )


def _transformer_bytes(mf, precision: str, act: str) -> tuple[int, dict]:
    """Resident transformer bytes of a checkpoint at a precision, and at every precision."""
    from .modulation import modulation_names

    cfg = mf.transformer_cfg
    folded = set(modulation_names(cfg)) | {n for n in mf.weights.names() if n.startswith("time_step_proj.")}
    quant = precision in ("int8", "fp8", "int4")
    float_b = BYTES_PER_PARAM[precision if not quant else act]
    n_lin = n_rest = n_mod = 0
    for n in mf.weights.names():
        k = 1
        for d in mf.weights.shape(n):
            k *= d
        if n in folded:
            n_mod += k
        elif n.endswith(".weight") and len(mf.weights.shape(n)) == 2 and not keeps_float(n):
            n_lin += k
        else:
            n_rest += k
    tr = (
        n_lin * BYTES_PER_PARAM[precision] + n_rest * float_b if quant else (n_lin + n_rest + n_mod) * float_b
    )
    by_prec = {p: int(n_lin * b + n_rest * 2) for p, b in BYTES_PER_PARAM.items()}
    return int(tr), by_prec


def _stored_bytes(cfg: dict) -> int:
    dt = str(cfg.get("torch_dtype") or cfg.get("dtype") or "float32")
    return 2 if ("16" in dt) else 4


def auto_precision(
    mf, device: str, budget: int, height: int, width: int, capability: tuple[int, int] | None
) -> tuple[str, str]:
    """``--precision auto`` on the torch backend: bf16 when its plan fits the budget, else fp8 on
    sm_89+ (Ada, Hopper) or int8 before; fp32 on the CPU (the quantized kernels are GPU kernels).
    -> (precision, one line saying why)."""
    if not device.startswith("cuda"):
        return "fp32", "precision auto: fp32 on the CPU"
    quant = "fp8" if capability is not None and capability >= (8, 9) else "int8"
    for p in ("bf16", quant):
        try:
            plan = make_plan(sizes_from_model(mf, p, "cuda"), height, width, budget)
        except UserError:
            continue
        return p, f"precision auto: {p} (planned peak {fmt_bytes(plan.peak)} of {fmt_bytes(budget)})"
    return quant, f"precision auto: {quant} (nothing fits {fmt_bytes(budget)}; the smallest is tried)"
