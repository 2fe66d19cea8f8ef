"""Search spaces: which blocks of a diffusion UNet a search may remove or copy."""

from .architecture import Action, Architecture
from .errors import ArchitectureError, SpaceError, UserError
from .registry import list_spaces, load_space
from .space import SearchSpace, Slot

__all__ = [
    "Action",
    "Architecture",
    "ArchitectureError",
    "SearchSpace",
    "Slot",
    "SpaceError",
    "UserError",
    "list_spaces",
    "load_space",
]
