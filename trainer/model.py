"""The SPARC model: item tower -> z, residual codebooks over z, a causal sequence encoder, a probabilistic interest
module over level-1 codes, and a code-conditioned user tower (one user vector per interest).

Scores are dot products u . z over the catalogue. No I/O here; `trainer.step` drives training, `trainer.search`
serves.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from trainer.batches import Batch
from trainer.config import SparcConfig
from trainer.losses import full_softmax_ce, sampled_softmax_ce
from trainer.rq import ResidualQuantizer
from trainer.search import explore_ranking, served_scores
from trainer.towers import CausalEncoder, ItemTower, last_state

HARD_EPS = 1e-30  # hard search: probability left to the codes other than the argmax (they rank below its items)


@dataclass
class Catalogue:
    """The whole item space at one moment: z (N+1, D) with grad, codes (N+1, L), row 0 = padding."""

    z: torch.Tensor
    codes: torch.Tensor

    def level1(self) -> torch.Tensor:
        """Each row's level-1 code (N+1,), -1 for the padding row (it belongs to no code's list)."""
        code1 = self.codes[:, 0].clone()
        code1[0] = -1
        return code1


@dataclass
class UserState:
    """Encoded histories: H (B, T, D) states, lengths (B,), h (B, D) the last state.

    `memo` keeps what scoring computed from these states and one catalogue (SparcModel._memo), so that scoring
    the same batch several ways (replay's score modes) computes the parts the ways share once."""

    H: torch.Tensor
    lengths: torch.Tensor
    h: torch.Tensor
    memo: dict = field(default_factory=dict, repr=False, compare=False)


class SparcModel(nn.Module):
    def __init__(self, cfg: SparcConfig, attributes: torch.Tensor | None = None):
        super().__init__()
        self.cfg = cfg
        d = cfg.encoder.dim
        self.items = ItemTower(cfg.num_items, d, cfg.num_attributes if cfg.use_attributes else 0, attributes,
                               attribute_dropout=cfg.attribute_dropout)
        self.encoder = CausalEncoder(cfg.encoder)
        self.rq = ResidualQuantizer(cfg.levels, cfg.codes, d, cfg.ema_decay, cfg.dead_code_threshold)
        if cfg.code_hysteresis > 0:  # each item's level-1 code as of the last training step (-1: none yet)
            self.register_buffer("held_codes", torch.full((cfg.num_items + 1,), -1, dtype=torch.long))
        self.interest = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))  # q(h); logits = q . E1^T
        self.code_proj = nn.Linear(d, d)  # W e_c
        nn.init.zeros_(self.code_proj.weight)
        nn.init.zeros_(self.code_proj.bias)
        if cfg.tower_attention:
            self.attn_q, self.attn_k, self.attn_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
            nn.init.zeros_(self.attn_v.weight)
            nn.init.zeros_(self.attn_v.bias)

    # ----------------------------------------------------------------- pieces
    def catalogue(self, *, dropout: bool = False) -> Catalogue:
        """The whole catalogue; dropout=True (the training loss only) applies the item tower's attribute dropout."""
        z = self.items(dropout=dropout)  # (N+1, D)
        return Catalogue(z=z, codes=self.codes_of(z))

    def codes_of(self, z: torch.Tensor, items: torch.Tensor | None = None) -> torch.Tensor:
        """Codes (n, L) of item vectors z (n, D): those of `items` (n,), or of the whole catalogue (items None,
        row i = item i). With code_hysteresis, level 1 keeps each item's held code within the margin."""
        return self.rq.encode(z, self._held(z.shape[0], items), self.cfg.code_hysteresis)[0]

    def _held(self, rows: int, items: torch.Tensor | None = None) -> torch.Tensor | None:
        """The held level-1 codes of `items` (or of rows 0..rows-1), -1 beyond the held table; None without
        hysteresis."""
        if self.cfg.code_hysteresis <= 0:
            return None
        held = self.held_codes
        if items is None:
            items = torch.arange(rows, device=held.device)
        return torch.where(items < held.shape[0], held[items.clamp(max=held.shape[0] - 1)], -1)

    def grow_(self, num_items: int, item_attributes: dict[int, list[int]] | None = None) -> bool:
        """ItemTower.grow_, keeping the held codes as long as the item table (new items hold none)."""
        grown = self.items.grow_(num_items, item_attributes)
        if grown and self.cfg.code_hysteresis > 0:
            pad = self.held_codes.new_full((num_items + 1 - self.held_codes.shape[0],), -1)
            self.held_codes = torch.cat([self.held_codes, pad])
        return grown

    def encode(
        self,
        inputs: torch.Tensor,
        lengths: torch.Tensor,
        z: torch.Tensor | None = None,
        *,
        length_buckets: bool = False,
    ) -> UserState:
        """inputs (B, T) right-padded item ids -> UserState. length_buckets: run the encoder per length bucket
        (CausalEncoder.forward_in_buckets: the same states at real positions, less work on padding)."""
        x = F.embedding(inputs, z) if z is not None else self.items(inputs)  # (B, T, D)
        H = self.encoder.forward_in_buckets(x, lengths) if length_buckets else self.encoder(x, lengths)
        return UserState(H=H, lengths=lengths, h=last_state(H, lengths))

    def interest_logits(self, h: torch.Tensor, z: torch.Tensor, codes: torch.Tensor) -> torch.Tensor:
        """h (..., D) -> logits over level-1 codes (..., C)."""
        if self.cfg.interest == "head":
            return self.interest(h) @ self.rq.levels[0].codebook.T
        # "marginal": log sum_{i: c1(i)=c} softmax(h . z)_i  (padding has probability 0)
        probs = torch.softmax(self._mask_padding(h @ z.T), dim=-1)  # (..., N+1)
        flat = probs.reshape(-1, probs.shape[-1])
        summed = flat.new_zeros(flat.shape[0], self.cfg.codes).index_add_(1, codes[:, 0], flat)
        return summed.clamp(min=1e-12).log().reshape(*probs.shape[:-1], self.cfg.codes)

    def code_vectors(self, state: UserState, code_ids: torch.Tensor) -> torch.Tensor:
        """One user vector per (user, level-1 code) for the LAST position.

        code_ids (B, K) -> u (B, K, D) = h + W e_c [+ attention over H with e_c as the query].
        """
        e = self.rq.levels[0].codebook[code_ids]  # (B, K, D)
        u = state.h[:, None, :] + self.code_proj(e)
        if self.cfg.tower_attention:
            t = state.H.shape[1]
            pad = torch.arange(t, device=e.device)[None, :] >= state.lengths[:, None].clamp(min=1)  # (B, T) at padding
            scores = self.attn_q(e) @ self.attn_k(state.H).transpose(1, 2) / math.sqrt(e.shape[-1])  # (B, K, T)
            scores = scores.masked_fill(pad[:, None, :], -math.inf)
            u = u + torch.softmax(scores, dim=-1) @ self.attn_v(state.H)
        return u

    def _target_code_vectors(
        self, H: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, e: torch.Tensor
    ) -> torch.Tensor:
        """Training form of the code-conditioned tower, at the target positions only: the m-th target, at position
        cols[m] of row rows[m] with query code e[m], gets u[m] = H[row, col] + W e[m] [+ attention over
        H[row, :col + 1] with e[m] as the query].

        H (B, T, D); rows, cols (M,) in row-major order (as `nonzero()` lists them); e (M, D) -> u (M, D).
        The same u as a causal attention at every position of the (B, T) grid, kept at the targets; but only the
        targets are computed, and keys and values only at the positions a target attends to (an online batch has
        one target per row, at its last real position: most of the grid is padding or has no target).
        """
        u = H[rows, cols] + self.code_proj(e)
        if not self.cfg.tower_attention or rows.numel() == 0:
            return u
        b, _, d = H.shape
        width = int(cols.max()) + 1  # no target attends further
        # keys and values at the positions some target of the row attends to (up to the row's last target)
        reach = rows.new_full((b,), -1).scatter_reduce(0, rows, cols, "amax")
        kr, kc = (torch.arange(width, device=H.device)[None, :] <= reach[:, None]).nonzero(as_tuple=True)
        seen = H[kr, kc]
        k = H.new_zeros(b, width, d).index_put((kr, kc), self.attn_k(seen))
        v = H.new_zeros(b, width, d).index_put((kr, kc), self.attn_v(seen))
        # each row's targets side by side as its queries (slot = rank of the target within its row); an empty
        # slot asks about position 0, and its answer is never read
        per_row = torch.bincount(rows, minlength=b)
        slot = torch.arange(rows.shape[0], device=H.device) - (per_row.cumsum(0) - per_row)[rows]
        q = H.new_zeros(b, int(per_row.max()), d).index_put((rows, slot), self.attn_q(e))
        asked = rows.new_zeros(q.shape[:2]).index_put((rows, slot), cols)  # (B, Q) positions
        causal = torch.arange(width, device=H.device)[None, None, :] <= asked[:, :, None]  # (B, Q, width)
        a = F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None], attn_mask=causal[:, None])
        return u + a[:, 0][rows, slot]

    def _log_popularity(self) -> torch.Tensor:
        """(N+1,) log of each item's share of the interactions learnt so far (add-one smoothed)."""
        counts = self.items.counts
        return torch.log((counts + 1.0) / (counts.sum() + counts.shape[0]))

    def _retrieval_loss(self, users: torch.Tensor, z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """users (M, D), z (N+1, D) the catalogue, y (M,) targets in 1..N. With popularity_adjustment t, every
        candidate's training logit is u . z + t log q (logit adjustment)."""
        t = self.cfg.popularity_adjustment
        if self.cfg.retrieval_loss == "full":
            if t:  # u . z + t log q as one product: [u, t] . [z, log q]
                users = torch.cat([users, users.new_full((users.shape[0], 1), t)], dim=1)
                z = torch.cat([z, self._log_popularity()[:, None]], dim=1)
            return full_softmax_ce(users, z[1:], y - 1)  # the padding row is never a candidate
        log_q = self._log_popularity()[y]  # the in-batch negatives' sampling bias, less the adjustment
        return sampled_softmax_ce(users, F.embedding(y, z), y, (1.0 - t) * log_q)

    def _within_code_ce(self, u: torch.Tensor, z: torch.Tensor, y: torch.Tensor, code1: torch.Tensor) -> torch.Tensor:
        """Mean CE of y among the items that share its level-1 code: -log softmax_{j: c(j)=c(y)}(u . z_j)[y].

        u (M, D) user vectors (each conditioned on its target's code), z (N+1, D), y (M,) in 1..N, code1 (N+1,).
        One small matmul per code present in the batch: ~C times cheaper than a full softmax.
        """
        if u.shape[0] == 0:
            return u.sum() * 0.0
        item_codes = code1[1:]
        t = self.cfg.popularity_adjustment
        bias = t * self._log_popularity() if t else None  # (N+1,) the logit adjustment
        order = torch.argsort(item_codes, stable=True) + 1  # item ids grouped by code
        ends = torch.bincount(item_codes, minlength=self.cfg.codes).cumsum(0)
        rank = torch.empty_like(order)
        rank[order - 1] = torch.arange(order.shape[0], device=order.device)  # item id - 1 -> its place in `order`
        target_code = code1[y]
        total = u.new_zeros(())
        for c in torch.unique(target_code).tolist():
            start = int(ends[c - 1]) if c > 0 else 0
            rows = (target_code == c).nonzero(as_tuple=True)[0]
            members = order[start : int(ends[c])]
            logits = u[rows] @ z[members].T  # (M_c, N_c)
            if bias is not None:
                logits = logits + bias[members]
            total = total + F.cross_entropy(logits, rank[y[rows] - 1] - start, reduction="sum")
        return total / u.shape[0]

    @staticmethod
    def _mask_padding(logits: torch.Tensor) -> torch.Tensor:
        logits = logits.clone()
        logits[..., 0] = -math.inf
        return logits

    # ----------------------------------------------------------------- training
    def loss(self, batch: Batch) -> tuple[torch.Tensor, dict]:
        """Loss of one batch (every position predicts its next item) and metrics for logging."""
        cat = self.catalogue(dropout=True)
        state = self.encode(batch.inputs, batch.lengths, cat.z, length_buckets=batch.length_buckets)
        rows, cols = (batch.targets > 0).nonzero(as_tuple=True)  # the M positions with a target, row-major
        y = batch.targets[rows, cols]  # (M,)
        target_code = cat.codes[y, 0]  # (M,): label of the interest module, recomputed every step
        e = self.rq.levels[0].codebook[target_code]  # (M, D)
        detach = self.cfg.conditioned_detach
        u = self._target_code_vectors(state.H.detach() if detach else state.H, rows, cols, e)  # (M, D)
        h = state.H[rows, cols]  # (M, D)

        if self.cfg.conditioned_scope == "code":
            conditioned = self._within_code_ce(u, cat.z.detach() if detach else cat.z, y, cat.codes[:, 0])
        else:
            conditioned = self._retrieval_loss(u, cat.z, y)
        total = conditioned
        metrics = {"loss_conditioned": float(conditioned.detach())}
        if self.cfg.global_weight > 0:
            glob = self._retrieval_loss(h, cat.z, y)
            total = total + self.cfg.global_weight * glob
            metrics["loss_global"] = float(glob.detach())
        if self.cfg.interest == "head" and self.cfg.interest_weight > 0:
            logits = self.interest_logits(h, cat.z, cat.codes)
            interest = F.cross_entropy(logits, target_code)
            total = total + self.cfg.interest_weight * interest
            metrics["loss_interest"] = float(interest.detach())
            metrics["interest_top1"] = float((logits.argmax(-1) == target_code).float().mean())
        zy = F.embedding(y, cat.z)  # the targets' z (F.embedding: its backward sums in a fixed order)
        if self.cfg.shuffle_bpr_weight > 0:
            perm = torch.randperm(y.shape[0], device=y.device)
            u_neg = self._target_code_vectors(state.H, rows, cols, e[perm])
            differs = target_code != target_code[perm]
            bpr = -F.logsigmoid(((u - u_neg) * zy).sum(-1))[differs].mean() if differs.any() else u.sum() * 0
            total = total + self.cfg.shuffle_bpr_weight * bpr
            metrics["loss_shuffle_bpr"] = float(bpr.detach())
        if self.cfg.commitment > 0:
            _, quantised = self.rq.encode(zy, self._held(0, y), self.cfg.code_hysteresis)
            commit = F.mse_loss(zy, quantised)
            total = total + self.cfg.commitment * commit
            metrics["loss_commit"] = float(commit.detach())
        metrics["loss"] = float(total.detach())
        return total, metrics

    @torch.no_grad()
    def update_codebooks_(self, batch: Batch, generator: torch.Generator | None = None) -> dict:
        """`update_from_items_` with the items consumed in this batch (its targets, row-major)."""
        return self.update_from_items_(batch.targets[batch.targets > 0], generator)

    @torch.no_grad()
    def update_from_items_(self, y: torch.Tensor, generator: torch.Generator | None = None) -> dict:
        """EMA/revival update of the codebooks from the consumed items y (M,), and the item counts behind the logQ
        correction (both no-ops in eval mode; a frozen codebook still counts consumption). A data-parallel step
        passes every rank's targets (trainer.distributed)."""
        if not self.training:
            return {"revived": 0}
        self.items.counts.index_add_(0, y, self.items.counts.new_ones(y.shape[0]))
        out = self.rq.update_(self.items(y, dropout=True), generator, self._held(0, y), self.cfg.code_hysteresis)
        if self.cfg.code_hysteresis > 0 and not bool(self.rq.levels[0].frozen):
            held = self.catalogue().codes[:, 0]  # what the items hold from now on
            held[0] = -1
            self.held_codes = held
        return out

    # ----------------------------------------------------------------- scoring
    @torch.no_grad()
    def score(
        self,
        inputs: torch.Tensor,
        lengths: torch.Tensor,
        *,
        search: str = "soft",
        top_codes: int = 4,
        temperature: float = 1.0,
        global_mix: float = 0.0,
        served: int = 0,
        exploit: int | None = None,
        lift: float = 0.0,
    ) -> torch.Tensor:
        """Full-catalogue scores (B, N+1) (higher is better; column 0 is padding and -inf).

        soft: log of the mixture  global_mix * softmax(h.Z) + (1 - global_mix) * P_codes, where P_codes is
              with conditioned_scope "catalogue": sum_k p_k softmax(u_k.Z) over the `top_codes` most probable
              level-1 codes (p renormalised over them, at `temperature`);
              with conditioned_scope "code": the factorised p(c(i)) p(i | c(i)) of `_factorised_scores`.
        hard: SPARC-Hard, the single most probable code c: u_c.Z ("catalogue"), or ("code") the items of c
              ranked by u_c, then the other items in the factorised order with p(c) ~ 1 - HARD_EPS.
        served=k > 0 (conditioned_scope "code", global_mix 0): what serving returns with k slots, as scores: the
              items of trainer.search.soft_search (the `top_codes` codes' lists, per-code quotas, free slots) or
              hard_search (the argmax code's top k) keep their scores above, every other item is -inf.
        exploit=E (soft search): exploration slots (trainer.search, step 5) with the item bias `lift_bias(lift)`:
              the E most probable items first, then the others by p(i | u) / q(i)^lift (the served lists'
              remaining slots from the chosen codes' lists); the values then encode that order.
        """
        cat = self.catalogue()
        return self.score_encoded(
            self.encode(inputs, lengths, cat.z), cat, search=search, top_codes=top_codes, temperature=temperature,
            global_mix=global_mix, served=served, exploit=exploit, lift=lift,
        )

    def lift_bias(self, lift: float) -> torch.Tensor:
        """(N+1,) -lift * log q(i), q(i) the item's share of the interactions learnt (items.counts): added to a log
        probability it ranks items by p(i | u) / q(i)^lift, what a user takes unusually often for its popularity."""
        return -lift * self._log_popularity()

    @torch.no_grad()
    def score_encoded(
        self,
        state: UserState,
        cat: Catalogue,
        *,
        search: str = "soft",
        top_codes: int = 4,
        temperature: float = 1.0,
        global_mix: float = 0.0,
        served: int = 0,
        exclude: torch.Tensor | None = None,
        exploit: int | None = None,
        lift: float = 0.0,
    ) -> torch.Tensor:
        """`score` from an encoded batch and its catalogue, for callers that score one batch several ways.
        exclude (B, N+1) bool: items a row must not be served (e.g. not known yet); with `served` they take no
        slot (they are removed before the lists are filled), otherwise they simply score -inf."""
        if exploit is not None and search != "soft":
            raise ValueError("exploration slots are soft search's (exploit needs search='soft')")
        logits_c = self._memo(state, cat, ("interest",),
                              lambda: self.interest_logits(state.h, cat.z, cat.codes)) / temperature  # (B, C)
        if served:
            return self._served_scores(state, cat, logits_c, search, top_codes, global_mix, served, exclude,
                                       temperature, exploit, lift)
        scores = self._memo(state, cat, ("scores", search, top_codes, temperature, global_mix),
                            lambda: self._scores(state, cat, logits_c, search, top_codes, global_mix))
        scores = scores if exclude is None else scores.masked_fill(exclude, -math.inf)
        return scores if exploit is None else explore_ranking(scores, self.lift_bias(lift), exploit)

    @staticmethod
    def _memo(state: UserState, cat: Catalogue, key: tuple, compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        """compute(), or what it returned before for this state and catalogue (UserState.memo). The results are
        shared: callers never modify them in place."""
        if state.memo.get("catalogue") is not cat:
            state.memo.clear()
            state.memo["catalogue"] = cat
        if key not in state.memo:
            state.memo[key] = compute()
        return state.memo[key]

    def _scores(self, state, cat, logits_c, search: str, top_codes: int, global_mix: float) -> torch.Tensor:
        if search == "hard":
            if self.cfg.conditioned_scope == "code":  # the argmax code's items first (by u_c), then the rest
                return self._factorised_scores(state, cat, self._hard_logits(logits_c), top_codes=1)
            u = self.code_vectors(state, logits_c.argmax(-1, keepdim=True))[:, 0]
            return self._mask_padding(u @ cat.z.T)
        if search != "soft":
            raise ValueError(f"unknown search {search!r}; expected 'soft' or 'hard'")
        if self.cfg.conditioned_scope == "code":
            mixture = self._factorised_scores(state, cat, logits_c, top_codes)
        else:
            top_logit, top = logits_c.topk(min(top_codes, self.cfg.codes), dim=-1)  # (B, K)
            logp_k = torch.log_softmax(top_logit, dim=-1)
            u = self.code_vectors(state, top)  # (B, K, D)
            per_code = torch.log_softmax(self._mask_padding(u @ cat.z.T), dim=-1)  # (B, K, N+1)
            mixture = torch.logsumexp(per_code + logp_k[..., None], dim=1)  # (B, N+1)
        if global_mix > 0:
            glob = torch.log_softmax(self._mask_padding(state.h @ cat.z.T), dim=-1)
            if global_mix >= 1:
                return glob
            mixture = torch.logaddexp(glob + math.log(global_mix), mixture + math.log1p(-global_mix))
        return mixture

    @staticmethod
    def _hard_logits(logits_c: torch.Tensor) -> torch.Tensor:
        """Hard search's interest logits: p(argmax) ~ 1, the other codes only break ties below its items."""
        best = logits_c.argmax(-1, keepdim=True)
        return (torch.log_softmax(logits_c, dim=-1) + math.log(HARD_EPS)).scatter(1, best, 0.0)

    def _served_scores(self, state, cat, logits_c, search: str, top_codes: int, global_mix: float, k: int,
                       exclude: torch.Tensor | None, temperature: float, exploit: int | None, lift: float):
        """`score_encoded(served=k)`: the factorised scores kept on the items serving returns, -inf elsewhere."""
        if self.cfg.conditioned_scope != "code" or global_mix > 0:
            raise ValueError("served lists are defined for conditioned_scope 'code' without a global mix")
        if search not in ("soft", "hard"):
            raise ValueError(f"unknown search {search!r}; expected 'soft' or 'hard'")
        key = ("scores", search, top_codes, temperature, 0.0)  # score_encoded's key: the same scores, shared
        if search == "hard":
            logits_c, top_codes = self._hard_logits(logits_c), 1
        top_codes = min(top_codes, self.cfg.codes)
        scores = self._memo(state, cat, key, lambda: self._factorised_scores(state, cat, logits_c, top_codes))
        if exclude is not None:
            scores = scores.masked_fill(exclude, -math.inf)
        weights, codes = torch.softmax(logits_c, dim=-1).topk(top_codes, dim=-1)
        weights = (weights / weights.sum(-1, keepdim=True)).cpu().numpy()  # renormalised, as choose_codes does
        return served_scores(scores, cat.level1(), codes, weights, k, exploit=exploit,
                             bias=None if exploit is None else self.lift_bias(lift))

    def _factorised_scores(self, state: UserState, cat: Catalogue, logits_c: torch.Tensor, top_codes: int):
        """log p(i) = log p(c(i)) + log p(i | c(i)) for the factorised model (conditioned_scope "code").

        p(c) is the interest distribution (logits_c, already at its temperature). Within the `top_codes` most
        probable codes, p(i | c) = softmax over code c's items of u_c . z; within the other codes it is the
        single-vector model's, softmax of h . z (with u_c = h, as at initialisation, this is exactly h's softmax).
        """
        code1 = cat.level1()  # (N+1,)

        def single_vector_within() -> torch.Tensor:  # log p_h(i | c(i)): h's softmax within each item's code
            glob = torch.log_softmax(self._mask_padding(state.h @ cat.z.T), dim=-1)  # (B, N+1)
            p_code = glob.new_zeros(glob.shape[0], self.cfg.codes).index_add_(1, code1[1:], glob[:, 1:].exp())
            return glob - p_code.clamp(min=1e-30).log()[:, code1.clamp(min=0)]

        within = self._memo(state, cat, ("within",), single_vector_within)
        _, top = logits_c.topk(min(top_codes, self.cfg.codes), dim=-1)  # (B, K)
        u = self.code_vectors(state, top)  # (B, K, D)
        for k in range(top.shape[1]):
            member = code1[None, :] == top[:, k, None]  # (B, N+1)
            s = (u[:, k] @ cat.z.T).masked_fill(~member, -math.inf)
            s = s - torch.logsumexp(s, dim=-1, keepdim=True)
            within = torch.where(member, s, within)
        scores = torch.log_softmax(logits_c, dim=-1)[:, code1.clamp(min=0)] + within
        return self._mask_padding(scores)
