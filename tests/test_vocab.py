"""trainer/vocab.py and the learner's use of it: external item ids (ints of any size, strings) map to dense rows,
one row per item whatever its id; the bound and its policies (refuse, evict the least recently seen); rows that
change hands are reset; what the learner cannot admit is named, not learnt."""

from __future__ import annotations

import pytest
import torch

from trainer.config import CatalogueConfig, EncoderConfig, SparcConfig, TrainConfig
from trainer.online import OnlineLearner, advance_histories
from trainer.vocab import MAX_ID_CHARS, ItemVocab, canonical_id

SKU = "sku-" + "x" * 196  # a 200-character string id


def small_learner(**catalogue) -> OnlineLearner:
    cfg = SparcConfig(num_items=0, num_attributes=50, codes=4, encoder=EncoderConfig(dim=8, max_len=5, layers=1))
    return OnlineLearner(cfg, TrainConfig(seed=0), catalogue=CatalogueConfig(**catalogue))


def ev(user, item, n=0) -> dict:
    return {"event_id": f"e{n}", "user_id": user, "item_id": item, "timestamp": 1_700_000_000 + n}


def test_canonical_ids_make_7_and_the_string_7_one_item():
    assert canonical_id(7) == canonical_id("7") == 7 and type(canonical_id("7")) is int
    assert canonical_id(2**62) == canonical_id(str(2**62)) == 2**62
    for text in ("07", "+7", " 7", "7.0", "sku-7", "٣", str(2**63)):  # not canonical decimals: strings
        assert canonical_id(text) == text
    for bad, error in ((True, TypeError), (7.0, TypeError), (None, TypeError), ("", ValueError),
                       ("x" * (MAX_ID_CHARS + 1), ValueError), (2**63, ValueError)):
        with pytest.raises(error):
            canonical_id(bad)


def test_vocab_rows_refuse_and_evict_the_least_recently_seen():
    refuse = ItemVocab(2, "refuse")
    assert refuse.admit("a") == (1, True, None) and refuse.admit(2**62) == (2, True, None)
    assert refuse.admit("a") == (1, False, None) and refuse.admit("c") is None and len(refuse) == 2
    evict = ItemVocab(3, "evict")
    for item in ("a", "b", "c"):
        evict.admit(item)
    evict.touch("a")  # seen again: "b" is now the least recently seen
    assert evict.admit("d") == (2, True, "b")
    assert evict.row("b") is None and evict.ids() == [None, "a", "d", "c"]
    assert evict.admit("e") == (3, True, "c") and evict.evictions == 2
    assert evict.known_rows(["e", "b", "a", "zz"]) == [3, 1]
    with pytest.raises(ValueError, match="twice"):
        ItemVocab(5, "refuse", [7, "7"])
    with pytest.raises(ValueError, match="more than max_items"):
        ItemVocab(1, "refuse", [1, 2])
    assert ItemVocab.identity(3, 10).is_identity() and not ItemVocab(10, "refuse", [2, 1]).is_identity()


def test_a_huge_id_and_a_long_string_id_cost_one_row_each():
    """The defect: item ids were row numbers, so item 1,000,000 grew the table to a million rows."""
    learner = small_learner()
    assert learner.observe_items([{"item_id": 2**62, "attributes": [3]}]).added == 1
    assert learner.num_items == 1
    m = learner.learn([ev("u", SKU, 1), ev("u", 2**62, 2), ev("u", SKU, 3)], {})
    assert learner.num_items == 2 and learner.model.items.id_embedding.shape == (3, 8)
    assert m["examples"] == 2 and m["unlearnt"] == []
    assert learner.vocab.ids() == [None, 2**62, SKU]
    assert learner.snapshot_state().item_ids == (2**62, SKU)
    learner.learn([ev("v", str(2**62), 4)], {"v": ["7"]})  # the same item as a string; "7" is unknown
    assert learner.num_items == 2


def test_a_full_catalogue_refuses_new_items_and_names_them():
    learner = small_learner(max_items=3)
    observed = learner.observe_items([{"item_id": i} for i in ("a", "b", "c", "d")])
    assert (observed.added, observed.refused, learner.num_items) == (3, ["d"], 3)
    m = learner.learn([ev("u", "a", 1), ev("u", "e", 2), ev("u", "b", 3)], {"u": ["f", "c"]})
    assert m["unlearnt"] == [(1, "catalogue_full")] and learner.vocab.row("e") is None
    # histories without the unknown items: "a" learnt from [c], "b" from [c, a]; "e" is not learnt
    assert (m["examples"], m["history_dropped"]) == (2, 3)


def test_items_only_sources_do_not_let_feedback_add_items():
    learner = small_learner(item_sources="items")
    learner.observe_items([{"item_id": 1}, {"item_id": 2}])
    m = learner.learn([ev("u", 1, 1), ev("u", 9, 2), ev("u", 2, 3)], {})
    assert m["unlearnt"] == [(1, "unknown_item")] and learner.num_items == 2 and m["examples"] == 1


def test_an_evicted_row_starts_over_as_a_new_item():
    learner = small_learner(max_items=3, on_full="evict")
    learner.observe_items([{"item_id": i, "attributes": [i]} for i in (1, 2, 3)])
    histories: dict = {}
    for n in range(4):  # train on items 1..3 so their rows and Adam moments are not zero
        batch = [ev("u", 1, 3 * n), ev("u", 2, 3 * n + 1), ev("u", 3, 3 * n + 2)]
        learner.learn(batch, histories)
        advance_histories(histories, batch, learner.max_len)
    learner.observe_items([{"item_id": 1}, {"item_id": 3}])  # item 2 is now the least recently seen
    tower = learner.model.items
    assert tower.id_embedding[2].abs().sum() > 0 and tower.counts[2] > 0
    observed = learner.observe_items([{"item_id": "new", "attributes": [40, 41]}])
    assert (observed.evicted, observed.rows, learner.vocab.row("new")) == ([2], [2], 2)
    assert learner.num_items == 3
    assert torch.equal(tower.id_embedding[2], torch.zeros(8)) and tower.counts[2] == 0
    assert tower.attributes[2].tolist() == [40, 41]
    moments = learner.trainer.optimizer.state[tower.id_embedding]
    assert moments["exp_avg"][2].abs().sum() == 0 and moments["exp_avg_sq"][2].abs().sum() == 0
    assert moments["exp_avg"][1].abs().sum() > 0  # other rows keep theirs
    m = learner.learn([ev("w", 2, 20), ev("w", "new", 21)], {"w": [1]})  # feedback brings 2 back, evicting 1
    assert m["unlearnt"] == [] and learner.vocab.ids() == [None, 2, "new", 3]
    assert (m["examples"], m["history_dropped"]) == (1, 2)  # item 1 is left out of both histories


def test_restore_keeps_the_vocabulary_and_reads_old_snapshots_as_identity():
    learner = small_learner()
    learner.observe_items([{"item_id": i} for i in ("b", 10, "a")])
    learner.learn([ev("u", "b", 1), ev("u", "a", 2)], {})
    state = learner.snapshot_state()
    assert state.item_ids == ("b", 10, "a")
    again = small_learner()
    again.restore(state.config, state.weights, state.steps, state.item_ids)
    assert again.vocab.ids() == [None, "b", 10, "a"] and again.snapshot_state().item_ids == ("b", 10, "a")
    old = small_learner()
    old.restore(state.config, state.weights, state.steps)  # a snapshot without a vocabulary: row i is item i
    assert old.vocab.ids() == [None, 1, 2, 3] and old.snapshot_state().item_ids is None
    with pytest.raises(ValueError, match="more than max_items"):
        small_learner(max_items=2).restore(state.config, state.weights, state.steps, state.item_ids)
    with pytest.raises(ValueError, match="names 2 items"):
        small_learner().restore(state.config, state.weights, state.steps, ("b", 10))
