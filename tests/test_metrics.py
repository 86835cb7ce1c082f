"""replay.metrics: ranks with ties, Recall/NDCG by hand, history masking, coverage and long-tail share."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from replay.metrics import (
    coverage_and_tail,
    evaluate_ranking,
    interests_per_list,
    mask_history,
    ranking_metrics,
    target_ranks,
)

NEG = -math.inf


def test_target_ranks_count_strictly_higher_scores():
    scores = torch.tensor([[NEG, 0.1, 0.5, 0.5, 0.2, 0.9]] * 4)
    ranks = target_ranks(scores, torch.tensor([2, 3, 4, 5]))
    # items 2 and 3 tie at 0.5: each has only item 5 above it, so both rank 1 (ties favour the target)
    assert ranks.tolist() == [1, 1, 3, 0]


def test_target_ranks_all_tied_is_first():
    scores = torch.zeros(2, 5)
    scores[:, 0] = NEG
    assert target_ranks(scores, torch.tensor([1, 4])).tolist() == [0, 0]


def test_ranking_metrics_by_hand():
    m = ranking_metrics(np.array([0, 3, 7, 12, 25]))
    assert m == pytest.approx(
        {
            "recall@5": 0.4,  # ranks 0, 3
            "recall@10": 0.6,  # + 7
            "recall@20": 0.8,  # + 12
            # 1/log2(2) = 1, 1/log2(5) = 0.43067655807339306, 1/log2(9) = 0.31546487678572877,
            # 1/log2(14) = 0.26264953503719357; each sum divided by the 5 users
            "ndcg@5": 0.28613531161467864,
            "ndcg@10": 0.34922828697182434,
            "ndcg@20": 0.4017581939792631,
        },
        rel=1e-12,
    )


def test_ranking_metrics_other_ks_and_empty():
    assert ranking_metrics(np.array([0, 1]), ks=(1,)) == {"recall@1": 0.5, "ndcg@1": 0.5}
    assert ranking_metrics(np.array([], dtype=np.int64)) == {
        f"{m}@{k}": 0.0 for m in ("recall", "ndcg") for k in (5, 10, 20)
    }


def test_mask_history_masks_history_but_never_the_target():
    scores = torch.tensor([[NEG, 6.0, 5.0, 4.0, 3.0, 2.0, 1.0]] * 2)
    histories = [np.array([1, 2, 3]), np.array([4, 4, 5, 1])]
    targets = torch.tensor([2, 1])  # both targets appear in their user's history
    masked = mask_history(scores, histories, targets)
    assert masked[0].tolist() == [NEG, NEG, 5.0, NEG, 3.0, 2.0, 1.0]
    assert masked[1].tolist() == [NEG, 6.0, 5.0, 4.0, NEG, NEG, 1.0]
    assert target_ranks(masked, targets).tolist() == [0, 0]
    assert target_ranks(scores, targets).tolist() == [1, 0]
    assert scores[0, 1] == 6.0  # the input is not modified
    assert torch.equal(mask_history(scores, [], torch.zeros(0, dtype=torch.long)), scores)


def test_coverage_and_tail_by_hand():
    num_items = 10
    #                             item: 1  2  3  4  5  6  7  8  9 10
    counts = np.array([0.0] + [5, 9, 9, 1, 9, 0, 2, 3, 0, 1])
    # head = the 2 most popular (20% of 10): 2, 3 and 5 tie at 9, the lower ids win -> {2, 3}
    top = np.array([[2, 3, 4, 6], [2, 5, 7, 4], [3, 2, 6, 4]])
    out = coverage_and_tail(top, counts, num_items)
    assert set(out) == {"coverage@4", "tail_share@4"}
    assert out["coverage@4"] == pytest.approx(6 / 10)  # {2, 3, 4, 5, 6, 7}
    assert out["tail_share@4"] == pytest.approx(7 / 12)  # 5 of the 12 slots hold 2 or 3


def test_interests_per_list_by_hand():
    #                  item: 0   1  2  3  4  5  6
    codes = np.array([-1, 0, 0, 1, 2, 2, 3])
    top = np.array([[1, 2, 1, 2], [3, 4, 5, 6], [6, 5, 0, 0]])  # 0 = an empty slot of a short served list
    out = interests_per_list(top, codes)
    assert set(out) == {"interests@4"}
    assert out["interests@4"] == pytest.approx((1 + 3 + 2) / 3)  # {0}, {1, 2, 3}, {3, 2}


def test_evaluate_ranking_raw_masked_and_top_lists():
    fixed = torch.tensor([NEG, 5.0, 4.0, 3.0, 2.0, 1.0])

    def score_fn(inputs: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        assert inputs.shape[0] == lengths.shape[0]
        return fixed[None].expand(inputs.shape[0], -1)

    histories = [np.array([1, 2]), np.array([3]), np.array([5, 4, 1])]
    targets = np.array([2, 4, 1])
    out = evaluate_ranking(score_fn, histories, targets, max_len=5, batch_size=2, top_n=3)
    assert out["raw"].tolist() == [1, 3, 0]
    assert out["masked"].tolist() == [0, 2, 0]  # item 1, item 3 and items 4, 5 removed from the rankings
    assert out["top"].tolist() == [[1, 2, 3]] * 3


def test_a_target_outside_a_served_list_is_a_miss_at_every_k():
    # a served list of two items (1 and 3); every other item scores -inf, the padding column too
    scores = torch.tensor([[-math.inf, 2.0, -math.inf, 1.0, -math.inf, -math.inf]] * 3)
    ranks = target_ranks(scores, torch.tensor([3, 4, 1]))
    assert ranks.tolist() == [1, 6, 0]  # not "rank 2" for item 4: it was never served
    assert ranking_metrics(ranks.numpy(), ks=(5,))["recall@5"] == pytest.approx(2 / 3)


def test_short_served_lists_leave_empty_slots_in_the_top_lists():
    served = torch.tensor([-math.inf, 3.0, -math.inf, 2.0, -math.inf, -math.inf])
    out = evaluate_ranking(lambda i, l: served[None].expand(i.shape[0], -1), [np.array([2])], np.array([4]),
                           max_len=5, top_n=4)
    assert out["top"].tolist() == [[1, 3, 0, 0]] and out["raw"].tolist() == [6]
    cover = coverage_and_tail(out["top"], np.array([0.0, 1, 1, 1, 1, 1]), 5)
    assert cover["coverage@4"] == pytest.approx(2 / 5)  # empty slots are no item
    assert cover["tail_share@4"] == pytest.approx(1 / 2)  # item 1 is the head (the lowest id of a tie), 3 is tail
