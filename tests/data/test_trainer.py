"""The real dataset entries through the trainer, on hand-made files: CIFAR-10 with the resident loader and
WikiText-2 (GPT-1-format tokenizer) with per-token perplexity on val and test."""
import math

import pytest

from fisherbench.data.download import OFFLINE_ENV
from tests.data_fakes import make_cifar, make_gpt1_tokenizer, make_wikitext_raw


@pytest.fixture(autouse=True)
def _no_downloads(monkeypatch):
    monkeypatch.setenv(OFFLINE_ENV, "1")


def test_cifar10_resident_trains_through_the_runner(run_train, tmp_path):
    make_cifar(tmp_path, "cifar10", per_file=8)
    r = run_train("data=cifar10", f"data.root={tmp_path}", "data.verify=false", "data.download=false",
                  "data.loader=resident", "data.batch_size=16", "budget=steps", "budget.steps=2",
                  base=["model=small_cnn", "model.width=4", "model.hidden=16", "optimizer=adam", "logger=none"])
    s = r.summary
    assert s["status"] == "completed" and s["steps"] == 2 and s["steps_per_epoch"] == 3  # 40 images / 16
    assert 0.0 <= s["final"]["test/acc1"] <= 1.0 and math.isfinite(s["final"]["test/loss"])


def test_wikitext2_trains_and_reports_perplexity(run_train, tmp_path):
    make_wikitext_raw(tmp_path, repeat=4)
    make_gpt1_tokenizer(tmp_path / "openai-gpt")
    r = run_train("data=wikitext2", f"data.root={tmp_path}", "data.download=false", "data.seq_len=16",
                  "data.batch_size=4", "budget=steps", "budget.steps=2",
                  base=["model=tiny_gpt", "optimizer=adam", "logger=none"])
    final = r.summary["final"]
    assert r.summary["status"] == "completed"
    for split in ("val", "test"):
        assert final[f"{split}/ppl"] == pytest.approx(math.exp(final[f"{split}/loss"]), rel=1e-9)
