"""The pure parts of ``fluxkiln bench --gpus N --profile``: kernel and op kinds (NCCL, gloo, c10d), interval
overlap of communication and compute, self times of nested ops, a trace's host and device summary, the table."""

from __future__ import annotations

import pytest

from fluxkiln.plugins.bench.profile import kind_of, merged, minus, overlap_time, summarize_trace
from fluxkiln.plugins.bench.step_profile import (WINDOW, host_summary, op_kind, render_profiles, self_times,
                                                 summarize)


@pytest.mark.parametrize("name", [
    "ncclDevKernel_AllReduce_Sum_f32_RING_LL(ncclDevKernelArgsStorage<4096ul>)",
    "ncclKernel_AllGather_RING_LL_Sum_int8_t(ncclDevComm*, unsigned long, ncclWork*)",
    "ncclDevKernel_SendRecv(ncclDevKernelArgsStorage<4096ul>)",
    "gloo:all_reduce", "gloo:all_gather", "c10d::allreduce_", "_c10d_functional::all_gather_into_tensor",
    "_c10d_functional::all_to_all_single", "_c10d_functional::wait_tensor", "record_param_comms",
])
def test_collectives_are_communication(name):
    assert kind_of(name) == "communication"
    assert op_kind(name) == "communication"


def test_compute_kernels_keep_their_kinds_beside_communication():
    assert kind_of("triton_poi_fused_all_gather_into_tensor_cat_0") == "triton_fused"  # a copy Inductor fused
    assert kind_of("void pytorch_flash::flash_fwd_kernel<...>") == "attention"
    assert kind_of("nvjet_tst_256x128_64x4_1x2_h_bz_coopA_TNT") == "gemm"
    assert kind_of("void at::native::elementwise_kernel<128, 2>") == "other"
    assert op_kind("aten::randn") == op_kind("aten::normal_") == "rng"
    assert op_kind("aten::addmm") == "gemm" and op_kind("aten::copy_") == "copy"
    assert op_kind("aten::_scaled_dot_product_flash_attention_for_cpu") == "attention"
    assert op_kind("aten::_foreach_add_") == "optimizer" and op_kind("aten::gelu") == "other"


def test_overlap_of_two_sets_of_intervals():
    assert merged([(5, 6), (0, 2), (1, 3), (3, 4), (7, 7)]) == [(0, 4), (5, 6)]
    assert overlap_time([(0, 10)], [(2, 3), (5, 7)]) == pytest.approx(3.0)
    assert overlap_time([(2, 3), (5, 7)], [(0, 10)]) == pytest.approx(3.0)  # symmetric
    assert overlap_time([(0, 4), (2, 6)], [(3, 5), (4, 8)]) == pytest.approx(3.0)  # overlapping within each set
    assert overlap_time([(0, 1), (2, 3)], [(1, 2), (3, 4)]) == 0.0  # touching only
    assert overlap_time([], [(0, 1)]) == 0.0 and overlap_time([(0, 1)], []) == 0.0
    assert minus([(0, 10)], [(2, 3), (5, 7), (9, 12)]) == [(0, 2), (3, 5), (7, 9)]
    assert minus([(0, 2), (4, 6)], [(1, 5)]) == [(0, 1), (5, 6)]
    assert minus([(0, 1)], [(0, 1)]) == []


def _k(name: str, ts: float, dur: float) -> dict:
    return {"cat": "kernel", "name": name, "ts": ts, "dur": dur}


def test_device_summary_splits_communication_into_overlapped_and_exposed():
    trace = {"traceEvents": [
        _k("nvjet_gemm", 0, 4000), _k("ncclDevKernel_AllGather_RING_LL", 3000, 3000),  # 1 ms under the GEMM
        _k("flash_fwd", 6000, 1000), _k("ncclDevKernel_AllReduce_Sum_f32", 9000, 1000),
        _k("late_kernel_outside_the_window", 20000, 500)]}
    got = summarize_trace(trace, wall_ms=10.0, window=(0, 10000))
    assert got["kernels"] == 4 and got["busy_ms"] == 8.0 and got["idle_pct"] == 20.0
    assert got["ms_by_kind"] == {"communication": 4.0, "gemm": 4.0, "attention": 1.0}
    assert got["comm_ms"] == 4.0 and got["overlapped_ms"] == 1.0 and got["exposed_comm_ms"] == 3.0


def test_self_time_counts_a_parents_time_in_its_children_once():
    ops = [{"name": "outer", "ts": 0, "dur": 10, "tid": 1}, {"name": "inner", "ts": 2, "dur": 3, "tid": 1},
           {"name": "inner", "ts": 6, "dur": 2, "tid": 1}, {"name": "leaf", "ts": 2.5, "dur": 1, "tid": 1},
           {"name": "other_thread", "ts": 1, "dur": 4, "tid": 2}]
    got = {}
    for name, own in self_times(ops):
        got[name] = got.get(name, 0) + own
    assert got == {"outer": 5, "inner": 4, "leaf": 1, "other_thread": 4}


def _cpu_trace() -> dict:
    """A CPU (gloo) step: the main thread computes, enqueues an all-reduce, waits, computes; gloo's worker
    thread runs the collective, 1 ms of it while the main thread still computes."""
    return {"traceEvents": [
        {"cat": "user_annotation", "name": WINDOW, "ts": 0, "dur": 10000, "tid": 1},
        {"cat": "user_annotation", "name": "phase:forward", "ts": 0, "dur": 3000, "tid": 1},
        {"cat": "cpu_op", "name": "aten::addmm", "ts": 100, "dur": 2000, "tid": 1},
        {"cat": "cpu_op", "name": "aten::randn", "ts": 2100, "dur": 900, "tid": 1},
        {"cat": "user_annotation", "name": "phase:sync", "ts": 3000, "dur": 5000, "tid": 1},
        {"cat": "cpu_op", "name": "c10d::allreduce_", "ts": 3000, "dur": 100, "tid": 1},
        {"cat": "cpu_op", "name": "aten::mul", "ts": 3100, "dur": 900, "tid": 1},
        {"cat": "user_annotation", "name": "gloo:all_reduce", "ts": 3000, "dur": 4000, "tid": 2},
        {"cat": "cpu_op", "name": "aten::copy_", "ts": 3500, "dur": 500, "tid": 2},  # inside the collective
        {"cat": "cpu_op", "name": "aten::mm", "ts": 8000, "dur": 1000, "tid": 1},
        {"cat": "cpu_op", "name": "aten::mm", "ts": 30000, "dur": 1000, "tid": 1}]}  # after the window


def test_host_summary_of_a_gloo_step():
    host = host_summary(_cpu_trace(), (0, 10000))
    assert host["ops"] == 6  # the op after the window is not counted
    assert host["comm_ms"] == 4.0 and host["overlapped_ms"] == 0.9 and host["exposed_comm_ms"] == 3.1
    assert host["op_self_ms_by_kind"] == {"gemm": 3.0, "other": 0.9, "rng": 0.9, "copy": 0.5, "communication": 0.1}
    assert host["phases_ms"] == {"forward": {"host": 3.0, "device": None}, "sync": {"host": 5.0, "device": None}}


def test_a_cpu_run_reports_no_device_numbers_and_the_table_says_where_comm_comes_from():
    got = summarize(_cpu_trace(), wall_ms=10.0, cuda=False)
    assert got["wall_ms"] == 10.0 and got["host"]["ops"] == 6
    for key in ("busy_ms", "idle_pct", "kernels", "ms_by_kind", "comm_ms", "overlapped_ms"):
        assert got[key] is None, key
    row = {**got, "what": "ddp step together", "rank": 1, "cpu_per_wall": 0.75, "sm_clock_mhz": None,
           "threads": {"intra_op": 1}}
    gpu = {**row, "rank": 0, "busy_ms": 8.0, "idle_pct": 20.0, "comm_ms": 4.0, "overlapped_ms": 1.0, "kernels": 4,
           "sm_clock_mhz": {"mean": 1830.0}}
    table = render_profiles({"ddp": {"profile": {"alone": None, "together": [gpu, row]}}})
    lines = table.splitlines()
    assert "rank" in lines[1] and "idle %" in lines[1] and "overlap ms" in lines[1] and "cpu/wall" in lines[1]
    assert lines[2].split() == ["0", "ddp", "step", "together", "10.0", "8.0", "20.0", "4.0", "1.0", "4", "6", "1",
                                "0.75", "1830"]
    assert lines[3].split() == ["1", "ddp", "step", "together", "10.0", "-", "-", "4.0*", "0.9*", "-", "6", "1",
                                "0.75", "-"]
    assert lines[-1].startswith("  * no GPU kernels")
    assert render_profiles({"ddp": {"one_step_s": 1.0}}) == ""


def test_sm_clock_is_sampled_while_a_call_runs_and_unknown_without_a_reader(monkeypatch):
    import time

    from fluxkiln.plugins.bench import hostfacts

    readings = iter([1980.0, None, 1755.0] + [1800.0] * 1000)
    monkeypatch.setattr(hostfacts, "_clock_reader", lambda: ((lambda: next(readings)), 1980.0))
    clock = hostfacts.SmClock(every_s=0.001).start()
    time.sleep(0.05)
    got = clock.stop()
    assert got["min"] == 1755.0 and got["max"] == 1980.0 and got["device_max"] == 1980.0 and got["samples"] >= 3
    monkeypatch.setattr(hostfacts, "_clock_reader", lambda: (None, None))
    assert hostfacts.SmClock().start().stop() is None


def test_a_cuda_trace_gives_device_numbers_and_each_phases_gpu_time():
    trace = _cpu_trace()
    trace["traceEvents"] += [
        _k("nvjet_tst_gemm", 500, 2000), _k("ncclDevKernel_AllReduce_Sum_f32_RING_LL", 3200, 3000),
        {"cat": "gpu_user_annotation", "name": "phase:forward", "ts": 500, "dur": 2000},
        {"cat": "gpu_user_annotation", "name": "phase:sync", "ts": 3200, "dur": 3000}]
    got = summarize(trace, wall_ms=10.0, cuda=True)
    assert got["kernels"] == 2 and got["busy_ms"] == 5.0 and got["idle_pct"] == 50.0
    assert got["comm_ms"] == 3.0 and got["overlapped_ms"] == 0.0 and got["exposed_comm_ms"] == 3.0
    assert got["host"]["phases_ms"] == {"forward": {"host": 3.0, "device": 2.0}, "sync": {"host": 5.0, "device": 3.0}}
