"""replay/prequential.py: test-then-train never sees the future; windows add up; frozen stays frozen; evolving
adapts to drift better than frozen. Small seeded streams and a small model."""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from replay.prequential import (
    CatalogueCache,
    Prequential,
    ReplaySettings,
    ScoreMode,
    churn_summary,
    interest_churn,
    parse_variants,
    recovery,
    replay,
    score_modes,
    top_interests,
    windowed_recall,
    with_seed,
    worker_model_config,
)
from replay.sources import is_feedback, synthetic_source
from trainer.config import EXPLORATION, EncoderConfig, SparcConfig
from trainer.search import BruteForce, retrieve

T0 = 1_700_000_000


def small_settings(**over) -> ReplaySettings:
    model = worker_model_config(num_attributes=256, codes=8, encoder=EncoderConfig(dim=32, max_len=20, layers=1))
    base = dict(model=model, batch_size=32, freeze_at=0.25, retrain_epochs=2)
    return ReplaySettings(**{**base, **over})


def drifting_stream(seed: int = 0, events: int = 3000):
    return synthetic_source(seed, n_users=120, n_events=events, n_initial_items=200, n_new_items=40, n_topics=8)


def run_scored(records, settings, total):
    """Run a replay; returns the engine and {(variant, event_id): (rank, top list)}."""
    seen = {}

    def observe(s):
        for i, eid in enumerate(s.event_ids):
            seen[(s.variant, eid)] = (int(s.ranks[i]), tuple(s.top[i].tolist()))

    engine = Prequential(settings, total)
    for _ in engine.run(records, observer=observe):
        pass
    return engine, seen


@pytest.fixture(scope="module")
def drift_report():
    source = drifting_stream(seed=1)
    settings = small_settings(modes=(ScoreMode(), ScoreMode(search="hard")), retrain_every=600)
    return replay(source.records(), with_seed(settings, 1), total=source.feedback)


# ------------------------------------------------------------------ settings
def test_score_modes_parse_and_name():
    assert ScoreMode.parse("soft") == ScoreMode()
    assert ScoreMode.parse("hard") == ScoreMode(search="hard")
    mode = ScoreMode.parse("soft:k=8:t=2:mix=0.25")
    assert (mode.top_codes, mode.temperature, mode.global_mix) == (8, 2.0, 0.25)
    assert mode.name == "soft:k=8:t=2:mix=0.25" and ScoreMode.parse(mode.name) == mode
    for bad in ("hard:k=2", "soft:q=1", "soft:k=two", "medium", "soft:t=0", "soft:k=8:served=4",
                "soft:mix=0.5:served=20", "hard:served=-1"):
        with pytest.raises(ValueError):
            ScoreMode.parse(bad)
    explore = ScoreMode.parse("soft:served=20:x=10:lift=0.5")
    assert (explore.served, explore.exploit, explore.lift) == (20, 10, 0.5)
    assert explore.name == "soft:served=20:x=10:lift=0.5" and ScoreMode.parse(explore.name) == explore
    for bad in ("hard:x=10", "soft:x=2", "soft:x=ten"):
        with pytest.raises(ValueError):
            ScoreMode.parse(bad)
    for text in ("soft:k=8:served=50:x=off", "hard:served=20"):
        plain = text.removesuffix(":x=off")
        assert ScoreMode.parse(text).name == plain and ScoreMode.parse(plain).served == int(plain.rpartition("=")[2])


def test_served_soft_modes_explore_as_the_worker_serves_by_default():
    """A served soft mode is what /retrieve serves: the worker's exploration slots (trainer.config.EXPLORATION,
    exploit 15, lift 0.5) unless x= says otherwise; x=off is the plain list (the default before 2026-12-07); lists
    no longer than the exploited slots and ranked modes have none."""
    assert (EXPLORATION.exploit, EXPLORATION.lift) == (15, 0.5)
    served = ScoreMode.parse("soft:served=20")
    assert (served.exploit, served.lift) == (15, 0.5) and served.name == "soft:served=20:x=15:lift=0.5"
    assert ScoreMode.parse("soft:served=20:lift=1") == ScoreMode(served=20, exploit=15, lift=1.0)
    assert ScoreMode.parse("soft:served=20:x=off") == ScoreMode(served=20) and ScoreMode(served=20).exploit is None
    assert ScoreMode.parse("soft:served=15").exploit is None and ScoreMode.parse("soft").exploit is None
    assert ScoreMode.parse("soft:k=16:served=20").exploit == 16  # at least a slot per code searched
    assert ScoreMode.parse("hard:served=20").exploit is None


def test_served_modes_rank_only_what_serving_returns():
    """served=N: a hit is an item of the served list (its place in it); hard's list is one code's items."""
    modes = (ScoreMode(), ScoreMode(search="hard"), ScoreMode(served=20), ScoreMode(search="hard", served=20))
    settings = small_settings(modes=modes, regimes=("evolving",), eval_per_batch=8, top_n=20)
    engine, seen = run_scored(drifting_stream(events=1200).records(), settings, 1200)
    model = engine.models["evolving"].model
    codes = model.catalogue().codes[:, 0].numpy()
    by_variant: dict = {}
    for (variant, eid), (rank, top) in seen.items():
        by_variant.setdefault(variant, {})[eid] = (rank, top)
    assert set(by_variant) == {"evolving/soft", "evolving/hard", "evolving/soft:served=20", "evolving/hard:served=20"}
    assert by_variant["evolving/soft"].keys() == by_variant["evolving/soft:served=20"].keys()
    served = [r for r, _ in by_variant["evolving/soft:served=20"].values()]
    ranked = [r for r, _ in by_variant["evolving/soft"].values()]
    assert any(r > 20 for r in served) and max(served) > max(r for r in served if r < 20)  # misses are far out
    assert served != ranked
    # score_modes on the trained model: the served top lists are what trainer.search.retrieve serves
    learner = engine.models["evolving"]
    rng = np.random.default_rng(0)
    n = model.items.num_items
    histories = [rng.integers(1, n + 1, size=5).tolist() for _ in range(6)]
    known = np.zeros(n + 1, dtype=np.int64)  # everything known since event 0
    (_, soft_top, _), (_, hard_top, _), (_, explore_top, _) = score_modes(
        learner, histories, rng.integers(1, n + 1, size=6), np.full(6, 10), known,
        [ScoreMode(served=20), ScoreMode(search="hard", served=20), ScoreMode(served=20, exploit=8, lift=1.0)], 20)
    cat = model.catalogue()
    retriever = BruteForce(cat.z.detach().numpy(), codes, model.cfg.codes)
    for history, soft_row, hard_row, explore_row in zip(histories, soft_top, hard_top, explore_top, strict=True):
        # the same items (the order may differ between exactly tied items: new items share attribute vectors)
        soft = retrieve(model, np.array(history), retriever, k=20, top_codes=4).items
        assert sorted(soft_row.tolist()) == sorted(soft.tolist())
        explore = retrieve(model, np.array(history), retriever, k=20, top_codes=4, exploit=8, lift=1.0).items
        assert sorted(explore_row.tolist()) == sorted(explore.tolist())
        assert len(set(codes[hard_row[hard_row > 0]].tolist())) == 1
        hard = retrieve(model, np.array(history), retriever, k=20, hard=True).items
        assert sorted(hard_row[hard_row > 0].tolist()) == sorted(hard.tolist())


def test_variants_are_regimes_times_modes():
    one = small_settings(regimes=("evolving", "frozen"))
    assert [n for n, _, _ in one.variant_names()] == ["evolving", "frozen"]
    two = small_settings(regimes=("frozen",), modes=(ScoreMode(), ScoreMode(search="hard")))
    assert [n for n, _, _ in two.variant_names()] == ["frozen/soft", "frozen/hard"]
    with pytest.raises(ValueError, match="unknown regime"):
        small_settings(regimes=("evolving", "sometimes"))


# ------------------------------------------------------------------ no future
def test_scores_never_depend_on_the_event_itself_or_later_ones():
    source = drifting_stream(events=1200)
    records = list(source.records())
    cut = 32 * 20 + 5  # inside the 21st micro-batch: the batch's earlier events must not move either
    positions = [i for i, r in enumerate(records) if is_feedback(r)]
    altered = copy.deepcopy(records)
    rng = np.random.default_rng(0)
    for i in positions[cut:]:  # every later event gets another user and another initial-catalogue item
        altered[i]["item_id"] = int(rng.integers(1, 201))
        altered[i]["user_id"] = str(rng.integers(1, 121))
    settings = small_settings(regimes=("evolving",), freeze_at=10_000)
    _, a = run_scored(records, settings, 1200)
    _, b = run_scored(altered, settings, 1200)
    before = [records[i]["event_id"] for i in positions[:cut]]
    scored = [("evolving", e) for e in before if ("evolving", e) in a]
    assert len(scored) > 500
    assert all(a[k] == b[k] for k in scored)
    after = [("evolving", records[i]["event_id"]) for i in positions[cut + 40:]]
    assert sum(a[k] != b.get(k) for k in after if k in a) > 100  # the alteration does matter later


@pytest.mark.parametrize("delay", [0, 96])
def test_a_model_learns_nothing_younger_than_the_delay(delay):
    """Alter the items of the `window` events just before a probed micro-batch: users who took no part in them
    get the same scores with a delay of `window` events, and not with no delay."""
    source = drifting_stream(events=1200)
    records = list(source.records())
    positions = [i for i, r in enumerate(records) if is_feedback(r)]
    probe, window = 25 * 32, 96
    altered = copy.deepcopy(records)
    touched = set()
    rng = np.random.default_rng(1)
    for i in positions[probe - window : probe]:
        altered[i]["item_id"] = int(rng.integers(1, 201))
        touched.add(records[i]["user_id"])
    settings = small_settings(regimes=("evolving",), freeze_at=10_000, delay_events=delay)
    _, a = run_scored(records, settings, 1200)
    _, b = run_scored(altered, settings, 1200)
    keys = [("evolving", records[i]["event_id"]) for i in positions[probe : probe + 32]
            if records[i]["user_id"] not in touched]
    keys = [k for k in keys if k in a]
    assert len(keys) >= 5
    same = sum(a[k] == b[k] for k in keys)
    if delay == window:
        assert same == len(keys)
    else:
        assert same < len(keys)


def test_an_item_first_seen_in_an_event_is_a_miss_there_and_rankable_after_its_item_event():
    users = [str(u) for u in range(1, 9)]
    records = [{"item_id": i, "attributes": [i % 5 + 1], "timestamp": T0} for i in range(1, 31)]
    n = 0
    for step in range(12):  # 96 events over items 1..30
        for u in users:
            records.append({"event_id": f"e{n}", "user_id": u, "item_id": (int(u) * 3 + step) % 30 + 1,
                            "timestamp": T0 + n, "event_type": "view"})
            n += 1
    # item 77 appears only in event "new", without an item event; item 78 has one just before its event
    records.append({"event_id": "new", "user_id": "1", "item_id": 77, "timestamp": T0 + n, "event_type": "view"})
    records.append({"item_id": 78, "attributes": [2], "timestamp": T0 + n})
    records.append({"event_id": "new2", "user_id": "2", "item_id": 78, "timestamp": T0 + n, "event_type": "view"})
    records.append({"event_id": "again", "user_id": "3", "item_id": 77, "timestamp": T0 + n + 1,
                    "event_type": "view"})
    for k in range(14):  # the rest of that micro-batch: after it, the model has learnt "new" and so holds 77
        records.append({"event_id": f"f{k}", "user_id": users[k % 8], "item_id": k + 1, "timestamp": T0 + n + 2,
                        "event_type": "view"})
    records.append({"event_id": "later", "user_id": "4", "item_id": 77, "timestamp": T0 + n + 3,
                    "event_type": "view"})
    settings = small_settings(regimes=("evolving",), batch_size=16, freeze_at=10_000, window_events=50)
    engine, seen = run_scored(records, settings, None)
    rank_new, top_new = seen[("evolving", "new")]
    assert rank_new > 30 and 77 not in top_new  # a miss: nothing knew item 77 before its event
    assert 78 not in top_new  # item 78's catalogue event came after event "new"
    rank_new2, _ = seen[("evolving", "new2")]
    assert rank_new2 <= 31  # rankable among the 31 known items (by its attributes)
    # in the same micro-batch as "new" the model has not been told of 77 yet (it learns a batch after testing
    # it, as the worker does): a miss; from the next batch on it is rankable
    assert seen[("evolving", "again")][0] == 32 and seen[("evolving", "later")][0] <= 32
    assert engine.online.num_items == 32  # both were learnt: one row each (ids are not rows)


# ------------------------------------------------------------------ windows and report
def test_windows_add_up_to_the_overall(drift_report):
    report = drift_report
    assert report["events"] == 3000 and report["freeze_event"] == 768 and report["retrains"] == 4
    for name, v in report["variants"].items():
        w, o = v["windows"], v["overall"]
        scored = np.array([x["scored"] for x in w])
        slots = np.array([x["slots"] for x in w])
        assert scored.sum() == o["scored"] == 3000 - report["cold"], name
        assert sum(x["events"] for x in w) == report["events"]
        for key in ("recall@10", "recall@20", "recall@50", "ndcg@10", "ndcg@20", "ndcg@50"):
            pooled = (scored * np.array([x[key] for x in w])).sum() / scored.sum()
            assert pooled == pytest.approx(o[key], abs=1e-12), (name, key)
        for key in ("tail_share@20", "new_share@20"):
            pooled = (slots * np.array([x[key] for x in w])).sum() / slots.sum()
            assert pooled == pytest.approx(o[key], abs=1e-12), (name, key)
        assert sum(x["new_items_reached@10"] for x in w) == o["new_items_reached@10"]
        firsts = np.array([x["first_interactions"] for x in w])
        assert firsts.sum() == o["first_interactions"] > 0
        pooled = sum(f * x["recall@20_first"] for f, x in zip(firsts, w, strict=True) if f) / firsts.sum()
        assert pooled == pytest.approx(o["recall@20_first"], abs=1e-12)
        rest = scored - firsts
        pooled = sum(r * x["recall@20_rest"] for r, x in zip(rest, w, strict=True) if r) / rest.sum()
        assert pooled == pytest.approx(o["recall@20_rest"], abs=1e-12)
        assert max(x["coverage@20"] for x in w) <= 1.0
        assert o["recall@10"] <= o["recall@20"] <= o["recall@50"]
        assert w[-1]["end_event"] == 3000 and w[0]["start_event"] == 0
        assert all(a["end_event"] == b["start_event"] for a, b in zip(w, w[1:], strict=False))
        assert sum(x["new_items"] for x in w) > 0


def test_regimes_share_one_model_before_the_freeze_point(drift_report):
    v = drift_report["variants"]
    before = [i for i, w in enumerate(v["evolving/soft"]["windows"]) if w["end_event"] <= 768]
    assert before
    for i in before:
        ranks = {n: v[n]["windows"][i]["recall@20"] for n in ("evolving/soft", "frozen/soft", "periodic/soft")}
        assert len(set(ranks.values())) == 1
    # after it: the frozen model's codes never move, the periodic model's change at every retrain
    frozen = [w["code_changed_share"] for w in v["frozen/soft"]["windows"] if w["start_event"] >= 1000]
    assert frozen and all(x == 0.0 for x in frozen)


def test_evolving_beats_frozen_on_a_drifting_stream(drift_report):
    v = drift_report["variants"]
    evolving, frozen = v["evolving/soft"]["after_freeze"], v["frozen/soft"]["after_freeze"]
    assert evolving["scored"] == frozen["scored"] > 2000
    # measured here: +44% .. +56% Recall@20 over seeds 0-2 of this stream; asked: +20%
    assert evolving["recall@20"] > 1.2 * frozen["recall@20"]
    assert evolving["ndcg@20"] > 1.2 * frozen["ndcg@20"]


def test_frozen_weights_never_change_after_the_freeze_point():
    source = drifting_stream(events=1600)
    records = list(source.records())
    settings = small_settings(regimes=("evolving", "frozen"), freeze_at=640)
    engine, _ = run_scored(records, settings, 1600)
    frozen = engine.models["frozen"]
    # the same stream cut at the freeze point, learnt online: the state the frozen model must still hold
    cut = [i for i, r in enumerate(records) if is_feedback(r)][639]
    reference, _ = run_scored(records[: cut + 1], replace(settings, regimes=("evolving",)), 640)
    want, got = reference.online.model.state_dict(), frozen.model.state_dict()
    assert engine.frozen_event == 640
    assert frozen.num_items > reference.online.num_items  # new items joined its catalogue after the freeze
    for key, ref in want.items():
        if key.endswith(".frozen"):
            assert bool(got[key]) and not bool(ref), key
            continue
        overlap = got[key][tuple(slice(0, n) for n in ref.shape)]
        assert torch.equal(overlap, ref), key
    new_rows = got["items.id_embedding"][reference.online.num_items + 1 :]
    assert torch.count_nonzero(new_rows) == 0  # never learnt, only their attributes were set
    assert not torch.equal(engine.online.model.rq.codebooks, frozen.model.rq.codebooks)


def test_same_seed_same_report():
    source = drifting_stream(events=800)
    settings = small_settings(eval_per_batch=8, modes=(ScoreMode(), ScoreMode(temperature=2.0)))
    a = replay(source.records(), settings, total=800)
    b = replay(source.records(), settings, total=800)
    strip = ("seconds", "learn_seconds", "retrain_seconds")
    for name in a["variants"]:
        assert a["variants"][name]["windows"] == b["variants"][name]["windows"], name
        assert a["variants"][name]["overall"] == b["variants"][name]["overall"], name
    assert {k: v for k, v in a.items() if k not in (*strip, "variants")} == \
        {k: v for k, v in b.items() if k not in (*strip, "variants")}
    assert a["variants"]["evolving/soft"]["overall"]["scored"] <= 8 * 25  # the sample limit holds


def test_delay_in_seconds_and_windows_in_seconds():
    source = drifting_stream(events=800)
    settings = small_settings(regimes=("evolving",), delay_seconds=1800.0, window_seconds=6 * 3600.0)
    report = replay(source.records(), settings, total=800)
    windows = report["variants"]["evolving"]["windows"]
    assert len(windows) >= 2
    for w in windows[:-1]:
        assert w["end_ts"] - w["start_ts"] >= 6 * 3600.0
    assert sum(w["events"] for w in windows) == 800


# ------------------------------------------------------------------ shared scoring (same results, less work)
def test_extra_variants_and_their_names():
    hard, hot = ScoreMode(search="hard"), ScoreMode(temperature=2.0)
    s = small_settings(**parse_variants("evolving,frozen,evolving/hard,evolving/soft:t=2"))
    assert [(n, r, m) for n, r, m in s.variant_names()] == [
        ("evolving/soft", "evolving", ScoreMode()), ("frozen/soft", "frozen", ScoreMode()),
        ("evolving/hard", "evolving", hard), ("evolving/soft:t=2", "evolving", hot)]
    assert s.all_regimes == ("evolving", "frozen")
    assert s.to_json()["extra_variants"] == ["evolving/hard", "evolving/soft:t=2"]
    only = small_settings(**parse_variants("periodic/hard"))
    assert [n for n, _, _ in only.variant_names()] == ["periodic"] and only.all_regimes == ("periodic",)
    with pytest.raises(ValueError, match="duplicate variant"):
        small_settings(**parse_variants("evolving,evolving/soft", (ScoreMode(), hard)))
    with pytest.raises(ValueError, match="unknown regime"):
        small_settings(**parse_variants("evolving,sometimes/hard"))
    with pytest.raises(ValueError):
        parse_variants("evolving/medium")


def test_shared_scoring_gives_exactly_the_reference_results():
    """One catalogue and one encoder pass per model and batch, catalogues kept between batches for fixed
    models: every rank and top list equals scoring each (model, mode) on its own with a fresh catalogue."""
    source = drifting_stream(events=1600)
    records = list(source.records())
    modes = (ScoreMode(), ScoreMode(search="hard"), ScoreMode(top_codes=2, temperature=2.0))
    settings = small_settings(modes=modes, freeze_at=480, retrain_every=512, retrain_epochs=1,
                              extra_variants=(("evolving", ScoreMode(top_codes=6)),))
    seen = []
    for share in (True, False):
        got = {}

        def observe(s, got=got):
            for i, eid in enumerate(s.event_ids):
                got[(s.variant, eid)] = (int(s.ranks[i]), tuple(s.top[i].tolist()))

        engine = Prequential(settings, 1600)
        engine.share_scoring = share
        windows = [w for w in engine.run(records, observer=observe)]
        seen.append((got, windows, engine.catalogues))
    (a, wa, cache), (b, wb, _) = seen
    assert len(a) == len(b) > 4000 and a == b
    assert wa == wb
    assert cache.partial > 10  # fixed models took new items into their kept catalogue


@pytest.mark.parametrize("hysteresis", [0.0, 0.3])
def test_kept_catalogue_rows_equal_a_full_recomputation(hysteresis):
    source = drifting_stream(events=640)
    settings = small_settings(regimes=("evolving",), freeze_at=10_000)
    settings = replace(settings, model=replace(settings.model, code_hysteresis=hysteresis))
    engine = Prequential(settings, 640)
    for _ in engine.run(source.records()):
        pass
    learner = copy.deepcopy(engine.online)
    learner.model.eval()
    cache = CatalogueCache()
    first = cache.get(learner)
    assert cache.get(learner) is first and cache.full == 1  # nothing changed: the same object
    n = learner.num_items
    for items in ([{"item_id": n + 1, "attributes": [3, 40]}],  # one new row (the padded path)
                  [{"item_id": 5, "attributes": [7]}, {"item_id": n + 90}],  # a changed row and a grown table
                  [{"item_id": i, "attributes": [i % 9 + 1]} for i in range(1, 150)]):  # many rows
        cache.touched(learner, learner.observe_items(items).rows)
        kept = cache.get(learner)
        with torch.no_grad():
            full = learner.model.catalogue()
        assert torch.equal(kept.z, full.z) and torch.equal(kept.codes, full.codes)
    assert first.z.shape[0] == n + 1  # a catalogue handed out before never changes
    assert cache.full == 1 and cache.partial == 3
    engine.online.learn([{"user_id": "1", "item_id": 3}, {"user_id": "1", "item_id": 4}], {"1": [2]})
    assert cache.get(engine.online) is not None and cache.full == 2  # another model
    steps = learner.steps
    learner.learn([{"user_id": "1", "item_id": 3}, {"user_id": "1", "item_id": 4}], {"1": [2]})
    assert learner.steps == steps + 1
    cache.get(learner)
    assert cache.full == 3  # a step invalidates it
    learner.vocab.max_items, learner.vocab.on_full = learner.num_items, "evict"  # a full catalogue that evicts
    cache.touched(learner, learner.observe_items([{"item_id": 10_000, "attributes": [4]}]).rows)
    kept = cache.get(learner)
    with torch.no_grad():
        full = learner.model.catalogue()
    assert cache.full == 4 and torch.equal(kept.z, full.z)  # a row that changed hands invalidates it too


# ------------------------------------------------------------------ recall over windows, recovery after a shift
def hand_made_curve():
    """Events 0..15999, every one scored: a hit every 2nd event before the shift at 10000 (recall 0.5), every
    10th for 1500 events after it (0.1), then every 2nd again (0.5); after 14000 every 10th (0.1) for good."""
    positions = np.arange(16_000)
    rate = np.where(positions < 10_000, 2, np.where(positions < 11_500, 10, np.where(positions < 14_000, 2, 10)))
    ranks = np.where(positions % rate == 0, 3, 500)
    return positions, ranks


def test_windowed_recall_counts_scored_events_in_each_window():
    positions, ranks = hand_made_curve()
    recall, scored = windowed_recall(positions, ranks, [0, 10_000, 10_500, 20_000], 1000)
    np.testing.assert_allclose(recall[:3], [0.5, 0.1, 0.1])
    assert np.isnan(recall[3]) and scored.tolist() == [1000, 1000, 1000, 0]
    shuffled = np.random.default_rng(0).permutation(len(positions))  # any order, k applies
    recall, _ = windowed_recall(positions[shuffled], ranks[shuffled], [0], 1000, k=3)
    assert recall[0] == 0.0


def test_recovery_on_a_hand_made_recall_curve():
    positions, ranks = hand_made_curve()
    r = recovery(positions, ranks, 10_000, pre_events=2000, width=1000, step=250, until=14_000)
    assert r["pre_recall"] == 0.5 and r["pre_scored"] == 2000 and r["target"] == pytest.approx(0.45)
    # window [10000 + a, 11000 + a): 0.1 * (1500 - a) / 1000 + 0.5 * (a - 500) / 1000 >= 0.45 needs a >= 1375:
    # the first such start on the 250-event grid is a = 1500, whose window ends 2500 events after the shift
    assert r["recovered_after"] == 2500
    assert r["dip"] == pytest.approx(0.1) and r["dip_at"] == 1000 and r["final"] == 0.5
    ends = [c["end"] for c in r["curve"]]
    assert ends[0] == 1000 and ends[-1] == 4000 and all(b - a == 250 for a, b in zip(ends, ends[1:], strict=False))
    # the window starting 1000 after the shift: 500 events at 0.1, then 500 at 0.5
    assert r["curve"][4] == {"end": 2000, "recall": pytest.approx(0.3), "scored": 1000}
    # every 2nd event scored: the same levels, half the counts
    half = positions % 2 == 1
    h = recovery(positions[half], np.where(positions[half] % 4 == 1, 3, 500), 10_000,
                 pre_events=2000, width=1000, step=250, until=14_000)
    assert h["pre_scored"] == 1000 and h["pre_recall"] == 0.5
    # a model that never comes back, and one measured against another's target
    never = recovery(positions, ranks, 14_000, pre_events=2000, width=1000, step=250, until=16_000)
    assert never["pre_recall"] == 0.5 and never["recovered_after"] is None and never["final"] == pytest.approx(0.1)
    low = recovery(positions, ranks, 14_000, pre_events=2000, width=1000, step=250, until=16_000, target=0.09)
    assert low["target"] == 0.09 and low["recovered_after"] == 1000
    with pytest.raises(ValueError):
        recovery(positions, ranks, 10_000, pre_events=0, width=1000, step=250, until=14_000)


def test_drift_benchmark_end_to_end(tmp_path):
    """benchmarks/drift_bench.py on a tiny stream: JSON with per-shift results, a PNG, the table."""
    from benchmarks import drift_bench

    out = tmp_path / "drift.json"
    stream = ["n_users=100", "n_events=2400", "n_initial_items=160", "n_topics=8", "max_interests=3"]
    rc = drift_bench.main(["--out", str(out), "--pre", "300", "--width", "300", "--step", "100", "--dim", "16",
                           "--codes", "8", "--layers", "1", "--set", "ema_decay=0.9", "--stream", *stream])
    assert rc == 0
    result = json.loads(out.read_text())
    assert result["settings"]["replay"]["model"]["ema_decay"] == 0.9  # --set reaches the replayed model
    assert result["stream"]["n_events"] == 2400 and result["stream"]["dormant_topics"] == 3
    assert result["settings"]["freeze_event"] >= 600 - 300
    assert [s["shift"] for s in result["shifts"]] == [600, 1200, 1800]
    for shift in result["shifts"]:
        for v in ("evolving", "frozen"):
            r = shift[v]
            assert r["pre_scored"] > 0 and r["curve"] and r["curve"][0]["end"] == 300
            assert r["recovered_after"] is None or r["recovered_after"] % 100 == 0
        assert "reaches_evolving_target_after" in shift["frozen"]
    assert [g["swapped_in_topics_never_seen_before_freeze"] for g in result["ground_truth"]] == [100, 100, 100]
    assert (tmp_path / "drift.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(SystemExit) as info:
        drift_bench.main(["--out", str(out), "--set", "no_such_field=1"])
    assert info.value.code == 2


def test_the_replayed_model_defaults_are_the_workers(monkeypatch):
    """replay reproduces the worker: worker_model_config() is WorkerSettings().sparc_config() with no SPARC_*
    environment (both differ from SparcConfig's offline defaults in two training options)."""
    import os

    from streams.settings import WorkerSettings

    for key in [k for k in os.environ if k.startswith("SPARC_")]:
        monkeypatch.delenv(key)
    assert worker_model_config() == WorkerSettings().sparc_config()
    online, offline = worker_model_config(), SparcConfig(num_items=0, num_attributes=1024)
    assert (online.attribute_dropout, online.conditioned_detach) == (0.0, False)
    assert (offline.attribute_dropout, offline.conditioned_detach) == (0.3, True)
    # stable interests (README, "Stable interests") are opt-in, in replay (--set) and in the worker alike
    assert (online.ema_decay, online.code_hysteresis) == (offline.ema_decay, offline.code_hysteresis) == (0.95, 0.0)
    stable = {"ema_decay": 0.99, "code_hysteresis": 3.0}
    assert worker_model_config(**stable) == WorkerSettings(**stable).sparc_config()
    monkeypatch.setenv("SPARC_EMA_DECAY", "0.99")
    monkeypatch.setenv("SPARC_CODE_HYSTERESIS", "3")
    assert WorkerSettings().sparc_config() == worker_model_config(**stable)


# ------------------------------------------------------------------ churn of interests
def test_interest_churn_counts_users_by_hand():
    before = {"a": (1, "e1"), "b": (2, "e2"), "c": (3, "e3"), "d": (4, "e4")}
    after = {"a": (1, "e1"), "b": (5, "e2"), "c": (3, "e9"), "d": (7, "e8"), "new": (0, "e5")}
    churn = interest_churn(before, after)
    assert churn == {"top_interest_changed_share": 2 / 4, "top_interest_changed_share_idle": 1 / 2,
                     "churn_users": 4, "churn_users_idle": 2}  # idle: a (same), b (changed by the model alone)
    assert interest_churn(None, after)["top_interest_changed_share"] is None
    windows = [{"level1_changed_share": None}, {"level1_changed_share": 0.2, "top_interest_changed_share": 0.5},
               {"level1_changed_share": 0.4, "top_interest_changed_share": 0.1}]
    summary = churn_summary(windows)
    assert summary["level1_churn"] == pytest.approx(0.3) and summary["level1_churn_max"] == 0.4
    assert summary["top_interest_churn"] == pytest.approx(0.3) and summary["top_interest_churn_idle"] is None


def test_top_interests_are_the_codes_hard_search_serves():
    source = drifting_stream(events=800)
    engine, _ = run_scored(source.records(), small_settings(regimes=("evolving",)), 800)
    model = engine.models["evolving"].model
    users = list(engine.ingest)[:40]
    histories = [engine.ingest[u]["items"] for u in users]
    cat = model.catalogue()
    tops = top_interests(model, histories, cat, batch_size=16)  # several batches
    index = BruteForce(cat.z.detach().numpy(), cat.level1().numpy(), model.cfg.codes)
    served = [int(retrieve(model, np.asarray(h), index, k=5, hard=True, catalogue=cat).codes[0]) for h in histories]
    assert tops.tolist() == served
    assert top_interests(model, [[], [model.items.num_items + 5]], cat).tolist() == [-1, -1]  # nothing known


def test_churn_per_window_and_overall(drift_report):
    v = drift_report["variants"]
    for variant in v.values():
        windows = variant["windows"]
        assert windows[0]["level1_changed_share"] is None and windows[0]["top_interest_changed_share"] is None
        later = windows[1:]
        assert all(0 <= w["level1_changed_share"] <= w["code_changed_share"] <= 1 for w in later)
        assert all(0 <= w["top_interest_changed_share"] <= 1 and w["churn_users"] > 0 for w in later)
        o = variant["overall"]
        assert o["level1_churn"] == pytest.approx(np.mean([w["level1_changed_share"] for w in later]))
        assert o["level1_churn_max"] == max(w["level1_changed_share"] for w in later)
        assert o["top_interest_churn"] == pytest.approx(np.mean([w["top_interest_changed_share"] for w in later]))
    # the frozen model changes nothing: an idle user keeps its top interest; the online learner moves both
    frozen = [w for w in v["frozen/soft"]["windows"] if w["start_event"] >= 1000]
    assert frozen and all(w["churn_users_idle"] > 0 and w["top_interest_changed_share_idle"] == 0 for w in frozen)
    assert v["evolving/soft"]["overall"]["level1_churn"] > 0
    assert v["evolving/soft"]["overall"]["top_interest_churn"] > 0


def test_churn_benchmark_end_to_end(tmp_path):
    """benchmarks/churn_bench.py on tiny streams: a configuration's JSON of churn, accuracy and recovery; the
    trade-off plot from several of them."""
    from benchmarks import churn_bench

    stream = ["n_users=60", "n_events=1200", "n_initial_items=120", "n_topics=8", "max_interests=3"]
    out = tmp_path / "slow.json"
    assert churn_bench.main(["--data", "synthetic:2?users=30&events=480&items=60&topics=4", "--window", "160",
                             "--pre", "150", "--width", "150", "--step", "50", "--set", "codes=8", "--set",
                             "ema_decay=0.999", "--label", "slow EMA", "--out", str(out), "--stream", *stream]) == 0
    r = json.loads(out.read_text())
    assert r["label"] == "slow EMA" and r["model"]["ema_decay"] == 0.999 and r["model"]["codes"] == 8
    d, s = r["data"], r["shift_stream"]
    assert d["events"] == 480 and len(d["level1_churn_per_window"]) == 2
    assert d["level1_churn"] == pytest.approx(np.mean(d["level1_churn_per_window"]))
    assert 0 <= d["served_recall@20"] <= 1 and 0 <= d["ranked_recall@20"] <= 1 and d["new_items_reached@10"] >= 0
    assert s["shifts"] == [300, 600, 900] and len(s["recovered_after"]) == 3
    assert 0 < s["mean_recovery_events"] <= 300
    assert s["level1_churn_stationary"] is not None and s["level1_churn_at_shifts"] is not None
    # the same Beauty-side numbers from an earlier `sparc replay` report of the same model; another model refused
    from sparc_stream.cli.main import main as sparc

    rep = tmp_path / "rep"
    assert sparc(["replay", "--events", "synthetic:2?users=30&events=480&items=60&topics=4", "--variants",
                  "evolving", "--modes", "soft,soft:served=20,soft:served=20:x=10:lift=1", "--window", "160",
                  "--eval-per-batch", "16",
                  "--codes", "8", "--set", "ema_decay=0.999", "--report", str(rep), "--quiet"]) == 0
    again = churn_bench.reported(rep / "report.json", {"codes": 8, "ema_decay": 0.999})
    assert {k: v for k, v in again.items() if k != "seconds"} == {k: v for k, v in d.items() if k != "seconds"}
    # served with exploration slots (--exploit 10 --lift 1): the same model and churn, its own served lists
    x10 = churn_bench.served_mode(10, 1.0)
    explored = churn_bench.reported(rep / "report.json", {"codes": 8, "ema_decay": 0.999}, x10)
    assert x10.name == "soft:served=20:x=10:lift=1" and r["served"] == "soft:served=20:x=15:lift=0.5"  # the worker's
    assert churn_bench.served_mode(exploration=False) == ScoreMode(served=20)  # --no-exploration
    assert (explored["ranked_recall@20"], explored["level1_churn"]) == (d["ranked_recall@20"], d["level1_churn"])
    assert 0 <= explored["served_recall@20"] <= 1 and explored["served_coverage@20"] > 0
    with pytest.raises(ValueError, match="differs from this configuration in ema_decay"):
        churn_bench.reported(rep / "report.json", {"codes": 8})
    other = tmp_path / "other.json"
    other.write_text(json.dumps({**r, "label": "other", "data": {**d, "level1_churn": 0.5}}))
    png = tmp_path / "tradeoff.png"
    assert churn_bench.main(["--plot", str(png), str(out), str(other)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
