"""The model zoo. Importing this package registers every arch family."""

from vcc.core.models.registry import (
    ModelSpec,
    apply_wrappers,
    build_model,
    get_spec,
    list_models,
    register_model,
    register_wrapper,
)

# Families register themselves on import (one file per family).
from vcc.core.models import resnet3d  # noqa: E402,F401

__all__ = [
    "ModelSpec",
    "apply_wrappers",
    "build_model",
    "get_spec",
    "list_models",
    "register_model",
    "register_wrapper",
]
