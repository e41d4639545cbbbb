"""`hybridlab bench ssm --layers`: the whole-layer rows (kernels.bench.ssm.run_layer_bench) with arch's layer factory.

CPU: the factory builds the official layer's shape and runs; the options refuse what cannot run.
GPU (``@pytest.mark.gpu``): one SISO layer row, eager, written to layer_bench.json.
"""

import json

import pytest
import torch

from hybridlab.arch import bench_layer
from hybridlab.kernels.bench.options import SsmBench, parse


def test_bench_layer_is_the_official_layer_shape():
    layer = bench_layer(64, "mimo", 2, 16, dtype=torch.float32, device="cpu", backend="torch")
    assert layer.blk.headdim == 64 and layer.blk.expand == 2 and layer.blk.out_norm == "none" and layer.blk.rank == 2
    y = layer(torch.randn(2, 8, 64))
    assert y.shape == (2, 8, 64) and torch.isfinite(y).all()
    siso = bench_layer(64, "siso", 1, 16, dtype=torch.float32, device="cpu", backend="torch")
    assert siso.blk.mode == "siso" and siso.blk.rank == 1


def test_layer_options_and_refusals(cli):
    from hybridlab.kernels.bench.ssm import run_options

    assert parse(SsmBench, ["--layers", "--no-kernels", "--d-states", "64"], "") == SsmBench(layers=True, kernels=False,
                                                                                          d_states="64")
    with pytest.raises(ValueError, match="make_layer"):
        run_options(SsmBench(layers=True, kernels=False))  # kernels imports no model code: the caller brings it
    r = cli("bench", "ssm", "--no-kernels")
    assert r.returncode == 2 and r.stderr.strip().count("\n") == 0 and "--layers" in r.stderr
    r = cli("bench", "ssm", "--layers", "--d-states", "64,x")
    assert r.returncode == 2 and "--d-states" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_layer_rows_on_gpu(tmp_path):
    from hybridlab.kernels.bench.ssm import run_options

    opts = SsmBench(out=str(tmp_path), kernels=False, layers=True, quick=True, ranks="1", compile=False, peers=False,
                    d_states="64")
    assert run_options(opts, make_layer=bench_layer) == 0
    rows = json.loads((tmp_path / "layer_bench.json").read_text())
    ours = [r for r in rows if r["impl"] == "hybridlab"]
    assert len(ours) == 1 and ours[0]["fwdbwd_ms"] > 0 and ours[0]["mode"] == "siso"
