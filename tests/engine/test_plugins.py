"""Plug-ins: an optimizer, model and dataset from the user's own code, composed and trained like built-ins.

Each test writes its own module and config folder under tmp_path, with names of its own: the registries and
Python's module cache live for the whole test process.
"""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from fisherbench.core import plugins
from fisherbench.core.errors import UserError
from fisherbench.core.store import iter_run_dirs
from fisherbench.engine.compose import compose_config, load_group_option
from fisherbench.engine.identity import identity_of, run_id_of

REPO = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, str(REPO / "train.py")]
TINY = ["model=small_cnn", "model.width=4", "model.hidden=16", "data=synthetic_image", "data.shape=[1,8,8]",
        "data.num_train=32", "data.num_test=16", "data.batch_size=16", "experiment=debug"]

SIGN_SGD = '''
import torch


class {cls}(torch.optim.Optimizer):
    """sign-SGD with momentum."""

    def __init__(self, params, lr=1e-3, momentum=0.9, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                buf = self.state[p].setdefault("m", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad, alpha=1 - group["momentum"])
                p.add_(buf.sign(), alpha=-group["lr"])
'''


def make_plugin(root: Path, tag: str, yaml_text: str, source: str = SIGN_SGD, group: str = "optimizer") -> Path:
    """`root/code/<module>.py` and `root/conf/<group>/<name>.yaml`; returns the config folder."""
    (root / "code").mkdir(parents=True, exist_ok=True)
    (root / "code" / f"mod_{tag}.py").write_text(source.format(cls=f"Opt_{tag}"))
    conf = root / "conf"
    (conf / group).mkdir(parents=True, exist_ok=True)
    (conf / group / f"p_{tag}.yaml").write_text(textwrap.dedent(yaml_text).format(mod=f"mod_{tag}", cls=f"Opt_{tag}"))
    return conf


def env_for(root: Path, conf: Path) -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "code"), os.environ["PYTHONPATH"]]),
            plugins.CONFIG_PATH_ENV: str(conf)}


def train(args, *, env, cwd):
    return subprocess.run([*TRAIN, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture
def in_process(tmp_path, monkeypatch):
    """A plug-in `p_<tag>` registered in this process (its module importable, its folder on the config path)."""

    def make(tag: str, yaml_text: str, **kw) -> str:
        conf = make_plugin(tmp_path, tag, yaml_text, **kw)
        monkeypatch.syspath_prepend(str(tmp_path / "code"))
        monkeypatch.setenv(plugins.CONFIG_PATH_ENV, str(conf))
        return f"p_{tag}"

    return make


def test_a_yaml_plugin_composes_typed_and_strict(in_process):
    name = in_process("typed", """
        _target_: {mod}.{cls}
        lr: 0.01
        momentum: 0
    """)
    cfg = compose_config([f"optimizer={name}", "optimizer.momentum=0.5"])
    node = OmegaConf.to_container(cfg.optimizer)
    # `momentum: 0` in the YAML is a float option (the class's default is a float): 0.5 is accepted
    assert node == {"name": name, "lr": 0.01, "weight_decay": 0.0, "no_decay_bias_norm": False, "grad_clip": None,
                    "momentum": 0.5}
    assert cfg._choices["optimizer"] == name
    with pytest.raises(Exception, match="bogus"):
        compose_config([f"optimizer={name}", "optimizer.bogus=1"])
    with pytest.raises(Exception, match="momentum"):
        compose_config([f"optimizer={name}", "optimizer.momentum=fast"])
    # what budget=reference / budget=match read for a plug-in reference optimizer
    assert load_group_option("optimizer", name)["lr"] == 0.01


def test_the_run_identity_holds_the_import_path_and_the_source_hash(in_process, tmp_path):
    name = in_process("ident", "_target_: {mod}.{cls}\n")
    cfg = compose_config([f"optimizer={name}", "budget=reference", f"budget.reference_optimizer={name}",
                          "budget.reference_epochs=1"])
    code = identity_of(cfg)["plugins"]
    source = tmp_path / "code" / "mod_ident.py"
    import hashlib

    expect = {"target": "mod_ident.Opt_ident", "source_sha256": hashlib.sha256(source.read_bytes()).hexdigest()}
    assert code == {"optimizer": expect, "reference_optimizer": expect}
    # a built-in run's identity has no plug-in key (its run id is what it always was)
    assert "plugins" not in identity_of(compose_config(["optimizer=adam"]))
    assert run_id_of(cfg) != run_id_of(compose_config(["optimizer=adam"]))


@pytest.mark.parametrize("tag, yaml_text, source, message", [
    ("imp", "_target_: no_such_module_h6.SignSGD\n", SIGN_SGD, "does not import"),
    ("cls", "_target_: {mod}.helper\n", "def helper(params, lr=1.0):\n    pass\n",
     "not a subclass of torch.optim.Optimizer"),
    ("key", "_target_: {mod}.{cls}\nbetaa: 0.9\n", SIGN_SGD, "['betaa'] are not parameters of"),
    ("cap", "_target_: {mod}.{cls}\n_capabilities_: {{needs_closur: true}}\n", SIGN_SGD, "unknown capabilities"),
])
def test_a_broken_plugin_is_a_user_error_naming_its_file(in_process, tmp_path, tag, yaml_text, source, message):
    in_process(tag, yaml_text, source=source)
    with pytest.raises(UserError) as err:
        compose_config([])
    assert message in str(err.value) and str(tmp_path / "conf" / "optimizer" / f"p_{tag}.yaml") in str(err.value)


def test_train_reports_a_broken_plugin_with_exit_2_and_no_traceback(tmp_path):
    conf = make_plugin(tmp_path, "bad", "_target_: {mod}.{cls}\nbetaa: 0.9\n")
    p = train([*TINY, "optimizer=p_bad"], env=env_for(tmp_path, conf), cwd=tmp_path)
    assert p.returncode == 2, (p.stdout, p.stderr)
    assert "configuration error" in p.stderr and str(conf / "optimizer" / "p_bad.yaml") in p.stderr
    assert "Remove them from the YAML" in p.stderr and "Traceback" not in p.stderr
    helped = train(["--help"], env=env_for(tmp_path, conf), cwd=tmp_path)  # --help too: no traceback
    assert helped.returncode == 2 and "p_bad.yaml" in helped.stderr and "Traceback" not in helped.stderr


@pytest.mark.slow  # three runs
def test_a_plugin_trains_and_editing_its_code_is_a_new_run(tmp_path):
    conf = make_plugin(tmp_path, "run", "_target_: {mod}.{cls}\nlr: 0.01\n")
    env, store = env_for(tmp_path, conf), tmp_path / "runs"
    args = [*TINY, "optimizer=p_run", f"results_dir={store}"]
    assert train(args, env=env, cwd=tmp_path).returncode == 0
    again = train(args, env=env, cwd=tmp_path)  # the same code: the same run, skipped
    assert again.returncode == 0 and "skipped" in again.stdout + again.stderr, again.stdout
    source = tmp_path / "code" / "mod_run.py"
    source.write_text(source.read_text() + "\n# edited\n")
    edited = train(args, env=env, cwd=tmp_path)
    assert edited.returncode == 0, edited.stderr
    runs = list(iter_run_dirs(store))
    assert len(runs) == 2 and {r.summary()["optimizer"] for r in runs} == {"p_run"}
    assert all(r.summary()["status"] == "completed" for r in runs)


def test_a_step_that_makes_nan_is_recorded_as_diverged(tmp_path):
    nan_step = SIGN_SGD.replace('p.add_(buf.sign(), alpha=-group["lr"])', 'p.fill_(float("nan"))')
    conf = make_plugin(tmp_path, "nan", "_target_: {mod}.{cls}\n", source=nan_step)
    p = train([*TINY, "optimizer=p_nan", f"results_dir={tmp_path / 'runs'}", "budget.steps=40"],
              env=env_for(tmp_path, conf), cwd=tmp_path)
    assert p.returncode == 3, (p.stdout, p.stderr)
    (run,) = list(iter_run_dirs(tmp_path / "runs"))
    assert run.summary()["status"] == "diverged"


def test_config_dir_and_hydra_searchpath_are_one_config_path():
    dirs, rest = plugins.split_config_dir_args(["--config-dir", "/a", "--config-dir=/b", "-cd", "/c",
                                               "hydra.searchpath=[file:///d,'file:///e']", "optimizer=x"])
    assert dirs == ["/a", "/b", "/c", "/d", "/e"] and rest == ["optimizer=x"]
    with pytest.raises(UserError, match="only file://"):
        plugins.split_config_dir_args(["hydra.searchpath=[pkg://x]"])


@pytest.mark.parametrize("value, default, annotation, expected", [
    (0.9, 0.9, None, float),
    (0, 0.9, None, float),  # an int in the YAML for a float parameter widens
    (None, None, "int", "Optional[int]"),
    (None, None, None, "Optional[Any]"),
    ([0.9, 1], (0.9, 0.999), None, "list[float]"),
    (True, False, None, bool),
    (None, lambda: 0, None, None),  # a callable default is no option
])
def test_option_types_follow_the_values_and_the_signature(value, default, annotation, expected):
    t = plugins.option_type(value, default, annotation)
    assert (t if expected in (float, bool, None) else str(t).replace("typing.", "")) == expected


def test_plain_configs_of_a_user_folder_are_options_too(tmp_path, monkeypatch):
    """An experiment preset (`# @package _global_`, a defaults list) and a variant of a built-in optimizer."""
    conf = tmp_path / "conf"
    (conf / "experiment").mkdir(parents=True)
    (conf / "optimizer").mkdir()
    (conf / "experiment" / "h6_tiny.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        # a user's preset
        defaults:
          - override /budget: steps
        budget:
          steps: 7
        eval:
          max_batches: 3
    """))
    (conf / "optimizer" / "h6_adam_fast.yaml").write_text(
        "defaults:\n  - /schema/optimizer/adam@_here_\n  - _self_\nname: adam\nlr: 3.0e-3\n")
    monkeypatch.setenv(plugins.CONFIG_PATH_ENV, str(conf))
    cfg = compose_config(["experiment=h6_tiny", "optimizer=h6_adam_fast"])
    assert (cfg.budget.mode, cfg.budget.steps, cfg.eval.max_batches) == ("steps", 7, 3)
    assert (cfg.optimizer.name, cfg.optimizer.lr, cfg.optimizer.betas) == ("adam", 3e-3, [0.9, 0.999])
    with pytest.raises(Exception, match="betaz"):  # typed by the built-in's schema
        compose_config(["optimizer=h6_adam_fast", "optimizer.betaz=[0.9,0.9]"])
