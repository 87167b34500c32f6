"""The architecture zoo: every benchmark network of CODE and of Lee et al. as a flat `nn.Sequential`,
and a small residual network (`resnet`, the one exception: see below).

CODE (Trainiti et al., MLSys 2021) evaluates a fully connected classifier, a fully connected denoising
autoencoder and AlexNet; Lee et al. ("Why M heads are better than one", 2015) use Caffe's CIFAR10-Quick,
Network-in-Network and VGG-16. Every network here is a plain `nn.Sequential` of Flatten, Linear, Conv2d,
activations, MaxPool2d/AvgPool2d and Dropout, with no custom `forward`, because codec exports members with
`torch.onnx.export(..., dynamo=True)` and lifts the ONNX graph neuron by neuron: anything fancier (adaptive
pooling, grouped convolutions, in-graph softmax) would either not lift or hide neurons from the passes.
`resnet` is an `nn.Module` with residual Adds and BatchNorm, lifted as a DAG (see its docstring); TreeNets
(`codec.runtime.training.coupled`) split Sequentials only, so they do not take it.

Classifiers output logits (the ensemble exporter appends the Softmax); the autoencoder outputs sigmoid
reconstructions flattened to (N, D). Sizes that depend on the input (flatten widths, the kernel of the
global average pool) are measured with a dummy forward pass, so every network works for MNIST (1x28x28)
and CIFAR-10 (3x32x32) alike.

torch is imported inside the builders, not at module top, so the CLI can list architectures and recipes
(`codec train --help`) without paying for `import torch`.
"""

from __future__ import annotations

import inspect
import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from codec.errors import ConfigError, ShapeError, positive_int

if TYPE_CHECKING:
    from torch import nn

# Activation option value -> torch.nn class name (resolved at build time: see the module docstring).
_ACTIVATIONS: dict[str, str] = {
    "relu": "ReLU",
    "leaky_relu": "LeakyReLU",
    "sigmoid": "Sigmoid",
    "tanh": "Tanh",
}


def _scaled(units: int, width: float) -> int:
    """`units` times the width multiplier, at least 1, so tiny widths still give a valid network."""
    return max(1, round(units * width))


def _activation(name: str) -> nn.Module:
    from torch import nn

    if name not in _ACTIVATIONS:
        raise ConfigError(f"unknown activation {name!r}; known: {', '.join(_ACTIVATIONS)}")
    return getattr(nn, _ACTIVATIONS[name])()


def _image_shape(arch: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ShapeError(
            f"{arch} needs image inputs shaped (channels, height, width); got "
            f"{'x'.join(map(str, input_shape))}"
        )
    return input_shape  # type: ignore[return-value]


def _feature_shape(layers: Sequence[nn.Module], input_shape: tuple[int, ...]) -> tuple[int, ...]:
    """The per-example output shape of `layers` on `input_shape`, found by running one zero example.

    Eval mode keeps Dropout from drawing random numbers, so measuring a shape never shifts the seeded
    initialisation of the layers built after it.
    """
    import torch
    from torch import nn

    probe = nn.Sequential(*layers)
    was_training = probe.training
    probe.eval()
    with torch.no_grad():
        out = probe(torch.zeros(1, *input_shape))
    probe.train(was_training)
    return tuple(out.shape[1:])


def _positive_int(value: object) -> int | None:
    """`value` as an int when it is a positive integer (numpy integers included), else None."""
    try:
        return positive_int(value, "value")
    except ConfigError:
        return None


def _hidden_widths(arch: str, hidden: Sequence[int]) -> tuple[int, ...]:
    try:
        widths = tuple(_positive_int(h) for h in hidden)
    except TypeError:
        widths = ()
    if not widths or None in widths:
        raise ConfigError(f"{arch}: hidden must be a non-empty sequence of positive integers, got {hidden!r}")
    return widths  # type: ignore[return-value]


def _probability(arch: str, name: str, p: float) -> float:
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= p < 1.0:
        raise ConfigError(f"{arch}: {name} must be a number in [0, 1), got {p!r}")
    return float(p)


def classifier(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    width: float = 1.0,
    hidden: Sequence[int] = (512, 256, 128, 64),
    dropout: float = 0.0,
    activation: str = "relu",
) -> nn.Sequential:
    """CODE's fully connected classifier: Flatten, hidden Linear layers of decreasing width, logits.

    CODE specifies four fully connected hidden layers of different widths; the default widths are chosen
    here (the paper names the layer count, not the widths). Any number of hidden layers is accepted.

    Args:
        input_shape: per-example input shape; flattened, so any rank works.
        num_outputs: number of classes (logits).
        width: multiplier of every hidden width.
        hidden: hidden layer widths before the multiplier.
        dropout: dropout after each hidden activation (0 leaves it out).
        activation: "relu", "leaky_relu", "sigmoid" or "tanh".
    """
    from torch import nn

    widths = [_scaled(h, width) for h in _hidden_widths("classifier", hidden)]
    dropout = _probability("classifier", "dropout", dropout)
    layers: list[nn.Module] = [nn.Flatten()]
    fan_in = math.prod(input_shape)
    for units in widths:
        layers += [nn.Linear(fan_in, units), _activation(activation)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        fan_in = units
    layers.append(nn.Linear(fan_in, num_outputs))
    return nn.Sequential(*layers)


def autoencoder_widths(hidden: Sequence[int]) -> tuple[int, int, int, int, int]:
    """The five hidden widths (encode1, encode2, code, decode1, decode2) of an autoencoder.

    Three widths (encode1, encode2, code) are mirrored into the decoder; five are accepted when they
    already mirror, so a configuration can spell the whole network out.

    Raises:
        ConfigError: not 3 or 5 positive widths, or 5 widths that do not mirror.
    """
    widths = _hidden_widths("autoencoder", hidden)
    if len(widths) == 3:
        e1, e2, code = widths
        return (e1, e2, code, e2, e1)
    if len(widths) == 5:
        if widths[0] != widths[4] or widths[1] != widths[3]:
            raise ConfigError(
                "autoencoder: hidden widths must mirror (encode1 == decode2, encode2 == decode1), got "
                f"{widths}"
            )
        return widths  # type: ignore[return-value]
    raise ConfigError(
        f"autoencoder: hidden takes 3 widths (encode1, encode2, code) or 5 mirrored ones, got {len(widths)}"
    )


def autoencoder(
    input_shape: tuple[int, ...],
    num_outputs: int | None = None,
    *,
    width: float = 1.0,
    hidden: Sequence[int] = (256, 128, 32),
    noise: float = 0.2,
    dropout: float = 0.0,
    activation: str = "relu",
) -> nn.Sequential:
    """CODE's fully connected denoising autoencoder with mirrored widths and a sigmoid output.

    Layout: Dropout(noise) on the input (CODE's input noise), Flatten, encode1, encode2, code, decode1,
    decode2, then a Linear back to D = prod(input_shape) inputs and a Sigmoid, so reconstructions are
    (N, D) in [0, 1], to be compared with the flattened input under MSE.

    Args:
        input_shape: per-example input shape (any rank).
        num_outputs: ignored; the output size is always prod(input_shape).
        width: multiplier of every hidden width (mirroring is preserved).
        hidden: (encode1, encode2, code) or all five mirrored widths, before the multiplier.
        noise: dropout probability on the input layer (0 leaves the Dropout out).
        dropout: dropout after each hidden activation (0 leaves it out).
        activation: hidden activation, "relu", "leaky_relu", "sigmoid" or "tanh".
    """
    from torch import nn

    del num_outputs  # the reconstruction target fixes the output size
    widths = [_scaled(h, width) for h in autoencoder_widths(hidden)]
    noise = _probability("autoencoder", "noise", noise)
    dropout = _probability("autoencoder", "dropout", dropout)
    size = math.prod(input_shape)
    layers: list[nn.Module] = [nn.Dropout(noise)] if noise > 0 else []
    layers.append(nn.Flatten())
    fan_in = size
    for units in widths:
        layers += [nn.Linear(fan_in, units), _activation(activation)]
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        fan_in = units
    layers += [nn.Linear(fan_in, size), nn.Sigmoid()]
    return nn.Sequential(*layers)


def _fully_connected_head(
    in_features: int, widths: Sequence[int], num_outputs: int, dropout: float
) -> list[nn.Module]:
    """Dropout -> Linear -> ReLU per hidden width, then the logits layer (AlexNet's and VGG's heads)."""
    from torch import nn

    layers: list[nn.Module] = []
    fan_in = in_features
    for units in widths:
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(fan_in, units), nn.ReLU()]
        fan_in = units
    layers.append(nn.Linear(fan_in, num_outputs))
    return layers


def alexnet(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    width: float = 1.0,
    fc: Sequence[int] = (1024, 1024),
    dropout: float = 0.5,
) -> nn.Sequential:
    """AlexNet's small-input variant for 28x28 and 32x32 images.

    AlexNet's five convolutions (64, 192, 384, 256, 256 channels, as in torchvision's single-tower
    version), ReLUs, and overlapping 3x3 stride-2 max pooling after conv1, conv2 and conv5, then two
    dropout-regularised fully connected layers and the logits. For small inputs, conv1 is 5x5 stride 1
    instead of 11x11 stride 4, conv2 stays 5x5, convolutions and pools are padded so 32 -> 16 -> 8 -> 4 and
    28 -> 14 -> 7 -> 4, and the fully connected layers default to 1024 units instead of 4096 (the
    ImageNet head would be ~90 % of the parameters on a 4x4x256 feature map).

    Args:
        input_shape: (channels, height, width).
        num_outputs: number of classes (logits).
        width: multiplier of every channel and fully connected width.
        fc: widths of the fully connected hidden layers, before the multiplier.
        dropout: dropout before each fully connected hidden layer (0 leaves it out).
    """
    from torch import nn

    _image_shape("alexnet", input_shape)
    dropout = _probability("alexnet", "dropout", dropout)
    c1, c2, c3, c4, c5 = (_scaled(c, width) for c in (64, 192, 384, 256, 256))
    features: list[nn.Module] = [
        nn.Conv2d(input_shape[0], c1, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        nn.Conv2d(c1, c2, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        nn.Conv2d(c2, c3, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c3, c4, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.Conv2d(c4, c5, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        nn.Flatten(),
    ]
    (flat,) = _feature_shape(features, input_shape)
    widths = [_scaled(u, width) for u in _hidden_widths("alexnet", fc)]
    return nn.Sequential(*features, *_fully_connected_head(flat, widths, num_outputs, dropout))


# VGG configuration D (16 weight layers): channel counts, "M" = 2x2 max pooling.
_VGG16_CONFIG: tuple[int | str, ...] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)


def vgg16(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    width: float = 1.0,
    fc: Sequence[int] = (512, 512),
    dropout: float = 0.5,
) -> nn.Sequential:
    """VGG-16 (configuration D) for small inputs, without batch normalisation.

    Thirteen 3x3 padded convolutions with ReLU in five blocks, each block closed by 2x2 max pooling. A
    pool whose input is already 1 pixel wide is left out, so 32x32 inputs go 32 -> 1 through all five
    pools and 28x28 inputs go 28 -> 14 -> 7 -> 3 -> 1 with the fifth pool dropped. The head is the usual
    small-input one (Dropout, 512, Dropout, 512, logits) instead of ImageNet's 4096-wide layers.

    Without batch normalisation a 16-layer ReLU stack only trains from a variance-preserving start, so
    convolutions use He initialisation (normal, fan_out, as torchvision's VGG) and linear layers
    N(0, 0.01) with zero biases.

    Args:
        input_shape: (channels, height, width).
        num_outputs: number of classes (logits).
        width: multiplier of every channel and fully connected width.
        fc: widths of the fully connected hidden layers, before the multiplier.
        dropout: dropout before each fully connected hidden layer (0 leaves it out).
    """
    from torch import nn

    channels, height, width_px = _image_shape("vgg16", input_shape)
    dropout = _probability("vgg16", "dropout", dropout)
    features: list[nn.Module] = []
    fan_in, size = channels, min(height, width_px)
    for item in _VGG16_CONFIG:
        if item == "M":
            if size >= 2:
                features.append(nn.MaxPool2d(kernel_size=2, stride=2))
                size //= 2
            continue
        out = _scaled(int(item), width)
        conv = nn.Conv2d(fan_in, out, kernel_size=3, padding=1)
        nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(conv.bias)
        features += [conv, nn.ReLU()]
        fan_in = out
    features.append(nn.Flatten())
    (flat,) = _feature_shape(features, input_shape)
    head = _fully_connected_head(
        flat, [_scaled(u, width) for u in _hidden_widths("vgg16", fc)], num_outputs, dropout
    )
    for layer in head:
        if isinstance(layer, nn.Linear):
            nn.init.normal_(layer.weight, 0.0, 0.01)
            nn.init.zeros_(layer.bias)
    return nn.Sequential(*features, *head)


def cifar10_quick(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    width: float = 1.0,
    ip1_relu: bool = False,
) -> nn.Sequential:
    """Caffe's cifar10_quick: conv5x5x32-maxpool-relu, conv5x5x32-relu-avgpool, conv5x5x64-relu-avgpool, fc64,
    fc.

    Caffe pools 3x3 stride 2 in ceil mode (32 -> 16 -> 8 -> 4); here the pools are padded by 1 instead
    (same sizes: 32 -> 16 -> 8 -> 4, 28 -> 14 -> 7 -> 4) and average pools exclude the padding, which
    matches Caffe's clipped border windows in size and avoids ceil-mode pooling in the exported graph.
    Caffe's ip1 has no nonlinearity (ip1 feeds ip2 directly); `ip1_relu=True` adds one. Initialisation is
    torch's default rather than Caffe's Gaussians (std 1e-4 .. 0.1), which were tuned for unnormalised
    0-255 pixels.

    Args:
        input_shape: (channels, height, width).
        num_outputs: number of classes (logits).
        width: multiplier of every channel and fully connected width.
        ip1_relu: put a ReLU between ip1 and ip2 (Caffe's network has none).
    """
    from torch import nn

    _image_shape("cifar10_quick", input_shape)
    c1, c2, c3, ip1 = (_scaled(c, width) for c in (32, 32, 64, 64))
    features: list[nn.Module] = [
        nn.Conv2d(input_shape[0], c1, kernel_size=5, padding=2),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(c1, c2, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=False),
        nn.Conv2d(c2, c3, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=False),
        nn.Flatten(),
    ]
    (flat,) = _feature_shape(features, input_shape)
    head: list[nn.Module] = [nn.Linear(flat, ip1)]
    if ip1_relu:
        head.append(nn.ReLU())
    head.append(nn.Linear(ip1, num_outputs))
    return nn.Sequential(*features, *head)


def nin(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    width: float = 1.0,
    dropout: float = 0.5,
    final_relu: bool = True,
) -> nn.Sequential:
    """Network-in-Network, CIFAR-10 version (Lin et al. 2014, the Caffe model zoo network).

    Three mlpconv blocks: conv5x5x192-cccp160-cccp96, max pool 3/2, dropout; conv5x5x192-cccp192-cccp192,
    average pool 3/2, dropout; conv3x3x192-cccp192-cccp(num_outputs); then global average pooling
    (an AvgPool2d whose kernel is the final feature map, 8x8 on CIFAR-10 and 7x7 on MNIST) and Flatten.
    The cccp layers are 1x1 convolutions. As in the original, every convolution including the last is
    followed by a ReLU (`final_relu=False` drops the last one, so logits may be negative). Pools are
    padded by 1 instead of Caffe's ceil mode (same sizes), average pools excluding the padding.

    Args:
        input_shape: (channels, height, width).
        num_outputs: number of classes; the last 1x1 convolution has this many channels (not scaled).
        width: multiplier of every other channel count.
        dropout: dropout after the first two blocks (0 leaves it out).
        final_relu: keep the ReLU after the last 1x1 convolution, as in the original network.
    """
    from torch import nn

    _image_shape("nin", input_shape)
    dropout = _probability("nin", "dropout", dropout)
    c192, c160, c96 = (_scaled(c, width) for c in (192, 160, 96))

    def mlpconv(in_channels: int, out: Sequence[int], kernel: int) -> list[nn.Module]:
        layers: list[nn.Module] = [
            nn.Conv2d(in_channels, out[0], kernel_size=kernel, padding=kernel // 2),
            nn.ReLU(),
        ]
        for a, b in itertools.pairwise(out):
            layers += [nn.Conv2d(a, b, kernel_size=1), nn.ReLU()]
        return layers

    def maybe_dropout() -> list[nn.Module]:
        return [nn.Dropout(dropout)] if dropout > 0 else []

    features: list[nn.Module] = [
        *mlpconv(input_shape[0], (c192, c160, c96), 5),
        nn.MaxPool2d(kernel_size=3, stride=2, padding=1),
        *maybe_dropout(),
        *mlpconv(c96, (c192, c192, c192), 5),
        nn.AvgPool2d(kernel_size=3, stride=2, padding=1, count_include_pad=False),
        *maybe_dropout(),
        *mlpconv(c192, (c192, c192, num_outputs), 3),
    ]
    if not final_relu:
        features.pop()
    _, height, width_px = _feature_shape(features, input_shape)
    features += [nn.AvgPool2d(kernel_size=(height, width_px)), nn.Flatten()]
    return nn.Sequential(*features)


def resnet(
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    width: float = 1.0,
    channels: Sequence[int] = (16, 32, 64),
    blocks_per_stage: int = 1,
) -> nn.Module:
    """A small ResNet with BatchNorm for CIFAR-10-sized images (He et al. 2016's CIFAR design, shallow).

    A 3x3 stem convolution (BN, ReLU), then one stage per entry of `channels`, each of `blocks_per_stage`
    basic blocks (conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, then ReLU); every stage after the first
    starts at stride 2 with a 1x1 convolution + BN on the shortcut; global average pooling; a linear layer
    to logits. The default is 3 stages of one block, 16/32/64 channels (78,042 parameters on CIFAR-10).

    The only zoo network that is not an `nn.Sequential`: its residual Adds need a `forward`. codec lifts
    the exported graph as a DAG, BatchNorm folded into the convolutions (`codec.ir.lift`).

    Args:
        input_shape: (channels, height, width).
        num_outputs: number of classes (logits).
        width: multiplier of every channel count.
        channels: the width of each stage.
        blocks_per_stage: basic blocks per stage.
    """
    from codec.models.resnet import ResNet

    _image_shape("resnet", input_shape)
    widths = _hidden_widths("resnet", channels)
    blocks = _positive_int(blocks_per_stage)
    if blocks is None:
        raise ConfigError(f"resnet: blocks_per_stage must be a positive integer, got {blocks_per_stage!r}")
    return ResNet(input_shape[0], [_scaled(c, width) for c in widths], blocks, num_outputs)


ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "classifier": classifier,
    "autoencoder": autoencoder,
    "alexnet": alexnet,
    "vgg16": vgg16,
    "cifar10_quick": cifar10_quick,
    "nin": nin,
    "resnet": resnet,
}


def architecture_options(arch: str) -> dict[str, object]:
    """The keyword options an architecture accepts (besides `width`), with their defaults."""
    builder = ARCHITECTURES[_arch_key(arch)]
    return {
        name: param.default
        for name, param in inspect.signature(builder).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY and name != "width"
    }


def _arch_key(arch: str) -> str:
    key = str(arch).strip().lower().replace("-", "_")
    if key not in ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r}; known: {', '.join(ARCHITECTURES)}")
    return key


def build_model(
    arch: str,
    input_shape: tuple[int, ...],
    num_outputs: int,
    *,
    width: float = 1.0,
    seed: int | None = None,
    **arch_kwargs,
) -> nn.Sequential:
    """Build a zoo architecture for one input shape.

    Args:
        arch: a key of ARCHITECTURES (case-insensitive, "-" == "_").
        input_shape: per-example input shape, e.g. (1, 28, 28) or (3, 32, 32).
        num_outputs: number of classes; ignored by "autoencoder" (its output size is prod(input_shape)).
        width: multiplies every hidden unit and channel count (not the outputs); small values give tiny
            networks for tests.
        seed: when given, parameters are initialised from `torch.manual_seed(seed)`, so equal seeds give
            equal networks; the caller's global RNG state is left as it was.
        **arch_kwargs: the architecture's own options (see `architecture_options(arch)`), e.g.
            hidden=(512, 256, 128, 64), dropout=0.2, noise=0.2.

    Returns:
        An `nn.Sequential` in training mode, outputting logits (classifiers) or flattened sigmoid
        reconstructions (autoencoder).

    Raises:
        ConfigError: unknown architecture or option, or a bad option value.
        ShapeError: an input shape the architecture cannot take.
    """
    import torch

    key = _arch_key(arch)
    options = architecture_options(key)
    unknown = sorted(set(arch_kwargs) - set(options))
    if unknown:
        raise ConfigError(
            f"{key} has no option {', '.join(map(repr, unknown))}; options: {', '.join(options) or 'none'}"
        )
    try:
        shape = tuple(_positive_int(d) for d in input_shape)
    except TypeError:
        shape = ()
    if not shape or None in shape:
        raise ShapeError(f"input shape must be a non-empty tuple of positive integers, got {input_shape!r}")
    if key != "autoencoder":
        if _positive_int(num_outputs) is None:
            raise ConfigError(f"num_outputs must be a positive integer, got {num_outputs!r}")
        num_outputs = _positive_int(num_outputs)
    if (
        isinstance(width, bool)
        or not isinstance(width, (int, float))
        or not math.isfinite(width)
        or width <= 0
    ):
        raise ConfigError(f"width must be a positive number, got {width!r}")
    builder = ARCHITECTURES[key]
    if seed is None:
        return builder(shape, num_outputs, width=float(width), **arch_kwargs)
    # fork_rng: seeding must make this build reproducible without resetting the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder(shape, num_outputs, width=float(width), **arch_kwargs)
