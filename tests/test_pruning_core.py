"""The pruning core on plain ``nn.Module``s, without a Trainer: config checks, the plan, the one-shot verb."""

import warnings

import pytest
import torch
from torch import nn

from lightning_compress import _lightning
from lightning_compress.pruning.core import (
    HINT_PREFIX,
    PruningConfig,
    PruningPlan,
    load_pruned_checkpoint,
    prune_,
    pruning_schedule,
)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))


def _zeros(weight):
    return int((weight == 0).sum())


def test_prune_unstructured_per_layer_zeroes_the_exact_count_of_smallest_weights():
    model = _mlp()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    plan = prune_(model, PruningConfig(amount=0.75))
    for index in (0, 2, 4):
        weight, old = model[index].weight, before[f"{index}.weight"]
        assert _zeros(weight) == round(0.75 * weight.numel())
        kept = weight != 0
        assert torch.equal(weight[kept], old[kept])  # kept weights untouched
        assert old[~kept].abs().max() <= old[kept].abs().min()  # the smallest magnitudes went
    assert torch.equal(model[0].bias, before["0.bias"])  # biases are not selected
    assert plan.masks == {} and plan.amount == 0.75  # finalized: the weights hold the zeros


def test_prune_global_with_a_layer_limit_reaches_the_total():
    model = _mlp()
    with torch.no_grad():
        model[4].weight.mul_(1e-3)  # ranks first in one global ranking
    prune_(model, PruningConfig(amount=0.9, scope="global", max_layer_amount=0.95))
    weights = [model[i].weight for i in (0, 2, 4)]
    assert sum(_zeros(w) for w in weights) == round(0.9 * sum(w.numel() for w in weights))
    assert _zeros(model[4].weight) == int(0.95 * 128)  # at its limit, not every weight


def test_prune_two_four_keeps_two_of_every_four_inputs():
    model = _mlp()
    plan = prune_(model, PruningConfig(mode="2:4", modules=nn.Linear), finalize=False)
    for index in (0, 2, 4):
        groups = model[index].weight.reshape(model[index].out_features, -1, 4)
        assert ((groups != 0).sum(-1) == 2).all()
    assert len(plan.masks) == 3 and plan.statistics()["weight_sparsity"] == 0.5


def test_prune_structured_removes_channels_and_keeps_the_outputs():
    model = _mlp()
    x = torch.randn(8, 16)
    plan = PruningPlan(model, PruningConfig(amount=0.5, mode="structured", round_to=1), x[:1])
    plan.compute_masks(0.5)
    plan.apply()
    with torch.no_grad():
        masked = model(x)
    assert plan.statistics()["removed_channels"] == 32.0  # 16 of 32 hidden units in each of two layers
    diff = plan.finalize(check_inputs=[x])
    widths = [model[0].out_features, model[2].in_features, model[2].out_features, model[4].in_features]
    assert widths == [16, 16, 16, 16]
    assert diff < 1e-5 and plan.max_abs_diff == diff
    with torch.no_grad():
        assert torch.allclose(model(x), masked, atol=1e-5)
    assert sum(map(len, plan.removed.values())) == 32  # the history stays for checkpoints


def test_layers_with_a_parametrized_weight_are_left_out_with_a_reason():
    from torch.nn.utils.parametrizations import weight_norm

    from lightning_compress import export

    model = _mlp()
    model[2] = weight_norm(model[2])  # its `weight` is computed from `g` and `v` at each call
    with pytest.warns(
        UserWarning, match=r"leaves out \['2'\]: their `weight` is computed .*remove_parametrizations"
    ):
        plan = prune_(model, PruningConfig(amount=0.5))
    assert plan.amount == 0.5
    assert [_zeros(model[i].weight) for i in (0, 2, 4)] == [256, 0, 64]
    # Structured: the channel groups through it are left out, with the reason (here: both hidden groups).
    model, x = _mlp(), torch.randn(2, 16)
    model[2] = weight_norm(model[2])
    with pytest.raises(ValueError, match=r"no prunable channel group \('0': '2' has a parametrized weight"):
        PruningPlan(model, PruningConfig(amount=0.5, mode="structured", round_to=1), x[:1])
    with pytest.raises(ValueError, match=r"`format='torch'` pickles the whole module.*parametrized"):
        export(model, "unused.pt", "torch", x)
    # The older hook-based forms too.
    for older in (torch.nn.utils.weight_norm, torch.nn.utils.spectral_norm):
        model = _mlp()
        model[2] = older(model[2])
        with pytest.warns(UserWarning, match=r"leaves out \['2'\]"):
            prune_(model, PruningConfig(amount=0.5))


def test_masks_only_grow_and_the_plan_survives_a_state_dict_round_trip():
    model = _mlp()
    config = PruningConfig(amount=0.8, criterion="random", seed=3)
    plan = PruningPlan(model, config)
    first = {k: v.clone() for k, v in plan.compute_masks(0.4).items()}
    plan.apply()
    second = plan.compute_masks(0.8)
    for name, mask in first.items():
        assert not (second[name] & ~mask).any()  # nothing pruned comes back
        assert int((~second[name]).sum()) == round(0.8 * mask.numel())
    state = plan.state_dict()
    again = PruningPlan(_mlp(), config)
    again.load_state_dict(state)
    assert again.amount == 0.8 and again.masks.keys() == second.keys()
    assert all(torch.equal(again.masks[k], second[k]) for k in second)
    assert torch.equal(again.generator.get_state(), plan.generator.get_state())


def test_taylor_structured_ranks_by_the_gradients_given():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    grads = {n: torch.ones_like(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        model[0].weight.copy_(torch.arange(1.0, 9.0).reshape(8, 1).expand(8, 4))
        model[0].bias.zero_()
        model[2].weight.fill_(1.0)
    config = PruningConfig(amount=0.5, mode="structured", criterion="taylor", round_to=1)
    plan = prune_(model, config, example_input=torch.randn(1, 4), grads=grads, finalize=False)
    assert plan.removed == {"0": [0, 1, 2, 3]}  # |w * g| smallest for the first four units
    with pytest.raises(ValueError, match="needs gradients"):
        prune_(model, config, example_input=torch.randn(1, 4))


def test_plan_keeps_zeros_through_optimizer_steps_and_parks_adam_state():
    model = _mlp()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    plan = PruningPlan(model, PruningConfig(amount=0.5))
    plan.compute_masks(0.5)
    plan.apply()
    for _ in range(3):
        model(torch.randn(4, 16)).sum().backward()
        plan.mask_gradients()
        optimizer.step()
        plan.mask_weights()
        optimizer.zero_grad()
    plan.park_optimizer_state([optimizer])
    for name, mask in plan.masks.items():
        param = plan.params[name]
        assert _zeros(param[~mask]) == int((~mask).sum())
        assert torch.equal(optimizer.state[param]["exp_avg"][~mask], torch.zeros(int((~mask).sum())))
        assert bool((optimizer.state[param]["exp_avg_sq"][~mask] == 1.0).all())


def test_config_checks_name_the_argument():
    with pytest.raises(ValueError, match=r"`scope='global'` does not apply to `mode='2:4'`"):
        PruningConfig(mode="2:4", scope="global")
    with pytest.raises(ValueError, match=r"`max_layer_amount=0.5` must be in \[amount, 1\]"):
        PruningConfig(amount=0.9, scope="global", max_layer_amount=0.5)
    with pytest.raises(ValueError, match=r"`round_to=0` must be a positive integer"):
        PruningConfig(amount=0.5, mode="structured", round_to=0)
    with pytest.raises(ValueError, match=r"`modules=\[\]` is empty"):
        PruningConfig(amount=0.5, modules=[])
    config = PruningConfig(mode="1:4")
    assert (config.kind, config.amount, config.nm) == ("N:M", 0.75, (1, 4))
    with pytest.raises(AttributeError):
        config.amount = 0.5  # frozen


def test_structured_without_an_example_input_says_what_to_pass():
    with pytest.raises(ValueError, match="needs an example input"):
        PruningPlan(_mlp(), PruningConfig(amount=0.5, mode="structured"))


def test_a_quiet_plan_warns_nothing():
    model = _mlp()
    with torch.no_grad():
        model[4].weight.mul_(1e-6)
    config = PruningConfig(amount=0.9, scope="global")
    with pytest.warns(UserWarning, match=r"prune_ pruned every weight of \['4.weight'\]"):
        prune_(model, config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        PruningPlan(_mlp(), config, quiet=True).compute_masks(0.9)


def test_schedule_moves_an_end_past_the_fit_onto_its_last_step():
    schedule = pruning_schedule(PruningConfig(amount=0.5), 10, 1000, steps=100)
    assert (schedule.start, schedule.end, schedule.frequency) == (10, 99, 4)
    assert schedule.value(99) == 0.5
    nm = pruning_schedule(PruningConfig(mode="2:4"), 5, 50, steps=100)
    assert (nm.end, nm.value(4), nm.value(5)) == (5, 0.5, 0.5)  # the pattern applies whole at start
    with pytest.raises(
        ValueError, match=r"`start='epoch:9'` is optimizer step 90, but this fit has 20 steps"
    ):
        pruning_schedule(PruningConfig(amount=0.5), 90, 95, steps=20, start_point="epoch:9")


def test_load_pruned_checkpoint_replays_the_plan_on_a_fresh_model():
    model = _mlp()
    plan = prune_(
        model, PruningConfig(amount=0.5, mode="structured", round_to=1), example_input=torch.randn(1, 16)
    )
    state = {"mode": "structured", "plan": plan.removed}
    checkpoint = {
        "state_dict": model.state_dict(),
        "callbacks": {"GradualPruning{'mode': 'structured'}": state},
    }
    checkpoint["state_dict"][HINT_PREFIX + "a hint"] = torch.zeros(0)
    fresh = load_pruned_checkpoint(_mlp(), checkpoint, example_input=torch.randn(1, 16))
    x = torch.randn(4, 16)
    assert fresh[0].out_features == 16 and torch.equal(fresh(x), model(x))


def test_the_hint_prefix_is_the_one_checkpoints_use():
    assert HINT_PREFIX == _lightning.HINT_PREFIX


def test_load_pruned_checkpoint_rebuilds_factorized_layers_before_replaying_the_plan():
    from lightning_compress.low_rank import factorize

    # A LowRankReplacement ran before the pruning: the plan names the factors' channels.
    model = _mlp()
    model[2] = factorize(model[2], rank=8)
    plan = prune_(
        model, PruningConfig(amount=0.5, mode="structured", round_to=1), example_input=torch.randn(1, 16)
    )
    assert any(root.startswith("2.") for root in plan.removed)
    state = {"mode": "structured", "plan": plan.removed, "materialized": True}
    low_rank = {"layers": {"2": {"kind": "linear", "rank": 8}}}  # the rank before the pruning cut it
    callbacks = {"LowRankReplacement{'rank': 8}": low_rank, "GradualPruning{'mode': 'structured'}": state}
    checkpoint = {"state_dict": model.state_dict(), "callbacks": callbacks}
    fresh = load_pruned_checkpoint(_mlp(), checkpoint, example_input=torch.randn(1, 16))
    x = torch.randn(4, 16)
    assert fresh[2].first.out_features == model[2].first.out_features and torch.equal(fresh(x), model(x))
