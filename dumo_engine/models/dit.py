"""Dual-head DiT: the DiT trunk (Peebles & Xie) with a velocity head and a flow-map head.

Parameter names follow facebookresearch/DiT's models.py so that DiT/SiT checkpoints load into the
trunk (see checkpoint_import.py). The two heads are `v_head` and `u_head`, each a DiT FinalLayer.

Conditioning: c = t_embedder(t) + h_embedder(t - r) + y_embedder(y); y == num_classes is the NULL
class used for classifier-free guidance.

This module is the pure-PyTorch reference ("the oracle"): fused kernels are tested against it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.autograd.forward_ad as fwAD
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


@dataclass(frozen=True)
class DiTSpec:
    hidden_size: int
    depth: int
    num_heads: int
    patch_size: int = 2
    mlp_ratio: float = 4.0


# Size registry (hidden, depth, heads); "tiny"/"digits" presets are for CPU runs and tests.
DIT_SIZES: dict[str, DiTSpec] = {
    "DiT-S/2": DiTSpec(384, 12, 6),
    "DiT-B/2": DiTSpec(768, 12, 12),
    "DiT-L/2": DiTSpec(1024, 24, 16),
    "DiT-XL/2": DiTSpec(1152, 28, 16),
    "DiT-S/4": DiTSpec(384, 12, 6, patch_size=4),
    "DiT-B/4": DiTSpec(768, 12, 12, patch_size=4),
    "DiT-L/4": DiTSpec(1024, 24, 16, patch_size=4),
    "DiT-XL/4": DiTSpec(1152, 28, 16, patch_size=4),
    "DiT-S/8": DiTSpec(384, 12, 6, patch_size=8),
    "DiT-B/8": DiTSpec(768, 12, 12, patch_size=8),
    "DiT-L/8": DiTSpec(1024, 24, 16, patch_size=8),
    "DiT-XL/8": DiTSpec(1152, 28, 16, patch_size=8),
    "DiT-digits": DiTSpec(128, 4, 4),
    "DiT-tiny": DiTSpec(32, 2, 2),
}


def _forward_ad_active(x: torch.Tensor) -> bool:
    """True when x carries a forward-mode tangent (torch.func.jvp or torch.autograd.forward_ad)."""
    return torch._C._functorch.is_functorch_wrapped_tensor(x) or fwAD.unpack_dual(x).tangent is not None


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    # x: (N, T, D); shift, scale: (N, D)
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Image to patch tokens; `proj` matches timm's PatchEmbed so DiT weights load."""

    def __init__(self, input_size: int, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.num_patches = (input_size // patch_size) ** 2
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, T, D)


class TimestepEmbedder(nn.Module):
    """Scalar in [0, 1] -> sinusoidal features -> MLP. Used for t and for h = t - r.

    DiT feeds t in [0, 1000); we keep t in [0, 1] and scale by `time_scale` (1000 by default, as DiT does),
    so a DiT embedder sees the range it was trained on. SiT feeds t in [0, 1] unscaled and runs time the
    other way (SiT t = 1 - ours): a SiT import uses time_scale 1 and folds the reflection into the first
    layer's weights (models/checkpoint_import.py).
    """

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, time_scale: float = 1000.0):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size, bias=True),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, bias=True),
        )
        self.frequency_embedding_size = frequency_embedding_size
        self.time_scale = time_scale

    @staticmethod
    def frequencies(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """f_k = max_period^(-k / half), k < dim // 2, in fp32 at least (bf16 cannot resolve t * 1000);
        float64 when t is float64 (finite-difference checks)."""
        dtype = torch.float64 if t.dtype == torch.float64 else torch.float32
        half = dim // 2
        return torch.exp(-math.log(max_period) * torch.arange(half, dtype=dtype, device=t.device) / half)

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        # t: (N,) -> (N, dim): [cos(t f_k), sin(t f_k)]
        freqs = TimestepEmbedder.frequencies(t, dim, max_period)
        args = t[:, None].to(freqs.dtype) * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
        return emb

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        freq = self.timestep_embedding(t * self.time_scale, self.frequency_embedding_size)
        return self.mlp(freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class label -> vector; index num_classes is the NULL (unconditional) class.

    Label dropout is done by the objectives (they need to know which rows were dropped to build the
    guided target), so unlike DiT's LabelEmbedder this one never drops labels itself.
    """

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(y)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        assert dim % num_heads == 0, f"hidden size {dim} is not divisible by num_heads {num_heads}"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, T, D = x.shape
        qkv = self.qkv(x).reshape(N, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (N, H, T, d)
        if _forward_ad_active(x):
            # Fused SDPA backends have no forward-mode derivative; the math backend does.
            with sdpa_kernel(SDPBackend.MATH):
                o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(o.transpose(1, 2).reshape(N, T, D))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, bias=True)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class DiTBlock(nn.Module):
    """adaLN-Zero block: gated attention and MLP residuals, modulated by c."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        # x: (N, T, D), c: (N, D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class FinalLayer(nn.Module):
    """One output head: LayerNorm, adaLN shift/scale from c, Linear to p*p*C per token."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """Fixed 2D sin-cos position table, (grid_size**2, embed_dim), as in DiT/MAE."""
    grid_h = np.arange(grid_size, dtype=np.float64)
    grid = np.meshgrid(grid_h, grid_h)  # w first, as in MAE
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)

    def one_d(dim: int, pos: np.ndarray) -> np.ndarray:
        omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    assert embed_dim % 4 == 0, "sin-cos position embedding needs hidden size divisible by 4"
    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


class DualHeadDiT(nn.Module):
    """DiT trunk + v head + u head. forward(x, t, h, y) -> (v_hat, u_hat).

    x: (N, C, H, W) input z_t; t: (N,) time in [0, 1]; h: (N,) step size t - r; y: (N,) int labels
    with num_classes meaning NULL. `heads` selects which outputs to compute ("vu", "v" or "u");
    a head not computed is returned as None.
    """

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        h_in_trunk: bool = True,
        time_scale: float = 1000.0,
    ):
        super().__init__()
        if input_size % patch_size:
            raise ValueError(f"input_size {input_size} is not divisible by patch_size {patch_size}")
        self.input_size = input_size
        self.in_channels = in_channels
        self.out_channels = in_channels
        self.patch_size = patch_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.hidden_size = hidden_size
        # True: c = t + h + y conditions every block and both heads. False: blocks and the v head see
        # c = t + y only, and h enters through the u head's adaLN alone (v is then exactly h-independent).
        self.h_in_trunk = h_in_trunk

        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size)
        # time_scale: 1000 feeds the sinusoids DiT's t * 1000; 1 is SiT's convention (for an exact SiT import)
        self.t_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.h_embedder = TimestepEmbedder(hidden_size, time_scale=time_scale)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        num_patches = self.x_embedder.num_patches
        # Fixed, not trained; persistent so the state dict carries "pos_embed" like DiT's.
        self.register_buffer("pos_embed", torch.zeros(1, num_patches, hidden_size), persistent=True)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.v_head = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.u_head = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    # ---- initialisation, all in one place (DiT's scheme) ----
    def initialize_weights(self) -> None:
        def _basic_init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.constant_(m.bias, 0)

        self.apply(_basic_init)
        if self.pos_embed.device.type != "meta":
            grid = int(self.x_embedder.num_patches**0.5)
            pe = get_2d_sincos_pos_embed(self.hidden_size, grid)
            self.pos_embed.copy_(torch.from_numpy(pe).float().unsqueeze(0))
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        for emb in (self.t_embedder, self.h_embedder):
            nn.init.normal_(emb.mlp[0].weight, std=0.02)
            nn.init.normal_(emb.mlp[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-Zero: every residual branch starts closed
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        for head in (self.v_head, self.u_head):
            nn.init.constant_(head.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(head.adaLN_modulation[-1].bias, 0)
            nn.init.constant_(head.linear.weight, 0)
            nn.init.constant_(head.linear.bias, 0)

    def forward_with_jvp(self, z: torch.Tensor, t: torch.Tensor, r: torch.Tensor, y: torch.Tensor,
                         tangent: torch.Tensor, heads: str = "vu"):
        """(v_hat, u_hat, du/dt) along (z, t, r) -> (tangent, 1, 0) in one ordinary forward (no torch.func).

        Only v_hat and u_hat carry gradients; du/dt is detached and no tangent activation is saved.
        """
        return self(z, t, t - r, y, heads=heads, tangent=tangent)

    def load_pretrained_dit(self, path, strict: bool = True, source: str = "dit"):
        """Initialise trunk and both heads from a DiT/SiT checkpoint; returns an ImportReport (see checkpoint_import)."""
        from .checkpoint_import import load_pretrained_dit

        return load_pretrained_dit(self, path, strict=strict, source=source)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        # (N, T, p*p*C) -> (N, C, H, W); channel is the fastest index within a patch, as in DiT.
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def trunk(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, y: torch.Tensor, heads: str = "vu"):
        """Shared trunk: token features (N, T, D) and the conditioning (N, D) of the v head and of the u head."""
        tokens = self.x_embedder(x) + self.pos_embed  # (N, T, D)
        if self.h_in_trunk:
            c = self.t_embedder(t) + self.h_embedder(h) + self.y_embedder(y)
            c_v = c_u = c
        else:
            c_v = self.t_embedder(t) + self.y_embedder(y)
            c_u = c_v + self.h_embedder(h) if "u" in heads else None
        for block in self.blocks:
            tokens = block(tokens, c_v)
        return tokens, c_v, c_u

    def forward(self, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, y: torch.Tensor, heads: str = "vu",
                tangent: torch.Tensor | None = None):
        """(v, u); with `tangent` (dz/dt, shape of x): (v, u, du/dt) from the fused forward + JVP pass,
        tangents (tangent, 1, 1) for (x, t, h). Going through forward keeps DDP/DeepSpeed wrappers in the loop."""
        if x.ndim != 4 or x.shape[1] != self.in_channels or x.shape[-2:] != (self.input_size, self.input_size):
            raise ValueError(
                f"expected x of shape (N, {self.in_channels}, {self.input_size}, {self.input_size}), got {tuple(x.shape)}"
            )
        if tangent is not None:
            from ..jvp.fused import dit_forward_jvp

            return dit_forward_jvp(self, x, t, h, y, tangent, heads)
        tokens, c_v, c_u = self.trunk(x, t, h, y, heads)
        v = self.unpatchify(self.v_head(tokens, c_v)) if "v" in heads else None
        u = self.unpatchify(self.u_head(tokens, c_u)) if "u" in heads else None
        return v, u


def build_model(name: str, input_size: int = 32, in_channels: int = 4, num_classes: int = 1000,
                h_in_trunk: bool = True, time_scale: float = 1000.0) -> DualHeadDiT:
    """Build a dual-head DiT from the size registry, e.g. build_model("DiT-XL/2")."""
    if name not in DIT_SIZES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(DIT_SIZES)}")
    s = DIT_SIZES[name]
    return DualHeadDiT(
        input_size=input_size,
        patch_size=s.patch_size,
        in_channels=in_channels,
        hidden_size=s.hidden_size,
        depth=s.depth,
        num_heads=s.num_heads,
        mlp_ratio=s.mlp_ratio,
        num_classes=num_classes,
        h_in_trunk=h_in_trunk,
        time_scale=time_scale,
    )
