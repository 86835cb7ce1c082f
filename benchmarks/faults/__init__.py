"""The fault suite's scenarios (benchmarks/fault_suite.py runs them): one module each, a `run(ctx) -> figures`."""
