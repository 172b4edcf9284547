"""Dataset registry, loaders and transforms. Importing this package registers every dataset."""
from data.registry import (  # noqa: F401
    DATASETS,
    BatchSource,
    BuildContext,
    ClassificationOptions,
    DataBundle,
    DataCapabilities,
    DataOptions,
    build_data,
    cache_root,
    default_root,
    resolve_root,
)
from data import offline, synthetic  # noqa: F401
from data import cifar, image_folder, imagenet, text_files, tiny_imagenet, wikitext  # noqa: F401
