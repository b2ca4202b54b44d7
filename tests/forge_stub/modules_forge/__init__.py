"""Stand-in for Forge's ``modules_forge`` package: here only so the web UI can be recognised as Forge."""
