"""benchmarks/kernels_gpu.py --docs: the table lands between the markers, the rest stays."""

from __future__ import annotations

import importlib.util
import json
import sys

import jax
import pytest

from tests.conftest import ROOT


def load_script():
    spec = importlib.util.spec_from_file_location("kernels_gpu", ROOT / "benchmarks" / "kernels_gpu.py")
    module = importlib.util.module_from_spec(spec)
    argv, sys.argv = sys.argv, ["kernels_gpu.py"]
    try:
        spec.loader.exec_module(module)
    finally:
        sys.argv = argv
    return module


def test_write_docs_replaces_only_the_marked_table(tmp_path):
    kg = load_script()
    results = json.loads((ROOT / "benchmarks" / "results" / "kernels_gpu.json").read_text())
    doc = tmp_path / "bench.md"
    doc.write_text(f"# Title\n\nintro\n\n{kg.DOCS_BEGIN}\nold table\n{kg.DOCS_END}\n\nafter\n")
    kg.write_docs(results, str(doc))
    text = doc.read_text()
    assert text.startswith("# Title\n\nintro\n\n") and text.endswith(f"{kg.DOCS_END}\n\nafter\n")
    assert "old table" not in text
    table = text.split(kg.DOCS_BEGIN)[1].split(kg.DOCS_END)[0]
    assert "### Correctness" in table and "#### simple_gla" in table  # headings one level down
    assert "# LinearNexus Pallas kernels" not in table  # the title is dropped
    for shape in kg.SHAPES:  # every shape of the issue has a row, measured or "not run"
        assert f"| {shape} |" in table
    kg.write_docs(results, str(doc))  # idempotent
    assert doc.read_text() == text

    doc.write_text("no markers here\n")
    with pytest.raises(ValueError, match="--docs: .* has no"):
        kg.write_docs(results, str(doc))


def test_profile_script_reads_a_trace():
    # benchmarks/profile_gpu.py: the op builds, the profiler trace is written and parsed; on
    # the CPU it holds no GPU plane, so no kernels; on a GPU, each kernel with its launches
    spec = importlib.util.spec_from_file_location("profile_gpu", ROOT / "benchmarks" / "profile_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    fn, arg = module.build("simple_gla", (1, 32, 2, 16), "fwd")
    times = module.kernel_times(fn, arg, calls=1)
    if jax.default_backend() == "gpu":
        assert times and all(n > 0 and ms >= 0 for ms, n in times.values()), times
        assert sum(ms for ms, _ in times.values()) > 0, times
    else:
        assert times == {}
    with pytest.raises(SystemExit):
        sys.argv, argv = ["profile_gpu.py", "gla", "--shape", "1,2"], sys.argv
        try:
            module.main()
        finally:
            sys.argv = argv


def test_scan_bound_balances_the_two_pipes():
    # benchmarks/scan_bound.py's model: the best FMA-pipe share of the exp2s makes the MUFU and
    # issue times equal, is no slower than every exp2 on MUFU, and the step size given is less work
    spec = importlib.util.spec_from_file_location("scan_bound", ROOT / "benchmarks" / "scan_bound.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    shape = (8, 4096, 2048, 16)
    r_mufu, r_issue = 16 * 132 * 1.98e9, 128 * 132 * 1.98e9  # H200 datasheet rates
    out = module.forward_bound(shape, r_mufu, r_issue)
    updates = 8 * 4096 * 2048 * 16
    m, s, x = out["mufu_per_update"], out["other_per_update"], out["best_offload"]
    assert m == 1 + module.PER_TOKEN_MUFU / 16 and 0 < x < m
    mufu_time = updates * (m - x) / r_mufu
    issue_time = updates * (s + m + (module.SOFT_EXP2_INSTR - 1) * x) / r_issue
    assert mufu_time == pytest.approx(issue_time, rel=1e-9) == pytest.approx(out["best_s"], rel=1e-9)
    assert out["best_s"] < out["all_mufu_s"] == pytest.approx(updates * m / r_mufu, rel=1e-9)
    given = module.forward_bound(shape, r_mufu, r_issue, step_given=True)
    assert given["best_s"] < out["best_s"]
    # where issue is the scarce resource the FMA-pipe exp2 never pays
    slow_issue = module.forward_bound(shape, r_mufu, r_mufu / 100)
    assert slow_issue["best_offload"] == 0.0 and slow_issue["best_s"] == slow_issue["all_mufu_s"]


_NCU_SAMPLE = """==PROF== Connected to process 123 (/usr/bin/python3.12)
==PROF== Profiling "simple_gla_fwd": 0%....50%....100% - 9 passes
  simple_gla_fwd (16, 8, 2)x(128, 1, 1), Context 1, Stream 13, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    ----------------------- ----------- ------------
    Metric Name             Metric Unit Metric Value
    ----------------------- ----------- ------------
    DRAM Frequency                  Ghz         2.62
    Memory Throughput                 %        41.20
    DRAM Throughput                   %        38.50
    Duration                         us       241.06
    Compute (SM) Throughput           %        22.10
    ----------------------- ----------- ------------

    OPT   This kernel grid is too small to fill the available resources on this device.
    Section: Memory Workload Analysis
    Memory Throughput         Tbyte/s         1.64
    Section: Occupancy
    Achieved Occupancy              %         6.25
  void input_reduce_fusion<float>(int) (132, 1, 1)x(256, 1, 1), Context 1, Stream 13, Device 0, CC 9.0
    Section: GPU Speed Of Light Throughput
    DRAM Throughput                   %        80.00
    Duration                         ms         1.50
    Memory Throughput         Gbyte/s       900.00
    Registers Per Thread  register/thread           40
"""


def test_ncu_summary_parses_a_report():
    # benchmarks/ncu_summary.py: kernels by their header lines (a templated name with spaces
    # too), each metric in its unit (Memory Throughput both as Speed Of Light's % and as a
    # rate), durations in microseconds, shares of the summed duration; text rows skipped
    spec = importlib.util.spec_from_file_location("ncu_summary", ROOT / "benchmarks" / "ncu_summary.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    kernels = module.parse(_NCU_SAMPLE)
    assert [k["name"] for k in kernels] == ["simple_gla_fwd", "void input_reduce_fusion<float>(int)"]
    assert kernels[0]["grid"] == (16, 8, 2) and kernels[0]["block"] == (128, 1, 1)
    first, second = kernels
    assert module._value(first, "Duration") == pytest.approx(241.06)
    assert module._value(second, "Duration") == pytest.approx(1500.0)
    assert module._value(first, "Memory Throughput") == pytest.approx(1640.0)  # the rate
    assert first["metrics"]["Memory Throughput"] == ("%", 41.2)  # the first seen
    assert module._value(second, "Memory Throughput") == pytest.approx(900.0)
    assert module._value(second, "Registers Per Thread") == 40
    assert module._value(first, "Registers Per Thread") is None
    rows = module.table(kernels).splitlines()
    assert len(rows) == 4 and rows[2].startswith("| simple_gla_fwd | 16x8x2 | 241.1 | 38.5 |")
    assert rows[2].endswith("| 14% |") and rows[3].endswith("| 86% |")
    # --between: the kernels strictly between two markers (decode_step_once.py's)
    names = ["init", "step_marker_before", "a", "b", "step_marker_after", "c"]
    listed = [{"name": n} for n in names]
    assert [k["name"] for k in module.between(listed, "marker_before", "marker_after")] == [
        "a", "b"]
    assert [k["name"] for k in module.between(listed[:4], "marker_before", "marker_after")] == [
        "a", "b"]  # no closing marker: everything after the first
    assert module.between(listed, "absent", "marker_after") == []
    # --by-name: one row per distinct name, largest sum first
    grouped = module.by_name(kernels + kernels[:1]).splitlines()
    assert grouped[2].startswith("| void input_reduce_fusion<float>(int) | 1 | 1,500.0 |")
    assert grouped[3].startswith("| simple_gla_fwd | 2 | 482.1 | 241.1 |")


def test_decode_gpu_on_the_cpu_and_an_fla_cell_in_its_own_process(tmp_path):
    # decode_gpu.py --quick (the issue 23 benchmark's CPU smoke test) writes its rows; an FLA
    # cell runs in a child process and comes back as a row, here an error one (no FLA / CUDA)
    import argparse

    spec = importlib.util.spec_from_file_location("decode_gpu", ROOT / "benchmarks" / "decode_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--skip-fla", "--models", "mamba2", "--out",
                        str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "decode_gpu.json").read_text())["rows"]
    assert [r["batch"] for r in rows] == [1, 4] and all(r["ms_per_step"] > 0 for r in rows)
    args = argparse.Namespace(d_model=64, layers=2, vocab=256, fla_steps=4, repeats=1,
                              max_seq_len=64)
    # Mamba2 (no MLP) gets twice the layers unless --mamba2-layers says otherwise
    assert module.model_layers("mamba2", args) == 4 and module.model_layers("gdn", args) == 2
    assert module.model_layers("mamba2", argparse.Namespace(layers=2, mamba2_layers=3)) == 3
    row = module.fla_cell("mamba2", 1, args, 120.0)
    assert row["framework"] == "fla" and row["model"] == "mamba2" and row["batch"] == 1
    assert "error" in row and "ms_per_step" not in row


def test_decode_gpu_counts_only_the_gpus_own_work_in_a_trace():
    # FLA's kernel time a step: the chrome trace's kernels, copies and fills, not the
    # profiler's host-side markers nor the operators that launched the kernels
    spec = importlib.util.spec_from_file_location("decode_gpu", ROOT / "benchmarks" / "decode_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    trace = {"traceEvents": [
        {"ph": "X", "cat": "kernel", "name": "gemm", "dur": 5.0},
        {"ph": "X", "cat": "kernel", "name": "fused_recurrent", "dur": 30.0},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoD", "dur": 2.0},
        {"ph": "X", "cat": "gpu_memset", "name": "Memset", "dur": 1.0},
        {"ph": "X", "cat": "cpu_op", "name": "aten::mm", "dur": 40.0},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "dur": 8.0},
        {"ph": "X", "cat": "overhead", "name": "Command Buffer Full", "dur": 4000.0},
        {"ph": "i", "cat": "kernel", "name": "marker"}]}
    seconds, kernels = module.trace_gpu_time(trace)
    assert seconds == pytest.approx(38e-6) and kernels == 2
    assert module.trace_gpu_time({}) == (0.0, 0)


def test_decode_step_once_runs_one_step(capsys):
    # decode_step_once.py: the program benchmarks/ncu_decode_gpu.sh wraps (a tiny model here)
    spec = importlib.util.spec_from_file_location(
        "decode_step_once", ROOT / "benchmarks" / "decode_step_once.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--quick", "--model", "mamba2"]) == 0
    assert "mamba2 batch 1: one step (with its two markers) took" in capsys.readouterr().out


def test_profile_script_once_runs_untraced(capsys):
    # profile_gpu.py --once: the program Nsight Compute wraps (benchmarks/ncu_gpu.sh) runs the
    # call once and writes no trace
    spec = importlib.util.spec_from_file_location("profile_gpu", ROOT / "benchmarks" / "profile_gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.argv, argv = ["profile_gpu.py", "simple_gla", "--shape", "1,32,2,16", "--mode", "fwd",
                      "--once"], sys.argv
    try:
        module.main()
    finally:
        sys.argv = argv
    assert "ran once, untraced" in capsys.readouterr().out


def test_host_time_flags_a_host_bound_measurement(monkeypatch):
    """``host_time`` marks a measurement whose calls' dispatch takes most of its time
    (``host_bound``): a fake device whose calls run 2 ms each once issued is device-bound
    when issuing is free, host-bound when each call holds the host 3 ms itself.

    The clock is virtual (``sleep`` advances it): on a loaded CI host real sleeps overshoot,
    the calibration call reads long, and the 3 ms case was once measured with n = 2 calls,
    whose final 2 ms wait pulled its dispatch share under the threshold."""
    import types

    kg = load_script()
    monkeypatch.setattr(kg, "WARM_S", 0.0)
    clock = [0.0]

    def sleep(seconds):
        clock[0] += max(0.0, seconds)

    monkeypatch.setattr(kg, "time", types.SimpleNamespace(perf_counter=lambda: clock[0], sleep=sleep))
    done = [0.0]  # when the fake device finishes what was issued

    def make_call(host_s):
        def call(i):
            sleep(host_s)
            done[0] = max(done[0], clock[0]) + 0.002  # 2 ms of device time
            return done[0]
        return call

    def sync(out):
        sleep(done[0] - clock[0])

    device = kg.host_time(make_call(0.0), sync, repeats=3, n_sets=1)
    host = kg.host_time(make_call(0.003), sync, repeats=3, n_sets=1)
    assert not device["host_bound"] and device["dispatch_ms"] == 0.0
    assert device["ms"] == pytest.approx(2.0) and device["n"] == 10
    # one calibration call takes 3 + 2 ms -> n = 4; per call 3 ms issuing + 2 ms / 4 waiting
    assert host["n"] == 4 and host["ms"] == pytest.approx(3.5)
    assert host["host_bound"] and host["dispatch_ms"] == pytest.approx(3.0)
    assert kg.fmt_ms({"fwd": host}, "fwd").endswith("*")
    assert not kg.fmt_ms({"fwd": device}, "fwd").endswith("*")


def test_environment_records_the_switches_and_the_source(tmp_path, monkeypatch):
    """Every GPU result file's environment names the library switches set
    (``LINEARNEXUS_*``) and a digest of the library's sources: equal for equal trees,
    different after any edit, whatever the checkout's git says."""
    kg = load_script()
    monkeypatch.setenv("LINEARNEXUS_MOSAIC_WAVES", "1")
    env = kg.environment(None)
    assert env["linearnexus_switches"]["LINEARNEXUS_MOSAIC_WAVES"] == "1"
    assert env["linearnexus_source"] == kg.source_digest()
    tree = tmp_path / "linearnexus"
    tree.mkdir()
    (tree / "a.py").write_text("x = 1\n")
    first = kg.source_digest(tmp_path)
    assert len(first) == 12 and kg.source_digest(tmp_path) == first
    (tree / "a.py").write_text("x = 2\n")
    assert kg.source_digest(tmp_path) != first
