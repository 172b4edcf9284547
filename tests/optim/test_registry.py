"""The optimizer factory as data: rows are consistent with their constructors, defaults live in one place
(schema == plain config), Capabilities holds only what the run layer reads, registry glue lives in
`*_entries.py` only, and docs/optimizers.md agrees with the registry."""
from __future__ import annotations

import ast
import dataclasses
import importlib.util
import inspect
import sys
from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from fisherbench import optim
from fisherbench.optim import OPTIMIZERS
from fisherbench.optim.registry import Capabilities, OptimizerAdapter, accepted_keywords, build_optimizer

REPO = Path(__file__).resolve().parents[2]
CONFIG_DIR = REPO / "fisherbench" / "configs" / "optimizer"
OPTIM_DIR = REPO / "fisherbench" / "optim"


# ----------------------------------------------------------------------------------------------- rows
@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_row_passes_only_constructor_parameters_and_declares_what_it_holds_back(name):
    row = optim.row(name)
    factory = row.resolve()
    fields = {f.name for f in dataclasses.fields(row.schema)}
    passed = set(row.constructor_options(row.schema())) | set(row.fixed)
    assert passed <= accepted_keywords(factory), passed - accepted_keywords(factory)
    # what the adapter and the group policy say they read exists in the schema (no stale declarations)
    held_back = set(row.adapter.reads) | set(getattr(row.groups, "reads", ()))
    assert held_back <= fields, held_back - fields
    assert passed | held_back | {"name"} >= fields


def test_an_option_no_one_reads_is_a_bug_not_a_silent_no_op():
    """pytorch_optimizer's constructors take **kwargs: the builder itself must refuse an unknown option."""
    from torch import nn

    from fisherbench.optim.pytorch_optimizer_entries import SoapOptions

    @dataclasses.dataclass
    class Misspelt(SoapOptions):
        precondition_frequncy: int = 3

    row = dataclasses.replace(optim.row("soap"), schema=Misspelt)
    with pytest.raises(TypeError, match=r"\['precondition_frequncy'\] are not parameters of pytorch_optimizer"):
        row(nn.Linear(2, 2), Misspelt(), optim.BuildContext())


def test_adapters_never_rewrite_train_step():
    adapters = {optim.row(n).adapter for n in OPTIMIZERS.names()}
    assert all(a.train_step is OptimizerAdapter.train_step for a in adapters)
    owns = sorted(n for n in OPTIMIZERS.names() if optim.row(n).overrides("forward_backward"))
    create_graph = sorted(n for n in OPTIMIZERS.names() if optim.row(n).overrides("backward"))
    assert owns == ["kfac", "shampoo"]
    assert create_graph == sorted(n for n in OPTIMIZERS.names() if optim.row(n).capabilities.needs_create_graph)


def test_capabilities_hold_only_fields_the_run_layer_reads():
    """Each field is read by engine/, by build_optimizer or by the benchmark script (not only by tests)."""
    sources = [p.read_text(encoding="utf-8") for p in (REPO / "fisherbench" / "engine").glob("*.py")]
    sources.append((REPO / "scripts" / "bench_optimizers.py").read_text(encoding="utf-8"))
    sources.append(inspect.getsource(build_optimizer))
    for f in dataclasses.fields(Capabilities):
        assert any(f".{f.name}" in s or f'"{f.name}"' in s for s in sources), f"nobody reads Capabilities.{f.name}"
    assert Capabilities.__dataclass_params__.frozen


# ---------------------------------------------------------------------------- defaults in one place
def _configs() -> dict[str, str]:
    """config file stem -> registry name it selects."""
    return {p.stem: str(yaml.safe_load(p.read_text(encoding="utf-8"))["name"])
            for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def test_every_config_selects_a_registered_optimizer_and_every_optimizer_has_its_plain_config():
    configs = _configs()
    assert set(configs.values()) <= set(OPTIMIZERS.names())
    for name in OPTIMIZERS.names():
        assert configs.get(name) == name, f"fisherbench/configs/optimizer/{name}.yaml (the plain config of {name}) is missing"


@pytest.mark.parametrize("name", OPTIMIZERS.names())
def test_schema_defaults_equal_the_plain_config(name):
    """The YAML is what a run gets; the schema default is what Python callers and variant configs that omit a
    field get. They must be the same numbers."""
    from fisherbench.engine.compose import compose_config

    composed = OmegaConf.to_container(compose_config([f"optimizer={name}"]).optimizer, resolve=True)
    defaults = dataclasses.asdict(optim.row(name).schema())
    assert composed == defaults


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("config", sorted(_configs()))
def test_every_config_composes_and_builds(config):
    from torch import nn

    from fisherbench.engine.compose import compose_config

    options = OmegaConf.to_container(compose_config([f"optimizer={config}"]).optimizer, resolve=True)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    adapter = build_optimizer(options, model)
    assert adapter.param_groups[0]["lr"] == options["lr"]


# --------------------------------------------------------------------------- where registry glue lives
# optimizer implementations: modules of fisherbench/optim/ and every module of its subpackages (adafisher/)
IMPLEMENTATIONS = sorted(
    p.relative_to(OPTIM_DIR).as_posix() for p in OPTIM_DIR.rglob("*.py")
    if p.relative_to(OPTIM_DIR).as_posix() not in ("__init__.py", "registry.py") and not p.name.endswith("_entries.py")
)


def _imports(path: Path) -> set[str]:
    """Top-level package (or `fisherbench.optim.<module>`) of every import in a file, wherever it is; a relative
    import that leaves the file's own package is reported as `..<module>`."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and node.level > 1:
            found.add("." * node.level + (node.module or ""))
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        for name in names:
            found.add(name if name.startswith("fisherbench.optim.") else name.split(".")[0])
    return found


def test_implementation_modules_are_the_expected_ones():
    assert {"fadam.py", "sgd_biascorrected.py", "adafisher/optimizer.py", "adafisher/functional.py",
            "adafisher/plan.py"} <= set(IMPLEMENTATIONS)


@pytest.mark.parametrize("module", IMPLEMENTATIONS)
def test_optimizer_implementations_import_only_torch(module):
    """fadam.py, sgd_biascorrected.py and adafisher/*.py: torch, the standard library and each other (the
    adafisher package's modules import each other relatively, so the package can be copied as it is)."""
    modules = {m[:-3].replace("/", ".").removesuffix(".__init__") for m in IMPLEMENTATIONS}
    allowed = {"torch", "__future__"} | set(sys.stdlib_module_names) | {f"fisherbench.optim.{m}" for m in modules}
    assert _imports(OPTIM_DIR / module) <= allowed, _imports(OPTIM_DIR / module) - allowed


def test_only_entries_modules_register_rows():
    for path in OPTIM_DIR.glob("*.py"):
        text = path.read_text(encoding="utf-8")
        if path.name.endswith("_entries.py"):
            assert "register(" in text, path.name
        elif path.name != "registry.py":
            assert "register(" not in text and "OptimizerRow(" not in text, path.name


# ------------------------------------------------------------------------------------------------ docs
def _capability_table_module():
    spec = importlib.util.spec_from_file_location("capability_table", REPO / "scripts" / "capability_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_docs_tables_match_the_registry():
    stale = _capability_table_module().main(["--check"])
    assert stale == 0, "docs/optimizers.md is stale: run `python scripts/capability_table.py`"
    text = (REPO / "docs" / "optimizers.md").read_text(encoding="utf-8")
    block = text.split("<!-- capabilities:start -->")[1].split("<!-- capabilities:end -->")[0]
    header = next(line for line in block.splitlines() if line.startswith("| name | class"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    rows = {line.split("`")[1]: [c.strip() for c in line.strip("|").split("|")]
            for line in block.split("\n\n")[0].splitlines() if line.startswith("| `")}
    assert sorted(rows) == OPTIMIZERS.names()
    kfac = dict(zip(columns, rows["kfac"]))
    assert (kfac["takes the model"], kfac["owns fwd/bwd"], kfac["DDP"], kfac["AMP"]) == ("-", "yes", "-", "-")
    assert kfac["configs"] == "`kfac`, `kfac_vit`"
    assert dict(zip(columns, rows["adahessian"]))["create_graph"] == "yes"
    assert dict(zip(columns, rows["schedulefree_adamw"]))["eval weights"] == "yes"
    assert "| `adafisher` | lr 1e-3, weight_decay 5e-4," in block  # the defaults table


def test_docs_page_stands_alone():
    text = (REPO / "docs" / "optimizers.md").read_text(encoding="utf-8")
    for forbidden in ("shared/", "spec " + "§", "official " + "§", "design " + "card"):
        assert forbidden not in text
    for config in _configs():
        assert f"`{config}`" in text


def test_table_splice_replaces_only_the_marked_block():
    capability_table = _capability_table_module()
    text = "intro\n<!-- capabilities:start -->\nold\n<!-- capabilities:end -->\noutro\n"
    expected = "intro\n<!-- capabilities:start -->\nNEW\n<!-- capabilities:end -->\noutro\n"
    assert capability_table.splice(text, "NEW") == expected
    with pytest.raises(ValueError, match="markers"):
        capability_table.splice("no markers here", "NEW")
