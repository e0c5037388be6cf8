"""Multi-token prediction (MTP) head.

Depth k (1..D) predicts the token k+1 positions ahead. Its first sublayer fuses the embedding of the
token k ahead with the previous depth's hidden state:
    h = eh_proj(cat[enorm(embed(tokens shifted k)), hnorm(h_{k-1})])
then runs the depth's blocks (the MTP pattern, e.g. ``*E``), the last ending in ``final_layernorm``;
the shared ``lm_head`` scores it. ``h_0`` is the backbone output after its final norm.
Loss: ``mtp_loss = scaling / D * sum_k CE_k``, each CE_k over the targets k+1 ahead that exist and
lie in the same document.

Checkpoint layout: ``mtp.layers.{depth * len(pattern) + sublayer}.*``; with
``mtp_use_repeated_layer`` one physical depth (``mtp.layers.0..len(pattern)-1``) is reused D times.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..backend import BackendConfig
from ..batch import BatchMeta
from .model import Block, causal_lm_loss, init_block, shift_labels
from .norms import RMSNorm


def future_token_embeddings(embed: nn.Module, input_ids: torch.Tensor, depths: int) -> tuple[torch.Tensor, ...]:
    """Per-depth embeddings of the tokens k ahead (k = 1..D); past the end reads token 0 and is never scored.

    Only the owner of the embedding table can compute them, so under pipeline parallelism the first
    stage does and the tensors travel with the hidden state to the MTP head on the last stage."""
    return tuple(embed(F.pad(input_ids, (0, k), value=0)[:, k:]) for k in range(1, depths + 1))


class MTPSublayer(Block):
    """A Block, plus the fusion layers on a depth's first sublayer and the final norm on its last."""

    def __init__(self, config, index: int, block_type: str, first: bool, last: bool, backend: BackendConfig) -> None:
        # Attention inside MTP never uses the decode cache, so the layer index only has to be unique.
        super().__init__(config, 10_000 + index, block_type, backend)
        h, eps = config.hidden_size, config.layer_norm_epsilon
        if first:
            self.enorm = RMSNorm(h, eps)
            self.hnorm = RMSNorm(h, eps)
            self.eh_proj = nn.Linear(2 * h, h, bias=False)
        if last:
            self.final_layernorm = RMSNorm(h, eps)
        self.first, self.last = first, last

    def forward(self, x: torch.Tensor, meta: BatchMeta, cache=None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        if self.first:
            x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(x)], dim=-1))
        x = super().forward(x, meta)
        return self.final_layernorm(x) if self.last else x


class MTPHead(nn.Module):
    def __init__(self, config, backend: BackendConfig) -> None:
        super().__init__()
        self.config = config
        self.depths = config.num_nextn_predict_layers
        self.pattern = list(config.mtp_layers_block_type)
        self.repeated = bool(getattr(config, "mtp_use_repeated_layer", False))
        physical = 1 if self.repeated else self.depths
        n = len(self.pattern)
        self.layers = nn.ModuleDict({
            str(d * n + j): MTPSublayer(config, d * n + j, t, first=j == 0, last=j == n - 1, backend=backend)
            for d in range(physical) for j, t in enumerate(self.pattern)
        })

    def depth_layers(self, depth: int) -> list[MTPSublayer]:
        base = 0 if self.repeated else depth * len(self.pattern)
        return [self.layers[str(base + j)] for j in range(len(self.pattern))]

    def embed_inputs(self, embed: nn.Module, input_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return future_token_embeddings(embed, input_ids, self.depths)

    def forward(self, parent: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor | None, meta: BatchMeta,
                labels: torch.Tensor | None, num_items=None, embeds: tuple[torch.Tensor, ...] | None = None):
        if embeds is None:
            embeds = self.embed_inputs(parent.get_input_embeddings(), input_ids)
        per_depth, losses = [], []
        h = hidden
        for depth in range(self.depths):
            for layer in self.depth_layers(depth):
                h = layer(h, meta, embeds=embeds[depth] if layer.first else None)
            per_depth.append(h)
            if labels is not None:
                logits = parent.lm_head(h)
                losses.append(causal_lm_loss(logits, shift_labels(labels, depth + 2, meta)))
        loss = None
        if losses:
            loss = parent.mtp_loss_scaling_factor / self.depths * torch.stack(losses).sum()
        return per_depth, loss

    @torch.no_grad()
    def initialize_weights(self) -> None:
        std = self.config.initializer_range
        for layer in self.layers.values():
            init_block(layer, self.config, self.config.num_hidden_layers)
            if layer.first:
                layer.enorm.reset_parameters()
                layer.hnorm.reset_parameters()
                nn.init.normal_(layer.eh_proj.weight, std=std)
            if layer.last:
                layer.final_layernorm.reset_parameters()
