"""`python -m benchmarks`: this service against its peers and the compute limit, on the same weights, in one run."""
