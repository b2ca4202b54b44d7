"""Stand-in for Forge's ``backend`` package (Forge 2's model code), for tests only."""
