"""trainer.losses, trainer.model, trainer.step and trainer.baselines on a tiny seeded model."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from trainer.baselines import ComiRecSA, Popularity, SASRec
from trainer.batches import Batch, make_batch
from trainer.config import EncoderConfig, SparcConfig, TrainConfig
from trainer.losses import full_softmax_ce, sampled_softmax_ce
from trainer.model import SparcModel
from trainer.step import Trainer
from trainer.towers import ItemTower, pad_attributes

N_ITEMS, N_ATTRS, CODES = 30, 6, 8
ENC = EncoderConfig(dim=16, max_len=8, layers=1, heads=1, ffn_mult=2, dropout=0.1)


def sparc_config(**overrides) -> SparcConfig:
    # the interest head and catalogue-wide code vectors unless a test asks for the (default) factorised model
    base = {"num_items": N_ITEMS, "num_attributes": N_ATTRS, "encoder": ENC, "levels": 2, "codes": CODES,
            "interest": "head", "conditioned_scope": "catalogue"}
    return SparcConfig(**{**base, **overrides})


def attributes(num_items: int = N_ITEMS, seed: int = 0) -> dict[int, list[int]]:
    rng = np.random.default_rng(seed)
    return {i: sorted({int(a) for a in rng.integers(1, N_ATTRS + 1, size=2)})
            for i in range(1, num_items + 1)}


def make_model(seed: int = 0, **overrides) -> SparcModel:
    torch.manual_seed(seed)
    cfg = sparc_config(**overrides)
    attrs = pad_attributes(attributes(), N_ITEMS) if cfg.num_attributes and cfg.use_attributes else None
    return SparcModel(cfg, attrs)


def batch(seed: int, users: int = 6, num_items: int = N_ITEMS) -> Batch:
    rng = np.random.default_rng(seed)
    seqs = [rng.integers(1, num_items + 1, size=int(rng.integers(3, 10))) for _ in range(users)]
    return make_batch(seqs, ENC.max_len)


def warm(model: torch.nn.Module, steps: int = 4, lr: float = 1e-2) -> Trainer:
    trainer = Trainer(model, TrainConfig(lr=lr, seed=0))
    for s in range(steps):
        trainer.step(batch(s))
    model.eval()
    return trainer


@pytest.fixture(scope="module")
def warm_model() -> SparcModel:
    """A few training steps, then random code-dependent weights so that every code's user vector differs."""
    model = make_model()
    warm(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for layer in (model.code_proj, model.attn_v, model.attn_q, model.interest[2]):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * 2.0)
    return model


# ----------------------------------------------------------------- losses


@pytest.mark.parametrize("upstream", [1.0, 2.5, -0.7])
def test_full_softmax_ce_equals_cross_entropy(upstream):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(5, 4, generator=g, dtype=torch.float64, requires_grad=True)
    z = torch.randn(7, 4, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.tensor([0, 3, 6, 3, 1])
    h_ref, z_ref = h.detach().clone().requires_grad_(True), z.detach().clone().requires_grad_(True)

    loss = full_softmax_ce(h, z, y)
    ref = F.cross_entropy(h_ref @ z_ref.T, y)
    torch.testing.assert_close(loss, ref)
    (loss * upstream).backward()
    (ref * upstream).backward()
    torch.testing.assert_close(h.grad, h_ref.grad)
    torch.testing.assert_close(z.grad, z_ref.grad)


def test_full_softmax_ce_of_no_rows_is_zero():
    h = torch.zeros(0, 4, requires_grad=True)
    loss = full_softmax_ce(h, torch.randn(3, 4), torch.zeros(0, dtype=torch.long))
    assert float(loss.detach()) == 0.0
    loss.backward()


def test_sampled_softmax_ce_matches_hand_computation_with_duplicates_masked():
    g = torch.Generator().manual_seed(1)
    h = torch.randn(4, 3, generator=g, dtype=torch.float64)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    y = torch.tensor([5, 7, 5, 9])  # rows 0 and 2 share a positive: neither is the other's negative
    log_q = torch.log(torch.tensor([0.2, 0.1, 0.2, 0.05], dtype=torch.float64))

    def hand(h, z, y, log_q):
        total = 0.0
        for i in range(len(y)):
            allowed = [j for j in range(len(y)) if j == i or y[j] != y[i]]
            logit = {j: float(h[i] @ z[j]) - float(log_q[j]) for j in allowed}
            total += -logit[i] + math.log(sum(math.exp(v) for v in logit.values()))
        return total / len(y)

    got = float(sampled_softmax_ce(h, z, y, log_q))
    assert got == pytest.approx(hand(h, z, y, log_q), rel=1e-12)
    # without the duplicate the loss is the plain in-batch softmax over all four rows
    y_unique = torch.tensor([5, 7, 6, 9])
    assert float(sampled_softmax_ce(h, z, y_unique, log_q)) == pytest.approx(hand(h, z, y_unique, log_q))
    assert got != pytest.approx(float(sampled_softmax_ce(h, z, y_unique, log_q)))


# ----------------------------------------------------------------- SPARC model


@pytest.mark.parametrize("overrides", [{}, {"retrieval_loss": "sampled"}, {"interest": "marginal"},
                                       {"tower_attention": False, "shuffle_bpr_weight": 1.0},
                                       {"interest": "marginal", "conditioned_scope": "code"}])
def test_loss_is_finite_and_backward_reaches_parameters(overrides):
    model = make_model(**overrides)
    model.train()
    model.rq.update_(model.items()[1:], torch.Generator().manual_seed(0))  # initialise the codebooks
    loss, metrics = model.loss(batch(0))
    assert torch.isfinite(loss)
    assert metrics["loss"] == pytest.approx(float(loss.detach()))
    loss.backward()
    assert model.items.id_embedding.grad is not None
    assert torch.isfinite(model.items.id_embedding.grad).all()
    assert model.items.id_embedding.grad.abs().sum() > 0
    if overrides.get("interest", "head") == "head":
        assert "loss_interest" in metrics
        assert model.interest[0].weight.grad.abs().sum() > 0


def test_score_shape_and_padding_column(warm_model):
    b = batch(10)
    for search in ("soft", "hard"):
        s = warm_model.score(b.inputs, b.lengths, search=search)
        assert s.shape == (b.size, N_ITEMS + 1)
        assert torch.isneginf(s[:, 0]).all()
        assert torch.isfinite(s[:, 1:]).all()
    with pytest.raises(ValueError, match="unknown search"):
        warm_model.score(b.inputs, b.lengths, search="medium")


def explicit_pieces(model: SparcModel, b: Batch):
    cat = model.catalogue()
    state = model.encode(b.inputs, b.lengths, cat.z)
    logits = model.interest_logits(state.h, cat.z, cat.codes)  # (B, C)
    return cat, state, logits


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_soft_score_is_the_explicit_mixture_over_all_codes(warm_model, temperature):
    b = batch(11)
    with torch.no_grad():
        cat, state, logits = explicit_pieces(warm_model, b)
        p = torch.softmax(logits / temperature, dim=-1)  # (B, C)
        all_codes = torch.arange(CODES).expand(b.size, -1)
        u = warm_model.code_vectors(state, all_codes)  # (B, C, D)
        per_code = torch.softmax(u @ cat.z[1:].T, dim=-1)  # (B, C, N) over real items only
        expected = (p[..., None] * per_code).sum(dim=1)  # (B, N)
    assert (per_code.amax(dim=1) / per_code.amin(dim=1)).max() > 1.1, "codes must give different rankings"
    assert p.max() < 0.99, "the interest distribution must not be one-hot"
    got = warm_model.score(b.inputs, b.lengths, search="soft", top_codes=CODES, temperature=temperature,
                           global_mix=0.0)
    torch.testing.assert_close(got[:, 1:].exp(), expected, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(got[:, 1:].exp().sum(dim=1), torch.ones(b.size))


def test_soft_score_top_codes_renormalises_and_global_mix_mixes(warm_model):
    b = batch(12)
    k, mix = 3, 0.25
    with torch.no_grad():
        cat, state, logits = explicit_pieces(warm_model, b)
        top_logit, top = logits.topk(k, dim=-1)
        p = torch.softmax(top_logit, dim=-1)
        u = warm_model.code_vectors(state, top)
        per_code = torch.softmax(u @ cat.z[1:].T, dim=-1)
        glob = torch.softmax(state.h @ cat.z[1:].T, dim=-1)
        expected = mix * glob + (1 - mix) * (p[..., None] * per_code).sum(dim=1)
    got = warm_model.score(b.inputs, b.lengths, top_codes=k, global_mix=mix)
    torch.testing.assert_close(got[:, 1:].exp(), expected, rtol=1e-4, atol=1e-7)


def test_hard_score_uses_the_argmax_code(warm_model):
    b = batch(13)
    with torch.no_grad():
        cat, state, logits = explicit_pieces(warm_model, b)
        best = logits.argmax(dim=-1)
        u = warm_model.code_vectors(state, best[:, None])[:, 0]  # (B, D)
        expected = u @ cat.z[1:].T
    got = warm_model.score(b.inputs, b.lengths, search="hard")
    torch.testing.assert_close(got[:, 1:], expected)


def test_interest_label_is_recomputed_from_the_current_codebook(monkeypatch):
    model = make_model(attribute_dropout=0.0)  # with dropout, the loss's labels come from its dropped-out z
    warm(model, steps=2)
    model.train()
    b = batch(20)
    labels: list[torch.Tensor] = []
    real_ce = F.cross_entropy

    def spy(logits, target, *args, **kwargs):
        if logits.shape[-1] == CODES:
            labels.append(target.clone())
        return real_ce(logits, target, *args, **kwargs)

    monkeypatch.setattr(F, "cross_entropy", spy)

    def expected_labels() -> torch.Tensor:
        with torch.no_grad():
            codes, _ = model.rq.encode(model.items())
        return codes[b.targets[b.targets > 0], 0]

    model.loss(b)
    first = expected_labels()
    assert torch.equal(labels[-1], first)
    with torch.no_grad():  # move the codebook: every level-1 codeword shifts to the next slot
        model.rq.levels[0].codebook.copy_(torch.roll(model.rq.levels[0].codebook, 1, dims=0))
    model.loss(b)
    second = expected_labels()
    assert torch.equal(labels[-1], second)
    assert torch.equal(second, (first + 1) % CODES)
    assert not torch.equal(labels[-1], labels[0])


def test_marginal_interest_is_the_sum_of_item_probabilities_per_code():
    model = make_model(interest="marginal")
    model.train()
    model.rq.update_(model.items()[1:], torch.Generator().manual_seed(0))
    model.eval()
    b = batch(30)
    with torch.no_grad():
        cat, state, logits = explicit_pieces(model, b)
        probs = logits.exp()
        item_p = torch.softmax(state.h @ cat.z[1:].T, dim=-1)  # (B, N)
        level1 = cat.codes[1:, 0]
    assert len(torch.unique(level1)) > 1, "the check needs items spread over several codes"
    torch.testing.assert_close(probs.sum(dim=-1), torch.ones(b.size), atol=1e-5, rtol=0)
    for c in range(CODES):
        expected = item_p[:, level1 == c].sum(dim=-1)
        torch.testing.assert_close(probs[:, c], expected, atol=1e-6, rtol=1e-4)


def test_trainer_step_is_deterministic():
    def run() -> dict[str, torch.Tensor]:
        model = make_model(seed=3)
        trainer = Trainer(model, TrainConfig(lr=1e-2, seed=5))
        for s in range(3):
            metrics = trainer.step(batch(s))
            assert metrics["step"] == s + 1
        return model.state_dict()

    a, b = run(), run()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert bool(a["rq.levels.0.initialised"])


def test_trainer_step_rejects_non_finite_loss():
    model = make_model()
    trainer = Trainer(model, TrainConfig())
    with torch.no_grad():
        model.items.id_embedding[1:] = math.nan
    with pytest.raises(FloatingPointError, match="non-finite loss"):
        trainer.step(batch(0))


def test_trainer_step_rejects_non_finite_gradients_under_a_finite_loss_and_changes_nothing():
    """A finite loss whose gradients are not finite (an op with a NaN derivative somewhere, a poisoned batch): the
    step refuses before the optimiser or the codebook update writes anything, so the model stays as it was and
    the next batch trains it (found by the fault suite: before, the NaN went into every weight and every later
    step failed on a NaN loss)."""
    model = make_model()
    trainer = warm(model, steps=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = {k: v.clone() for k, v in trainer.optimizer.state[model.items.id_embedding].items()}
    hook = model.items.id_embedding.register_hook(lambda grad: grad * math.nan)
    with pytest.raises(FloatingPointError, match="non-finite gradient"):
        trainer.step(batch(2))
    hook.remove()
    after = model.state_dict()
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    for key, value in moments.items():
        assert torch.equal(trainer.optimizer.state[model.items.id_embedding][key], value), key
    assert trainer.steps == 2
    assert trainer.step(batch(3))["step"] == 3
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_grow_items_new_items_come_from_attributes_and_training_continues():
    model = make_model()
    trainer = warm(model, steps=2)
    old_id = model.items.id_embedding
    old_avg = trainer.optimizer.state[old_id]["exp_avg"].clone()

    trainer.grow_items(N_ITEMS + 5, {N_ITEMS + 1: [1, 2], N_ITEMS + 2: [3], N_ITEMS + 3: []})
    tower = model.items
    new_id = tower.id_embedding
    assert tower.num_items == N_ITEMS + 5
    assert new_id is not old_id
    assert torch.equal(new_id[: N_ITEMS + 1], old_id.detach())
    assert torch.equal(new_id[N_ITEMS + 1 :], torch.zeros(5, ENC.dim))
    assert tower.counts.shape == (N_ITEMS + 6,)
    assert tower.attributes.shape[0] == N_ITEMS + 6

    with torch.no_grad():
        z = tower()
        attr_part = tower.attr_proj(tower.attr_embedding.weight[[1, 2]].mean(dim=0))
    torch.testing.assert_close(z[N_ITEMS + 1], attr_part)  # ID row is zero: z is the attribute part only
    torch.testing.assert_close(z[N_ITEMS + 3], tower.attr_proj.bias.detach())  # no attributes at all
    assert not torch.allclose(z[N_ITEMS + 1], z[N_ITEMS + 3])
    assert not torch.allclose(z[N_ITEMS + 1], z[N_ITEMS + 2])

    # the optimiser follows the new parameter, keeps the old rows' moments and pads the new ones with zeros
    assert any(p is new_id for group in trainer.optimizer.param_groups for p in group["params"])
    assert old_id not in trainer.optimizer.state
    state = trainer.optimizer.state[new_id]
    for key in ("exp_avg", "exp_avg_sq"):
        assert state[key].shape == new_id.shape
        assert torch.equal(state[key][N_ITEMS + 1 :], torch.zeros(5, ENC.dim))
    assert torch.equal(state["exp_avg"][: N_ITEMS + 1], old_avg)

    grown = make_batch([np.array([1, N_ITEMS + 1, 2, N_ITEMS + 4, N_ITEMS + 5])], ENC.max_len)
    for _ in range(2):
        metrics = trainer.step(grown)
        assert math.isfinite(metrics["loss"])
    assert tower.id_embedding is new_id
    assert new_id[N_ITEMS + 4].abs().sum() > 0, "a new item's ID row learns once it has interactions"
    for key in ("exp_avg", "exp_avg_sq"):
        assert trainer.optimizer.state[new_id][key].shape == new_id.shape
    scores = model.score(grown.inputs, grown.lengths)
    assert scores.shape == (1, N_ITEMS + 6)


def test_grow_items_is_a_no_op_below_capacity():
    model = make_model()
    trainer = warm(model, steps=1)
    before = model.items.id_embedding
    trainer.grow_items(N_ITEMS - 3, {2: [4]})
    assert model.items.id_embedding is before
    assert model.items.attributes[2, 0] == 4


def test_item_tower_without_attributes():
    model = make_model(num_attributes=0)
    assert not model.items.use_attributes
    trainer = warm(model, steps=2)
    trainer.grow_items(N_ITEMS + 2, {N_ITEMS + 1: [1, 2]})  # attributes are ignored without a table
    z = model.items()
    assert z.shape == (N_ITEMS + 3, ENC.dim)
    assert torch.equal(z[N_ITEMS + 1], torch.zeros(ENC.dim))
    metrics = trainer.step(make_batch([np.array([1, N_ITEMS + 1, N_ITEMS + 2])], ENC.max_len))
    assert math.isfinite(metrics["loss"])

    tower = ItemTower(4, 3)
    assert tower(torch.tensor([[1, 2], [0, 4]])).shape == (2, 2, 3)
    assert torch.equal(tower()[0], torch.zeros(3))


# ----------------------------------------------------------------- baselines


@pytest.mark.parametrize("make", [lambda: SASRec(N_ITEMS, ENC), lambda: ComiRecSA(N_ITEMS, ENC, interests=3)],
                         ids=["sasrec", "comirec-sa"])
def test_neural_baselines_train_and_score(make):
    torch.manual_seed(0)
    model = make()
    loss, metrics = model.loss(batch(0))
    assert torch.isfinite(loss) and metrics["loss"] == pytest.approx(float(loss.detach()))
    trainer = Trainer(model, TrainConfig(lr=1e-2))
    for s in range(2):
        assert math.isfinite(trainer.step(batch(s))["loss"])
    model.eval()
    b = batch(5)
    scores = model.score(b.inputs, b.lengths)
    assert scores.shape == (b.size, N_ITEMS + 1)
    assert torch.isneginf(scores[:, 0]).all()
    assert torch.isfinite(scores[:, 1:]).all()


def test_popularity_ranks_by_training_count():
    pop = Popularity(6)
    pop.fit([np.array([3, 1, 3]), np.array([5, 3, 5, 2])])  # counts: 3 -> 3, 5 -> 2, 1 -> 1, 2 -> 1
    b = batch(0, users=2, num_items=6)
    scores = pop.score(b.inputs, b.lengths)
    assert scores.shape == (2, 7)
    assert torch.isneginf(scores[:, 0]).all()
    assert scores[0, 1:].tolist() == [1.0, 1.0, 3.0, 0.0, 2.0, 0.0]
    assert torch.equal(scores[0], scores[1])
    assert scores[0].argsort(descending=True, stable=True)[:2].tolist() == [3, 5]


# ----------------------------------------------------------------- factorised SPARC (conditioned_scope "code")


def test_within_code_ce_equals_a_masked_full_softmax():
    model = make_model(conditioned_scope="code")
    model.train()
    model.rq.update_(model.items()[1:], torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(3)
    u = torch.randn(25, ENC.dim, generator=g, requires_grad=True)
    y = torch.randint(1, N_ITEMS + 1, (25,), generator=g)
    cat = model.catalogue()
    code1 = cat.codes[:, 0]
    assert len(torch.unique(code1[y])) > 2, "targets must span several codes"
    got = model._within_code_ce(u, cat.z, y, code1)
    member = (code1[None, 1:] == code1[y][:, None])  # (M, N) items sharing the target's code
    logits = (u @ cat.z[1:].T).masked_fill(~member, -math.inf)
    expected = F.cross_entropy(logits, y - 1)
    torch.testing.assert_close(got, expected)
    (gu,) = torch.autograd.grad(got, u, retain_graph=True)
    (eu,) = torch.autograd.grad(expected, u)
    torch.testing.assert_close(gu, eu)


@pytest.mark.parametrize("interest", ["marginal", "head"])
def test_factorised_score_is_a_distribution_and_starts_as_the_single_vector_model(interest):
    model = make_model(conditioned_scope="code", interest=interest)
    warm(model)  # code_proj / attn_v start at zero: u_c = h for every code
    with torch.no_grad():
        model.code_proj.weight.zero_()
        model.code_proj.bias.zero_()
        model.attn_v.weight.zero_()
        model.attn_v.bias.zero_()
    b = batch(20)
    with torch.no_grad():
        cat, state, logits = explicit_pieces(model, b)
        glob = torch.log_softmax(state.h @ cat.z[1:].T, dim=-1)  # (B, N)
        code1 = cat.codes[1:, 0]
        p_code = torch.zeros(b.size, CODES).index_add_(1, code1, glob.exp())
        expected = torch.log_softmax(logits, dim=-1)[:, code1] + glob - p_code.log()[:, code1]
    got = model.score(b.inputs, b.lengths, top_codes=3)
    torch.testing.assert_close(got[:, 1:], expected, rtol=1e-4, atol=1e-5)
    if interest == "marginal":  # p(c) is then h's own marginal: the product is h's softmax
        torch.testing.assert_close(got[:, 1:], glob, rtol=1e-4, atol=1e-5)


def test_factorised_score_uses_each_top_codes_own_vector_within_its_code(warm_model):
    model = make_model(conditioned_scope="code")
    model.load_state_dict(warm_model.state_dict())
    model.eval()
    b = batch(21)
    k, temperature = 3, 0.7
    with torch.no_grad():
        cat, state, logits = explicit_pieces(model, b)
        logq = torch.log_softmax(logits / temperature, dim=-1)
        code1 = cat.codes[1:, 0]
        glob = torch.log_softmax(state.h @ cat.z[1:].T, dim=-1)
        p_code = torch.zeros(b.size, CODES).index_add_(1, code1, glob.exp())
        expected = logq[:, code1] + glob - p_code.log()[:, code1]
        top = logq.topk(k, dim=-1).indices
        u = model.code_vectors(state, top)  # (B, K, D)
        for row in range(b.size):
            for j in range(k):
                member = code1 == top[row, j]
                within = torch.log_softmax(u[row, j] @ cat.z[1:][member].T, dim=0)
                expected[row, member] = logq[row, top[row, j]] + within
    got = model.score(b.inputs, b.lengths, top_codes=k, temperature=temperature)
    torch.testing.assert_close(got[:, 1:], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[:, 1:].exp().sum(dim=1), torch.ones(b.size))
    assert torch.isneginf(got[:, 0]).all()


def test_factorised_hard_score_ranks_the_argmax_codes_items_first_by_their_code_vector(warm_model):
    model = make_model(conditioned_scope="code")
    model.load_state_dict(warm_model.state_dict())
    model.eval()
    b = batch(22)
    with torch.no_grad():
        cat, state, logits = explicit_pieces(model, b)
        best = logits.argmax(dim=-1)
        u = model.code_vectors(state, best[:, None])[:, 0]
    got = model.score(b.inputs, b.lengths, search="hard")
    code1 = cat.codes[1:, 0]
    for row in range(b.size):
        member = code1 == best[row]
        order = got[row, 1:].argsort(descending=True)
        n = int(member.sum())
        assert member[order[:n]].all(), "the argmax code's items come first"
        inside = order[:n]
        assert torch.equal(inside, inside[(u[row] @ cat.z[1:][inside].T).argsort(descending=True)])


# ----------------------------------------------------------------- the conditioned tower at target positions only


def grid_code_vectors(model: SparcModel, H, rows, cols, e):
    """The reference: the conditioned tower over the whole (B, T) grid (causal attention at every position, the
    query code at the targets' positions), kept at the targets: what loss() computed before it was restricted."""
    grid = torch.zeros_like(H).index_put((rows, cols), e)
    u = H + model.code_proj(grid)
    if model.cfg.tower_attention:
        u = u + F.scaled_dot_product_attention(
            model.attn_q(grid)[:, None], model.attn_k(H)[:, None], model.attn_v(H)[:, None], is_causal=True
        )[:, 0]
    return u[rows, cols]


def loss_and_grads(model: SparcModel, b: Batch, seed: int = 0):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)  # shuffle BPR's permutation
    loss, metrics = model.loss(b)
    loss.backward()
    return metrics, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def reference_loss_and_grads(model: SparcModel, b: Batch, monkeypatch, seed: int = 0):
    with monkeypatch.context() as m:
        m.setattr(SparcModel, "_target_code_vectors", grid_code_vectors)
        m.setattr(type(model.encoder), "forward_in_buckets", type(model.encoder).forward)
        return loss_and_grads(model, b, seed)


def online_batch(seed: int, rows: int = 40) -> Batch:
    from trainer.online import next_item_batch

    rng = np.random.default_rng(seed)
    examples = [(list(rng.integers(1, N_ITEMS + 1, size=int(rng.integers(1, ENC.max_len + 1)))),
                 int(rng.integers(1, N_ITEMS + 1))) for _ in range(rows)]
    return next_item_batch(examples, ENC.max_len)


def sparse_batch(seed: int) -> Batch:
    """Targets at a random subset of each row's real positions (a row may have none): any batch must work."""
    b = batch(seed, users=12)
    rng = np.random.default_rng(seed)
    keep = torch.from_numpy(rng.random(b.targets.shape) < 0.4)
    return Batch(inputs=b.inputs, targets=b.targets * keep, lengths=b.lengths)


@pytest.mark.parametrize("overrides", [{}, {"tower_attention": False}, {"shuffle_bpr_weight": 1.0},
                                       {"interest": "marginal", "conditioned_scope": "code"}])
@pytest.mark.parametrize("make", [lambda: batch(3, users=10), lambda: online_batch(4), lambda: sparse_batch(5)],
                         ids=["offline", "online", "sparse"])
def test_loss_at_target_positions_equals_the_whole_grid(overrides, make, monkeypatch):
    model = make_model(**overrides)
    model.train()
    model.rq.update_(model.items()[1:], torch.Generator().manual_seed(0))  # initialise the codebooks
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():  # code-dependent weights, so that the tower's attention matters
        for name in ("code_proj", "attn_v", "attn_q"):
            if hasattr(model, name):
                getattr(model, name).weight.copy_(torch.randn(getattr(model, name).weight.shape, generator=g))
    model.eval()  # no dropout: both computations must agree
    b = make()
    assert (b.targets > 0).any()
    metrics, grads = loss_and_grads(model, b)
    ref_metrics, ref_grads = reference_loss_and_grads(model, b, monkeypatch)
    assert metrics.keys() == ref_metrics.keys()
    for key, value in ref_metrics.items():
        assert metrics[key] == pytest.approx(value, rel=1e-6, abs=1e-7), key
    assert grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_encoder_in_length_buckets_gives_the_same_states_at_real_positions():
    model = make_model()
    model.eval()
    b = online_batch(6, rows=50)
    x = model.items(b.inputs)
    plain = model.encoder(x, b.lengths)
    bucketed = model.encoder.forward_in_buckets(x, b.lengths)
    real = torch.arange(b.inputs.shape[1])[None, :] < b.lengths[:, None]
    torch.testing.assert_close(bucketed[real], plain[real], atol=1e-6, rtol=1e-5)
    assert b.length_buckets and not batch(0).length_buckets  # online batches ask for buckets, offline do not


def test_offline_batches_keep_the_plain_encoder_bit_for_bit():
    model = make_model()
    model.train()
    b = batch(7)
    torch.manual_seed(3)
    state = model.encode(b.inputs, b.lengths, model.items())
    torch.manual_seed(3)
    assert torch.equal(state.H, model.encoder(model.items()[b.inputs], b.lengths))  # same dropout draws too


def test_length_buckets_double_up_to_the_longest():
    from trainer.towers import length_buckets

    assert length_buckets(50) == [1, 2, 4, 8, 16, 32, 50]
    assert length_buckets(8) == [1, 2, 4, 8]
    assert length_buckets(1) == [1] and length_buckets(0) == [1]


def test_conditioned_detach_keeps_the_conditioned_loss_out_of_h_and_z():
    def grads(detach: bool) -> dict[str, torch.Tensor]:
        model = make_model(conditioned_scope="code", interest="marginal", conditioned_detach=detach,
                           global_weight=0.0, commitment=0.0)  # the conditioned loss alone
        model.train()
        model.rq.update_(model.items()[1:], torch.Generator().manual_seed(0))
        with torch.no_grad():
            model.code_proj.weight.normal_()
        torch.manual_seed(5)
        loss, _ = model.loss(batch(0))
        loss.backward()
        return {name: p.grad for name, p in model.named_parameters()}

    free, detached = grads(False), grads(True)
    assert free["items.id_embedding"].abs().sum() > 0
    assert any(g is not None and g.abs().sum() > 0 for k, g in free.items() if k.startswith("encoder."))
    for name, g in detached.items():
        if name.startswith(("items.", "encoder.")):
            assert g is None or g.abs().sum() == 0, name
    assert detached["code_proj.weight"].abs().sum() > 0


def test_attribute_dropout_acts_on_the_attribute_term_of_training_losses_only():
    torch.manual_seed(0)
    attrs = pad_attributes({1: [1, 2], 2: [3], 3: [2, 3]}, 3)
    plain = ItemTower(3, 8, num_attributes=3, attributes=attrs)
    dropped = ItemTower(3, 8, num_attributes=3, attributes=attrs, attribute_dropout=0.5)
    dropped.load_state_dict(plain.state_dict())
    plain.eval(), dropped.eval()
    assert torch.equal(dropped(), plain())  # evaluation: no dropout at all
    assert torch.equal(dropped(dropout=True), plain())  # not even when asked
    dropped.train()
    assert torch.equal(dropped(), plain())  # training mode, but not asked (snapshots, serving, validation)
    assert torch.equal(dropped(torch.tensor([[1, 2]])), plain(torch.tensor([[1, 2]])))
    torch.manual_seed(1)
    z = dropped(dropout=True)
    ids = plain.id_embedding.detach()
    term = plain().detach() - ids  # the attribute term alone
    kept = (z - ids).detach()
    # every coordinate of the attribute term is either dropped (0) or scaled by 1 / (1 - p); the ID part is intact
    assert torch.all(torch.isclose(kept, torch.zeros_like(kept), atol=1e-7) | torch.isclose(kept, 2 * term, atol=1e-6))
    assert (kept[1:].abs() < 1e-7).any() and (kept[1:].abs() > 1e-7).any()


def test_the_catalogue_has_no_attribute_dropout_outside_the_loss():
    model = make_model(attribute_dropout=0.5)
    model.eval()
    clean = model.catalogue()
    model.train()  # an online learner's model stays in training mode between steps
    torch.manual_seed(0)
    live = model.catalogue()
    assert torch.equal(live.z, clean.z) and torch.equal(live.codes, clean.codes)
    torch.manual_seed(0)
    assert not torch.equal(model.catalogue(dropout=True).z, clean.z)  # what the loss sees


def test_fit_validates_without_dropout_and_leaves_the_model_in_eval_mode():
    from trainer.fit import fit

    model = make_model(attribute_dropout=0.5)
    seqs = [np.random.default_rng(s).integers(1, N_ITEMS + 1, size=6) for s in range(12)]
    modes: list[bool] = []

    def validate() -> float:
        modes.append(model.training)
        return float(len(modes))  # improves every time: training runs to max_epochs

    res = fit(model, seqs, ENC.max_len, TrainConfig(max_epochs=4, eval_every=2, batch_size=4, seed=0), validate,
              progress=False)
    assert modes == [False, False] and res.epochs == 4 and res.best_epoch == 4
    assert not model.training


def repeated_gradients(build, items: int = 500, repeats: int = 6) -> list[dict]:
    """The gradients of `repeats` identical backward passes of the model `build()` returns, with 2 torch threads,
    on one batch of 128 sequences of 51 items (sized so that a gather by advanced indexing differed between
    repeats on this 2-core machine)."""
    rng = np.random.default_rng(0)
    b = make_batch([rng.integers(1, items + 1, size=51) for _ in range(128)], 50)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        torch.manual_seed(0)
        model = build()
        update = getattr(model, "update_codebooks_", None)
        if update is not None:
            update(b, torch.Generator().manual_seed(0))  # k-means init of the codebooks
        grads = []
        for _ in range(repeats):
            torch.manual_seed(1)
            model.zero_grad()
            model.loss(b)[0].backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None})
    finally:
        torch.set_num_threads(threads)
    assert "items.id_embedding" in grads[0]
    return grads


def test_sparc_gradients_are_bit_identical_across_runs_with_several_threads():
    """`sparc evaluate` trains with torch's default threads. Gathering rows of z by advanced indexing has a
    backward (index_put_ with accumulate) whose sum order depends on the threads: two identical runs of SPARC on
    Beauty ended 0.1% apart. Gathers go through F.embedding, whose backward is ordered."""
    items = 500
    cfg = SparcConfig(num_items=items, num_attributes=N_ATTRS, encoder=EncoderConfig(dim=64, max_len=50, layers=1),
                      codes=8, levels=2)
    grads = repeated_gradients(
        lambda: SparcModel(cfg, pad_attributes({i: [1 + i % N_ATTRS] for i in range(1, items + 1)}, items)), items)
    for other in grads[1:]:
        assert all(torch.equal(grads[0][k], other[k]) for k in grads[0])


@pytest.mark.parametrize("baseline", [SASRec, ComiRecSA])
def test_baseline_gradients_are_bit_identical_across_runs_with_several_threads(baseline):
    """Issue 16: ComiRec-SA moved 4% between identical Beauty runs. The baselines gather item rows with the same
    deterministic lookup as SPARC (F.embedding)."""
    grads = repeated_gradients(lambda: baseline(500, EncoderConfig(dim=64, max_len=50, layers=1)))
    for other in grads[1:]:
        assert all(torch.equal(grads[0][k], other[k]) for k in grads[0])


def test_popularity_adjustment_adds_t_log_q_to_every_training_logit():
    """Logit adjustment: the global CE and the within-code CE score u . z + t log q(i), q from items.counts;
    t = 0 is the plain loss."""
    model = make_model(interest="marginal", conditioned_scope="code", conditioned_detach=False,
                       attribute_dropout=0.0)
    warm(model, steps=2)
    model.items.counts.copy_(torch.arange(N_ITEMS + 1, dtype=torch.float) ** 2)
    log_q = torch.log((model.items.counts + 1) / (model.items.counts.sum() + N_ITEMS + 1))
    b = batch(7)
    cat = model.catalogue()
    state = model.encode(b.inputs, b.lengths, cat.z)
    rows, cols = (b.targets > 0).nonzero(as_tuple=True)
    y, h = b.targets[rows, cols], state.H[rows, cols]
    code1 = cat.codes[:, 0]
    u = model._target_code_vectors(state.H, rows, cols, model.rq.levels[0].codebook[code1[y]])

    def by_hand(t: float) -> tuple[float, float]:
        glob = F.cross_entropy(h @ cat.z[1:].T + t * log_q[1:], y - 1).detach()
        within = []
        for m in range(len(y)):
            members = (code1 == code1[y[m]]).nonzero().flatten()
            members = members[members > 0]
            logits = u[m] @ cat.z[members].T + t * log_q[members]
            within.append(-torch.log_softmax(logits, 0)[(members == y[m]).nonzero()[0, 0]])
        return float(glob), float(torch.stack(within).mean().detach())

    for t in (0.0, 0.7):
        adjusted = copy.deepcopy(model)
        adjusted.cfg = replace(model.cfg, popularity_adjustment=t)
        glob = adjusted._retrieval_loss(h, cat.z, y)
        within = adjusted._within_code_ce(u, cat.z, y, code1)
        assert (float(glob.detach()), float(within.detach())) == pytest.approx(by_hand(t), rel=1e-5)
    assert by_hand(0.7) != pytest.approx(by_hand(0.0))  # the adjustment changes the loss


def test_code_hysteresis_holds_level1_codes_across_steps_growth_and_snapshots():
    from trainer.online import capture_state, load_model

    model = make_model(interest="marginal", conditioned_scope="code", code_hysteresis=0.5)
    trainer = warm(model, steps=3)
    cat = model.catalogue()
    assert model.held_codes[0] == -1 and torch.equal(model.held_codes[1:], cat.codes[1:, 0])
    # an item held in its second-nearest code keeps it within the margin, and leaves a far one
    rq = model.rq.levels[0]
    dist = torch.cdist(cat.z.detach(), rq.codebook) ** 2  # (N+1, C)
    ratio = dist.sort(dim=1).values[:, 1] / dist.min(dim=1).values
    near = int(torch.nonzero(ratio[1:] < 1.5)[0, 0]) + 1
    far = int(torch.nonzero(dist[1:].max(dim=1).values > 1.6 * dist[1:].min(dim=1).values)[0, 0]) + 1
    second, farthest = int(dist[near].argsort()[1]), int(dist[far].argmax())
    model.held_codes[near], model.held_codes[far] = second, farthest
    codes = model.catalogue().codes[:, 0]
    assert codes[near] == second and codes[far] == dist[far].argmin()
    # rows of one item give the same codes alone as in the whole catalogue
    assert torch.equal(model.codes_of(cat.z[[far, near]], torch.tensor([far, near]))[:, 0], codes[[far, near]])
    # the held table grows with the item table; new items hold nothing and take the nearest code
    trainer.grow_items(N_ITEMS + 4, {N_ITEMS + 2: [1, 2]})
    assert model.held_codes.shape == (N_ITEMS + 5,) and (model.held_codes[N_ITEMS + 1:] == -1).all()
    grown = model.catalogue()
    assert torch.equal(grown.codes[: N_ITEMS + 1, 0], codes)
    # a snapshot of the grown model (no step since) restores with the same codes
    state = capture_state(model)
    restored = load_model(state.config, state.weights)
    assert torch.equal(restored.catalogue().codes, grown.codes)
    # a training step commits what the items hold now
    trainer.step(batch(9))
    assert torch.equal(model.held_codes[1:], model.catalogue().codes[1:, 0])
