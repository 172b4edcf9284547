"""Dataset registry, loaders and transforms. Importing this package registers every dataset."""
from data.registry import (  # noqa: F401
    DATASETS,
    BatchSource,
    BuildContext,
    DataBundle,
    DataCapabilities,
    DataOptions,
    build_data,
    default_root,
    resolve_root,
)
from data import offline, synthetic  # noqa: F401
from data import cifar, imagenet, tiny_imagenet, wikitext  # noqa: F401
