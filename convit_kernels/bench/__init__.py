"""Benchmarks of the fused GPSA: ``convit-kernels bench`` (cli.py) and the suites in benchmarks/.

workloads.py: shapes, workloads, inputs and FLOPs; implementations.py: every
implementation timed and its comparison with the reference; timing.py: the timing function,
peak memory and the matmul yardstick; run.py: the microbenchmark loop;
models.py: whole-model throughput; report.py: table, JSON and plot.
"""
