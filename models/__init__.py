"""Model registry and the paper's architectures. Importing this package registers every model."""
from models.registry import MODELS, ModelCapabilities, ModelOptions, count_parameters, create_model  # noqa: F401
from models import small_cnn  # noqa: F401
from models import (  # noqa: F401  (each module registers its models)
    cct, densenet_cifar, focalnet, gpt, mobilenetv3, resnet_cifar, resnet_imagenet, swin, tiny_vit,
)
