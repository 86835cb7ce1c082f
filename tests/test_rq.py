"""trainer.rq: reconstruction vs depth, the EMA update, dead-code revival, frozen mode, state, code health."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from trainer.rq import ResidualQuantizer, VectorQuantizer, code_health, kmeans


def clustered(n: int = 480, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """Three scales of structure: 8 coarse centres, 8 finer offsets, then noise. (n, dim) float32."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(8, dim, generator=g) * 4.0
    fine = torch.randn(8, dim, generator=g) * 1.0
    i = torch.randint(0, 8, (n,), generator=g)
    j = torch.randint(0, 8, (n,), generator=g)
    return coarse[i] + fine[j] + 0.1 * torch.randn(n, dim, generator=g)


def buffers(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: b.detach().clone() for name, b in module.named_buffers()}


def assert_same_buffers(before: dict[str, torch.Tensor], module: torch.nn.Module) -> None:
    after = dict(module.named_buffers())
    assert set(after) == set(before)
    for name, value in before.items():
        assert after[name].dtype == value.dtype, name
        assert torch.equal(after[name], value), f"buffer {name} changed"


def trained_rq(levels: int = 2, codes: int = 8, dim: int = 8, seed: int = 0) -> ResidualQuantizer:
    rq = ResidualQuantizer(levels, codes, dim)
    g = torch.Generator().manual_seed(seed)
    z = clustered(dim=dim, seed=seed)
    for _ in range(3):
        rq.update_(z, g)
    return rq


# ----------------------------------------------------------------- reconstruction


def test_reconstruction_error_falls_with_each_level():
    z = clustered()
    errors = []
    for levels in (1, 2, 3):
        rq = ResidualQuantizer(levels, codes=8, dim=8)
        rq.update_(z, torch.Generator().manual_seed(1))  # k-means init of every level on its residuals
        codes, quantised = rq.encode(z)
        assert codes.shape == (z.shape[0], levels)
        recon = rq.decode(codes)
        torch.testing.assert_close(recon, quantised)
        errors.append(float((z - recon).norm(dim=1).mean()))
    assert errors[1] < 0.8 * errors[0], errors
    assert errors[2] < 0.8 * errors[1], errors


def test_kmeans_finds_separated_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    x = centres.repeat_interleave(20, dim=0) + 0.1 * torch.randn(60, 2, generator=g)
    found = kmeans(x, 3, iters=20, generator=torch.Generator().manual_seed(3))
    # every true centre has a centroid close by
    assert torch.cdist(centres, found).min(dim=1).values.max() < 0.5


def test_forward_is_straight_through_with_commitment():
    rq = trained_rq()
    z = clustered(n=32, seed=5).requires_grad_(True)
    z_q, codes, commit = rq(z)
    _, quantised = rq.encode(z)
    torch.testing.assert_close(z_q, quantised)
    torch.testing.assert_close(commit, ((z - quantised) ** 2).mean())
    (z_q.sum() + 0.0 * commit).backward()
    torch.testing.assert_close(z.grad, torch.ones_like(z))  # identity gradient through the quantiser


# ----------------------------------------------------------------- EMA update


def test_ema_update_matches_numpy_reference():
    codes_n, dim, decay, eps = 5, 3, 0.9, 0.1  # a large eps makes the Laplace smoothing visible
    q = VectorQuantizer(codes_n, dim, decay=decay, eps=eps)
    rng = np.random.default_rng(0)
    old_size = rng.uniform(0.5, 3.0, codes_n)
    old_sum = rng.normal(size=(codes_n, dim))
    q.cluster_size.copy_(torch.from_numpy(old_size))
    q.embed_sum.copy_(torch.from_numpy(old_sum))
    q.codebook.copy_(torch.from_numpy(old_sum / old_size[:, None]))
    q.initialised.fill_(True)
    x = rng.normal(size=(12, dim))
    assign = np.array([0, 0, 1, 3, 3, 3, 0, 1, 4, 4, 0, 1])  # code 2 gets nothing

    q.update_(torch.from_numpy(x).float(), torch.from_numpy(assign))

    x32 = x.astype(np.float32).astype(np.float64)
    counts = np.array([(assign == c).sum() for c in range(codes_n)], dtype=np.float64)
    sums = np.zeros((codes_n, dim))
    for row, c in zip(x32, assign, strict=True):
        sums[c] += row
    size = decay * old_size + (1 - decay) * counts
    total = decay * old_sum + (1 - decay) * sums
    n = size.sum()
    smoothed = (size + eps) / (n + codes_n * eps) * n
    np.testing.assert_allclose(q.cluster_size.numpy(), size, rtol=1e-5)
    np.testing.assert_allclose(q.embed_sum.numpy(), total, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.codebook.numpy(), total / smoothed[:, None], rtol=1e-5, atol=1e-6)
    assert size[2] == pytest.approx(decay * old_size[2])  # the empty code only decays


def test_init_is_kmeans_once():
    q = VectorQuantizer(4, 2)
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [5.0, 5.0], [5.1, 5.0], [-5.0, 5.0], [9.0, -9.0]])
    q.init_(x, torch.Generator().manual_seed(0))
    assert bool(q.initialised)
    torch.testing.assert_close(q.cluster_size, torch.ones(4))
    torch.testing.assert_close(q.embed_sum, q.codebook)
    first = q.codebook.clone()
    q.init_(x + 100.0, torch.Generator().manual_seed(0))  # already initialised: no-op
    assert torch.equal(q.codebook, first)


# ----------------------------------------------------------------- dead codes


def test_dead_code_is_revived_with_a_batch_vector():
    g = torch.Generator().manual_seed(0)
    centres = torch.tensor([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
    x = centres.repeat_interleave(10, dim=0) + 0.05 * torch.randn(30, 2, generator=g)
    q = VectorQuantizer(4, 2, decay=0.8, dead_threshold=0.5)
    q.codebook.copy_(torch.cat([centres, torch.tensor([[1000.0, 1000.0]])]))
    q.embed_sum.copy_(q.codebook)
    q.cluster_size.fill_(1.0)
    q.initialised.fill_(True)

    sizes, revived_at = [], None
    for step in range(10):
        c = q.assign(x)
        if revived_at is None:
            assert not (c == 3).any()  # nothing is assigned to the far codeword
        q.update_(x, c)
        sizes.append(float(q.cluster_size[3]))
        if q.revive_(x, g):
            revived_at = step
            break
    # 0.8, 0.64, 0.512, 0.4096 < 0.5: revived on the fourth update
    assert revived_at == 3
    assert sizes == pytest.approx([0.8, 0.64, 0.512, 0.4096])
    assert float(q.cluster_size[3]) == 1.0
    assert (q.codebook[3] == x).all(dim=1).any(), "the codeword must be one of the batch's vectors"
    torch.testing.assert_close(q.embed_sum[3], q.codebook[3])
    # once revived it attracts data and its EMA size stays healthy
    for _ in range(5):
        c = q.assign(x)
        assert (c == 3).any()
        q.update_(x, c)
        assert q.revive_(x, g) == 0
    assert float(q.cluster_size[3]) > q.dead_threshold


def test_residual_update_reports_revivals():
    rq = ResidualQuantizer(1, codes=4, dim=2, decay=0.5)
    x = torch.tensor([[0.0, 0.0], [0.1, 0.0], [3.0, 3.0], [3.1, 3.0]])
    g = torch.Generator().manual_seed(0)
    rq.update_(x, g)
    q = rq.levels[0]
    q.codebook[3] = torch.tensor([500.0, 500.0])  # make one code unreachable
    q.embed_sum[3] = q.codebook[3]
    total = sum(rq.update_(x, g)["revived"] for _ in range(3))
    assert total >= 1
    assert float(q.codebook[3].abs().max()) < 10.0


# ----------------------------------------------------------------- frozen / eval


@pytest.mark.parametrize("mode", ["frozen", "eval"])
def test_frozen_or_eval_changes_no_buffer(mode):
    rq = trained_rq()
    if mode == "frozen":
        rq.freeze_()
    else:
        rq.eval()
    before = buffers(rq)
    g = torch.Generator().manual_seed(7)
    shifted = clustered(seed=9) * 3.0 + 5.0  # very different data: would move every codeword
    for _ in range(3):
        assert rq.update_(shifted, g) == {"revived": 0}
        for q in rq.levels:
            q.init_(shifted, g)
            q.update_(shifted, q.assign(shifted))
            assert q.revive_(shifted, g) == 0
    assert_same_buffers(before, rq)
    # the same data does move the codebooks once unfrozen and training (the check above is not vacuous)
    rq.freeze_(False)
    rq.train()
    rq.update_(shifted, g)
    assert not torch.equal(rq.levels[0].codebook, before["levels.0.codebook"])


def test_frozen_uninitialised_stays_uninitialised():
    rq = ResidualQuantizer(2, codes=4, dim=8)
    rq.freeze_()
    before = buffers(rq)
    rq.update_(clustered(), torch.Generator().manual_seed(0))
    assert_same_buffers(before, rq)
    assert not bool(rq.levels[0].initialised)


# ----------------------------------------------------------------- state


def test_state_dict_round_trips_into_a_fresh_module():
    rq = trained_rq(levels=3)
    rq.freeze_()
    state = rq.state_dict()
    for l in range(3):
        for key in ("codebook", "cluster_size", "embed_sum", "initialised", "frozen"):
            assert f"levels.{l}.{key}" in state
    fresh = ResidualQuantizer(3, codes=8, dim=8)
    assert not bool(fresh.levels[0].initialised)
    fresh.load_state_dict(state)
    assert_same_buffers(buffers(rq), fresh)
    assert all(bool(q.initialised) and bool(q.frozen) for q in fresh.levels)
    z = clustered(n=64, seed=4)
    codes_a, quant_a = rq.encode(z)
    codes_b, quant_b = fresh.encode(z)
    assert torch.equal(codes_a, codes_b)
    assert torch.equal(quant_a, quant_b)
    # the frozen flag travelled: the fresh module refuses updates too
    before = buffers(fresh)
    fresh.train()
    fresh.update_(z * 5.0)
    assert_same_buffers(before, fresh)


def test_loading_refuses_mismatched_shapes():
    state = trained_rq(levels=2, codes=8).state_dict()
    with pytest.raises(RuntimeError):
        ResidualQuantizer(2, codes=16, dim=8).load_state_dict(state)


# ----------------------------------------------------------------- health


def test_code_health_on_a_hand_made_assignment():
    codes = torch.tensor([[0, 0], [0, 0], [1, 0], [1, 1], [2, 3], [2, 3]])
    h = code_health(codes, codes_per_level=4)
    assert h["items"] == 6
    # level 1 uses codes {0, 1, 2} of 4, each for 2 of 6 items: perplexity 3
    assert h["level1_utilisation"] == pytest.approx(0.75)
    assert h["level1_perplexity"] == pytest.approx(3.0)
    # level 2 uses {0, 1, 3}: shares 3/6, 1/6, 2/6
    p = [3 / 6, 1 / 6, 2 / 6]
    assert h["level2_utilisation"] == pytest.approx(0.75)
    assert h["level2_perplexity"] == pytest.approx(math.exp(-sum(x * math.log(x) for x in p)))
    # tuples (0,0) x2 and (2,3) x2 collide: 4 of 6 items
    assert h["collision_rate"] == pytest.approx(4 / 6)


def test_code_health_extremes():
    unique = code_health(torch.tensor([[0, 0], [1, 1], [2, 2], [3, 3]]), codes_per_level=4)
    assert unique["level1_utilisation"] == 1.0
    assert unique["level1_perplexity"] == pytest.approx(4.0)
    assert unique["collision_rate"] == 0.0
    same = code_health(torch.zeros(5, 2, dtype=torch.long), codes_per_level=4)
    assert same["level1_utilisation"] == 0.25
    assert same["level1_perplexity"] == pytest.approx(1.0)
    assert same["collision_rate"] == 1.0
    empty = code_health(torch.zeros(0, 2, dtype=torch.long), codes_per_level=4)
    assert empty["items"] == 0 and empty["collision_rate"] == 0.0 and empty["level1_utilisation"] == 0.0


def test_assignment_hysteresis_keeps_a_held_code_within_the_margin():
    q = VectorQuantizer(codes=3, dim=2)
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [2.0, 0.0], [0.0, 10.0]]))
    # squared distances to codes 0 / 1: x=0.9 -> 0.81 / 1.21; x=1.1 -> 1.21 / 0.81; x=1.6 -> 2.56 / 0.16
    x = torch.tensor([[0.9, 0.0], [1.1, 0.0], [1.6, 0.0], [1.1, 0.0]])
    held = torch.tensor([1, 0, 0, -1])
    assert q.assign(x).tolist() == [0, 1, 1, 1]  # nearest
    assert q.assign(x, held, 0.0).tolist() == [0, 1, 1, 1]  # no margin: nearest
    # margin 0.5: 1.21 <= 1.5 * 0.81 keeps rows 0 and 1 where they were; 2.56 > 1.5 * 0.16 moves row 2; row 3
    # holds nothing and takes the nearest
    assert q.assign(x, held, 0.5).tolist() == [1, 0, 1, 1]


def test_residual_levels_below_the_first_assign_plainly_under_hysteresis():
    rq = trained_rq(levels=2)
    z = clustered(n=64, seed=3)
    codes, quantised = rq.encode(z)
    held = (codes[:, 0] + 1) % 8  # every row holds another level-1 code
    kept, _ = rq.encode(z, held, 1e9)  # an unbounded margin: every row keeps its held code
    assert torch.equal(kept[:, 0], held)
    second = rq.levels[1].assign(z - rq.levels[0].codebook[held])
    assert torch.equal(kept[:, 1], second)  # level 2 quantises the residual of the HELD codeword
    assert torch.equal(rq.encode(z, held, 0.0)[0], codes)
