"""Tools that measure a running cluster: load tests, the fault drill, latency and hop benchmarks."""
