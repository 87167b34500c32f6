"""Distributed execution on torch.distributed, launched by torchrun.

Independent work (members trained from scratch, grown members) is split into tasks; task i runs on rank
i mod world_size. Each task returns its facts and its artifact's bytes, which are gathered to every rank
(`all_gather_object`), so nothing depends on a shared filesystem: rank 0 writes the run directory. A task
that fails on its rank is retried once on rank 0; if it fails again the compile stops with an error that
names the member, never with a member silently missing.

Backends: gloo on CPU (tested with 2 ranks on loopback), NCCL when every rank has a CUDA device.
torchrun sets OMP_NUM_THREADS=1 per rank; codec sets torch's intra-op threads deliberately to
cores // local ranks (at least 1) unless the user chose `--threads`.
"""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from codec.errors import CodecError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    local_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current() -> World:
    """This process's place in the job, from torchrun's environment (a single process otherwise)."""
    env = os.environ
    return World(
        int(env.get("RANK", 0)),
        int(env.get("WORLD_SIZE", 1)),
        int(env.get("LOCAL_RANK", 0)),
        int(env.get("LOCAL_WORLD_SIZE", env.get("WORLD_SIZE", 1))),
    )


def init(threads: int | None = None) -> World:
    """Join the process group when launched by torchrun (idempotent); set torch threads deliberately."""
    import torch
    import torch.distributed as dist

    world = current()
    if not world.distributed:
        return world
    if not dist.is_initialized():
        use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world.local_size
        if use_cuda:
            torch.cuda.set_device(world.local_rank)
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
        # Leaving with the group alive kills the process in gloo's destructor ("terminate called without an
        # active exception"), turning a finished job into a failed one: tear it down at exit.
        atexit.register(shutdown)
    torch.set_num_threads(threads or max(1, (os.cpu_count() or 1) // world.local_size))
    return world


def shutdown() -> None:
    """Leave the process group (idempotent)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_process(code: int = 0) -> None:
    """End this process with `code`; in a torchrun worker, without interpreter finalization.

    After a worker has finished and left the process group, the C++ teardown of torch.distributed at
    interpreter exit can still abort it ("terminate called without an active exception", SIGABRT on
    both ranks), and torchrun then reports the whole job failed although every artifact was written.
    Seen here with torch 2.13 and gloo in 3 of 30 2-rank runs of the coupled-training test job under
    load (3 of 30 again with a barrier before leaving the group), and in 0 of 30 ending this way. So a
    worker leaves the process group, flushes its streams and logs, and exits with `os._exit`: codec's
    artifacts are already on disk (written atomically, fsynced).
    Outside torchrun this is `sys.exit(code)`.
    """
    if not current().distributed:
        sys.exit(code)
    import logging

    try:
        shutdown()
    finally:
        logging.shutdown()
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            # a closed or broken stream must not change the exit status
            except Exception:  # noqa: BLE001, S110
                pass
        os._exit(code)


def barrier() -> None:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def broadcast(obj: Any, src: int = 0) -> Any:
    """`obj` from rank `src` on every rank (the object itself when not distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def run_tasks(names: list[str], fn: Callable[[str], Any]) -> dict[str, Any]:
    """Run `fn(name)` for every task, spread over ranks; every rank gets every result.

    Results travel between codec's own processes only (pickled by torch.distributed's object
    collectives), never from files or the network.
    """
    import torch.distributed as dist

    world = current()
    if not (world.distributed and dist.is_initialized()):
        return {name: fn(name) for name in names}
    mine: dict[str, tuple[bool, Any]] = {}
    for i, name in enumerate(names):
        if i % world.size == world.rank:
            try:
                mine[name] = (True, fn(name))
            except CodecError as exc:
                mine[name] = (False, f"{type(exc).__name__}: {exc}")
            except Exception:  # a crash on one rank must not hang the others in the gather below
                mine[name] = (False, traceback.format_exc(limit=3))
    gathered: list[dict] = [None] * world.size
    dist.all_gather_object(gathered, mine)
    results: dict[str, Any] = {}
    failed = []
    for part in gathered:
        for name, (ok, value) in part.items():
            if ok:
                results[name] = value
            else:
                failed.append((name, value))
    retried = {}
    for name, error in failed:
        print(
            f"codec: task {name} failed on its rank ({error.strip().splitlines()[-1]}); retrying on rank 0",
            file=sys.stderr,
        )
        if world.is_main:
            try:
                retried[name] = (True, fn(name))
            except Exception as exc:  # reported below, on every rank
                retried[name] = (False, str(exc))
    retried = broadcast(retried)
    for name, (ok, value) in retried.items():
        if not ok:
            raise CodecError(f"member {name} failed twice (on its rank and on rank 0): {value}")
        results[name] = value
    missing = [n for n in names if n not in results]
    if missing:
        raise CodecError(f"no result for {', '.join(missing)}")
    return results


def partition(names: list[str]) -> list[list[str]]:
    """The tasks of each rank under `run_task_groups`: task i goes to rank i mod world size (all of them
    to the one process when not distributed)."""
    import torch.distributed as dist

    world = current()
    if not (world.distributed and dist.is_available() and dist.is_initialized()):
        return [list(names)]
    return [names[rank :: world.size] for rank in range(world.size)]


def run_task_groups(names: list[str], fn: Callable[[list[str]], dict[str, Any]]) -> dict[str, Any]:
    """Run `fn(part)` once per rank on that rank's part of the tasks (`partition`), so that one call can
    train its members together; every rank gets every result.

    A part that fails on its rank is retried on rank 0 as a whole.
    """
    import torch.distributed as dist

    world = current()
    if not names:
        return {}
    if not (world.distributed and dist.is_initialized()):
        return dict(fn(list(names)))
    part = partition(names)[world.rank]
    mine: tuple[bool, Any] = (True, {})
    if part:
        try:
            mine = (True, dict(fn(part)))
        except CodecError as exc:
            mine = (False, f"{type(exc).__name__}: {exc}")
        except Exception:  # noqa: BLE001 - a crash on one rank must not hang the others in the gather below
            mine = (False, traceback.format_exc(limit=3))
    gathered: list = [None] * world.size
    dist.all_gather_object(gathered, (part, mine))
    results: dict[str, Any] = {}
    failed = []
    for their_part, (ok, value) in gathered:
        if ok:
            results.update(value)
        else:
            failed.append((their_part, value))
    retried = {}
    for their_part, error in failed:
        label = "+".join(their_part)
        print(
            f"codec: tasks {label} failed on their rank ({error.strip().splitlines()[-1]}); retrying "
            "on rank 0",
            file=sys.stderr,
        )
        if world.is_main:
            try:
                retried[label] = (True, dict(fn(their_part)))
            except Exception as exc:  # noqa: BLE001 - reported below, on every rank
                retried[label] = (False, str(exc))
    retried = broadcast(retried)
    for label, (ok, value) in retried.items():
        if not ok:
            raise CodecError(f"members {label} failed twice (on their rank and on rank 0): {value}")
        results.update(value)
    missing = [n for n in names if n not in results]
    if missing:
        raise CodecError(f"no result for {', '.join(missing)}")
    return results


def launch(nproc: int, argv: list[str]) -> int:
    """Re-run `codec <argv>` under torchrun with `nproc` local processes; returns its exit status."""
    if nproc < 1:
        raise CodecError(f"--nproc must be at least 1, got {nproc}")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "codec",
        *argv,
    ]
    return subprocess.call(command)


def strip_nproc(argv: list[str]) -> list[str]:
    """The command line without `--nproc N` / `--nproc=N` (the launched ranks must not relaunch)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg == "--nproc":
            skip = True
            continue
        if arg.startswith("--nproc="):
            continue
        out.append(arg)
    return out
