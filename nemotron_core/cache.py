"""NemotronHybridCache: what decoding needs from each layer, and nothing for layers that need nothing.

* attention layers: a preallocated K/V buffer ``[B, kv_heads, max_length, head_dim]`` (no growth by
  concatenation; a step writes one row);
* Mamba layers: the last ``conv_kernel - 1`` conv inputs and the SSM state ``[B, heads, head_dim, N]``
  (in ``mamba_ssm_cache_dtype``, fp32 by default, because the recurrence accumulates);
* MLP and MoE layers: nothing.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ATTENTION, MAMBA
from .errors import InputError

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class MambaState:
    conv: torch.Tensor  # [B, conv_dim, K-1]
    ssm: torch.Tensor  # [B, heads, head_dim, state]


class NemotronHybridCache:
    is_compileable = False

    def __init__(self, config, batch_size: int, max_length: int, dtype: torch.dtype = torch.float32,
                 device: torch.device | str = "cpu", layer_types: list[str] | None = None) -> None:
        self.config = config
        self.batch_size = batch_size
        self.max_length = max_length
        self.dtype = dtype
        self.device = torch.device(device)
        self.seq_len = 0
        self.embedded_prefix = 0  # prompt positions that generate() fed as inputs_embeds
        ssm_dtype = _DTYPES.get(str(getattr(config, "mamba_ssm_cache_dtype", "float32")), torch.float32)
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.mamba: dict[int, MambaState] = {}
        for idx, kind in enumerate(layer_types or config.layers_block_type):
            if kind == ATTENTION:
                shape = (batch_size, config.num_key_value_heads, max_length, config.head_dim)
                self.kv[idx] = (torch.zeros(shape, dtype=dtype, device=self.device),
                                torch.zeros(shape, dtype=dtype, device=self.device))
            elif kind == MAMBA:
                self.mamba[idx] = MambaState(
                    conv=torch.zeros(batch_size, config.mamba_conv_dim, config.conv_kernel - 1, dtype=dtype,
                                     device=self.device),
                    ssm=torch.zeros(batch_size, config.mamba_num_heads, config.mamba_head_dim,
                                    config.ssm_state_size, dtype=ssm_dtype, device=self.device),
                )

    # ---- used by the mixers --------------------------------------------------------------------
    def mamba_state(self, layer_idx: int) -> MambaState:
        return self.mamba[layer_idx]

    def update_kv(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, past_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new rows at ``past_len`` and return views over everything cached so far."""
        end = past_len + k.shape[2]
        if end > self.max_length:
            raise InputError(f"sequence length {end} exceeds the cache's max_length {self.max_length}")
        kc, vc = self.kv[layer_idx]
        kc[:, :, past_len:end] = k
        vc[:, :, past_len:end] = v
        return kc[:, :, :end], vc[:, :, :end]

    def write_kv_at(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Static-shape decode: write one step at device index ``pos`` and return the whole buffers
        (the caller masks positions not yet written). No host sync, so it can be graph-captured."""
        kc, vc = self.kv[layer_idx]
        kc.index_copy_(2, pos, k)
        vc.index_copy_(2, pos, v)
        return kc, vc

    # ---- bookkeeping ---------------------------------------------------------------------------
    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.seq_len

    def advance(self, n: int) -> None:
        self.seq_len += n

    def reset(self) -> None:
        """Zero every state in place (buffers keep their storage, so captured CUDA graphs stay valid)."""
        self.seq_len = 0
        self.embedded_prefix = 0
        for k, v in self.kv.values():
            k.zero_()
            v.zero_()
        for st in self.mamba.values():
            st.conv.zero_()
            st.ssm.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Select batch rows (beam search): every state follows its beam."""
        for idx, (k, v) in self.kv.items():
            self.kv[idx] = (k.index_select(0, beam_idx.to(k.device)), v.index_select(0, beam_idx.to(v.device)))
        for st in self.mamba.values():
            st.conv.copy_(st.conv.index_select(0, beam_idx.to(st.conv.device)))
            st.ssm.copy_(st.ssm.index_select(0, beam_idx.to(st.ssm.device)))

    def memory_bytes(self) -> dict[str, int]:
        kv = sum(t.numel() * t.element_size() for pair in self.kv.values() for t in pair)
        conv = sum(s.conv.numel() * s.conv.element_size() for s in self.mamba.values())
        ssm = sum(s.ssm.numel() * s.ssm.element_size() for s in self.mamba.values())
        return {"kv": kv, "conv": conv, "ssm": ssm, "total": kv + conv + ssm}
