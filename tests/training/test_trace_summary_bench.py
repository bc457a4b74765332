"""bench/trace_summary.py: a step's GPU-busy time is the union of its kernels, counted by hand."""

from tests.conftest import load_bench


def test_busy_time_idle_and_host_waits_of_a_hand_made_trace():
    ts = load_bench("trace_summary")
    events = [
        {"ph": "X", "name": "ProfilerStep#3", "ts": 0, "dur": 10_000},
        # two streams overlapping (1000-4000 and 3000-5000: 4 ms busy), one copy (6000-7000), one kernel after the step
        {"ph": "X", "cat": "kernel", "name": "sm90_xmma_gemm_bf16", "ts": 1000, "dur": 3000},
        {"ph": "X", "cat": "kernel", "name": "ncclDevKernel_AllGather", "ts": 3000, "dur": 2000},
        {"ph": "X", "cat": "gpu_memcpy", "name": "Memcpy DtoH", "ts": 6000, "dur": 1000},
        {"ph": "X", "cat": "kernel", "name": "triton_poi_fused_add_0", "ts": 12_000, "dur": 500},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaStreamSynchronize", "ts": 5000, "dur": 2500},
        {"ph": "X", "cat": "cuda_runtime", "name": "cudaLaunchKernel", "ts": 100, "dur": 5000},
    ]
    s = ts.summarize(events)
    (step,) = s["steps"]
    assert step["wall_us"] == 10_000 and step["gpu_busy_us"] == 5000
    assert step["host_wait_us"] == 2500 and step["host_waits"] == [(2500, "cudaStreamSynchronize")]
    assert dict(s["classes"]) == {"matmul": 3000, "communication": 2000, "copy/cast": 1000}
