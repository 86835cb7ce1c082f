"""trainer/device.py and the device-following model code: `--device auto|cpu|cuda`, without a GPU here.

Without a GPU the model code is checked for what would break on one: a tensor made on torch's default device
(the CPU) inside a training step or a scoring call (NoDefaultDevice below). The tests marked for CUDA run where
torch sees a GPU: a learner there takes the CPU learner's steps within rounding, and its snapshots are CPU tensors.
"""

from __future__ import annotations

import pytest
import torch
from learner_fixture import drive, small_config, split, stream_events
from torch.overrides import TorchFunctionMode

from sparc_stream.cli.main import main
from trainer.baselines import ComiRecSA, SASRec
from trainer.batches import make_batch
from trainer.config import EncoderConfig, TrainConfig
from trainer.device import resolve_device
from trainer.online import OnlineLearner, advance_histories, capture_state, event_histories, next_item_batch
from trainer.step import Trainer

HAS_CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not HAS_CUDA, reason="no CUDA GPU here")

FACTORIES = {torch.arange, torch.zeros, torch.ones, torch.full, torch.empty, torch.eye, torch.tensor,
             torch.as_tensor, torch.randperm, torch.randint, torch.rand, torch.randn, torch.linspace}


class NoDefaultDevice(TorchFunctionMode):
    """Fails a tensor factory called without device=: inside model code such a tensor is made on the default
    device (the CPU) whatever device the model is on, and meets the model's tensors on a GPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES and "device" not in kwargs:
            raise AssertionError(f"torch.{func.__name__} without device= in model code")
        return func(*args, **kwargs)


def test_auto_is_cuda_where_torch_sees_a_gpu_else_cpu():
    assert resolve_device("auto").type == ("cuda" if HAS_CUDA else "cpu")
    assert resolve_device("cpu") == torch.device("cpu")


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is here")
def test_cuda_without_a_gpu_is_one_clear_error():
    with pytest.raises(ValueError, match="no CUDA GPU"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="unknown device"):
        resolve_device("tpu")


@pytest.mark.skipif(HAS_CUDA, reason="a GPU is here")
@pytest.mark.parametrize("command", [
    ["train", "--data", "unused", "--store", "memory://"],
    ["evaluate", "--data", "unused"],
    ["replay", "--events", "synthetic", "--report", "unused"],
    ["worker"],
])
def test_commands_refuse_cuda_without_a_gpu_in_one_line(command, capsys):
    assert main([*command, "--device", "cuda"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no CUDA GPU" in err[0], err


@pytest.mark.parametrize("overrides", [
    {},
    dict(interest="head", conditioned_scope="catalogue", retrieval_loss="sampled", shuffle_bpr_weight=0.5),
])
def test_training_and_scoring_make_no_tensor_on_the_default_device(overrides):
    items, feedback = split(stream_events(n_events=320))
    learner = OnlineLearner(small_config(dead_code_threshold=1.5, **overrides), TrainConfig(seed=0))
    histories: dict = {}
    with NoDefaultDevice():
        learner.trainer.grow_items(90, {i["item_id"]: i["attributes"] for i in items if i["item_id"] <= 90})
    revived = 0
    for start in range(0, len(feedback), 32):
        events = feedback[start : start + 32]
        befores = event_histories(events, histories, learner.max_len)  # items 1..100 at rows 1..100: ids as rows
        examples = [(h, e["item_id"]) for e, h in zip(events, befores, strict=True) if h]
        learner.trainer.grow_items(max([e["item_id"] for e in events] + [max(h) for h, _ in examples]))
        if examples:
            batch = next_item_batch(examples, learner.max_len)
            with NoDefaultDevice():
                revived += learner.trainer.step(batch)["revived"]
        advance_histories(histories, events, learner.max_len)
    assert learner.model.rq.levels[0].initialised and revived > 0  # k-means and revival ran under the check
    model = learner.model.eval()
    inputs = next_item_batch([([1, 2, 3], 4), ([5], 6)], learner.max_len)
    modes = [dict(search="soft"), dict(search="hard"), dict(search="soft", global_mix=0.5)]
    if model.cfg.conditioned_scope == "code":
        modes += [dict(search="soft", served=8), dict(search="hard", served=8)]
    with NoDefaultDevice():
        for mode in modes:
            assert model.score(inputs.inputs, inputs.lengths, **mode).shape == (2, learner.num_items + 1)
        capture_state(model)


@pytest.mark.parametrize("make", [SASRec, ComiRecSA])
def test_baselines_train_and_score_without_tensors_on_the_default_device(make):
    import numpy as np

    rng = np.random.default_rng(0)
    model = make(30, EncoderConfig(dim=16, max_len=6, layers=1))
    trainer = Trainer(model, TrainConfig(seed=0))
    batch = make_batch([rng.integers(1, 31, size=int(rng.integers(3, 8))) for _ in range(8)], max_len=6)
    with NoDefaultDevice():
        trainer.step(batch)
        assert model.score(batch.inputs, batch.lengths).shape == (8, 31)


def test_snapshots_hold_copies_not_the_live_tensors():
    items, feedback = split(stream_events(n_events=200))
    learner = OnlineLearner(small_config(), TrainConfig(seed=0))
    drive(learner, items, feedback)
    state = learner.snapshot_state()
    live = dict(learner.model.state_dict())
    for key, value in state.weights.items():
        assert value.device.type == "cpu" and value.data_ptr() != live[key].data_ptr(), key


@needs_cuda
def test_a_learner_on_cuda_takes_the_cpu_learners_steps_within_rounding():
    items, feedback = split(stream_events(n_events=320))
    config = small_config(attribute_dropout=0.0, encoder=EncoderConfig(dim=16, max_len=8, layers=1, dropout=0.0))
    cpu = OnlineLearner(config, TrainConfig(seed=0))
    gpu = OnlineLearner(config, TrainConfig(seed=0), device="cuda")
    assert next(gpu.model.parameters()).is_cuda
    drive(cpu, items, feedback)
    metrics = drive(gpu, items, feedback)
    assert all(torch.isfinite(torch.tensor(m["loss"])) for m in metrics if "loss" in m)
    state, health = gpu.capture()
    assert health["finite"] and health["initialised"]
    assert all(v.device.type == "cpu" for v in state.weights.values())
    assert state.codebooks.device.type == state.item_codes.device.type == "cpu"
    want = cpu.snapshot_state().weights
    for key, value in state.weights.items():
        torch.testing.assert_close(value, want[key], atol=1e-3, rtol=1e-3, msg=key)


@needs_cuda
def test_scores_on_cuda_equal_scores_on_the_cpu():
    items, feedback = split(stream_events(n_events=200))
    learner = OnlineLearner(small_config(), TrainConfig(seed=0))
    drive(learner, items, feedback)
    model = learner.model.eval()
    batch = next_item_batch([([1, 2, 3], 4), ([5], 6), ([7, 8], 9)], learner.max_len)
    on_cpu = {m: model.score(batch.inputs, batch.lengths, search=m, served=8) for m in ("soft", "hard")}
    model.cuda()
    for m, want in on_cpu.items():
        got = model.score(batch.inputs.cuda(), batch.lengths.cuda(), search=m, served=8).cpu()
        assert torch.equal(torch.isfinite(got), torch.isfinite(want))
        torch.testing.assert_close(got[torch.isfinite(got)], want[torch.isfinite(want)], atol=1e-4, rtol=1e-4)
