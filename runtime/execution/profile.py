"""Activation profiling: run lifted networks with onnxruntime over calibration data and accumulate statistics.

Statistics are accumulated batch by batch, so memory is O(neurons^2) per layer whatever the number of
calibration inputs (the calibration set itself may be a memory-mapped array or any iterable of batches).

Per input, a Dense neuron's *activation* is its post-activation output. A Conv neuron is a channel: its
activation on an input is the spatial mean of its post-activation map (an Add's channels alike: a DAG's
hidden Adds are profiled too, since the neurons they tie must be dead in every tied layer to be removed), and
it *fires* on that input when
its firing condition holds at any position (so "never fires" means "zero everywhere, on every input" for
ReLU, which is what dead-neuron elimination needs). The firing condition is per activation function, see
`codec.ir.Activation.fire_threshold`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

from codec.errors import ConfigError, DataError, ShapeError
from codec.ir.lower import lower, tap_names, to_bytes
from codec.ir.network import Add, NetworkIR
from codec.runtime.execution.inputs import fit_examples


@dataclass
class LayerStats:
    """Running statistics of one hidden layer's neurons over the calibration inputs seen so far.

    Attributes:
        fire: inputs on which each neuron fired.
        nonzero: inputs on which each neuron's output was not exactly zero (somewhere, for channels).
        sum / sumsq: sums of each neuron's activation and its square (float64).
        cofire: (neurons, previous-layer neurons) inputs on which both fired; None for the first hidden layer,
            whose inputs are the network's input (counted as fully shared by CODE).
    """

    name: str
    activation: str
    threshold: float
    num_neurons: int
    previous: str | None
    count: int = 0
    fire: np.ndarray = None
    nonzero: np.ndarray = None
    sum: np.ndarray = None
    sumsq: np.ndarray = None
    cofire: np.ndarray | None = None

    def __post_init__(self) -> None:
        n = self.num_neurons
        self.fire = np.zeros(n, np.int64) if self.fire is None else self.fire
        self.nonzero = np.zeros(n, np.int64) if self.nonzero is None else self.nonzero
        self.sum = np.zeros(n, np.float64) if self.sum is None else self.sum
        self.sumsq = np.zeros(n, np.float64) if self.sumsq is None else self.sumsq

    @property
    def fire_rate(self) -> np.ndarray:
        return self.fire / max(self.count, 1)

    @property
    def mean(self) -> np.ndarray:
        return self.sum / max(self.count, 1)

    @property
    def std(self) -> np.ndarray:
        var = self.sumsq / max(self.count, 1) - self.mean**2
        return np.sqrt(np.maximum(var, 0.0))

    @property
    def never_fires(self) -> np.ndarray:
        return self.fire == 0

    @property
    def always_zero(self) -> np.ndarray:
        """Neurons whose output was exactly zero on every input: removing them changes no output."""
        return self.nonzero == 0

    @property
    def nbytes(self) -> int:
        arrays = [self.fire, self.nonzero, self.sum, self.sumsq] + (
            [self.cofire] if self.cofire is not None else []
        )
        return sum(a.nbytes for a in arrays)


@dataclass
class ActivationStats:
    """Statistics of every hidden layer of one network, by layer name (in network order)."""

    network: str
    count: int = 0
    layers: dict[str, LayerStats] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.layers.values())

    def select(self, layer: str, keep: np.ndarray) -> None:
        """Keep only neurons `keep` of `layer` (in place), as neuron surgery did to the network.

        Exact for removed neurons whose output was zero on every input, and for reorderings: no other
        neuron's statistics change."""
        s = self.layers[layer]
        s.num_neurons = len(keep)
        s.fire, s.nonzero, s.sum, s.sumsq = s.fire[keep], s.nonzero[keep], s.sum[keep], s.sumsq[keep]
        if s.cofire is not None:
            s.cofire = s.cofire[keep]
        for other in self.layers.values():
            if other.previous == layer:
                other.cofire = other.cofire[:, keep]

    def to_dict(self) -> dict:
        """A JSON-ready per-layer summary (rates, not the raw matrices)."""
        return {
            "network": self.network,
            "inputs": self.count,
            "layers": [
                {
                    "name": s.name,
                    "activation": s.activation,
                    "neurons": s.num_neurons,
                    "fire_threshold": s.threshold,
                    "mean_fire_rate": float(s.fire_rate.mean()) if s.num_neurons else 0.0,
                    "never_fire": int(s.never_fires.sum()),
                    "always_zero": int(s.always_zero.sum()),
                    "dead_neurons": np.flatnonzero(s.always_zero).tolist(),
                }
                for s in self.layers.values()
            ],
        }


@dataclass
class CrossLayerStats:
    """Statistics between the same layer of two members (main neurons x peer neurons)."""

    name: str
    cofire: np.ndarray  # (n_main, n_peer) int64: inputs on which both fired
    sum_products: np.ndarray  # (n_main, n_peer) float64: sum over inputs of a_main * a_peer


@dataclass
class PairStats:
    """Two members' ActivationStats plus the cross-member statistics CSNE needs."""

    main: ActivationStats
    peer: ActivationStats
    cross: dict[str, CrossLayerStats] = field(default_factory=dict)  # by main's layer name
    peer_layer: dict[str, str] = field(
        default_factory=dict
    )  # main layer name -> peer layer name (same position)

    @property
    def count(self) -> int:
        return self.main.count

    def select(self, member: str, layer: str, keep: np.ndarray) -> None:
        """Neuron surgery on `member` ("main" or "peer"): keep neurons `keep` of `layer` (in place)."""
        if member == "main":
            self.main.select(layer, keep)
            c = self.cross[layer]
            c.cofire, c.sum_products = c.cofire[keep], c.sum_products[keep]
        else:
            self.peer.select(layer, keep)
            main_layer = next(m for m, p in self.peer_layer.items() if p == layer)
            c = self.cross[main_layer]
            c.cofire, c.sum_products = c.cofire[:, keep], c.sum_products[:, keep]

    def _pair(self, main_layer: str) -> tuple[LayerStats, LayerStats]:
        return self.main.layers[main_layer], self.peer.layers[self.peer_layer[main_layer]]

    def agreement(self, main_layer: str) -> np.ndarray:
        """Fraction of inputs on which main neuron m and peer neuron p both fire or both stay silent."""
        m, p = self._pair(main_layer)
        both = self.cross[main_layer].cofire
        n = max(self.count, 1)
        return (n - m.fire[:, None] - p.fire[None, :] + 2 * both) / n

    def cofire_rate(self, main_layer: str) -> np.ndarray:
        """Fraction of inputs on which both fire."""
        return self.cross[main_layer].cofire / max(self.count, 1)

    def correlation(self, main_layer: str) -> np.ndarray:
        """Pearson correlation of activations, main neuron x peer neuron; 0 where either is constant."""
        m, p = self._pair(main_layer)
        n = max(self.count, 1)
        cov = self.cross[main_layer].sum_products / n - np.outer(m.mean, p.mean)
        denom = np.outer(m.std, p.std)
        with np.errstate(divide="ignore", invalid="ignore"):
            corr = np.where(denom > 1e-12, cov / denom, 0.0)
        return np.clip(corr, -1.0, 1.0)


class _Tapped:
    """A network lowered with taps, running in onnxruntime, reducing each batch to per-input neuron views."""

    def __init__(self, net: NetworkIR, intra_op_threads: int | None = None):
        from codec.runtime.execution.session import create_session

        self.net = net
        self.hidden = net.profiled_layers()
        self.session = create_session(to_bytes(lower(net, taps=True)), intra_op_threads)
        names = tap_names(net)
        self.outputs = [names[layer.name] for layer in self.hidden]

    def new_stats(self) -> ActivationStats:
        stats = ActivationStats(network=self.net.name)
        for layer in self.hidden:
            previous = _previous(self.net, layer)
            s = LayerStats(
                name=layer.name,
                activation=layer.activation.kind,
                threshold=layer.activation.fire_threshold(layer.num_neurons),
                num_neurons=layer.num_neurons,
                previous=previous.name if previous is not None else None,
            )
            if previous is not None:
                s.cofire = np.zeros((layer.num_neurons, previous.num_neurons), np.int64)
            stats.layers[layer.name] = s
        return stats

    def views(self, batch: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """Per hidden layer: (activation (B, n) float64, fires (B, n) bool, nonzero (B, n) bool)."""
        outs = self.session.run(self.outputs, {self.session.get_inputs()[0].name: batch})
        views = []
        for layer, out in zip(self.hidden, outs):
            thr = layer.activation.fire_threshold(layer.num_neurons)
            if out.ndim == 4:  # a Conv's (or an Add's) channels
                flat = out.reshape(out.shape[0], out.shape[1], -1)
                act = flat.mean(axis=2, dtype=np.float64)
                fires = (flat > thr).any(axis=2)
                nonzero = (flat != 0).any(axis=2)
            else:
                act = out.astype(np.float64)
                fires = out > thr
                nonzero = out != 0
            views.append((act, fires, nonzero))
        return views


def _is_chain(net) -> bool:
    return getattr(net, "is_chain", True)  # the budget check also takes stand-ins with hidden_layers() only


def _profiled(net) -> list:
    return net.hidden_layers() if _is_chain(net) else net.profiled_layers()


def _previous(net: NetworkIR, layer):
    """The profiled layer whose neurons are all of `layer`'s inputs (its co-firing partner), or None: the
    first hidden layer (its inputs are the network's), an Add (it has no weights), or a layer reading a
    Concat of several layers' neurons."""
    if isinstance(layer, Add):
        return None
    previous = net.previous_neuron_layer(layer.name)
    return previous if previous is not None and previous in net.profiled_layers() else None


def _accumulate(stats: ActivationStats, views, packed: list[np.ndarray]) -> None:
    """Add one batch. `packed[i]` is layer i's fire matrix bit-packed by `kernels.pack_fires`."""
    from codec import kernels

    position = {name: i for i, name in enumerate(stats.layers)}
    for i, (s, (act, fires, nonzero)) in enumerate(zip(stats.layers.values(), views)):
        s.count += act.shape[0]
        s.fire += fires.sum(axis=0)
        s.nonzero += nonzero.sum(axis=0)
        s.sum += act.sum(axis=0)
        s.sumsq += np.einsum("bi,bi->i", act, act)
        if s.cofire is not None:
            # popcount(a_i & b_j) over bit-packed inputs: exact, and ~5x a float32 GEMM (bench/kernels.json)
            kernels.cofire_counts(
                packed[i],
                packed[position[s.previous]],
                out=s.cofire,
                n_threads=_threads_for(s.cofire, packed[i]),
            )
    stats.count += views[0][0].shape[0] if views else 0


MAX_STATS_BYTES_ENV = "CODEC_MAX_STATS_BYTES"
# The statistics are O(neurons^2) per layer (co-firing with the layer below, main x peer products): a wide
# enough model would need more memory than the machine has and be killed mid-run instead of refused.
DEFAULT_MAX_STATS_BYTES = 4 << 30


def stats_bytes(nets: list[NetworkIR], pair: bool = False) -> dict[str, int]:
    """Bytes the statistics of profiling `nets` (main x peer cross statistics too when `pair`) will hold, by
    "network/layer": fire, nonzero, sum, sumsq per neuron, co-firing with the layer below, cross products."""
    sizes: dict[str, int] = {}
    for net in nets:
        previous = None
        for layer in _profiled(net):
            n = layer.num_neurons
            if not _is_chain(net):
                previous = _previous(net, layer)
            sizes[f"{net.name}/{layer.name}"] = 4 * 8 * n + (
                8 * n * previous.num_neurons if previous is not None else 0
            )
            if _is_chain(net):
                previous = layer  # a chain's hidden layer co-fires with the one before it
    if pair:
        for a, b in zip(_profiled(nets[0]), _profiled(nets[1])):
            sizes[f"{nets[0].name}/{a.name}"] += 2 * 8 * a.num_neurons * b.num_neurons
    return sizes


def stats_budget() -> int:
    """The statistics budget in bytes: `$CODEC_MAX_STATS_BYTES`, else 4 GiB (also the NDG GraphML budget).

    Raises:
        ConfigError: the variable is not a positive whole number.
    """
    text = os.environ.get(MAX_STATS_BYTES_ENV) or str(DEFAULT_MAX_STATS_BYTES)
    try:
        limit = int(text)
    except ValueError:
        raise ConfigError(f"{MAX_STATS_BYTES_ENV}={text!r} is not a whole number of bytes") from None
    if limit < 1:
        raise ConfigError(f"{MAX_STATS_BYTES_ENV}={text!r} must be a positive number of bytes")
    return limit


def _check_stats_budget(nets: list[NetworkIR], pair: bool, limit: int | None) -> None:
    """Refuse, before anything is allocated, statistics larger than the memory budget."""
    if limit is None:
        limit = stats_budget()
    sizes = stats_bytes(nets, pair)
    total = sum(sizes.values())
    if total > limit:
        layer = max(sizes, key=sizes.get)
        raise ShapeError(
            f"profiling needs {_mib(total)} for its statistics, more than the budget of {_mib(limit)}; "
            "the largest "
            f"share is layer {layer} ({_mib(sizes[layer])}); set {MAX_STATS_BYTES_ENV}=BYTES to raise "
            "the budget"
        )


def _mib(n: int) -> str:
    return f"{n / 2**20:,.1f} MiB"


def _threads_for(out: np.ndarray, bits: np.ndarray) -> int | None:
    """OpenMP threads for a co-firing update: one below ~16M word-ANDs, where waking workers costs more
    than the work (on a busy machine, much more); else the OpenMP default."""
    return None if out.size * bits.shape[1] >= 1 << 24 else 1


def _batches(data, batch_size: int) -> Iterator[np.ndarray]:
    """Yield float32 batches from an array (sliced lazily; memmaps stay on disk) or an iterable of arrays."""
    if isinstance(data, np.ndarray):
        for start in range(0, len(data), batch_size):
            yield data[start : start + batch_size]
    else:
        yield from data


def _check_batch(batch: np.ndarray, net: NetworkIR, seen: int) -> np.ndarray:
    # the one input rule (inputs.py): flat <-> image layouts; the lowered, tapped network computes in float32
    batch = fit_examples(batch, tuple(net.input_shape), np.float32, model=repr(net.name))
    if not np.all(np.isfinite(batch)):
        bad = int(np.flatnonzero(~np.isfinite(batch.reshape(len(batch), -1)).all(axis=1))[0])
        raise DataError(f"calibration input {seen + bad} contains NaN or infinite values")
    return batch


def profile(
    net: NetworkIR,
    data: np.ndarray | Iterable[np.ndarray],
    batch_size: int = 256,
    progress: bool = False,
    intra_op_threads: int | None = None,
    max_stats_bytes: int | None = None,
) -> ActivationStats:
    """Profile one network's hidden activations over `data` (an array or an iterable of batches).

    `max_stats_bytes` caps the memory the statistics may take (default `$CODEC_MAX_STATS_BYTES`, else 4 GiB):
    a network needing more is refused with a ShapeError naming its largest layer, before any allocation."""
    return _run([net], data, batch_size, progress, intra_op_threads, max_stats_bytes=max_stats_bytes)[0]


def profile_pair(
    main: NetworkIR,
    peer: NetworkIR,
    data: np.ndarray | Iterable[np.ndarray],
    batch_size: int = 256,
    progress: bool = False,
    intra_op_threads: int | None = None,
    max_stats_bytes: int | None = None,
) -> PairStats:
    """Profile two members of the same architecture together, with their cross-member statistics.

    Their layer widths may differ (after dead-neuron elimination, say): cross statistics are main x peer.
    `max_stats_bytes`: as for `profile`.
    """
    difference = main.same_architecture(peer, widths=False)
    if difference is not None:
        raise ShapeError(f"{main.name!r} and {peer.name!r} do not have the same architecture: {difference}")
    stats_main, stats_peer, cross = _run(
        [main, peer], data, batch_size, progress, intra_op_threads, pair=True, max_stats_bytes=max_stats_bytes
    )
    names = {a.name: b.name for a, b in zip(main.profiled_layers(), peer.profiled_layers())}
    return PairStats(stats_main, stats_peer, cross, names)


def _run(nets, data, batch_size, progress, intra_op_threads, pair=False, max_stats_bytes=None):
    from threadpoolctl import threadpool_limits
    from tqdm.auto import tqdm

    _check_stats_budget(nets, pair, max_stats_bytes)

    # The per-batch products are small: a multi-threaded BLAS spends more time waking threads than
    # computing (measured 30x slower for 256x128 products on a busy 2-core machine). onnxruntime keeps
    # its own thread pool for the forward passes.
    with threadpool_limits(limits=1, user_api="blas"):
        return _run_batches(nets, data, batch_size, progress, intra_op_threads, pair, tqdm)


def _run_batches(nets, data, batch_size, progress, intra_op_threads, pair, tqdm):
    from codec import kernels

    if batch_size < 1:
        raise DataError(f"batch size must be positive, got {batch_size}")
    tapped = [_Tapped(net, intra_op_threads) for net in nets]
    stats = [t.new_stats() for t in tapped]
    cross = {}
    if pair:
        for a, b in zip(tapped[0].hidden, tapped[1].hidden):
            cross[a.name] = CrossLayerStats(
                a.name,
                np.zeros((a.num_neurons, b.num_neurons), np.int64),
                np.zeros((a.num_neurons, b.num_neurons)),
            )
    total = len(data) if hasattr(data, "__len__") else None
    bar = tqdm(total=total, unit="input", desc="profiling", disable=not progress, leave=False)
    seen = 0
    try:
        for batch in _batches(data, batch_size):
            if len(batch) == 0:
                continue
            batch = _check_batch(batch, nets[0], seen)
            views = [t.views(batch) for t in tapped]
            # packing is a light O(batch x neurons) pass: one thread (waking OpenMP workers costs more)
            packed = [[kernels.pack_fires(fires, n_threads=1) for _, fires, _ in v] for v in views]
            for s, v, p in zip(stats, views, packed):
                _accumulate(s, v, p)
            if pair:
                for c, (act_m, _, _), (act_p, _, _), bits_m, bits_p in zip(
                    cross.values(), views[0], views[1], packed[0], packed[1]
                ):
                    kernels.cofire_counts(
                        bits_m, bits_p, out=c.cofire, n_threads=_threads_for(c.cofire, bits_m)
                    )
                    # float64: correlation = E[xy] - E[x]E[y] cancels badly for low-variance neurons (sigmoid
                    # units near 0.5), where float32 products lose ~1e-4 relative accuracy
                    c.sum_products += act_m.T @ act_p
            seen += len(batch)
            bar.update(len(batch))
    finally:
        bar.close()
    if seen == 0:
        raise DataError("the calibration set is empty: nothing to profile")
    return (*stats, cross) if pair else stats


def activations(net: NetworkIR, x: np.ndarray, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Every hidden layer's per-input neuron activations on `x`, (N, neurons) each (channels: spatial mean).

    Holds O(N x neurons) memory: for inspection and tests, not for calibration-sized data.
    """
    tapped = _Tapped(net)
    parts: dict[str, list[np.ndarray]] = {layer.name: [] for layer in tapped.hidden}
    for start in range(0, len(x), batch_size):
        batch = _check_batch(x[start : start + batch_size], net, start)
        for layer, (act, _, _) in zip(tapped.hidden, tapped.views(batch)):
            parts[layer.name].append(act)
    return {name: np.concatenate(p) for name, p in parts.items()}


def merge(a: ActivationStats, b: ActivationStats) -> ActivationStats:
    """Statistics of the union of two disjoint calibration sets (e.g. shards profiled in parallel)."""
    out = ActivationStats(a.network, a.count + b.count)
    for name, sa in a.layers.items():
        sb = b.layers[name]
        out.layers[name] = dataclasses.replace(
            sa,
            count=sa.count + sb.count,
            fire=sa.fire + sb.fire,
            nonzero=sa.nonzero + sb.nonzero,
            sum=sa.sum + sb.sum,
            sumsq=sa.sumsq + sb.sumsq,
            cofire=None if sa.cofire is None else sa.cofire + sb.cofire,
        )
    return out
