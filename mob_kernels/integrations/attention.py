"""The last prompt token's attention at one decoder layer, computed from that layer's own projections.

D2Pruner's importance and BTP's attention signal are the attention of the last prompt token to the image tokens at a
decoder layer (docs/contract.md §3.4, §3.5). Switching the model to eager attention with ``output_attentions=True``
would give it, but would slow every layer down and materialise ``[B, H, L, L]``. Here only the last query row is
computed, ``[B, H, L]``, the way the layer itself computes it:

* the query: the layer's ``input_layernorm`` then ``q_proj`` (with its bias) on the query token's hidden state;
* the keys: ``k_proj`` on the normed hidden states of every token (the model's own ``k_proj`` output, captured by a
  forward hook, so no projection is run twice);
* both rotated by the rotary function of the layer's modeling module with the cos/sin the layer receives: Qwen's
  M-RoPE cos/sin are ``[3, B, L, d]`` per axis before transformers 5.17 (``apply_multimodal_rotary_pos_emb`` with the
  config's ``mrope_section``) and already recomposed ``[B, L, d]`` from 5.17 on (``apply_rotary_pos_emb``); the shape
  of cos says which;
* grouped key/value heads serve ``num_key_value_groups`` query heads each (``repeat_kv``'s order: head ``h`` reads
  key head ``h // groups``), scaled by the layer's ``scaling``;
* keys after the query and padding keys masked; softmax over every remaining key, in float32.

The eager attention of transformers computes the same numbers (a test holds them to 1e-6 in float32).
"""

from __future__ import annotations

import sys
from typing import Callable

import torch
from torch import Tensor


def _rotary(attn) -> Callable[[Tensor, Tensor, Tensor], Tensor]:
    """``rotate(x [B, h, n, hd], cos, sin)`` with the rotary function of ``attn``'s own modeling module."""
    module = sys.modules[type(attn).__module__]

    def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        if cos.dim() == 4:  # Qwen M-RoPE per axis, [3, B, n, d] (transformers < 5.17)
            params = getattr(attn.config, "rope_parameters", None) or getattr(attn.config, "rope_scaling", None) or {}
            return module.apply_multimodal_rotary_pos_emb(x, x, cos, sin, params["mrope_section"])[0]
        return module.apply_rotary_pos_emb(x, x, cos, sin)[0]

    return rotate


def _gather_tokens(x: Tensor, idx: Tensor) -> Tensor:
    """``x[..., b, idx[b], :]`` for cos/sin of shape ``[..., B or 1, L, d]`` and ``idx`` ``[B, m]``."""
    B, m = idx.shape
    lead = x.shape[:-3]
    x = x.expand(*lead, B, *x.shape[-2:])
    index = idx.to(x.device).view(*(1,) * len(lead), B, m, 1).expand(*lead, B, m, x.shape[-1])
    return torch.gather(x, -2, index)


def rotated_keys(layer, keys: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """``[B, H_kv, n, hd]``: the pre-rotary ``k_proj`` output ``keys`` ``[B, n, H_kv * hd]`` of ``layer`` rotated
    with the cos/sin of those ``n`` tokens."""
    attn = layer.self_attn
    B, n, _ = keys.shape
    k = keys.view(B, n, -1, attn.head_dim).transpose(1, 2)
    cos, sin = position_embeddings
    return _rotary(attn)(k, cos, sin)


def layer_keys(layer, hidden: Tensor, position_embeddings: tuple[Tensor, Tensor]) -> Tensor:
    """The post-rotary keys ``[B, H_kv, n, hd]`` ``layer`` computes for the tokens whose hidden states (entering the
    layer) are ``hidden`` ``[B, n, d]`` and whose cos/sin are ``position_embeddings``."""
    return rotated_keys(layer, layer.self_attn.k_proj(layer.input_layernorm(hidden)), position_embeddings)


def last_token_attention(
    layer,
    hidden: Tensor,
    keys: Tensor | None,
    position_embeddings: tuple[Tensor, Tensor],
    query_index: Tensor,
    key_valid: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """The attention of token ``query_index[b]`` to every token at ``layer`` (a decoder layer), as the layer computes
    it, without materialising more than that row.

    ``hidden`` ``[B, L, d]``: the hidden states entering the layer; ``keys`` ``[B, L, H_kv * hd]``: the layer's
    ``k_proj`` output for them (None: computed here); ``position_embeddings``: the (cos, sin) the layer receives;
    ``key_valid`` ``[B, L]`` bool: False for padding (None: all valid). Keys after the query are masked (causal).
    Returns (probabilities ``[B, H, L]``, softmax over the unmasked keys, masked keys exactly 0; pre-softmax logits
    ``[B, H, L]``, masked keys ``-inf``), both float32, one row per query head."""
    attn = layer.self_attn
    if getattr(attn, "sliding_window", None) is not None:
        raise NotImplementedError("mob_kernels: the last-token attention of a sliding-window layer is not supported")
    B, L, _ = hidden.shape
    q_idx = query_index.to(hidden.device).view(B, 1)
    rows = torch.arange(B, device=hidden.device).unsqueeze(1)
    x_q = layer.input_layernorm(hidden[rows, q_idx])  # [B, 1, d]: the norm is per token
    q = attn.q_proj(x_q).view(B, 1, -1, attn.head_dim).transpose(1, 2)  # [B, H, 1, hd]
    cos, sin = position_embeddings
    q = _rotary(attn)(q, _gather_tokens(cos, q_idx), _gather_tokens(sin, q_idx))
    if keys is None:
        k = layer_keys(layer, hidden, position_embeddings)
    else:
        k = rotated_keys(layer, keys, position_embeddings)
    H, H_kv = q.shape[1], k.shape[1]
    groups = H // H_kv
    # Query head h reads key head h // groups (repeat_kv's order), without expanding the keys.
    qg = q.float().view(B, H_kv, groups, attn.head_dim)
    logits = torch.einsum("bgrd,bgld->bgrl", qg, k.float()).reshape(B, H, L) * attn.scaling
    allowed = torch.arange(L, device=hidden.device).unsqueeze(0) <= q_idx
    if key_valid is not None:
        allowed = allowed & key_valid.to(hidden.device).bool()
    logits = logits.masked_fill(~allowed.unsqueeze(1), float("-inf"))
    return torch.softmax(logits, dim=-1), logits
