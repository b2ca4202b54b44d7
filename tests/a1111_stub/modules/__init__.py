"""Stand-in for AUTOMATIC1111's ``modules`` package (v1.10.1), for tests only."""
