"""Benchmarks of the kernels against their peers (``hybridlab bench``)."""


def run_ssm_bench(*args, **kwargs):
    """See ``hybridlab.kernels.bench.ssm.run_ssm_bench``."""
    from .ssm import run_ssm_bench as _run

    return _run(*args, **kwargs)


__all__ = ["run_ssm_bench"]
