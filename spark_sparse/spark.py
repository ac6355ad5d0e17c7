"""The SparK model: mask, encode, densify, decode, and the loss on hidden patches."""
from __future__ import annotations

import math
from typing import List, Optional, Tuple

import torch
from timm.layers import LayerNorm2d, trunc_normal_
from torch import nn

from .backends.encoder import SparseEncoder
from .backends.layers.convnext import masked_layer_norm_2d
from .backends.masked import masked_batch_norm_from
from .decoder import LightDecoder
from .masking import ActiveSites, draw_mask, num_visible_patches, upsample_mask


class SparK(nn.Module):
    """Sparse masked image modeling around a hierarchical encoder and the light decoder.

    ``forward(images, active=None)`` returns the scalar loss: the mean squared error
    on hidden patches between the reconstruction and the per-patch normalised
    image. With ``active`` None, a mask is drawn from the global RNG.
    """

    def __init__(
        self,
        encoder: SparseEncoder,
        decoder: LightDecoder,
        mask_ratio: float = 0.6,
        densify_norm: str = "bn",
        sync_bn: bool = False,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.mask_ratio = mask_ratio
        self.downsample_ratio = encoder.downsample_ratio
        self.grid_size = encoder.grid_size
        self.num_visible = num_visible_patches(self.grid_size, mask_ratio)
        self.densify_norm = densify_norm
        self.sites = ActiveSites()

        # One mask token, norm and projection per feature, smallest scale first. Each
        # feature feeds the decoder block of its scale, so features that share a scale
        # (the dilated stages of an output-stride-16 model) are projected to that
        # block's width and summed there.
        self.decoder_blocks = [self._decoder_block_of(stride) for stride in reversed(encoder.feature_strides)]
        self.mask_tokens = nn.ParameterList()
        self.densify_norms = nn.ModuleList()
        self.densify_projs = nn.ModuleList()
        for block, width in zip(self.decoder_blocks, reversed(encoder.feature_channels)):
            token = nn.Parameter(torch.zeros(1, width, 1, 1))
            trunc_normal_(token, mean=0, std=0.02, a=-0.02, b=0.02)
            self.mask_tokens.append(token)
            self.densify_norms.append(self._build_densify_norm(width, sync_bn))
            decoder_width = decoder.width // 2**block
            if block == 0 and width == decoder_width:
                proj: nn.Module = nn.Identity()
            else:
                kernel = 1 if block == 0 else 3
                proj = nn.Conv2d(width, decoder_width, kernel_size=kernel, stride=1, padding=kernel // 2, bias=True)
                trunc_normal_(proj.weight, std=0.02)
                nn.init.zeros_(proj.bias)
            self.densify_projs.append(proj)

    def _decoder_block_of(self, stride: int) -> int:
        """Return the index of the decoder block that takes a feature of ``stride``: log2(ratio / stride)."""
        block = round(math.log2(self.downsample_ratio / stride))
        if self.downsample_ratio != stride * 2**block:
            raise ValueError(
                f"feature stride {stride} is not the downsample ratio {self.downsample_ratio} divided by a power of two"
            )
        return block

    def _build_densify_norm(self, width: int, sync_bn: bool) -> nn.Module:
        if self.densify_norm == "bn":
            return masked_batch_norm_from(nn.BatchNorm2d(width), self.sites, sync=sync_bn)
        if self.densify_norm == "ln":
            return masked_layer_norm_2d(LayerNorm2d(width, eps=1e-6), self.sites)
        if self.densify_norm in ("", "identity"):
            return nn.Identity()
        raise ValueError(f"unknown densify norm {self.densify_norm!r}; use 'bn', 'ln' or 'identity'")

    def mask(
        self, batch_size: int, device: Optional[torch.device] = None, generator: Optional[torch.Generator] = None
    ) -> torch.Tensor:
        """Draw a ``(B, 1, h, w)`` mask with ``mask_ratio`` of the patches hidden."""
        return draw_mask(batch_size, self.grid_size, self.mask_ratio, generator=generator, device=device)

    def densify(self, features: List[torch.Tensor], active: torch.Tensor) -> List[Optional[torch.Tensor]]:
        """Normalise each scale's features over active sites, fill hidden sites with mask tokens, project.

        ``features`` go from the largest scale to the smallest. The result holds one
        input per decoder block, from the smallest scale to the largest, as the
        decoder takes it, with None where no feature has that block's scale.
        """
        to_decoder: List[Optional[torch.Tensor]] = [None] * (max(self.decoder_blocks) + 1)
        with self.sites.bind(active):
            for i, bchw in enumerate(reversed(features)):
                bchw = self.densify_norms[i](bchw)
                active_here = upsample_mask(active, bchw.shape[-2:])
                bchw = torch.where(active_here, bchw, self.mask_tokens[i].to(bchw.dtype).expand_as(bchw))
                projected = self.densify_projs[i](bchw)
                block = self.decoder_blocks[i]
                to_decoder[block] = projected if to_decoder[block] is None else to_decoder[block] + projected
        return to_decoder

    def reconstruct(
        self, images: torch.Tensor, active: Optional[torch.Tensor] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Return the ``(B, 3, H, W)`` reconstruction (in per-patch normalised units) and the mask used."""
        if active is None:
            active = self.mask(images.shape[0], images.device)
        features = self.encoder(images, active)
        reconstruction = self.decoder(self.densify(features, active))
        return reconstruction, active

    def patchify(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, C, H, W)`` to ``(B, h * w, p * p * C)`` with patch size ``p`` = downsample ratio."""
        p = self.downsample_ratio
        batch, channels, height, width = images.shape
        h, w = height // p, width // p
        patches = images.reshape(batch, channels, h, p, w, p)
        return torch.einsum("bchpwq->bhwpqc", patches).reshape(batch, h * w, p * p * channels)

    def unpatchify(self, patches: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """Inverse of :meth:`patchify` for images of ``size`` ``(H, W)``."""
        p = self.downsample_ratio
        batch = patches.shape[0]
        h, w = size[0] // p, size[1] // p
        channels = patches.shape[-1] // (p * p)
        patches = patches.reshape(batch, h, w, p, p, channels)
        return torch.einsum("bhwpqc->bchpwq", patches).reshape(batch, channels, h * p, w * p)

    def normalized_targets(self, images: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Return per-patch normalised patches of ``images`` with each patch's mean and standard deviation."""
        patches = self.patchify(images)
        mean = patches.mean(dim=-1, keepdim=True)
        std = (patches.var(dim=-1, keepdim=True) + 1e-6) ** 0.5
        return (patches - mean) / std, mean, std

    def loss(self, images: torch.Tensor, reconstruction: torch.Tensor, active: torch.Tensor) -> torch.Tensor:
        """Mean squared error over the hidden patches only, against per-patch normalised targets."""
        targets, _, _ = self.normalized_targets(images)
        per_patch = (self.patchify(reconstruction) - targets).square().mean(dim=2)
        hidden = active.logical_not().view(active.shape[0], -1).to(per_patch.dtype)
        return (per_patch * hidden).sum() / (hidden.sum() + 1e-8)

    def forward(self, images: torch.Tensor, active: Optional[torch.Tensor] = None) -> torch.Tensor:
        reconstruction, active = self.reconstruct(images, active)
        return self.loss(images, reconstruction.float(), active)

    def denormalize_reconstruction(self, images: torch.Tensor, reconstruction: torch.Tensor) -> torch.Tensor:
        """Map a reconstruction back to the input's units with each patch's statistics from ``images``."""
        _, mean, std = self.normalized_targets(images)
        return self.unpatchify(self.patchify(reconstruction) * std + mean, images.shape[-2:])
