"""trainer/online.py: the online-learning step shared by the Kafka worker and replay (no broker needed)."""

from __future__ import annotations

import copy
import itertools
import threading

import pytest
import torch

from replay.synthetic import SyntheticConfig, generate
from trainer.config import EncoderConfig, SparcConfig, TrainConfig
from trainer.online import (
    OnlineLearner,
    advance_histories,
    append_history,
    config_differences,
    event_histories,
    load_model,
    next_item_batch,
)


def small_config(**over) -> SparcConfig:
    base = dict(num_items=0, num_attributes=200, codes=8, encoder=EncoderConfig(dim=16, max_len=6, layers=1))
    return SparcConfig(**{**base, **over})


def ev(user, item, n=0) -> dict:
    return {"event_id": f"e{n}", "user_id": user, "item_id": item, "timestamp": 1_700_000_000 + n}


@pytest.fixture(scope="module")
def stream():
    return generate(SyntheticConfig(n_users=60, n_events=1500, n_initial_items=120, n_new_items=20, seed=3))


def split(stream):
    items = [e for e in stream.iter_events() if "event_id" not in e]
    feedback = [e for e in stream.iter_events() if "event_id" in e]
    return items, feedback


def drive(learner: OnlineLearner, item_events, feedback, batch_size=32) -> list[dict]:
    """What replay does: items first, then micro-batches; histories kept in a dict by the caller."""
    learner.observe_items(item_events)
    histories: dict = {}
    metrics = []
    for start in range(0, len(feedback), batch_size):
        batch = feedback[start : start + batch_size]
        metrics.append(learner.learn(batch, histories))
        advance_histories(histories, batch, learner.max_len)
    return metrics


def test_append_history_keeps_the_last_max_len():
    assert append_history([1, 2, 3], 4, 3) == [2, 3, 4]
    assert append_history([], 9, 3) == [9]


def test_event_histories_hold_the_history_before_each_event_including_earlier_ones_in_the_batch():
    histories = {"a": [1, 2], "b": []}
    events = [ev("a", 3), ev("b", 7), ev("a", 4), ev("c", 5), ev("b", 8)]
    frozen = copy.deepcopy(histories)
    got = event_histories(events, histories, max_len=3)
    assert got == [[1, 2], [], [1, 2, 3], [], [7]]  # b's and c's first events have no history
    assert histories == frozen  # read, never written


def test_next_item_batch_targets_only_the_last_position():
    batch = next_item_batch([([1, 2, 3], 4), ([5], 6)], max_len=10)
    assert batch.inputs.tolist() == [[1, 2, 3], [5, 0, 0]]
    assert batch.lengths.tolist() == [3, 1]
    assert batch.targets.tolist() == [[0, 0, 4], [6, 0, 0]]


def test_advance_histories_matches_event_histories():
    events = [ev(u, i) for u, i in [("a", 1), ("a", 2), ("b", 3), ("a", 4)]]
    histories: dict = {}
    advance_histories(histories, events, max_len=2)
    assert histories == {"a": [2, 4], "b": [3]}


def test_observe_items_adds_one_row_per_item_and_sets_attributes():
    learner = OnlineLearner(small_config(), TrainConfig(seed=0))
    observed = learner.observe_items([{"item_id": 3, "attributes": [5, 9]}, {"item_id": 1}])
    assert (observed.added, observed.rows, observed.refused) == (2, [1, 2], [])
    assert learner.num_items == 2 and learner.vocab.ids() == [None, 3, 1]  # rows in order of arrival
    assert learner.model.items.attributes[1].tolist() == [5, 9]
    again = learner.observe_items([{"item_id": 1, "attributes": [4]}])  # attributes only
    assert (again.added, again.rows, learner.num_items) == (0, [2], 2)
    assert learner.model.items.attributes[2].tolist()[:1] == [4]


def test_learn_adds_unknown_items_and_skips_first_events():
    learner = OnlineLearner(small_config(), TrainConfig(seed=0))
    m = learner.learn([ev("a", 5), ev("a", 9), ev("b", 2)], {})
    assert learner.num_items == 3 and learner.vocab.ids() == [None, 5, 9, 2]
    assert (m["examples"], m["skipped"], m["step"], m["unlearnt"]) == (1, 2, 1, [])
    assert torch.isfinite(torch.tensor(m["loss"]))
    # no example: no step
    m = learner.learn([ev("z", 1)], {})
    assert (m["examples"], m["step"]) == (0, 1) and "loss" not in m


def test_learn_does_not_mutate_its_inputs(stream):
    items, feedback = split(stream)
    learner = OnlineLearner(small_config(), TrainConfig(seed=0))
    learner.observe_items(items)
    histories = {u: [1, 2, 3] for u in range(1, 61)}
    batch = feedback[:64]
    before = (copy.deepcopy(batch), copy.deepcopy(histories))
    learner.learn(batch, histories)
    assert (batch, histories) == before


def test_same_seed_same_batches_same_weights_whatever_else_uses_the_rng(stream):
    items, feedback = split(stream)
    a = OnlineLearner(small_config(), TrainConfig(seed=7))
    b = OnlineLearner(small_config(), TrainConfig(seed=7))
    drive(a, items, feedback[:600])
    torch.manual_seed(123)  # other code in the process draws from torch's global RNG ...
    torch.rand(1000)
    drive(b, items, feedback[:600])  # ... and b still follows a exactly
    sa, sb = a.snapshot_state(), b.snapshot_state()
    for key in sa.weights:
        assert torch.equal(sa.weights[key], sb.weights[key]), key
    assert torch.equal(sa.item_codes, sb.item_codes)
    c = OnlineLearner(small_config(), TrainConfig(seed=8))
    drive(c, items, feedback[:600])
    assert not torch.equal(c.snapshot_state().codebooks, sa.codebooks)


def test_health_and_snapshot_state_after_training(stream):
    items, feedback = split(stream)
    learner = OnlineLearner(small_config(), TrainConfig(seed=0))
    metrics = drive(learner, items, feedback)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
    health = learner.health()
    assert health["finite"] and health["initialised"]
    assert health["items"] == stream.num_items
    assert health["level1_utilisation"] > 0.5  # 8 codes over 140 items after k-means + EMA
    state = learner.snapshot_state()
    n, cfg = stream.num_items, learner.model.cfg
    assert state.codebooks.shape == (cfg.levels, cfg.codes, cfg.encoder.dim)
    assert state.codebooks.dtype == torch.float32
    assert state.item_codes.shape == (n + 1, cfg.levels) and state.item_codes.dtype == torch.int64
    assert state.item_vectors.shape == (n + 1, cfg.encoder.dim)
    assert state.config["num_items"] == n and state.steps == learner.steps
    # a copy: training on does not change it
    frozen = state.weights["items.id_embedding"].clone()
    drive(learner, [], feedback[:64])
    assert torch.equal(state.weights["items.id_embedding"], frozen)


def test_capture_equals_snapshot_state_and_health(stream):
    items, feedback = split(stream)
    learner = OnlineLearner(small_config(), TrainConfig(seed=0))
    drive(learner, items, feedback[:256])
    state, health = learner.capture()
    alone = learner.snapshot_state()
    assert health == learner.health()
    assert state.config == alone.config and state.steps == alone.steps
    for name in ("codebooks", "item_codes", "item_vectors"):
        assert torch.equal(getattr(state, name), getattr(alone, name))
    assert state.weights.keys() == alone.weights.keys()
    assert all(torch.equal(state.weights[k], alone.weights[k]) for k in alone.weights)


def test_load_model_serves_like_the_learner(stream):
    items, feedback = split(stream)
    learner = OnlineLearner(small_config(), TrainConfig(seed=0))
    drive(learner, items, feedback[:800])
    state = learner.snapshot_state()
    served = load_model(state.config, state.weights)
    learner.model.eval()
    inputs, lengths = torch.tensor([[1, 2, 3], [4, 5, 0]]), torch.tensor([3, 2])
    assert torch.allclose(served.score(inputs, lengths), learner.model.score(inputs, lengths))
    assert torch.equal(served.catalogue().codes, state.item_codes)


def test_micro_batches_can_split_a_user_anywhere(stream):
    """Batch boundaries change which step sees an event, never which history an event is trained with."""
    _, feedback = split(stream)
    events = feedback[:200]
    whole = event_histories(events, {}, max_len=6)
    histories: dict = {}
    pieces = []
    for a, b in itertools.pairwise([0, 13, 50, 51, 200]):
        pieces += event_histories(events[a:b], histories, max_len=6)
        advance_histories(histories, events[a:b], 6)
    assert pieces == whole


def test_restore_continues_from_a_snapshot_and_refuses_another_model(stream):
    items, feedback = split(stream)
    a = OnlineLearner(small_config(), TrainConfig(seed=0))
    drive(a, items, feedback[:640])
    state = a.snapshot_state()
    b = OnlineLearner(small_config(), TrainConfig(seed=0))
    b.restore(state.config, state.weights, steps=state.steps)
    restored = b.snapshot_state()
    assert b.steps == a.steps and b.num_items == a.num_items
    assert all(torch.equal(restored.weights[k], state.weights[k]) for k in state.weights)
    assert torch.equal(restored.item_codes, state.item_codes)
    histories: dict = {}
    advance_histories(histories, feedback[:640], b.max_len)
    m = b.learn(feedback[640:672], histories)  # trains on: a fresh optimiser over the restored model
    assert m["step"] == a.steps + 1 and torch.isfinite(torch.tensor(m["loss"]))
    other = OnlineLearner(small_config(codes=16), TrainConfig(seed=0))
    with pytest.raises(ValueError, match="codes"):
        other.restore(state.config, state.weights, steps=3)
    assert other.steps == 0  # unchanged
    bad = {**state.weights, "items.id_embedding": state.weights["items.id_embedding"][:5]}
    with pytest.raises(ValueError, match="do not fit"):
        OnlineLearner(small_config(), TrainConfig(seed=0)).restore(state.config, bad)


def test_config_differences_ignore_num_items_and_fill_missing_keys():
    cfg = small_config()
    stored = small_config(num_items=50).to_json()
    assert config_differences(stored, cfg) == []
    del stored["interest_weight"]  # an older snapshot without a newer key: its default
    assert config_differences(stored, cfg) == []
    assert config_differences(small_config(encoder=EncoderConfig(dim=8, max_len=6, layers=1)).to_json(), cfg) == [
        "encoder.dim"
    ]


def test_a_warm_start_bridges_training_only_options_and_learns_on_under_its_own(stream):
    """An offline snapshot (attribute dropout 0.3, no detach) continued by an online learner with other training
    options: the same weights and scores at once, then its own options in every later step and snapshot."""
    items, feedback = split(stream)
    offline = OnlineLearner(small_config(attribute_dropout=0.3, conditioned_detach=False, commitment=0.1),
                            TrainConfig(seed=0))
    drive(offline, items, feedback[:640])
    state = offline.snapshot_state()
    online = OnlineLearner(small_config(attribute_dropout=0.0, conditioned_detach=True), TrainConfig(seed=0))
    bridged = online.restore(state.config, state.weights, steps=state.steps)
    assert bridged == ["attribute_dropout", "commitment", "conditioned_detach"]
    cfg = online.model.cfg
    assert (cfg.attribute_dropout, cfg.conditioned_detach, cfg.commitment) == (0.0, True, 0.05)
    assert online.model.items.attribute_dropout == 0.0  # the tower itself, not only the config record
    restored = online.snapshot_state()
    assert all(torch.equal(restored.weights[k], state.weights[k]) for k in state.weights)
    assert torch.equal(restored.item_codes, state.item_codes)
    assert restored.config["attribute_dropout"] == 0.0 and restored.config["conditioned_detach"] is True
    histories: dict = {}
    advance_histories(histories, feedback[:640], online.max_len)
    assert online.learn(feedback[640:672], histories)["step"] == state.steps + 1
    # a field that changes what the model computes is never bridged
    with pytest.raises(ValueError, match="tower_attention"):
        OnlineLearner(small_config(tower_attention=False), TrainConfig(seed=0)).restore(state.config, state.weights)


def test_config_differences_split_training_only_fields_from_the_rest():
    stored = small_config(attribute_dropout=0.0, retrieval_loss="sampled", levels=2).to_json()
    assert config_differences(stored, small_config()) == ["levels"]
    assert config_differences(stored, small_config(), training_only=True) == ["attribute_dropout", "retrieval_loss"]


def test_models_built_in_another_thread_do_not_disturb_training(stream):
    """The worker builds serving models (load_model) in a publisher thread while the learner trains: both use
    torch's process-wide generator, which GLOBAL_RNG_LOCK serialises."""
    items, feedback = split(stream)
    alone = OnlineLearner(small_config(), TrainConfig(seed=4))
    drive(alone, items, feedback[:480])
    state = alone.snapshot_state()
    busy = OnlineLearner(small_config(), TrainConfig(seed=4))
    stop = threading.Event()

    def build() -> None:
        while not stop.is_set():
            load_model(state.config, state.weights)

    builder = threading.Thread(target=build)
    builder.start()
    try:
        drive(busy, items, feedback[:480])
    finally:
        stop.set()
        builder.join()
    after = busy.snapshot_state()
    assert all(torch.equal(after.weights[k], state.weights[k]) for k in state.weights)
    before = torch.get_rng_state()
    load_model(state.config, state.weights)
    assert torch.equal(torch.get_rng_state(), before)  # nor does building one move the process's generator


def test_hysteresis_is_a_training_option_a_warm_start_bridges_both_ways(stream):
    """A snapshot without held codes continues under hysteresis (every item starts from its nearest code), and a
    snapshot with them continues without (they go unused); a snapshot with hysteresis serves its held codes."""
    items, feedback = split(stream)
    plain = OnlineLearner(small_config(), TrainConfig(seed=0))
    drive(plain, items, feedback[:480])
    state = plain.snapshot_state()
    sticky = OnlineLearner(small_config(code_hysteresis=2.0), TrainConfig(seed=0))
    assert sticky.restore(state.config, state.weights, steps=state.steps) == ["code_hysteresis"]
    assert torch.equal(sticky.snapshot_state().item_codes, state.item_codes)  # nothing held yet: nearest codes
    histories: dict = {}
    advance_histories(histories, feedback[:480], sticky.max_len)
    for start in range(480, 800, 32):
        sticky.learn(feedback[start : start + 32], histories)
        advance_histories(histories, feedback[start : start + 32], sticky.max_len)
    held = sticky.snapshot_state()
    assert "held_codes" in held.weights and held.config["code_hysteresis"] == 2.0
    served = load_model(held.config, held.weights)  # what the serving index builds from the snapshot
    assert torch.equal(served.catalogue().codes, held.item_codes)
    nearest = served.rq.encode(served.catalogue().z)[0]
    assert (nearest[1:, 0] != held.item_codes[1:, 0]).any()  # some items kept a code that is not their nearest
    again = OnlineLearner(small_config(), TrainConfig(seed=0))
    assert again.restore(held.config, held.weights, steps=held.steps) == ["code_hysteresis"]
    assert "held_codes" not in again.snapshot_state().weights
