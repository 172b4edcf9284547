"""Figure 1 (IRIS trajectories): the trajectory code against a hand-written training loop, and the figure."""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F


def test_adam_trajectory_matches_a_plain_torch_loop():
    from fisherbench.analysis.trajectories import BATCH, iris_2d, mlp, train_trajectory

    x, y = iris_2d()
    assert x.shape == (150, 2) and sorted(set(y.tolist())) == [0, 1, 2]
    init = {k: v.clone() for k, v in mlp().state_dict().items()}
    weights, losses = train_trajectory("adam", x, y, init, epochs=2)

    model = mlp()
    model.load_state_dict(init)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, weight_decay=5e-4)  # fisherbench/configs/optimizer/adam.yaml
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        ref_w, ref_l = [model[0].weight.flatten().numpy().copy()], [float(F.cross_entropy(model(x), y))]
    for _ in range(2):
        order = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), BATCH):
            idx = order[i:i + BATCH]
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
            with torch.no_grad():
                ref_w.append(model[0].weight.detach().flatten().numpy().copy())
                ref_l.append(float(F.cross_entropy(model(x), y)))
    assert weights.shape == (1 + 2 * 10, 32)
    np.testing.assert_allclose(weights, np.stack(ref_w), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(losses, ref_l, rtol=1e-5)


def test_figure1_all_optimizers_from_the_same_start(tmp_path):
    from fisherbench.analysis.trajectories import figure1

    files, final = figure1(tmp_path / "fig1", epochs=1, grid=40)
    assert [f.suffix for f in files] == [".png", ".pdf"] and all(f.stat().st_size > 5000 for f in files)
    assert list(final) == ["Adam", "AdaHessian", "K-FAC", "Shampoo", "AdaFisher"]
    assert all(np.isfinite(v) and 0 < v < 5 for v in final.values())
