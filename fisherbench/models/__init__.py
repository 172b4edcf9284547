"""Model registry and the paper's architectures. Importing this package registers every model."""
from fisherbench.models import (  # noqa: F401  (each module registers its models)
    cct,
    densenet_cifar,
    focalnet,
    gpt,
    mobilenetv3,
    resnet_cifar,
    resnet_imagenet,
    small_cnn,  # noqa: F401
    swin,
    tiny_vit,
)
from fisherbench.models.registry import (  # noqa: F401
    MODELS,
    ModelCapabilities,
    ModelOptions,
    count_parameters,
    create_model,
    register_plugin,
)
