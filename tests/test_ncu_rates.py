"""kernels/bench/ncu_rates.py: Nsight Compute's CSV (as `ncu --csv --print-units base --metrics ...` writes it)
into per-kernel rates."""

from hybridlab.kernels.bench.ncu_rates import METRICS, TENSOR_METRICS, markdown, parse_ncu_csv, short_name, summarize

HEADER = '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",' \
         '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'


def _rows(launch_id, kernel, values):
    return [f'"{launch_id}","1","python3","h","{kernel}","1","7","(128, 1, 1)","(64, 8, 1)","0","9.0",'
            f'"Command line profiler metrics","{name}","{unit}","{value}"' for name, unit, value in values]


def _launch(launch_id, kernel, ns, read, write, dram_pct, sm_pct):
    return _rows(launch_id, kernel, [("gpu__time_duration.sum", "ns", ns), ("dram__bytes_read.sum", "byte", read),
                                     ("dram__bytes_write.sum", "byte", write),
                                     ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "%", dram_pct),
                                     ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "%", sm_pct),
                                     ("launch__registers_per_thread", "register/thread", "128")])


def test_short_name_drops_templates_and_parameters():
    assert short_name("void at::native::vectorized_elementwise_kernel<4, at::native::FillFunctor<float>>(int, T2)") \
        == "vectorized_elementwise_kernel"
    assert short_name("_bwd_chunk_kernel") == "_bwd_chunk_kernel"


def test_launches_fold_by_kernel_with_time_weighted_rates():
    text = "\n".join(["==PROF== Connected to process 1", HEADER,
                      *_launch(0, "_fwd_kernel", "2,000,000", "3,000,000,000", "1,000,000,000", "80", "20"),
                      *_launch(1, "_fwd_kernel", "1,000,000", "500,000,000", "500,000,000", "20", "50"),
                      *_launch(2, "_bwd_chunk_kernel", "4,000,000", "400,000,000", "0", "5", "90"),
                      "==PROF== Disconnected from process 1"])
    launches = parse_ncu_csv(text, METRICS)
    assert len(launches) == 3 and launches[0]["ns"] == 2e6 and launches[0]["read"] == 3e9
    rows = summarize(launches)
    assert [r["kernel"] for r in rows] == ["_bwd_chunk_kernel", "_fwd_kernel"]  # most time first
    fwd = rows[1]
    assert fwd["calls"] == 2 and fwd["ms"] == 3.0
    assert abs(fwd["gb_s"] - 5e9 / 3e6) < 1e-6  # 5 GB in 3 ms
    assert abs(fwd["dram_pct"] - (80 * 2 + 20 * 1) / 3) < 1e-9 and abs(fwd["sm_pct"] - 30.0) < 1e-9
    table = markdown("layer", rows)
    assert "7.000 ms of kernels" in table and "`_bwd_chunk_kernel` | 1 | 4.000 | 57.1 %" in table


def test_metrics_it_was_not_asked_for_are_ignored():
    text = "\n".join([HEADER, *_rows(0, "k", [("gpu__time_duration.sum", "ns", "10"), ("other.metric", "x", "5")])])
    assert parse_ncu_csv(text, METRICS) == [{"kernel": "k", "ns": 10.0}]


def test_a_counter_a_kernel_lacks_is_left_out_not_averaged_in():
    text = "\n".join([HEADER, *_rows(0, "gemm", [("gpu__time_duration.sum", "ns", "100"),
                                                ("sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active", "", "n/a"),
                                                ("sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active", "%", "90")])])
    (launch,) = parse_ncu_csv(text, {**METRICS, **TENSOR_METRICS})
    assert "gmma_pct" not in launch and launch["hmma_pct"] == 90.0
    (row,) = summarize([launch])
    assert row["hmma_pct"] == 90.0 and "| 90.0 |" in markdown("gemm", [row])
