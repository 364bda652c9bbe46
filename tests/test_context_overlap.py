"""Context parallelism's ``overlap`` mode: attention with log-sum-exp, the exact merge of two partial attentions,
and three gloo processes whose overlapped attention equals attention over every rank's keys, eager and compiled
(one graph, the collective's wait placed after the local attention)."""

from __future__ import annotations

import os
import socket
import sys

import pytest

torch = pytest.importorskip("torch")

from fluxkiln.plugins.flux import context, lse_attention  # noqa: E402


def _qkv(sq: int, sk: int, seed: int = 0, dtype=None):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, 3, sq, 16, generator=g)
    k, v = torch.randn(2, 3, sk, 16, generator=g) * 2, torch.randn(2, 3, sk, 16, generator=g)
    return tuple(x.to(dtype or torch.float32) for x in (q, k, v))


def _sdpa(q, k, v):
    return torch.nn.functional.scaled_dot_product_attention(q, k, v)


@pytest.mark.parametrize("attend", [lse_attention.attend, lse_attention.attend_math], ids=["cpu-kernel", "math"])
def test_attend_returns_attention_and_its_log_sum_exp(attend):
    q, k, v = _qkv(7, 11)
    out, lse = attend(q, k, v)
    assert lse.shape == (2, 3, 7) and lse.dtype == torch.float32 and out.shape == q.shape
    torch.testing.assert_close(out, _sdpa(q, k, v), atol=1e-5, rtol=0)
    torch.testing.assert_close(lse, torch.logsumexp(q @ k.transpose(-2, -1) / 4.0, dim=-1), atol=1e-5, rtol=0)


@pytest.mark.parametrize("attend", [lse_attention.attend, lse_attention.attend_math], ids=["cpu-kernel", "math"])
def test_merging_two_partial_attentions_equals_attention_over_all_keys(attend):
    q, k, v = _qkv(9, 16, seed=3)
    cut = 5  # uneven parts: weights swapped between them would give another result
    o1, lse1 = attend(q, k[:, :, :cut], v[:, :, :cut])
    o2, lse2 = attend(q, k[:, :, cut:], v[:, :, cut:])
    whole = _sdpa(q, k, v)
    torch.testing.assert_close(lse_attention.merge(o1, lse1, o2, lse2), whole, atol=1e-5, rtol=0)
    torch.testing.assert_close(lse_attention.merge(o2, lse2, o1, lse1), whole, atol=1e-5, rtol=0)  # order-free
    swapped = lse_attention.merge(o1, lse2, o2, lse1)
    assert (swapped - whole).abs().max() > 1e-2  # the weights matter: the test sees a wrong merge
    plain_mean = (o1 + o2) / 2
    assert (plain_mean - whole).abs().max() > 1e-2


def test_merge_is_stable_for_large_log_sum_exps_and_keeps_the_dtype():
    q, k, v = _qkv(4, 8, seed=5, dtype=torch.bfloat16)
    k = k * 30  # log-sum-exps in the hundreds: their plain exp overflows float32
    o1, lse1 = lse_attention.attend_math(q, k[:, :, :3], v[:, :, :3])
    o2, lse2 = lse_attention.attend_math(q, k[:, :, 3:], v[:, :, 3:])
    out = lse_attention.merge(o1, lse1, o2, lse2)
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all()) and float(lse1.abs().max()) > 100
    whole = _sdpa(q.float(), k.float(), v.float())
    torch.testing.assert_close(out.float(), whole, atol=3e-2, rtol=0)


# ------------------------------------------------------------------ three ranks (gloo)
def _record(graphs: list):
    def backend(gm, example_inputs):
        graphs.append([str(n.target) for n in gm.graph.nodes if n.op == "call_function"])
        return gm.forward
    return backend


def _worker(rank: int, port: int, n: int, out: dict) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=n)
    try:
        g = torch.Generator().manual_seed(0)
        b, s, h, d = 1, 6, 2, 8
        q, k, v = (torch.randn(n, b, s, h, d, generator=g) for _ in range(3))  # every rank's tokens, same seed
        every = [x.permute(1, 3, 0, 2, 4).reshape(b, h, n * s, d) for x in (k, v)]
        want = _sdpa(q[rank].transpose(1, 2), *every).transpose(1, 2)
        group = dist.group.WORLD
        res = {}
        for mode in ("overlap", "allgather"):
            state = context.Split(n, rank, mode, group, group.group_name, active=True)
            res[mode] = float((context.attention(q[rank], k[rank], v[rank], state) - want).abs().max())
        state = context.Split(n, rank, "overlap", group, group.group_name, active=True)
        graphs: list = []
        compiled = torch.compile(lambda a, b_, c: context.attention(a, b_, c, state), fullgraph=True,
                                 backend=_record(graphs))
        res["compiled"] = float((compiled(q[rank], k[rank], v[rank]) - want).abs().max())
        res["graph"] = graphs
        out[rank] = res
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def three_ranks():
    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with mp.Manager() as manager:
        out = manager.dict()
        mp.spawn(_worker, args=(port, 3, out), nprocs=3, join=True)
        return dict(out)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo processes")
def test_overlapped_attention_of_each_rank_equals_attention_over_every_ranks_keys(three_ranks):
    for rank in range(3):  # the middle rank too: its own keys are cut out of the gathered ones, none twice
        got = three_ranks[rank]
        assert got["overlap"] <= 1e-5 and got["allgather"] <= 1e-5 and got["compiled"] <= 1e-5, (rank, got)


@pytest.mark.skipif(sys.platform == "win32", reason="gloo processes")
def test_compiled_overlap_is_one_graph_with_the_wait_after_the_local_attention(three_ranks):
    [ops] = three_ranks[0]["graph"]  # fullgraph=True: one graph or an error
    where = {name: [i for i, op in enumerate(ops) if name in op]
             for name in ("all_gather_into_tensor", "wait_tensor", "flash_attention_for_cpu")}
    gather, wait, attends = where["all_gather_into_tensor"], where["wait_tensor"], where["flash_attention_for_cpu"]
    assert len(gather) == len(wait) == 1 and len(attends) == 2, ops
    assert gather[0] < attends[0] < wait[0] < attends[1]  # the exchange runs while the local keys are attended
