"""Small helpers every stage shares: atomic file writes, progress bars."""

from openk2.utils.files import atomic_open, atomic_torch_save, atomic_write, read_json
from openk2.utils.progress import progress_bar

__all__ = ["atomic_open", "atomic_torch_save", "atomic_write", "progress_bar", "read_json"]
