"""The model zoo. Importing this package registers every arch family."""

# Families register themselves on import (one file per family).
from vcc.core.models import (  # noqa: E402,F401
    c3d,
    cnn_lstm,
    csn,
    lstm_e2e,
    mobilenetv2_3d,
    resnet3d,
    torchvision_video,
)
from vcc.core.models.registry import (
    ModelSpec,
    apply_wrappers,
    build_model,
    check_input,
    get_spec,
    list_models,
    register_model,
    register_wrapper,
)

__all__ = [
    "ModelSpec",
    "apply_wrappers",
    "build_model",
    "check_input",
    "get_spec",
    "list_models",
    "register_model",
    "register_wrapper",
]
