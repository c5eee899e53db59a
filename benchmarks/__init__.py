"""Benchmark suite (import as stt_fast.benchmarks): latency and accuracy of every backend, per machine.

    timing.py            the one timing helper (device-synchronised, median / p90 / p99)
    machine.py           the machine header and the measured ceilings (matmul peak, copy bandwidth)
    backends.py          every way to run STT, behind one build() interface
    harness.py           the suite: backends x batch sizes -> one JSON result per run
    report.py            stored results -> markdown tables, PNG plots, regression check
    bench_st_attention.py  the kernel microbenchmark (st_attention vs PyTorch SDPA)
    pytest_backends.py   the same suite driven by pytest-benchmark
Results live in benchmarks/results/<machine>/ in the repository (not in the installed package).
"""
