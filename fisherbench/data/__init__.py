"""Dataset registry, loaders and transforms. Importing this package registers every dataset."""
from fisherbench.data import cifar, image_folder, imagenet, offline, synthetic, text_files, tiny_imagenet, wikitext  # noqa: F401  # noqa: F401
from fisherbench.data.registry import (  # noqa: F401
    DATASETS,
    BatchSource,
    BuildContext,
    ClassificationOptions,
    DataBundle,
    DataCapabilities,
    DataOptions,
    build_data,
    cache_root,
    content_function,
    data_content,
    default_root,
    resolve_root,
)
