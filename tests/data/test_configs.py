"""Every dataset entry has a config, every config in fisherbench/configs/data type-checks against its entry's schema,
and the offline configs build bundles of the advertised shape."""
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fisherbench.core.registry import options_from
from fisherbench.data.registry import DATASETS, build_data

CONFIG_DIR = Path(__file__).resolve().parents[2] / "fisherbench" / "configs" / "data"
CONFIGS = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load(option: str):
    raw = OmegaConf.load(CONFIG_DIR / f"{option}.yaml")
    defaults = OmegaConf.to_container(raw.pop("defaults"))
    assert defaults[-1] == "_self_"
    schema_ref = defaults[0]
    assert schema_ref.startswith("/schema/data/") and schema_ref.endswith("@_here_"), schema_ref
    entry = DATASETS.get(schema_ref[len("/schema/data/"):-len("@_here_")])
    assert raw.name == entry.name, f"{option}.yaml: name {raw.name!r} but extends the schema of {entry.name!r}"
    merged = OmegaConf.merge(OmegaConf.structured(entry.schema), raw)  # type-checks every value
    return entry, options_from(entry.schema, OmegaConf.to_container(merged))


def test_every_dataset_entry_has_a_config_of_its_name():
    assert set(DATASETS.names()) <= set(CONFIGS)


@pytest.mark.parametrize("option", CONFIGS)
def test_config_type_checks_against_its_schema(option):
    entry, opts = load(option)
    assert opts.loader in ("auto", "torch", "resident") and opts.batch_size >= 1


@pytest.mark.parametrize("option,shape,classes,task", [
    ("synthetic_cifar", (3, 32, 32), 10, "classification"),
    ("synthetic_cifar100", (3, 32, 32), 100, "classification"),
    ("synthetic_tiny_imagenet", (3, 64, 64), 200, "classification"),
    ("synthetic_imagenet", (3, 224, 224), 1000, "classification"),
    ("synthetic_wikitext", (256,), 40478, "language_model"),
])
def test_offline_configs_build_the_advertised_shapes(option, shape, classes, task):
    _, opts = load(option)
    b = build_data(opts)
    assert (b.input_shape, b.num_classes, b.task) == (shape, classes, task)
    x, y = next(iter(b.train.iterate(0)))
    assert tuple(x.shape[1:]) == shape
    if task == "language_model":
        assert y.shape == x.shape and int(y.max()) < classes and {"val", "test"} <= set(b.evals)
    else:
        assert int(y.max()) < classes


def test_paper_settings_in_the_real_dataset_configs():
    for option in ("cifar10", "cifar100"):
        _, opts = load(option)
        assert (opts.batch_size, opts.augment, opts.cutout, opts.cutout_length) == (256, True, True, 16)
    _, opts = load("wikitext2")
    assert (opts.batch_size, opts.seq_len, opts.variant) == (32, 256, "raw")
