"""Development helpers: local servers for `make dev`, the tests and the benchmarks."""
