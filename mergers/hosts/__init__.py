"""Hosts: the programs the merger runs inside, each behind :class:`mergers.host.Host`.

``a1111`` adapts AUTOMATIC1111's web UI (v1.5–v1.10): it receives A1111's modules
from ``scripts/supermerger.py`` instead of importing them, so it imports and
tests without A1111. ``forge`` is the same web UI as Forge / Forge Neo change it: merges are
swapped into Forge's model objects (key table in ``forge_keys``). ``standalone`` is a models
folder with no loaded model.
"""
