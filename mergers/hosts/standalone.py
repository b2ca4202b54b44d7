"""The standalone host: checkpoints from a folder, no loaded model, no image generator.

``python -m mergers ui`` runs the tab over this host: merges are planned and
saved to files; previews need the web UI.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, ContextManager, Optional

from mergers.errors import CheckpointError, MergeError
from mergers.hashing import cached_sha256
from mergers.host import Generated, GenerationParams, LiveModel, ModelEntry, no_lock
from mergers.models import list_checkpoints, list_virtual_checkpoints


class FolderHost:
    """A Host over the checkpoints under ``models_dir`` (subfolders included).

    Example:
        >>> host = FolderHost(Path("models"))
        >>> [m.title for m in host.list_models()]
        ['a.safetensors', 'sdxl/b.safetensors']
    """

    def __init__(self, models_dir: Path, *, data_dir: Optional[Path] = None):
        self.models_dir = Path(models_dir)
        self.data_dir = Path(data_dir) if data_dir else self.models_dir / ".supermerger"
        self.grids_dir = self.data_dir / "xyz"  # XYZ plots' grid images

    def list_models(self) -> list[ModelEntry]:
        """The checkpoints, then the saved recipes (virtual checkpoints, merged when used)."""
        files = [*list_checkpoints(self.models_dir), *list_virtual_checkpoints(self.models_dir)]
        return [self._entry(path) for path in files]

    def resolve(self, name: str) -> Path:
        """A model by title (path relative to the folder), file name, stem or short hash — only inside the folder."""
        wanted = name.strip()
        for entry in self.list_models():
            if wanted in (entry.title, entry.path.name, entry.path.stem) or (
                    entry.shorthash and len(wanted) >= 10 and entry.shorthash.startswith(wanted[:10])):
                return entry.path
        raise CheckpointError(f"model {name!r} is not in {self.models_dir}")

    def live_model(self) -> Optional[LiveModel]:
        return None

    def lock(self) -> ContextManager:
        return no_lock()

    def default_generation(self) -> GenerationParams:
        return GenerationParams()

    def can_generate(self) -> bool:
        return False

    def generate(self, params: GenerationParams, *, extra_info: Mapping[str, Any]) -> Generated:
        raise MergeError("preview needs the web UI: the standalone app has no image generator")

    def _entry(self, path: Path) -> ModelEntry:
        sha = cached_sha256(path)  # only what is already known: listing must not hash gigabytes
        return ModelEntry(str(path.relative_to(self.models_dir)), path, sha[:10] if sha else None)
