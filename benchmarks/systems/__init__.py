"""The systems under test: the service (gateway + Triton), the two peers, the limit and the transport probe."""
