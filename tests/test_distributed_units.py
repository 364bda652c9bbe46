"""The parts of running on many processes that need no process group: splitting work, the launch options,
what a failed launch reports, and refusing bad launch settings before anything starts."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fluxkiln.engine import distributed
from fluxkiln.engine.launch import _report, strip_launch_args


@given(st.integers(0, 200), st.integers(1, 9))
def test_shards_cover_every_item_once_in_order_and_rank_0_is_never_idle(n, size):
    parts = [distributed.shard(n, distributed.World(r, size, r)) for r in range(size)]
    assert [i for p in parts for i in p] == list(range(n))
    assert max(map(len, parts)) - min(map(len, parts)) <= 1
    if n:
        assert len(parts[0]) >= 1


def test_world_from_the_launcher_environment():
    w = distributed.from_env({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"})
    assert (w.rank, w.size, w.local_rank, w.owner, w.many) == (1, 4, 1, False, True)
    assert distributed.from_env({}) == distributed.World()
    with pytest.raises(distributed.NodeError, match="outside WORLD_SIZE"):
        distributed.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(distributed.NodeError, match="whole numbers"):
        distributed.from_env({"WORLD_SIZE": "two"})


def test_a_world_of_one_runs_the_whole_share_here():
    assert distributed.run_shard(lambda part: [i * 10 for i in part], 3) == [0, 10, 20]
    assert distributed.broadcast("x") == "x" and distributed.all_gather(5) == [5]


def test_workers_are_started_without_the_launch_options():
    argv = ["run", "r.toml", "--gpus", "2", "--nnodes=2", "--rdzv-endpoint", "h:29400", "--rdzv-id", "x",
            "--procs", "3", "--set", "nodes.a.seed=1"]
    assert strip_launch_args(argv) == ["run", "r.toml", "--set", "nodes.a.seed=1"]


def _failure(code: int, pid: int = 10) -> SimpleNamespace:
    return SimpleNamespace(exitcode=code, pid=pid)


def test_a_failed_launch_names_the_rank_that_died_first(capsys):
    assert _report({0: _failure(-signal.SIGTERM, 1), 1: _failure(-signal.SIGKILL, 2)}) == 1
    err = capsys.readouterr().err
    assert "worker rank 1 (pid 2) was killed by SIGKILL" in err and "rank 0 was killed by SIGTERM" in err
    assert _report({0: _failure(1, 3)}) == 1
    assert "worker rank 0 (pid 3) exited with code 1" in capsys.readouterr().err
    assert _report({0: _failure(130), 1: _failure(-signal.SIGTERM)}) == 130  # interrupted, not failed


@pytest.mark.parametrize(("args", "message"), [
    (["--gpus", "0"], "--gpus N needs N >= 1"),
    (["--gpus", "2", "--nnodes", "2"], "--nnodes > 1 needs --rdzv-endpoint"),
])
def test_bad_launch_settings_are_refused_before_anything_starts(tmp_path, args, message):
    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nname = "r"\n')
    out = subprocess.run([sys.executable, "-m", "fluxkiln.engine.cli", "run", str(recipe), *args], capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr


def _load_with(tmp_path, context_parallel: int):
    from fluxkiln.engine.runner import Engine

    recipe = tmp_path / "cp.toml"
    recipe.write_text('[recipe]\nname = "cp"\n\n[nodes.base]\ntype = "load_model"\nmodel = "builtin:tiny-flux"\n'
                      f"context_parallel = {context_parallel}\n")
    result = Engine(cache_dir=tmp_path / "cache").run(recipe)
    return result, [e.data for e in result.events if e.event == "node_failed"]


def test_context_parallel_needs_one_process_per_gpu(tmp_path):
    result, failed = _load_with(tmp_path, 2)
    assert result.status == "failed"
    assert "context_parallel = 2 needs 2 processes, one per GPU; this run has 1" in failed[0]["error"]
    assert "--gpus 2" in failed[0]["hint"]


def test_only_diffusers_context_parallel_is_refused_on_cpu_in_a_world_of_the_right_size(tmp_path, monkeypatch):
    from fluxkiln.plugins.flux import parallel

    monkeypatch.setattr(distributed, "_world", distributed.World(0, 2, 0))  # as a launched rank 0 sees it
    with pytest.raises(distributed.NodeError, match="needs CUDA GPUs") as info:
        parallel.check(2, "cpu", "diffusers")
    assert info.value.key == "context_parallel_mode" and "auto" in info.value.hint
    for mode in ("auto", "ulysses", "allgather", "overlap"):  # fluxkiln's own runs on CPU with gloo
        parallel.check(2, "cpu", mode)
    parallel.check(1, "cpu", "diffusers")  # off: nothing to refuse


def test_context_parallel_off_keeps_the_split_and_the_residency_key(tmp_path):
    from fluxkiln.plugins.flux import parallel

    result, failed = _load_with(tmp_path, 1)
    assert result.ok, failed
    (model,) = result.outputs["base"].values()
    assert model.info["context_parallel"] == 1 and parallel.splits_images(model)
    assert model.key.endswith(f"|{model.info['device']}")  # no context-parallel suffix (device: cpu or cuda)
    assert model.info["device"] == ("cuda" if __import__("torch").cuda.is_available() else "cpu")
    shared = type(model)(ref="x", kind="flux", key="k", info={"context_parallel": 2})
    assert not parallel.splits_images(shared)


def test_python_dash_m_fluxkiln_is_the_fluxkiln_command():  # what torchrun / accelerate launch -m fluxkiln run
    out = subprocess.run([sys.executable, "-m", "fluxkiln", "run", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0 and "--gpus N" in out.stdout and "--rdzv-endpoint" in out.stdout


def test_the_sigint_gate_keeps_an_early_ctrl_c_counts_a_forwarded_repeat_once_and_aborts_on_a_second():
    from fluxkiln.engine.launch import SigintGate

    gate, calls = SigintGate(window=0.2), []
    gate()  # before anything is bound (the worker is still joining the group): kept, not lost
    assert gate.pending and not calls
    gate()  # the same Ctrl-C forwarded by a launcher within the window: ignored
    gate.bind(lambda: calls.append("cancel"))
    assert calls == ["cancel"] and not gate.pending and not gate.aborted
    time.sleep(0.25)
    with pytest.raises(KeyboardInterrupt):
        gate()  # a second Ctrl-C after the window: abort now
    assert gate.aborted and calls == ["cancel"]


def _one_gpu(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)


def test_more_workers_than_gpus_is_refused_before_anything_starts(tmp_path, monkeypatch, capsys):
    from fluxkiln.engine.cli import main

    _one_gpu(monkeypatch)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    recipe = tmp_path / "r.toml"
    recipe.write_text('[recipe]\nname = "r"\n')
    assert main(["run", str(recipe), "--gpus", "2"]) == 2
    err = capsys.readouterr().err
    assert "--gpus 2 starts one worker per GPU, but this host has 1 visible CUDA GPU (CUDA_VISIBLE_DEVICES='3')" in err
    assert "use --gpus 1 or fewer" in err and "CUDA_VISIBLE_DEVICES= fluxkiln ... --gpus 2" in err


def test_a_launcher_that_started_more_workers_than_gpus_gets_a_clear_error(monkeypatch):
    from fluxkiln.engine import distributed

    _one_gpu(monkeypatch)
    for key, value in {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(RuntimeError, match=r"2 workers were started on this host but it has 1 visible CUDA GPU"):
        distributed.init(timeout_s=5)
    assert not distributed.current().many  # nothing was joined


def test_launched_workers_get_a_fair_share_of_threads_unless_the_user_chose():
    from fluxkiln.engine.launch import worker_threads

    assert worker_threads({}, cuda=True, nproc=4, cpus=64) == "1"  # like torchrun: the work is on the GPUs
    assert worker_threads({}, cuda=False, nproc=4, cpus=64) == "16"  # CPU workers (gloo) share the CPUs
    assert worker_threads({}, cuda=False, nproc=4, cpus=2) == "1"
    assert worker_threads({"OMP_NUM_THREADS": "8"}, cuda=True, nproc=4, cpus=64) is None
    assert worker_threads({"OMP_NUM_THREADS": "8"}, cuda=False, nproc=2, cpus=64) is None


def _counting_ops() -> tuple[object, list[str]]:
    from torch.utils._python_dispatch import TorchDispatchMode

    seen: list[str] = []

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(str(func))
            return func(*args, **(kwargs or {}))

    return Count(), seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "mixed"])
def test_gradient_sum_is_one_all_reduce_in_a_few_ops_whatever_the_parameter_count(monkeypatch, dtype):
    import torch
    import torch.distributed as dist

    from fluxkiln.plugins.train.ddp import DataParallel

    gen = torch.Generator().manual_seed(0)
    kinds = {"float32": [torch.float32], "bfloat16": [torch.bfloat16], "mixed": [torch.bfloat16, torch.float32]}
    types = kinds[dtype]
    params = [torch.nn.Parameter(torch.randn(3 + i % 4, 2 + i % 3, generator=gen).to(types[i % len(types)]))
              for i in range(150)]
    for i, p in enumerate(params):
        p.grad = None if i == 7 else torch.randn(p.shape, generator=gen).to(p.dtype)
    before = [None if p.grad is None else p.grad.clone() for p in params]
    reduced: list[torch.Tensor] = []

    def all_reduce(t, *a, **kw):  # two ranks with the same gradients: every value doubles, exactly
        assert t.dtype == torch.float32 and t.ndim == 1
        reduced.append(t)
        t.mul_(2)

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    dp = DataParallel()
    dp.world = distributed.World(0, 2, 0)
    mode, seen = _counting_ops()
    with mode:
        loss = dp.sync(params, 0.25)
    assert len(reduced) == 1 and loss == 0.5
    for p, b in zip(params, before, strict=True):
        want = torch.zeros_like(p) if b is None else (b.float() * 2).to(p.dtype)
        assert p.grad.dtype == p.dtype and torch.equal(p.grad, want)
    # 150 parameters: a copy (kernel) per parameter each way would be 300+ ops that compute; views compute nothing
    views = ("view", "slice", "select", "narrow", "split", "reshape", "alias", "as_strided", "zeros_like", "empty")
    work = [s for s in seen if not any(v in s for v in views)]
    assert len(work) <= 6, work[:40]  # fill, cat, cast, the all-reduce, one multi-tensor copy, the loss


def test_cuda_graph_variants_of_context_parallelism_are_compared_with_one_gpu():
    import argparse

    from fluxkiln.plugins.bench.cp_latency import summary
    from fluxkiln.plugins.bench.many import cp_variants

    args = argparse.Namespace(cp_variants="allgather-graphs,one-graphs,one-compiled")
    assert cp_variants(args, "cuda") == ["one-compiled", "one-graphs", "allgather-graphs"]
    runs = {"one-compiled": {"s": 4.0}, "one-graphs": {"s": 3.6}, "allgather-graphs": {"s": 1.8},
            "ulysses-graphs": {"s": 2.0}}
    out = summary(runs)
    assert runs["allgather-graphs"]["ratio"] == 0.5  # against one GPU in the same (graph) mode
    assert out["best"] == {"variant": "allgather-graphs", "s": 1.8, "one_s": 3.6, "ratio": 0.5}
    alone = {"one-compiled": {"s": 4.0}, "allgather-graphs": {"s": 1.8}}
    summary(alone)
    assert alone["allgather-graphs"]["ratio"] == 0.45  # no one-graphs run: against one GPU compiled


def test_the_overlap_variants_are_measured_on_request_in_the_order_asked_for():
    import argparse

    from fluxkiln.plugins.bench.many import cp_variants

    asked = "one-compiled,one-graphs,allgather-graphs,overlap-graphs,overlap-compiled"
    assert cp_variants(argparse.Namespace(cp_variants=asked), "cuda") == [
        "one-compiled", "one-graphs", "allgather-graphs", "overlap-compiled", "overlap-graphs"]
    assert "overlap-eager" in cp_variants(argparse.Namespace(cp_variants=""), "cpu")
    assert not any(v.startswith("overlap") for v in cp_variants(argparse.Namespace(cp_variants=""), "cuda"))


def test_whole_step_graph_variants_and_inductor_options_are_asked_for_and_compared_with_one_gpu():
    import argparse

    from fluxkiln.plugins.bench.cp_latency import summary
    from fluxkiln.plugins.bench.many import cp_variants

    asked = "allgather-steps+noreorder,one-steps,allgather-steps,one-compiled,ulysses-compiled+sched"
    assert cp_variants(argparse.Namespace(cp_variants=asked), "cuda") == [
        "one-compiled", "ulysses-compiled+sched", "one-steps", "allgather-steps", "allgather-steps+noreorder"]
    for wrong in ("allgather-steps+fast", "allgather-eager+sched", "ring-steps"):
        with pytest.raises(SystemExit, match=f"unknown --cp-variants {re.escape(wrong)}.*may add \\+noreorder or \\+sched"):
            cp_variants(argparse.Namespace(cp_variants=wrong), "cuda")
    runs = {"one-compiled": {"s": 4.0}, "one-steps": {"s": 3.5}, "allgather-steps": {"s": 2.1},
            "allgather-steps+noreorder": {"s": 2.0}, "ulysses-compiled+sched": {"s": 2.6}}
    out = summary(runs)
    assert runs["allgather-steps+noreorder"]["ratio"] == round(2.0 / 3.5, 3)  # against one GPU with step graphs
    assert runs["ulysses-compiled+sched"]["ratio"] == 0.65
    assert out["best"] == {"variant": "allgather-steps+noreorder", "s": 2.0, "one_s": 3.5, "ratio": round(2 / 3.5, 3)}


def test_before_shutdown_callbacks_run_once_each_and_a_failing_one_does_not_stop_the_others():
    calls = []

    def release():
        calls.append("release")

    def broken():
        raise RuntimeError("graph already gone")

    distributed.before_shutdown(release)
    distributed.before_shutdown(release)  # registered twice: called once
    distributed.before_shutdown(broken)
    distributed.before_shutdown(lambda: calls.append("last"))
    with pytest.warns(RuntimeWarning, match="broken before leaving the process group failed: RuntimeError: graph"):
        distributed.shutdown()
    assert calls == ["release", "last"]
    distributed.shutdown()  # nothing left to call
    assert calls == ["release", "last"]


def test_nccl_connects_its_peers_at_start_unless_the_user_says_otherwise():
    env = {}
    distributed.nccl_defaults(env)
    assert env == {"NCCL_RUNTIME_CONNECT": "0"}  # graphs that record collectives cannot connect peers lazily
    mine = {"NCCL_RUNTIME_CONNECT": "1"}
    distributed.nccl_defaults(mine)
    assert mine == {"NCCL_RUNTIME_CONNECT": "1"}
