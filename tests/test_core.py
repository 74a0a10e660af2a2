"""core/: validation, parameter selection, schedules, batch access, surgery, optimizer hooks."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from lightning_reg.core.batch import BatchSlot
from lightning_reg.core.hooks import OptimizerStepHooks
from lightning_reg.core.params import ParamSelection
from lightning_reg.core.random import CallbackRNG, mix_seed, seeded_global_rng
from lightning_reg.core.schedules import (
    CallableSchedule,
    ConstantSchedule,
    CosineSchedule,
    LinearSchedule,
    StepSchedule,
    as_schedule,
)
from lightning_reg.core.surgery import (
    SurgeryWrapper,
    TransparentWrapper,
    format_changes,
    replace_modules,
    restore_modules,
    training_flags_restored,
)
from lightning_reg.core.validation import (
    check_choice,
    check_int,
    check_non_negative,
    check_positive,
    check_probability,
)

# ---------------------------------------------------------------- validation


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_checks_accept_exactly_the_finite_values_in_range(x):
    ok = math.isfinite(x) and x >= 0
    if ok:
        assert check_non_negative("strength", x) == x
    else:
        with pytest.raises(ValueError, match=r"`strength`.*got"):
            check_non_negative("strength", x)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 0.0, -1.0])
def test_check_positive_rejects_nan_inf_and_non_positive(bad):
    with pytest.raises(ValueError, match=r"`r` must be a finite number in \(0, inf\), got"):
        check_positive("r", bad)


def test_probability_ends_and_types():
    assert check_probability("p", 0.0) == 0.0
    with pytest.raises(ValueError, match=r"`p` must be a finite number in \[0, 1\), got 1.0"):
        check_probability("p", 1.0, allow_one=False)
    for bad in ("0.5", None, True, [0.5]):
        with pytest.raises(TypeError, match="`p`"):
            check_probability("p", bad)
    with pytest.raises(TypeError, match="`n`"):
        check_int("n", 2.0)
    with pytest.raises(ValueError, match=r"`n` must be in \[1, inf\], got 0"):
        check_int("n", 0, minimum=1)
    with pytest.raises(ValueError, match=r"`n` must be in \[-inf, 3\], got 4"):
        check_int("n", 4, maximum=3)
    with pytest.raises(ValueError, match="`mode` must be one of 'a', 'b'; got 'c'"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(ValueError, match=r"`kind` must be one of 'a'; got \[1\]"):
        check_choice("kind", [1], {"a": 1})  # unhashable value, dict of choices
    assert check_probability("p", torch.tensor(0.25)) == 0.25  # one-element tensors are numbers
    with pytest.raises(TypeError, match="`p` must be a real number"):
        check_probability("p", torch.ones(2))


# ---------------------------------------------------------------- parameter selection


def test_weights_preset_on_torchvision_resnet_skips_biases_and_batchnorm():
    from torchvision.models import resnet18

    model = resnet18(weights=None)
    names = [s.name for s in ParamSelection("weights").select(model)]
    assert "conv1.weight" in names and "fc.weight" in names
    assert not any(n.endswith(".bias") for n in names)
    assert not any(".bn" in n or n.startswith("bn1") for n in names)
    assert len(ParamSelection("all").select(model)) == len(list(model.parameters()))


def test_globs_and_types_refine_the_selection():
    model = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    no_embed = ParamSelection("weights", exclude_types=(nn.Embedding,)).select(model)
    assert [s.name for s in no_embed] == ["1.weight", "3.weight"]
    only_last = ParamSelection("all", include=("3.*",)).select(model)
    assert [s.name for s in only_last] == ["3.weight", "3.bias"]
    linear_only = ParamSelection("all", include_types=nn.Linear, exclude=("*.bias",))
    assert [s.name for s in linear_only.select(model)] == ["1.weight", "3.weight"]


def test_shared_and_frozen_parameters():
    lin = nn.Linear(3, 3)
    model = nn.Sequential(lin, nn.ReLU(), lin, nn.Linear(3, 2))
    model[3].weight.requires_grad_(False)
    names = [s.name for s in ParamSelection("weights").select(model)]
    assert names == ["0.weight"]


def test_empty_selection_and_bad_specs():
    with pytest.raises(RuntimeError, match="matched no parameter"):
        ParamSelection("weights").select(nn.Sequential(nn.ReLU()))
    assert ParamSelection("weights").select(nn.ReLU(), allow_empty=True) == []
    with pytest.raises(ValueError, match="`params` must be one of 'weights', 'all'"):
        ParamSelection.coerce("biases")
    with pytest.raises(TypeError, match="params"):
        ParamSelection.coerce(42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="include_types"):
        ParamSelection(include_types=(int,))  # type: ignore[arg-type]


# ---------------------------------------------------------------- schedules


@given(st.floats(-5, 5), st.floats(-5, 5), st.integers(1, 50), st.integers(0, 100))
def test_linear_and_cosine_schedules_hit_their_ends_and_stay_between(start, end, duration, t):
    for schedule in (LinearSchedule(start, end, duration), CosineSchedule(start, end, duration)):
        assert schedule.at(0) == pytest.approx(start)
        assert schedule.at(duration) == pytest.approx(end)
        assert min(start, end) - 1e-9 <= schedule.at(t) <= max(start, end) + 1e-9
        if t >= duration:
            assert schedule.at(t) == pytest.approx(end)


def test_step_constant_callable_and_units():
    s = StepSchedule([0.5, 0.1, 0.0], boundaries=[2, 5], unit="step")
    assert [s.value(epoch=0, step=t) for t in (0, 2, 4, 5, 9)] == [0.5, 0.1, 0.1, 0.0, 0.0]
    assert ConstantSchedule(0.3).value(epoch=7, step=100) == 0.3
    assert CallableSchedule(lambda e: 0.1 * e).value(epoch=3, step=0) == pytest.approx(0.3)
    assert isinstance(as_schedule(0.2), ConstantSchedule)
    with pytest.raises(ValueError, match=r"boundaries\) \+ 1 = 4 entries, got 2"):
        StepSchedule([1.0, 2.0], boundaries=[1, 2, 3])
    with pytest.raises(ValueError, match=r"`boundaries` must be strictly increasing, got \[3, 1\]"):
        StepSchedule([1.0, 2.0, 3.0], boundaries=[3, 1])
    with pytest.raises(ValueError, match="unit"):
        LinearSchedule(0, 1, 5, unit="batch")
    with pytest.raises(ValueError, match="start"):
        LinearSchedule(float("nan"), 1, 5)
    with pytest.raises(TypeError, match="`schedule` must be a number, a Schedule or a callable"):
        as_schedule("cosine")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="`schedule value` must be a finite number"):
        CallableSchedule(lambda e: float("nan")).at(0)


# ---------------------------------------------------------------- batch access


def test_batch_slot_reads_and_writes_lists_and_dicts():
    x = torch.ones(2)
    batch = [x, torch.zeros(2)]
    BatchSlot(0).set(batch, x * 3)
    assert torch.equal(BatchSlot(0).get(batch), torch.full((2,), 3.0))
    d = {"image": x, "label": torch.zeros(2)}
    BatchSlot("label", role="target").set(d, torch.ones(2))
    assert torch.equal(d["label"], torch.ones(2))


def test_batch_slot_errors_say_what_to_do():
    with pytest.raises(RuntimeError, match=r"tuple.*list or a dict"):
        BatchSlot(0).get((torch.ones(1), torch.ones(1)))
    with pytest.raises(RuntimeError, match=r"target_key='y'.*available"):
        BatchSlot("y", role="target").get({"x": torch.ones(1)})
    with pytest.raises(RuntimeError, match="not a tensor"):
        BatchSlot(1).get([torch.ones(1), "label"])
    with pytest.raises(RuntimeError, match=r"batch is a str\..*list or a dict"):
        BatchSlot(0).get("not a batch")
    with pytest.raises(TypeError, match="input_key"):
        BatchSlot(1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="`setter` must be callable"):
        BatchSlot(0, setter=3)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="pass `setter=` too"):
        BatchSlot(0, getter=lambda b: b[0]).set([torch.ones(1)], torch.zeros(1))


def test_batch_slot_user_functions():
    class Pair:
        def __init__(self):
            self.inputs = torch.zeros(1)

    pair = Pair()
    slot = BatchSlot(0, getter=lambda b: b.inputs, setter=lambda b, v: setattr(b, "inputs", v))
    slot.set(pair, torch.ones(1))
    assert torch.equal(slot.get(pair), torch.ones(1))


# ---------------------------------------------------------------- surgery


class Wrapped(SurgeryWrapper):
    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)

    def unwrap(self) -> nn.Module:
        return self.inner


def test_replace_and_restore_round_trip():
    model = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Sequential(nn.Linear(2, 2), nn.ReLU()))
    original = [type(m) for m in model.modules()]
    changes = replace_modules(model, {nn.Linear: lambda m, path: Wrapped(m)})
    assert [c.path for c in changes] == ["0", "2.0"]
    assert all(c.old_type == "Linear" and c.new_type == "Wrapped" for c in changes)
    assert format_changes(changes, "test") == "test: 2 module(s) changed\n  Linear -> Wrapped  x2"
    assert format_changes([], "test") == "test: no module changed"
    with pytest.raises(RuntimeError, match="already wrapped"):
        replace_modules(model, {nn.Linear: Wrapped}, refuse_if_contains=(Wrapped,))
    restored = restore_modules(model, Wrapped)
    assert len(restored) == 2
    assert [type(m) for m in model.modules()] == original


def test_policy_returning_a_non_module_fails():
    with pytest.raises(TypeError, match=r"must return an nn\.Module or None"):
        replace_modules(nn.Sequential(nn.ReLU()), {nn.ReLU: lambda m, p: 3})


def test_transparent_wrapper_checkpoints_load_both_ways_and_flags_are_restored():
    plain = nn.Sequential(nn.Linear(2, 2), nn.BatchNorm1d(2))
    wrapped = nn.Sequential(nn.Linear(2, 2), TransparentWrapper(nn.BatchNorm1d(2)))
    state = wrapped.state_dict()
    assert list(state) == list(plain.state_dict())  # no `.module.` level
    assert state._metadata["1"] == plain.state_dict()._metadata["1"]  # BN version travels
    plain.load_state_dict(state)
    wrapped.load_state_dict({k: v + 1 for k, v in plain.state_dict().items()})
    assert torch.equal(wrapped[1].module.running_mean, plain[1].running_mean + 1)
    wrapped[1].module.eval()
    with training_flags_restored(wrapped) as modules:
        wrapped.train()
        assert len(modules) == 4 and wrapped[1].module.training
    assert wrapped.training and not wrapped[1].module.training


# ---------------------------------------------------------------- random streams


def test_mix_seed_is_a_fixed_function():
    # Pinned: changing these values changes every seeded run of every callback.
    assert mix_seed(0) == 7070836379803831727
    assert mix_seed(1, 2, 3) == 5797055558538453683
    assert mix_seed(-1) == 7266964230113668128


def test_callback_rng_is_per_step_resumable_and_seeded():
    cpu = torch.device("cpu")
    a, b = CallbackRNG(seed=7, salt=1), CallbackRNG(seed=7, salt=1)
    draws = [torch.rand(3, generator=a.next(cpu)[0]) for _ in range(3)]
    assert not torch.equal(draws[0], draws[1])
    b.load_state_dict(CallbackRNG(seed=7, salt=1).state_dict() | {"counter": 2})
    assert torch.equal(torch.rand(3, generator=b.next(cpu)[0]), draws[2])
    assert a.state_dict() == {"seed": 7, "counter": 3}
    other_salt = CallbackRNG(seed=7, salt=2).next(cpu)[1]
    assert other_salt != CallbackRNG(seed=7, salt=1).next(cpu)[1]
    with pytest.raises(TypeError, match="`seed` must be an integer"):
        CallbackRNG(seed=1.5)  # type: ignore[arg-type]


def test_seeded_global_rng_is_deterministic_and_restores_the_global_stream():
    torch.manual_seed(0)
    expected_next = torch.rand(2)
    torch.manual_seed(0)
    with seeded_global_rng(123, torch.device("cpu")):
        first = torch.rand(2)
    with seeded_global_rng(123, torch.device("cpu")):
        assert torch.equal(torch.rand(2), first)
    assert torch.equal(torch.rand(2), expected_next)


# ---------------------------------------------------------------- optimizer hooks


def test_before_step_runs_after_the_closure_and_before_the_update():
    w = nn.Parameter(torch.ones(1))
    opt = torch.optim.SGD([w], lr=0.1)
    seen = []

    def before(optimizer):
        seen.append(("before", w.grad.clone() if w.grad is not None else None, w.item()))

    def after(optimizer):
        seen.append(("after", None, w.item()))

    hooks = OptimizerStepHooks(before_step=before, after_step=after)
    hooks.attach([opt])

    def closure():
        opt.zero_grad()
        (w * 2).sum().backward()
        return torch.tensor(0.0)

    opt.step(closure=closure)  # Lightning's non-AMP path
    w.grad = None
    opt.step(closure)  # closure as a positional argument
    opt.step()  # AMP path: gradients already exist
    assert [s[0] for s in seen] == ["before", "after"] * 3
    # Every before_step saw this step's gradients, and ran before the update.
    assert [s[1].item() for s in seen[::2]] == [2.0, 2.0, 2.0]
    assert seen[0][2] == 1.0 and seen[1][2] == pytest.approx(0.8)
    assert seen[2][2] == pytest.approx(0.8) and seen[3][2] == pytest.approx(0.6)
    hooks.detach()
    opt.step()
    assert len(seen) == 6


def test_hooks_do_not_run_on_a_step_skipped_by_grad_scaler():
    w = nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=0.1)
    calls = []
    hooks = OptimizerStepHooks(after_step=lambda o: calls.append(1))
    hooks.attach([opt])
    scaler = torch.amp.GradScaler("cpu", init_scale=4.0)
    scaler.scale((w * float("inf")).sum()).backward()
    scaler.step(opt)
    scaler.update()
    assert calls == []
    opt.zero_grad()
    scaler.scale((w * 2).sum()).backward()
    scaler.step(opt)
    assert calls == [1]
    hooks.detach()


# ----------------------------------------- the "weights" rule against the zoos' own rules


def _names(model: nn.Module) -> set[str]:
    return {s.name for s in ParamSelection("weights").select(model)}


def test_weights_rule_equals_timms_own_grouping_on_a_vit():
    timm = pytest.importorskip("timm")
    from timm.optim import param_groups_weight_decay

    vit = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2
    )
    groups = param_groups_weight_decay(vit, 0.05, no_weight_decay_list=vit.no_weight_decay())
    decayed = {id(p) for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    expected = {n for n, p in vit.named_parameters() if id(p) in decayed}
    assert _names(vit) == expected
    assert not {"pos_embed", "cls_token"} & _names(vit)


def test_timm_declarations_are_read_on_submodules_with_their_prefix():
    class Declares(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.table = nn.Parameter(torch.zeros(3, 3))  # 2-D: a weight unless declared
            self.relative_position_bias_table = nn.Parameter(torch.zeros(4, 2))
            self.proj = nn.Linear(3, 3)

        def no_weight_decay(self) -> set[str]:
            return {"table"}

        def no_weight_decay_keywords(self) -> set[str]:
            return {"relative_position"}

    wrapper = nn.Module()
    wrapper.model = Declares()  # a LightningModule holding a timm model looks like this
    wrapper.other = nn.Linear(3, 3)
    wrapper.other_table = nn.Parameter(torch.zeros(2, 2))  # same short name, not declared
    assert _names(wrapper) == {"model.proj.weight", "other.weight", "other_table"}


def test_weights_rule_equals_hugging_face_trainer_minus_positional_embeddings():
    transformers = pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification
    from transformers.pytorch_utils import ALL_LAYERNORM_LAYERS
    from transformers.trainer_pt_utils import get_parameter_names

    config = BertConfig(
        vocab_size=50,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
    )
    model = BertForSequenceClassification(config)
    hf = set(get_parameter_names(model, ALL_LAYERNORM_LAYERS, ["bias", "layernorm", "rmsnorm"]))
    assert hf == set(transformers.Trainer.get_decay_parameter_names(None, model))
    positional = {n for n in hf if "position_embeddings" in n}
    assert positional == {"bert.embeddings.position_embeddings.weight"}
    assert _names(model) == hf - positional


def test_unit_dim_is_1_for_conv_transpose_and_0_elsewhere():
    model = nn.Sequential(
        nn.ConvTranspose1d(2, 3, 3),
        nn.ConvTranspose3d(2, 3, 1),
        nn.Conv2d(3, 4, 1),
        nn.Linear(2, 2),
    )
    dims = {s.name: s.unit_dim for s in ParamSelection("weights").select(model)}
    assert dims == {"0.weight": 1, "1.weight": 1, "2.weight": 0, "3.weight": 0}


def test_custom_norm_classes_and_class_tokens_are_not_weights():
    class LlamaRMSNorm(nn.Module):  # Hugging Face's own norm classes subclass nn.Module
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(2, 2))

    model = nn.Module()
    model.norm_layer = LlamaRMSNorm()
    model.class_token = nn.Parameter(torch.zeros(1, 1, 4))
    model.encoder = nn.Module()
    model.encoder.pos_embedding = nn.Parameter(torch.zeros(1, 5, 4))  # torchvision ViT names
    model.fc = nn.Linear(4, 2)
    assert _names(model) == {"fc.weight"}
