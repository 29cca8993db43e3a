"""The positional table outside the graph: its centre crop for an image size, in numpy.

AuraFlow adds a learned positional embedding, centre-cropped from a square grid to the latent's
patch grid. The exported transformer takes that crop as an input (``pos``), like the folded
modulation, so one engine serves every image size the grid covers.
"""

from __future__ import annotations

import numpy as np

from ..model.config import AuraFlowConfig, check_latent_size
from ..model.safetensors_io import SafetensorsFile, save_streamed

POS_NAME = "pos_embed.pos_embed"


def write_position_table(source, path) -> int:
    """Copy the (1, grid*grid, D) table (stored dtype kept) from a WeightSource."""
    return save_streamed([(POS_NAME, source.shape(POS_NAME), source.dtype(POS_NAME))], source.read, path)


def crop(table: np.ndarray, cfg: AuraFlowConfig, h_lat: int, w_lat: int) -> np.ndarray:
    """Same crop as the model's PatchEmbed.pos_crop: (1, max, D) -> (1, H/p, W/p, D) float32."""
    check_latent_size(cfg, h_lat, w_lat)
    p, g = cfg.patch_size, cfg.grid
    hp, wp = h_lat // p, w_lat // p
    r0, c0 = g // 2 - hp // 2, g // 2 - wp // 2
    grid = table[:, : g * g].reshape(1, g, g, -1)  # (1, g, g, D)
    return np.ascontiguousarray(grid[:, r0 : r0 + hp, c0 : c0 + wp], dtype=np.float32)


class PositionTable:
    """Crops of an engine's positions.safetensors, cached per latent size."""

    def __init__(self, cfg: AuraFlowConfig, path):
        self.cfg, self.path = cfg, path
        self._table: np.ndarray | None = None
        self._cache: dict[tuple[int, int], np.ndarray] = {}

    def __call__(self, h_lat: int, w_lat: int) -> np.ndarray:
        if (h_lat, w_lat) not in self._cache:
            if self._table is None:
                self._table = SafetensorsFile(self.path).read(POS_NAME)
            self._cache[h_lat, w_lat] = crop(self._table, self.cfg, h_lat, w_lat)
        return self._cache[h_lat, w_lat]
