"""Building blocks shared by SPARC and the baselines: the item tower and the causal sequence encoder."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainer.config import EncoderConfig


def pad_attributes(item_attributes: dict[int, list[int]], num_items: int) -> torch.Tensor:
    """{item: [attr, ...]} -> (num_items + 1, A) int64, 0-padded; row 0 (padding item) is all zeros."""
    width = max((len(a) for a in item_attributes.values()), default=1)
    out = torch.zeros(num_items + 1, max(width, 1), dtype=torch.long)
    for item, attrs in item_attributes.items():
        if 1 <= item <= num_items:
            out[item, : len(attrs)] = torch.as_tensor(attrs, dtype=torch.long)
    return out


class ItemTower(nn.Module):
    """z_i = ID embedding_i + W * mean(attribute embeddings of i).   (N+1, D); row 0 is padding.

    The ID table grows with `grow_` when unseen items arrive, and a row handed to another item is cleared with
    `reset_rows_`; a new item's ID row starts at zero, so its z comes from its attributes alone until it has
    interactions.
    """

    def __init__(self, num_items: int, dim: int, num_attributes: int = 0, attributes: torch.Tensor | None = None,
                 attribute_dropout: float = 0.0):
        super().__init__()
        self.dim = dim
        self.attribute_dropout = attribute_dropout  # dropout on the attribute term while training
        self.id_embedding = nn.Parameter(torch.randn(num_items + 1, dim) * 0.02)
        self.use_attributes = num_attributes > 0
        if self.use_attributes:
            self.attr_embedding = nn.EmbeddingBag(num_attributes + 1, dim, mode="mean", padding_idx=0)
            nn.init.normal_(self.attr_embedding.weight, std=0.02)
            self.attr_proj = nn.Linear(dim, dim)
            nn.init.eye_(self.attr_proj.weight)
            nn.init.zeros_(self.attr_proj.bias)
            if attributes is None:
                attributes = torch.zeros(num_items + 1, 1, dtype=torch.long)
            self.register_buffer("attributes", attributes.clone())  # (N+1, A)
        self.register_buffer("counts", torch.zeros(num_items + 1))  # interactions seen per item (for logQ)
        with torch.no_grad():
            self.id_embedding[0].zero_()

    @property
    def num_items(self) -> int:
        return self.id_embedding.shape[0] - 1

    def forward(self, items: torch.Tensor | None = None, *, dropout: bool = False) -> torch.Tensor:
        """items: any int shape (...) -> z (..., D); None -> the whole catalogue (N+1, D).

        dropout: apply the attribute dropout (in training mode only). Only the training losses ask for it, so
        the z that snapshots, serving and validation see never depends on the mode the model happens to be in."""
        if items is None:
            z = self.id_embedding
            if self.use_attributes:
                z = z + self._attribute_term(self.attributes, dropout)
            return z
        flat = items.reshape(-1)
        z = F.embedding(flat, self.id_embedding)
        if self.use_attributes:
            z = z + self._attribute_term(self.attributes[flat], dropout)
        return z.reshape(*items.shape, self.dim)

    def _attribute_term(self, attributes: torch.Tensor, dropout: bool) -> torch.Tensor:
        term = self.attr_proj(self.attr_embedding(attributes))
        if dropout and self.training and self.attribute_dropout:
            return F.dropout(term, self.attribute_dropout)
        return term

    @torch.no_grad()
    def grow_(self, num_items: int, item_attributes: dict[int, list[int]] | None = None) -> bool:
        """Make room for items up to `num_items` and set attributes of the listed items.

        Returns True when the ID parameter was replaced (optimisers holding it must be told; see Trainer).
        Attribute ids beyond the attribute table are ignored (the table does not grow).
        """
        grown = False
        if num_items > self.num_items:
            extra = self.id_embedding.new_zeros(num_items - self.num_items, self.dim)
            self.id_embedding = nn.Parameter(torch.cat([self.id_embedding.data, extra]))
            self.counts = torch.cat([self.counts, self.counts.new_zeros(num_items + 1 - self.counts.shape[0])])
            if self.use_attributes:
                pad = self.attributes.new_zeros(num_items - self.attributes.shape[0] + 1, self.attributes.shape[1])
                self.attributes = torch.cat([self.attributes, pad])
            grown = True
        if item_attributes and self.use_attributes:
            limit = self.attr_embedding.num_embeddings
            width = max(len(a) for a in item_attributes.values())
            if width > self.attributes.shape[1]:
                pad = self.attributes.new_zeros(self.attributes.shape[0], width - self.attributes.shape[1])
                self.attributes = torch.cat([self.attributes, pad], dim=1)
            for item, attrs in item_attributes.items():
                kept = [a for a in attrs if 0 < a < limit]
                self.attributes[item].zero_()
                if kept:
                    self.attributes[item, : len(kept)] = torch.as_tensor(kept, device=self.attributes.device)
        return grown

    @torch.no_grad()
    def reset_rows_(self, rows: list[int]) -> None:
        """Make `rows` new items again (rows reused for other items): zero ID rows, no attributes, no counts."""
        if not rows:
            return
        idx = torch.as_tensor(rows, dtype=torch.long, device=self.id_embedding.device)
        self.id_embedding[idx] = 0.0
        self.counts[idx] = 0.0
        if self.use_attributes:
            self.attributes[idx] = 0


class CausalSelfAttentionBlock(nn.Module):
    """Pre-LayerNorm transformer block with causal self-attention. (B, T, D) -> (B, T, D)."""

    def __init__(self, dim: int, heads: int, ffn_mult: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_mult * dim), nn.GELU(), nn.Linear(ffn_mult * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        p = self.dropout if self.training else 0.0
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=p)  # (B, H, T, D/H)
        x = x + F.dropout(self.out(a.transpose(1, 2).reshape(b, t, d)), p, self.training)
        return x + F.dropout(self.ffn(self.ln2(x)), p, self.training)


class CausalEncoder(nn.Module):
    """SASRec-style encoder over item vectors.

    Sequences are RIGHT-padded (items first, zeros after), so causal attention never sees padding from a real
    position. Positions count back from each sequence's last item (0 = most recent), as SASRec's left padding does.
    forward(x (B, T, D), lengths (B,)) -> H (B, T, D); H[b, t] summarises items 0..t of sequence b.
    """

    def __init__(self, cfg: EncoderConfig):
        super().__init__()
        self.cfg = cfg
        self.position = nn.Embedding(cfg.max_len, cfg.dim)
        nn.init.normal_(self.position.weight, std=0.02)
        self.blocks = nn.ModuleList(
            CausalSelfAttentionBlock(cfg.dim, cfg.heads, cfg.ffn_mult, cfg.dropout) for _ in range(cfg.layers)
        )
        self.ln = nn.LayerNorm(cfg.dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        back = lengths[:, None] - 1 - torch.arange(t, device=x.device)[None, :]
        pos = back.clamp(min=0, max=self.cfg.max_len - 1)  # (B, T)
        h = x * math.sqrt(d) + self.position(pos)
        h = F.dropout(h, self.cfg.dropout, self.training)
        for block in self.blocks:
            h = block(h)
        return self.ln(h)

    def forward_in_buckets(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """forward() run once per length bucket (lengths <= 1, 2, 4, 8, ..., then the rest), each bucket padded
        to its own longest row instead of the batch's: for batches whose lengths vary widely (online batches,
        where most of a (B, T) grid is padding) most of the work is saved.

        The same H at every real position: with right padding, causal attention and positions counted from each
        row's end, a real position never sees the padding, so its state does not depend on the padded width. H
        at padding positions means nothing (as with forward()). In training, dropout is drawn per bucket, so the
        random masks (not their distribution) differ from forward()'s.
        """
        b, t, d = x.shape
        out = x.new_zeros(b, t, d)
        lower = -1  # rows of length 0 (no history) join the first bucket
        for upper in length_buckets(t):
            rows = ((lengths > lower) & (lengths <= upper)).nonzero().squeeze(1)
            lower = upper
            if rows.numel() == 0:
                continue
            width = max(int(lengths[rows].max()), 1)
            out[rows, :width] = self.forward(x[rows, :width], lengths[rows])
        return out


def length_buckets(longest: int) -> list[int]:
    """Upper length bounds of CausalEncoder.forward_in_buckets' buckets: 1, 2, 4, ... below `longest`, then it."""
    bounds, upper = [], 1
    while upper < longest:
        bounds.append(upper)
        upper *= 2
    return [*bounds, max(longest, 1)]


def last_state(h: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """H (B, T, D), lengths (B,) -> the state at each sequence's last item (B, D)."""
    return h[torch.arange(h.shape[0], device=h.device), (lengths - 1).clamp(min=0)]
