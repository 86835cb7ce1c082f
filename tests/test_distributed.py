"""trainer/distributed.py: K gloo ranks on the CPU take the steps one learner takes on the whole batches.

The ranks are real processes (torch.multiprocessing, spawn) in a real gloo group over loopback, joined through a
file store in the test's tmp dir (no port to pick); every collective times out after 60 s and the test after 120 s.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from learner_fixture import reference_learner, rounds, small_config, stream_events
from safetensors.torch import load_file, save_file

from trainer.config import TrainConfig
from trainer.distributed import DataParallel, DataParallelLearner, init_group, leave_group
from trainer.online import OnlineLearner, advance_histories

REFERENCE = Path(__file__).parent / "data" / "learner_reference.safetensors"
TIMEOUT_S = 120

# The equivalence test's model: no dropout (each rank draws masks for its own rows, so K ranks cannot draw the
# masks one learner draws for the whole batch: with dropout the two are equal in distribution, not in value), and
# a dead-code threshold high enough that codewords die and are revived from the gathered batch.
NO_DROPOUT = dict(attribute_dropout=0.0, dead_code_threshold=1.5,
                  encoder=small_config().encoder.__class__(dim=16, max_len=8, layers=1, dropout=0.0))
# Tolerance of the weights: the ranks sum the same per-example gradients in another order (two halves, then an
# all-reduce), so gradients and weights agree to float32 rounding: measured <= 1.1e-7 after 10 steps, compared at
# 1e-6. Except the attention keys' biases: softmax is invariant to them, so their true gradient is 0 and what is
# left is rounding noise, which Adam (dividing by sqrt(v)) turns into steps of up to lr: compared at lr (measured
# 1e-4). A changed step (a wrong loss scale, a codebook update from one rank's targets, a lost rank) moves weights
# by 1e-3 or more.
ATOL = 1e-6
KEY_BIAS_ATOL = TrainConfig().lr


def test_a_learner_without_a_process_group_keeps_todays_weights():
    """The single-process path is unchanged: the weights main's learner had (recorded before the data-parallel
    and device changes), bit for bit on the platform that recorded them, else within float rounding."""
    from safetensors import safe_open

    with safe_open(REFERENCE, "pt") as f:
        meta = f.metadata()
    expected = load_file(REFERENCE)
    got = reference_learner().snapshot_state().weights
    assert got.keys() == expected.keys()
    same_platform = (meta["torch"], meta["cpu_capability"]) == (torch.__version__,
                                                                 torch.backends.cpu.get_cpu_capability())
    for key, value in expected.items():
        if same_platform:
            assert torch.equal(got[key], value), key
        else:  # another CPU's BLAS rounds differently
            torch.testing.assert_close(got[key], value, atol=1e-5, rtol=1e-5, msg=key)


def _rank_main(rank: int, world_size: int, store: str, out: str) -> None:
    """One rank: the rounds of tests/learner_fixture.rounds for this rank; writes its weights and metrics."""
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"  # loopback only
    torch.set_num_threads(1)
    init_group(rank, world_size, f"file://{store}", backend="gloo", timeout_s=60)
    try:
        learner = DataParallelLearner(small_config(**NO_DROPOUT), TrainConfig(seed=0))
        histories: dict = {}
        metrics = []
        for per_rank in rounds(stream_events(), world_size):
            items, feedback = per_rank[rank]
            learner.observe_items(items)
            metrics.append(learner.learn(feedback, histories))
            advance_histories(histories, feedback, learner.max_len)
        in_sync = learner.parallel.in_sync(learner.model)
        save_file({k: v.contiguous() for k, v in learner.snapshot_state().weights.items()},
                  f"{out}/rank{rank}.safetensors")
        try:  # ranks that would join with models of different shapes are refused, every one of them
            DataParallelLearner(small_config(codes=8 if rank == 0 else 16), TrainConfig(seed=0))
            refused = ""
        except ValueError as exc:
            refused = str(exc)
        Path(f"{out}/rank{rank}.json").write_text(json.dumps({"metrics": metrics, "in_sync": in_sync,
                                                              "refused": refused}))
    finally:
        leave_group()


def run_ranks(fn, world_size: int, tmp_path: Path, *args) -> None:
    ctx = mp.start_processes(fn, args=(world_size, str(tmp_path / "store"), str(tmp_path), *args),
                             nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    try:  # join() returns as each rank ends (and raises when one failed); True once all have
        while not ctx.join(timeout=max(deadline - time.monotonic(), 0)):
            assert time.monotonic() < deadline, "ranks timed out"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def one_learner_on_the_whole_batches(world_size: int) -> tuple[OnlineLearner, list[dict]]:
    learner = OnlineLearner(small_config(**NO_DROPOUT), TrainConfig(seed=0))
    histories: dict = {}
    metrics = []
    for per_rank in rounds(stream_events(), world_size):
        learner.observe_items([e for items, _ in per_rank for e in items])
        whole = [e for _, feedback in per_rank for e in feedback]
        metrics.append(learner.learn(whole, histories))
        advance_histories(histories, whole, learner.max_len)
    return learner, metrics


def test_two_ranks_on_two_halves_take_the_steps_of_one_learner_on_the_whole(tmp_path):
    world_size = 2
    run_ranks(_rank_main, world_size, tmp_path)
    one, expected = one_learner_on_the_whole_batches(world_size)
    # the fixture exercises what it should: k-means at the first step, revivals, a rank without examples, growth
    assert sum(m.get("revived", 0) for m in expected) > 0
    assert one.model.rq.levels[0].initialised and one.num_items > 97  # 98-100 are never announced
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(world_size)]
    assert any(m["examples"] == 0 and m["step_examples"] > 0 for m in reports[1]["metrics"])
    weights, key_biases = key_biases_apart(one.snapshot_state().weights)
    for r, report in enumerate(reports):
        assert report["in_sync"]
        assert "differ in shape" in report["refused"]
        for got, want in zip(report["metrics"], expected, strict=True):
            assert got["step"] == want["step"] and got["step_examples"] == want["examples"]
            assert got.get("revived") == want.get("revived")
            if "loss" in want:
                assert got["loss"] == pytest.approx(want["loss"], rel=1e-5)
        ranked, ranked_keys = key_biases_apart(load_file(tmp_path / f"rank{r}.safetensors"))
        assert ranked.keys() == weights.keys()
        for key, value in weights.items():
            torch.testing.assert_close(ranked[key], value, atol=ATOL, rtol=ATOL, msg=f"rank {r}: {key}")
        for key, value in key_biases.items():
            torch.testing.assert_close(ranked_keys[key], value, atol=KEY_BIAS_ATOL, rtol=0, msg=f"rank {r}: {key}")


def key_biases_apart(weights: dict[str, torch.Tensor]) -> tuple[dict, dict]:
    """(the weights without the attention keys' biases, those biases)."""
    rest, keys = dict(weights), {}
    for name, value in weights.items():
        if name.endswith("qkv.bias"):  # (3D,) = query, key, value biases
            d = value.shape[0] // 3
            keys[name], rest[name] = value[d : 2 * d], torch.cat([value[:d], value[2 * d :]])
        elif name == "attn_k.bias":
            keys[name] = rest.pop(name)
    return rest, keys


def test_a_group_of_one_is_the_plain_learner_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    init_group(0, 1, f"file://{tmp_path / 'store'}", backend="gloo", timeout_s=60)
    try:
        learner = DataParallelLearner(small_config(**NO_DROPOUT), TrainConfig(seed=0))
        histories: dict = {}
        for per_rank in rounds(stream_events(), 1):
            items, feedback = per_rank[0]
            learner.observe_items(items)
            learner.learn(feedback, histories)
            advance_histories(histories, feedback, learner.max_len)
    finally:
        leave_group()
    one, _ = one_learner_on_the_whole_batches(1)
    want = one.snapshot_state().weights
    for key, value in learner.snapshot_state().weights.items():
        assert torch.equal(value, want[key]), key


def test_a_group_step_with_non_finite_gradients_changes_nothing(tmp_path, monkeypatch):
    """As Trainer.step: a finite loss whose all-reduced gradients are not finite is refused on every rank before
    the optimiser or the codebook update writes anything (a group of one, in this process)."""
    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    init_group(0, 1, f"file://{tmp_path / 'store'}", backend="gloo", timeout_s=60)
    try:
        learner = DataParallelLearner(small_config(**NO_DROPOUT), TrainConfig(seed=0))
        histories: dict = {}
        batches = [per_rank[0] for per_rank in rounds(stream_events(), 1)]
        for items, feedback in batches[:2]:
            learner.observe_items(items)
            learner.learn(feedback, histories)
            advance_histories(histories, feedback, learner.max_len)
        items, feedback = batches[2]
        learner.observe_items(items)
        before = {k: v.clone() for k, v in learner.model.state_dict().items()}
        hook = learner.model.encoder.parameters().__next__().register_hook(lambda grad: grad * float("nan"))
        with pytest.raises(FloatingPointError, match="non-finite gradient"):
            learner.learn(feedback, histories)
        hook.remove()
        assert all(torch.equal(v, before[k]) for k, v in learner.model.state_dict().items())
        assert "loss" in learner.learn(feedback, histories)
    finally:
        leave_group()


def test_data_parallel_needs_a_process_group():
    assert not dist.is_initialized()
    with pytest.raises(RuntimeError, match="init_group"):
        DataParallel(torch.device("cpu"))
