"""The architecture zoo and the named recipes: shapes, seeding, option checks, ONNX export parity."""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from codec.errors import ConfigError, ShapeError
from codec.models import (
    ARCHITECTURES,
    RECIPES,
    TRAIN_KEYS,
    Recipe,
    architecture_options,
    autoencoder_widths,
    build_model,
    get_recipe,
    list_recipes,
)

MNIST = (1, 28, 28)
CIFAR = (3, 32, 32)
TINY = 0.0625  # every hidden width / channel count x 1/16: fast to build, run and export
# What each data spec used by the recipes yields per example (owned by codec.runtime.data).
DATASET_SHAPES = {
    "mnist": MNIST,
    "fashion_mnist": MNIST,
    "mnist_small": MNIST,
    "cifar10": CIFAR,
    "cifar10_jpeg": CIFAR,
}
ALLOWED_MODULES = (
    nn.Flatten,
    nn.Linear,
    nn.Conv2d,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.Dropout,
)


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("shape", [MNIST, CIFAR], ids=["mnist", "cifar"])
@pytest.mark.parametrize(
    "arch", sorted(set(ARCHITECTURES) - {"resnet"})
)  # resnet is a DAG: tests/test_ir_dag.py
def test_output_shape_and_allowed_modules(arch, shape):
    model = build_model(arch, shape, 7, width=TINY, seed=0)
    assert isinstance(model, nn.Sequential)
    for module in model:
        assert isinstance(module, ALLOWED_MODULES), f"{arch}: {type(module).__name__} is not an allowed layer"
        if isinstance(module, nn.Conv2d):
            assert module.groups == 1
    out = model.eval()(torch.rand(5, *shape))
    expected = (5, math.prod(shape)) if arch == "autoencoder" else (5, 7)
    assert tuple(out.shape) == expected
    assert torch.isfinite(out).all()


def test_classifiers_output_logits_and_autoencoder_sigmoid_reconstructions():
    for arch in ("classifier", "alexnet", "vgg16", "cifar10_quick"):
        last = build_model(arch, CIFAR, 10, width=TINY)[-1]
        assert isinstance(last, nn.Linear) and last.out_features == 10
    ae = build_model("autoencoder", MNIST, 10, width=TINY)
    assert isinstance(ae[-1], nn.Sigmoid)
    assert isinstance(ae[0], nn.Dropout) and ae[0].p == pytest.approx(0.2)  # input noise comes first
    out = ae.eval()(torch.randn(4, *MNIST) * 10)
    assert out.min() >= 0 and out.max() <= 1


def test_width_scales_hidden_units_but_not_outputs():
    small = build_model("classifier", MNIST, 10, width=0.5, hidden=(100, 80, 60, 40))
    widths = [m.out_features for m in small if isinstance(m, nn.Linear)]
    assert widths == [50, 40, 30, 20, 10]
    tiny = build_model("classifier", MNIST, 10, width=1e-6, hidden=(100, 80))
    assert [m.out_features for m in tiny if isinstance(m, nn.Linear)] == [1, 1, 10]
    full = sum(p.numel() for p in build_model("alexnet", CIFAR, 10).parameters())
    half = sum(p.numel() for p in build_model("alexnet", CIFAR, 10, width=0.5).parameters())
    assert half < full / 3  # parameters shrink roughly with width squared


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_seed_reproduces_init_and_leaves_global_rng_alone(arch):
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a = build_model(arch, CIFAR, 10, width=TINY, seed=7)
    after = torch.rand(3)
    assert torch.equal(before, after), "a seeded build must not move the caller's random stream"
    b = build_model(arch, CIFAR, 10, width=TINY, seed=7)
    c = build_model(arch, CIFAR, 10, width=TINY, seed=8)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa if k.endswith("weight"))


def test_autoencoder_widths_mirror():
    assert autoencoder_widths((256, 128, 32)) == (256, 128, 32, 128, 256)
    assert autoencoder_widths((8, 4, 2, 4, 8)) == (8, 4, 2, 4, 8)
    model = build_model("autoencoder", CIFAR, 0, hidden=(300, 100, 20), width=0.5, noise=0.0)
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [m.out_features for m in linears] == [150, 50, 10, 50, 150, 3072]
    assert linears[0].in_features == 3072
    assert not any(isinstance(m, nn.Dropout) for m in model)  # noise=0 leaves the input Dropout out
    with pytest.raises(ConfigError, match="mirror"):
        build_model("autoencoder", MNIST, 0, hidden=(8, 4, 2, 5, 8))
    with pytest.raises(ConfigError, match="3 widths"):
        build_model("autoencoder", MNIST, 0, hidden=(8, 4))


def test_small_input_variants_keep_spatial_sizes_valid():
    def spatial_after_features(model, shape):
        x = torch.zeros(1, *shape)
        for module in model:
            if isinstance(module, nn.Flatten):
                return tuple(x.shape[1:])
            x = module(x)
        return tuple(x.shape[1:])

    # AlexNet: 32 -> 16 -> 8 -> 4 and 28 -> 14 -> 7 -> 4, so both flatten 256 x 4 x 4.
    for shape in (MNIST, CIFAR):
        assert spatial_after_features(build_model("alexnet", shape, 10).eval(), shape) == (256, 4, 4)
    # VGG-16: 32 -> 1 with five pools; 28 -> 14 -> 7 -> 3 -> 1 with the fifth pool left out.
    pools = {
        s: sum(isinstance(m, nn.MaxPool2d) for m in build_model("vgg16", s, 10, width=TINY))
        for s in (MNIST, CIFAR)
    }
    assert pools == {MNIST: 4, CIFAR: 5}
    assert sum(isinstance(m, nn.Conv2d) for m in build_model("vgg16", CIFAR, 10, width=TINY)) == 13
    # NiN ends in a global average pool over the whole last feature map (8x8 on CIFAR, 7x7 on MNIST).
    for shape, size in ((CIFAR, 8), (MNIST, 7)):
        model = build_model("nin", shape, 10, width=TINY)
        gap = model[-2]
        assert isinstance(gap, nn.AvgPool2d) and tuple(np.broadcast_to(gap.kernel_size, 2)) == (size, size)
        assert sum(isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) for m in model) == 6


def test_cifar10_quick_matches_caffe_layout():
    model = build_model("cifar10_quick", CIFAR, 10)
    convs = [m for m in model if isinstance(m, nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size) for c in convs] == [(32, (5, 5)), (32, (5, 5)), (64, (5, 5))]
    linears = [m for m in model if isinstance(m, nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(64 * 4 * 4, 64), (64, 10)]
    # Caffe's ip1 feeds ip2 directly, without a nonlinearity.
    assert isinstance(model[-2], nn.Linear) and isinstance(model[-1], nn.Linear)
    assert isinstance(build_model("cifar10_quick", CIFAR, 10, ip1_relu=True)[-2], nn.ReLU)


def test_bad_arguments_raise_one_line_codec_errors():
    with pytest.raises(ConfigError, match="unknown architecture 'densenet'; known: classifier"):
        build_model("densenet", MNIST, 10)
    with pytest.raises(ConfigError, match="no option 'depth'"):
        build_model("classifier", MNIST, 10, depth=3)
    with pytest.raises(ConfigError, match="width"):
        build_model("classifier", MNIST, 10, width=0)
    with pytest.raises(ConfigError, match="num_outputs"):
        build_model("alexnet", CIFAR, 0)
    with pytest.raises(ConfigError, match="dropout"):
        build_model("classifier", MNIST, 10, dropout=1.5)
    with pytest.raises(ConfigError, match="activation"):
        build_model("classifier", MNIST, 10, activation="gelu")
    with pytest.raises(ShapeError, match="channels, height, width"):
        build_model("alexnet", (784,), 10)
    # Padded pools never shrink a map below 1x1, so even tiny images give a valid network.
    assert tuple(build_model("cifar10_quick", (1, 2, 2), 10).eval()(torch.rand(4, 1, 2, 2)).shape) == (4, 10)
    assert build_model("Cifar10-Quick", CIFAR, 10, width=TINY) is not None  # names forgive case and dashes
    assert set(architecture_options("autoencoder")) == {"hidden", "noise", "dropout", "activation"}


def _spread_weights(model: nn.Module) -> None:
    """Re-draw weights at unit-preserving scale so outputs are O(1) and a parity check means something
    (VGG's N(0, 0.01) head at a tiny width would otherwise output ~1e-10 and match anything)."""
    gen = torch.Generator().manual_seed(0)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            fan_in = module.weight[0].numel()
            with torch.no_grad():
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * math.sqrt(2.0 / fan_in))
                module.bias.copy_(torch.randn(module.bias.shape, generator=gen) * 0.1)


EXPORT_CASES = [
    ("classifier", MNIST),
    ("autoencoder", MNIST),
    ("alexnet", CIFAR),
    ("vgg16", MNIST),  # the variant with the fifth pool left out
    ("cifar10_quick", CIFAR),
    ("nin", MNIST),  # global average pool over 7x7
    ("nin", CIFAR),
]


@pytest.mark.parametrize(("arch", "shape"), EXPORT_CASES, ids=[f"{a}-{s[1]}" for a, s in EXPORT_CASES])
def test_dynamo_onnx_export_matches_torch(arch, shape):
    import onnxruntime as ort

    model = build_model(arch, shape, 10, width=TINY, seed=0)
    _spread_weights(model)
    model.eval()
    x = torch.rand(3, *shape, generator=torch.Generator().manual_seed(1))
    buffer = io.BytesIO()
    torch.onnx.export(model, (x,), buffer, dynamo=True, external_data=False)
    session = ort.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]
    with torch.no_grad():
        want = model(x).numpy()
    assert got.shape == want.shape
    assert want.std() > 1e-2, "outputs too flat for the comparison to mean anything"
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_every_recipe_resolves_validates_and_builds():
    assert [r.name for r in list_recipes()] == list(RECIPES)
    required = {
        "classifier_m", "classifier_c", "classifier_f", "autoenc_m", "autoenc_c", "autoenc_f", "alexnet_m",
        "alexnet_c", "vgg16_c", "cifar10_quick", "nin_c", "classifier_s", "autoenc_s", "cifar10_quick_j",
        "classifier_cj", "autoenc_cj",
    }  # fmt: skip
    assert required <= set(RECIPES)
    for recipe in list_recipes():
        assert get_recipe(recipe.name) is recipe
        assert get_recipe(recipe.name.upper().replace("_", "-")) is recipe
        assert tuple(recipe.train) == TRAIN_KEYS
        assert recipe.description
        shape = DATASET_SHAPES[recipe.dataset]
        model = recipe.build(shape, 10, width=TINY, seed=0)
        out = model.eval()(torch.rand(2, *shape))
        if recipe.task == "reconstruction":
            assert recipe.arch == "autoencoder" and recipe.train["loss"] == "mse"
            assert tuple(out.shape) == (2, math.prod(shape))
        else:
            assert recipe.train["loss"] == "ce"
            assert tuple(out.shape) == (2, 10)


def test_small_recipes_are_small():
    s = get_recipe("classifier_s")
    assert s.dataset == "mnist_small" and s.arch_kwargs["hidden"] == (128, 96, 64, 32)
    assert s.train["max_epochs"] <= 20 and s.train["patience"] == 5
    assert get_recipe("autoenc_s").dataset == "mnist_small"
    assert get_recipe("cifar10_quick_j").dataset == "cifar10_jpeg"
    assert get_recipe("classifier_cj").dataset == "cifar10_jpeg"


def test_unknown_recipe_names_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown recipe 'resnet_m'; known: .*classifier_s"):
        get_recipe("resnet_m")


def test_recipes_are_frozen_hashable_and_serialisable():
    recipe = get_recipe("classifier_m")
    with pytest.raises(dataclasses.FrozenInstanceError):
        recipe.name = "x"
    with pytest.raises(TypeError):
        recipe.train["lr"] = 1.0
    with pytest.raises(TypeError):
        recipe.arch_kwargs.update(hidden=(1,))
    assert len({hash(r) for r in list_recipes()}) == len(RECIPES)
    assert copy.deepcopy(recipe) == recipe and pickle.loads(pickle.dumps(recipe)) == recipe
    data = recipe.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["arch_kwargs"]["hidden"] == [512, 256, 128, 64]
    assert json.loads(json.dumps(dataclasses.asdict(recipe)))["train"]["lr"] == recipe.train["lr"]
    assert dict(**recipe.train)["batch_size"] == recipe.train["batch_size"]


def test_with_train_derives_a_validated_copy():
    recipe = get_recipe("classifier_s")
    short = recipe.with_train(max_epochs=2, n_train=100)
    assert short.train["max_epochs"] == 2 and short.train["n_train"] == 100
    assert recipe.train["max_epochs"] == 15  # the registered recipe is unchanged
    with pytest.raises(ConfigError, match="no training setting 'epochs'"):
        recipe.with_train(epochs=2)
    with pytest.raises(ConfigError, match="batch_size"):
        recipe.with_train(batch_size=0)
    with pytest.raises(ConfigError, match="optimizer"):
        recipe.with_train(optimizer="rmsprop")
    with pytest.raises(ConfigError, match="loss 'ce'"):
        recipe.with_train(loss="mse")


def test_recipe_definitions_are_checked():
    good = get_recipe("autoenc_s")
    with pytest.raises(ConfigError, match="missing"):
        Recipe("x", "classifier", "mnist", "classification", {}, {"lr": 1e-3}, "")
    with pytest.raises(ConfigError, match="only the autoencoder"):
        Recipe("x", "classifier", "mnist", "reconstruction", {}, dict(good.train), "")
    with pytest.raises(ConfigError, match="no option 'noise'"):
        Recipe("x", "classifier", "mnist", "classification", {"noise": 0.1}, dict(good.train, loss="ce"), "")
    with pytest.raises(ConfigError, match="unknown architecture"):
        Recipe("x", "lenet", "mnist", "classification", {}, dict(good.train, loss="ce"), "")


def test_importing_the_zoo_does_not_import_torch():
    # The CLI lists recipes in --help; `import torch` there would cost seconds on every invocation.
    code = "import sys, codec.models as m; m.get_recipe('classifier_s'); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
