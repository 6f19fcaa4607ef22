"""The optimiser side of a step: schedule, accumulation, clipping, LR groups, precision, channels-last, state."""

from __future__ import annotations

import copy
import dataclasses
import io
import math
import warnings

import pytest
import torch
from torch import nn

import retrieval.optimization as optimization_module
from retrieval.config import TrainConfig, load_config
from retrieval.errors import ConfigError
from retrieval.models.backbones import IMAGENET_MEAN, IMAGENET_STD, Backbone
from retrieval.models.encoder import ImageEncoder
from retrieval.optimization import Optimization, lr_factor


class ScaledMSE(nn.Module):
    """A loss with a parameter of its own (as the class losses have), averaged over the batch."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.5))

    def forward(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((outputs * self.scale - targets) ** 2).mean()


def tiny_encoder(freeze_backbone: bool, seed: int = 0) -> ImageEncoder:
    """A conv backbone (with an unused ImageNet-style classifier, as real backbones have) and a linear projection."""
    torch.manual_seed(seed)
    trunk = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    backbone = Backbone(trunk, feature_dim=4, mean=IMAGENET_MEAN, std=IMAGENET_STD, image_size=8,
                        classifier=nn.Linear(4, 10))
    return ImageEncoder(backbone, out_dim=3, freeze_backbone=freeze_backbone)


def tiny_mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3))


def data(count: int, seed: int = 1, images: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (count, 3, 8, 8) if images else (count, 6)
    return torch.randn(shape, generator=generator), torch.randn(count, 3, generator=generator)


def train(**settings) -> TrainConfig:
    return dataclasses.replace(TrainConfig(), **settings)


def params_of(*modules: nn.Module) -> list[torch.Tensor]:
    return [p.detach().clone() for module in modules for p in module.parameters()]


def differ(first: list[torch.Tensor], second: list[torch.Tensor]) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(first, second, strict=True))


# -- config ------------------------------------------------------------------------------------
def test_config_defaults_are_todays_plain_fp32_adamw_and_choices_are_checked():
    default = TrainConfig()
    assert (default.precision, default.backbone_lr, default.warmup_steps, default.lr_schedule,
            default.grad_clip_norm, default.grad_accumulation, default.channels_last) == \
        ("fp32", None, 0, "constant", None, 1, "auto")
    config = load_config(None, ["train.precision=bf16", "train.channels_last=true", "train.lr_schedule=cosine",
                                "train.grad_accumulation=4", "train.grad_clip_norm=1", "model.freeze_backbone=false",
                                "train.backbone_lr=0.0001"])
    assert (config.train.precision, config.train.channels_last, config.train.grad_clip_norm,
            config.train.backbone_lr) == ("bf16", True, 1.0, 1e-4)
    for override, message in [
        ("train.precision=fp64", "train.precision: must be one of fp32, bf16, fp16; got 'fp64'"),
        ("train.lr_schedule=linear", "train.lr_schedule: must be one of constant, cosine; got 'linear'"),
        ("train.channels_last=sometimes", "train.channels_last: must be one of auto, true, false; got 'sometimes'"),
        ("train.grad_accumulation=0", "config.train.grad_accumulation: must be at least 1, got 0"),
        ("train.warmup_steps=-1", "config.train.warmup_steps: must be at least 0, got -1"),
        ("train.grad_clip_norm=0", "config.train.grad_clip_norm: must be greater than 0.0, got 0.0"),
        ("train.backbone_lr=0.0001", "train.backbone_lr: set, but model.freeze_backbone is true, so no backbone "
                                   "trains; set model.freeze_backbone=false or drop train.backbone_lr"),
    ]:
        with pytest.raises(ConfigError) as error:
            load_config(None, [override])
        assert str(error.value) == message


# -- schedule ----------------------------------------------------------------------------------
def test_warmup_then_cosine_against_hand_computed_factors():
    # 4 warm-up steps ramp (n+1)/5; cosine over the remaining 8 steps: 0.5 (1 + cos(pi (n-4)/8))
    expected = [0.2, 0.4, 0.6, 0.8, 1.0, 0.9619397662556434, 0.8535533905932737, 0.6913417161825449, 0.5,
                0.3086582838174551, 0.14644660940672624, 0.038060233744356624, 0.0]
    assert [lr_factor(n, 4, "cosine", 12) for n in range(13)] == pytest.approx(expected, abs=1e-12)
    assert [lr_factor(n, 2, "constant", 12) for n in range(5)] == pytest.approx([1 / 3, 2 / 3, 1, 1, 1], abs=1e-12)
    assert lr_factor(0, 0, "cosine", 10) == 1.0 and lr_factor(5, 0, "cosine", 10) == pytest.approx(0.5, abs=1e-12)


def test_the_optimizer_uses_the_scheduled_lr_once_per_accumulation_cycle():
    model, loss_fn = tiny_mlp(), ScaledMSE()
    opt = Optimization(train(lr=0.1, warmup_steps=4, lr_schedule="cosine", grad_accumulation=2), model, loss_fn,
                       "cpu", total_steps=12)
    x, y = data(2)
    used = []
    for _ in range(24):  # 12 optimizer steps of 2 micro-batches
        lr_before = opt.lr
        opt.backward(loss_fn(model(x), y))
        if opt.step():
            used.append(lr_before)
        else:
            assert opt.lr == lr_before  # a micro-batch inside a cycle leaves the schedule alone
    assert used[:4] == pytest.approx([0.02, 0.04, 0.06, 0.08], abs=1e-12)  # warm-up
    assert used[4] == pytest.approx(0.1, abs=1e-12)
    assert used[8] == pytest.approx(0.05, abs=1e-12)  # cosine midpoint
    assert used[11] == pytest.approx(0.1 * 0.038060233744356624, abs=1e-12)  # the last step
    assert opt.lr == pytest.approx(0.0, abs=1e-15) and opt.optimizer_steps == 12  # the end of the run


# -- accumulation and clipping -----------------------------------------------------------------
def captured_grads(opt: Optimization) -> list[list[torch.Tensor]]:
    """The gradients AdamW sees, recorded at each of its steps."""
    seen: list[list[torch.Tensor]] = []
    opt.optimizer.register_step_pre_hook(lambda optimizer, args, kwargs: seen.append(
        [p.grad.clone() for group in optimizer.param_groups for p in group["params"]]))
    return seen


def test_accumulating_k_micro_batches_equals_one_step_on_their_concatenation():
    """Mean loss over equal micro-batches: k backward passes of loss/k give the gradient of the whole batch.
    Two optimizer steps; parameters agree to 1e-6 (only the float summation order differs)."""
    x, y = data(24)
    whole_model, whole_loss = tiny_mlp(), ScaledMSE()
    whole = Optimization(train(lr=0.01), whole_model, whole_loss, "cpu", total_steps=2)
    whole_grads = captured_grads(whole)
    for batch in range(2):
        rows = slice(12 * batch, 12 * (batch + 1))
        whole.backward(whole_loss(whole_model(x[rows]), y[rows]))
        assert whole.step()

    parts_model, parts_loss = tiny_mlp(), ScaledMSE()
    parts = Optimization(train(lr=0.01, grad_accumulation=3), parts_model, parts_loss, "cpu", total_steps=2)
    parts_grads = captured_grads(parts)
    will_step, stepped = [], []
    for micro in range(6):
        rows = slice(4 * micro, 4 * (micro + 1))
        will_step.append(parts.will_step)
        parts.backward(parts_loss(parts_model(x[rows]), y[rows]))
        stepped.append(parts.step())
    assert will_step == stepped == [False, False, True, False, False, True]
    for got_step, want_step in zip(parts_grads, whole_grads, strict=True):  # the gradients AdamW stepped with
        for got, want in zip(got_step, want_step, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    for got, want in zip(params_of(parts_model, parts_loss), params_of(whole_model, whole_loss), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert differ(params_of(parts_model), params_of(tiny_mlp()))  # it did train


@pytest.mark.parametrize("max_norm", [0.05, 1e6])
def test_clipping_caps_the_total_gradient_norm_as_clip_grad_norm_does(max_norm):
    model, loss_fn = tiny_mlp(), ScaledMSE()
    reference_model, reference_loss = copy.deepcopy(model), copy.deepcopy(loss_fn)
    opt = Optimization(train(grad_clip_norm=max_norm), model, loss_fn, "cpu", total_steps=1)
    seen = captured_grads(opt)
    x, y = data(8)
    opt.backward(loss_fn(model(x), y))
    opt.step()

    reference_loss(reference_model(x), y).backward()
    reference = list(reference_model.parameters()) + list(reference_loss.parameters())
    unclipped = [p.grad.clone() for p in reference]
    norm = nn.utils.clip_grad_norm_(reference, max_norm)
    assert opt.last_grad_norm == norm
    for got, want in zip(seen[0], [p.grad for p in reference], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    total = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in seen[0]]))
    if max_norm < 1:
        assert norm > 10 * max_norm and total == pytest.approx(max_norm, rel=1e-5)  # it did clip, to max_norm
    else:
        assert all(torch.equal(g, u) for g, u in zip(seen[0], unclipped, strict=True))  # under the cap: untouched


# -- parameter groups --------------------------------------------------------------------------
def test_a_frozen_backbone_gives_one_group_with_todays_parameters_in_todays_order():
    encoder, loss_fn = tiny_encoder(freeze_backbone=True), ScaledMSE()
    opt = Optimization(train(lr=2e-3), encoder, loss_fn, "cpu", total_steps=1)
    today = [p for p in list(encoder.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    assert len(opt.optimizer.param_groups) == 1 and opt.backbone_lr is None
    assert [id(p) for p in opt.optimizer.param_groups[0]["params"]] == [id(p) for p in today]
    assert opt.lr == 2e-3


def test_a_training_backbone_gets_its_own_lr_and_the_head_train_lr():
    encoder, loss_fn = tiny_encoder(freeze_backbone=False), ScaledMSE()
    before = {name: p.detach().clone() for name, p in encoder.named_parameters()}
    opt = Optimization(train(lr=1e-2, backbone_lr=1e-4, weight_decay=0.0), encoder, loss_fn, "cpu", total_steps=1)
    backbone_group, head_group = opt.optimizer.param_groups
    assert [id(p) for p in backbone_group["params"]] == [id(p) for p in encoder.backbone.parameters()]
    assert [id(p) for p in head_group["params"]] == [id(p) for p in list(encoder.projection.parameters())
                                                     + list(loss_fn.parameters())]
    assert not any(p.requires_grad for p in encoder.classifier.parameters())  # the ImageNet head never trains
    assert (opt.backbone_lr, opt.lr) == (1e-4, 1e-2)
    images, targets = data(4, images=True)
    opt.backward(loss_fn(encoder(images), targets))
    opt.step()
    # AdamW's first step moves each parameter with a clear gradient by about its group's lr
    for name, p in encoder.named_parameters():
        moved = (p.detach() - before[name]).abs()
        if name.startswith("backbone."):
            assert moved.max().item() == pytest.approx(1e-4, rel=1e-2)
        elif name.startswith("projection."):
            assert moved.max().item() == pytest.approx(1e-2, rel=1e-2)
        else:  # the unused classifier gets no gradient and stays
            assert moved.max().item() == 0.0

    warm = Optimization(train(lr=1e-2, warmup_steps=1), tiny_encoder(freeze_backbone=False), ScaledMSE(), "cpu",
                        total_steps=4)
    assert (warm.backbone_lr, warm.lr) == (pytest.approx(0.5e-2), pytest.approx(0.5e-2))  # None: train.lr, scheduled


# -- precision ---------------------------------------------------------------------------------
def test_bf16_on_cpu_runs_matmuls_in_bf16_and_trains():
    model, loss_fn = tiny_mlp(), ScaledMSE()
    opt = Optimization(train(precision="bf16", lr=0.05), model, loss_fn, "cpu", total_steps=30)
    x, y = data(16)
    with opt.autocast():
        assert model(x).dtype == torch.bfloat16
    with Optimization(train(), tiny_mlp(), ScaledMSE(), "cpu", 1).autocast():
        assert model(x).dtype == torch.float32  # fp32: no autocast
    losses = []
    for _ in range(30):
        with opt.autocast():
            outputs = model(x)
        loss = loss_fn(outputs.float(), y)
        losses.append(loss.item())
        opt.backward(loss)
        opt.step()
    assert all(p.dtype == torch.float32 for p in model.parameters())  # master weights stay fp32
    assert losses[-1] < 0.5 * losses[0]


def test_fp16_is_refused_off_cuda_in_one_line():
    with pytest.raises(ConfigError) as error:
        Optimization(train(precision="fp16"), tiny_mlp(), ScaledMSE(), "cpu", total_steps=1)
    assert str(error.value) == ("train.precision: fp16 needs a CUDA device, and training runs on cpu; "
                                "use bf16 (or fp32) there")


@pytest.fixture
def cuda_scaler_on_cpu(monkeypatch):
    """Fake CUDA at the one point the fp16 path touches it: the gradient scaler, made on CPU instead."""
    made = []

    def cpu_scaler(device_kind: str, enabled: bool) -> torch.amp.GradScaler:
        made.append((device_kind, enabled))
        return torch.amp.GradScaler("cpu", enabled=enabled, init_scale=16.0)

    monkeypatch.setattr(optimization_module, "make_grad_scaler", cpu_scaler)
    return made


def test_fp16_scales_the_loss_unscales_before_clipping_and_skips_steps_with_inf(cuda_scaler_on_cpu):
    x, y = data(8)
    fp32_model, fp32_loss = tiny_mlp(), ScaledMSE()
    fp32 = Optimization(train(grad_clip_norm=0.05), fp32_model, fp32_loss, "cpu", total_steps=3)
    fp32_stepped = captured_grads(fp32)
    fp32.backward(fp32_loss(fp32_model(x), y))
    fp32_grads = [p.grad.clone() for p in fp32.parameters]
    fp32.step()

    model, loss_fn = tiny_mlp(), ScaledMSE()
    opt = Optimization(train(precision="fp16", grad_clip_norm=0.05), model, loss_fn, "cuda", total_steps=3)
    assert cuda_scaler_on_cpu[-1] == ("cuda", True)
    stepped = captured_grads(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # without a GPU, torch notes that CUDA autocast is off
        context = opt.autocast()
    assert (context.device, context.fast_dtype) == ("cuda", torch.float16)
    opt.backward(loss_fn(model(x), y))
    for got, want in zip([p.grad for p in opt.parameters], fp32_grads, strict=True):
        torch.testing.assert_close(got, 16.0 * want, rtol=0, atol=0)  # scaled by the scaler's 16
    assert opt.step()
    for got, want in zip(stepped[0], fp32_stepped[0], strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # AdamW saw the unscaled, clipped gradients
    for got, want in zip(params_of(model, loss_fn), params_of(fp32_model, fp32_loss), strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # unscaled, then clipped as in fp32
    assert opt.scaler.get_scale() == 16.0

    after_first = params_of(model, loss_fn)
    opt.backward(loss_fn(model(x), y) * math.inf)  # an overflow: inf/nan gradients
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the skipped step raises no scheduler warning
        assert opt.step()
    assert len(stepped) == 1  # AdamW did not step
    for got, want in zip(params_of(model, loss_fn), after_first, strict=True):
        assert torch.equal(got, want)  # the step was skipped ...
    assert opt.scaler.get_scale() == 8.0  # ... and the scale backed off
    assert all(p.grad is None for p in opt.parameters) and opt.optimizer_steps == 2


# -- channels-last -----------------------------------------------------------------------------
@pytest.mark.parametrize("setting, device, freeze_backbone, expected", [
    ("auto", "cuda", False, True), ("auto", "cuda", True, False), ("auto", "cpu", False, False),
    (True, "cpu", True, True), (False, "cuda", False, False),
])
def test_channels_last_where_set_and_only_for_image_batches(setting, device, freeze_backbone, expected):
    encoder = tiny_encoder(freeze_backbone=freeze_backbone)
    opt = Optimization(train(channels_last=setting), encoder, ScaledMSE(), device, total_steps=1)  # fp32: no CUDA call
    assert opt.channels_last is expected
    conv = opt.prepare_model(encoder).backbone[0].weight
    assert conv.is_contiguous(memory_format=torch.channels_last) is expected
    assert conv is encoder.backbone[0].weight  # the optimizer's parameters stay the same objects
    images = torch.randn(2, 3, 8, 8)
    assert opt.prepare_inputs(images).is_contiguous(memory_format=torch.channels_last) is expected
    features = torch.randn(2, 4)
    assert opt.prepare_inputs(features) is features  # cached feature batches pass untouched


# -- checkpoints -------------------------------------------------------------------------------
@pytest.mark.parametrize("precision, device", [("fp32", "cpu"), ("fp16", "cuda")])
def test_state_dict_round_trip_continues_exactly(precision, device, cuda_scaler_on_cpu):
    settings = train(precision=precision, lr=0.05, warmup_steps=2, lr_schedule="cosine", grad_clip_norm=0.5,
                     grad_accumulation=2)
    x, y = data(16)

    def run(model, loss_fn, opt, micro_batches):
        for micro in micro_batches:
            opt.backward(loss_fn(model(x[2 * micro:2 * micro + 2]), y[2 * micro:2 * micro + 2]))
            opt.step()

    model, loss_fn = tiny_mlp(), ScaledMSE()
    straight = Optimization(settings, model, loss_fn, device, total_steps=4)
    run(model, loss_fn, straight, range(8))

    first_model, first_loss = tiny_mlp(), ScaledMSE()
    first = Optimization(settings, first_model, first_loss, device, total_steps=4)
    run(first_model, first_loss, first, range(4))
    buffer = io.BytesIO()
    torch.save({"optimization": first.state_dict(), "model": first_model.state_dict(),
                "loss": first_loss.state_dict()}, buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    resumed_model, resumed_loss = tiny_mlp(seed=7), ScaledMSE()
    resumed_model.load_state_dict(saved["model"])
    resumed_loss.load_state_dict(saved["loss"])
    resumed = Optimization(settings, resumed_model, resumed_loss, device, total_steps=4)
    resumed.load_state_dict(saved["optimization"])
    assert (resumed.micro_steps, resumed.lr) == (4, first.lr)
    run(resumed_model, resumed_loss, resumed, range(4, 8))
    for got, want in zip(params_of(resumed_model, resumed_loss), params_of(model, loss_fn), strict=True):
        assert torch.equal(got, want)
    assert resumed.lr == straight.lr and resumed.scaler.get_scale() == straight.scaler.get_scale()


def test_a_state_from_other_parameter_groups_is_refused_in_one_line():
    frozen = Optimization(train(), tiny_encoder(freeze_backbone=True), ScaledMSE(), "cpu", total_steps=1)
    training = Optimization(train(), tiny_encoder(freeze_backbone=False), ScaledMSE(), "cpu", total_steps=1)
    with pytest.raises(ConfigError, match=r"^the saved optimizer state has parameter groups of \[3\] tensors, "
                                          r"this run \[2, 3\]; resume with"):
        training.load_state_dict(frozen.state_dict())


# -- defaults ----------------------------------------------------------------------------------
def test_the_default_settings_update_parameters_exactly_as_todays_adamw_loop():
    images, targets = data(6, images=True)
    config = TrainConfig()

    encoder, loss_fn = tiny_encoder(freeze_backbone=True), ScaledMSE()
    parameters = [p for p in list(encoder.parameters()) + list(loss_fn.parameters()) if p.requires_grad]
    today = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=config.weight_decay)
    for step in range(3):
        rows = slice(2 * step, 2 * step + 2)
        today.zero_grad(set_to_none=True)
        loss_fn(encoder(images[rows]), targets[rows]).backward()
        today.step()

    new_encoder, new_loss = tiny_encoder(freeze_backbone=True), ScaledMSE()
    opt = Optimization(config, new_encoder, new_loss, "cpu", total_steps=3)
    assert opt.prepare_model(new_encoder) is new_encoder and opt.channels_last is False
    for step in range(3):
        rows = slice(2 * step, 2 * step + 2)
        with opt.autocast():
            loss = new_loss(new_encoder(opt.prepare_inputs(images[rows])), targets[rows])
        opt.backward(loss)
        assert opt.step()
    for got, want in zip(params_of(new_encoder, new_loss), params_of(encoder, loss_fn), strict=True):
        assert torch.equal(got, want)
    assert differ(params_of(new_encoder.projection), params_of(tiny_encoder(freeze_backbone=True).projection))


def test_closing_a_cycle_early_steps_with_what_was_accumulated():
    """An epoch's last batch closes its accumulation cycle: no gradient carries into the next epoch."""
    model, loss_fn = tiny_mlp(), ScaledMSE()
    opt = Optimization(train(grad_accumulation=3, weight_decay=0.0), model, loss_fn, "cpu", total_steps=2)
    inputs, targets = data(4)
    stepped = []
    for row in range(4):
        assert opt.will_step == (row == 2)
        opt.backward(loss_fn(model(inputs[row:row + 1]), targets[row:row + 1]))
        stepped.append(opt.step(close_cycle=row == 3))
    assert stepped == [False, False, True, True] and opt.optimizer_steps == 2 and opt.micro_steps == 4
    assert all(p.grad is None for p in opt.parameters)
    assert opt.state_dict()["completed_steps"] == 2
