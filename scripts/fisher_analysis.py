#!/usr/bin/env python
"""Fisher analysis: what the Kronecker factors H = E[ã ãᵀ] and S = E[g gᵀ] of chosen layers contain.

    # a finished run (needs checkpoints: train with checkpoint.keep_final=true [checkpoint.every_epochs=N])
    python scripts/fisher_analysis.py --run-dir runs/<run_id>
    # or train briefly and analyse the model after chosen optimizer steps
    python scripts/fisher_analysis.py --model small_cnn --data mnist5k --optimizer adafisher --steps 0,100,300
    python scripts/fisher_analysis.py --model resnet18_cifar --data cifar10 --steps 200 --layers '#37,#41'
    python scripts/fisher_analysis.py --model small_cnn --data digits --list-layers

For each step and layer it collects the FULL factors (over --batches training batches), computes the
diagnostics of `optim/analysis/diagnostics.py` (diagonal energy, the paper's SNR (Eq. 7), Gershgorin discs,
spectra with/without off-diagonal noise, curvature vs damping, diagonal-approximation error of H ⊗ S), and
writes to --out (default: <run-dir>/fisher_analysis/): fisher_table.{csv,md,json} and, for the figure
layers, the paper's figures (gershgorin_*, spectrum_*, fft_*, heatmap_* as PNG and PDF). Extra arguments
are Hydra overrides of the training config (e.g. model.width=8 data.batch_size=128 seed=1).
See docs/fisher-analysis.md.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Optional, Sequence

from fisherbench.core.eta import Eta


def _log(msg: str) -> None:
    print(f"[fisher_analysis] {msg}", file=sys.stderr, flush=True)


def _steps(text: Optional[str]) -> Optional[list[int]]:
    if text is None:
        return None
    try:
        return [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"--steps must be comma-separated integers, got {text!r}") from None


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("what to analyse (one of --run-dir or --model/--data)")
    src.add_argument("--run-dir", type=Path, help="a fisherbench run directory with checkpoint(s)")
    src.add_argument("--model", help="registry model name (train briefly)")
    src.add_argument("--data", help="registry dataset name (train briefly)")
    src.add_argument("--optimizer", default="adafisher", help="optimizer config for the short run (adafisher)")
    src.add_argument("--steps", help="optimizer steps at which to analyse, e.g. 0,100,300 (with --run-dir: "
                                     "keep only checkpoints at these steps)")
    src.add_argument("overrides", nargs="*", help="Hydra overrides for the short run (model.width=8 ...)")
    a = p.add_argument_group("analysis")
    a.add_argument("--layers", default="default",
                   help="default (a conv and a linear layer: ResNet-18's #37/#41 as in the paper, else the last "
                        "Conv2d and Linear) | all (every Linear/Conv2d) | comma-separated names or #N positions")
    a.add_argument("--figure-layers", default=None,
                   help="layers to draw (default: the default pair among --layers, else the first two)")
    a.add_argument("--batches", type=int, default=4, help="training batches averaged per factor (4)")
    a.add_argument("--max-dim", type=int, default=1024,
                   help="wider factors are analysed as a random principal sub-block of this size (1024)")
    a.add_argument("--grad-scale", choices=("batch", "mean"), default="batch",
                   help="batch: per-example loss gradients (K-FAC convention, default); mean: gradients of "
                        "the batch-mean loss as delivered (official AdaFisher code)")
    a.add_argument("--sigma", type=float, default=1e-3, help="std of the off-diagonal Gaussian noise (1e-3)")
    a.add_argument("--damping", type=float, default=None,
                   help="λ to compare curvature with (default: the optimizer's damping, else 1e-3)")
    a.add_argument("--seed", type=int, default=0, help="seed of the noise and of sub-block sampling")
    a.add_argument("--device", default=None, help="cpu | cuda | auto (default: the config's device)")
    o = p.add_argument_group("output")
    o.add_argument("--out", type=Path, default=None, help="output directory")
    o.add_argument("--no-figures", action="store_true", help="tables only")
    o.add_argument("--wandb", action="store_true", help="also log the table and figures to W&B")
    o.add_argument("--wandb-mode", default="auto", choices=("auto", "online", "offline", "disabled"))
    o.add_argument("--wandb-project", default=None, help="W&B project (default: the run's, else fisherbench)")
    o.add_argument("--list-layers", action="store_true", help="print the analysable layers and exit")
    args = p.parse_args(argv)
    if bool(args.run_dir) == bool(args.model or args.data):
        p.error("give either --run-dir, or --model and --data")
    if not args.run_dir and not (args.model and args.data):
        p.error("--model and --data go together")
    if args.run_dir and args.overrides:
        p.error("Hydra overrides apply to --model/--data runs only (a run's config is fixed)")
    if args.batches < 1 or args.max_dim < 2:
        p.error("--batches must be >= 1 and --max-dim >= 2")
    return args


def _compose(args: argparse.Namespace) -> dict:
    # lazy: these pull in torch and hydra (~3.5 s); --help and usage errors answer at once
    from fisherbench.core.errors import UserError
    from fisherbench.engine.compose import compose_config
    from fisherbench.engine.identity import resolved_dict

    overrides = [f"model={args.model}", f"data={args.data}", f"optimizer={args.optimizer}", "logger=none",
                 *args.overrides]
    try:
        return resolved_dict(compose_config(overrides))
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - Hydra raises several types for unknown options/keys
        raise SystemExit(f"could not compose the config {overrides}: {exc}") from None


def _figure_layers(args: argparse.Namespace, model, layers: list[str]) -> list[str]:
    from fisherbench.analysis.factors import default_layers, select_layers  # lazy: pulls in torch (~3.5 s), as above

    if args.figure_layers:
        chosen = select_layers(model, args.figure_layers)
        missing = [n for n in chosen if n not in layers]
        if missing:
            raise SystemExit(f"--figure-layers {missing} are not among --layers {layers}")
        return chosen
    pair = [n for n in default_layers(model) if n in layers]
    return pair or layers[:2]


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fisherbench import use_files_only_backend

    use_files_only_backend()  # before anything imports matplotlib
    args = parse_args(argv)
    t_start = time.perf_counter()
    # lazy: these pull in torch and hydra (~3.5 s); --help and usage errors answer at once
    from fisherbench.analysis import sources
    from fisherbench.analysis.diagnostics import analyse_layer
    from fisherbench.analysis.factors import collect_factors, describe_layers, select_layers
    from fisherbench.analysis.report import layer_row, log_wandb, markdown_table, write_tables

    steps = _steps(args.steps)
    try:
        if args.run_dir:
            setup, paths = sources.load_run(args.run_dir, args.device)
            snapshots = sources.checkpoint_snapshots(setup, paths, steps, log=_log)
            out = args.out or args.run_dir / "fisher_analysis"
            _log(f"run {args.run_dir}: {len(paths)} checkpoint file(s)")
        else:
            if steps is None and not args.list_layers:
                raise SystemExit("--steps is required with --model/--data (e.g. --steps 0,100)")
            cfg = _compose(args)
            setup = sources.setup_from_config(cfg, args.device)
            snapshots = sources.training_snapshots(setup, steps or [0], log=_log)
            out = args.out or (Path(cfg["results_dir"]) / "fisher_analysis"
                               / f"{args.model}-{args.data}-{args.optimizer}-seed{cfg['seed']}")
        probe = setup.build_model()
        if args.list_layers:
            print("\n".join(describe_layers(probe)))
            return 0
        layers = select_layers(probe, args.layers)
        figure_layers = [] if args.no_figures else _figure_layers(args, probe, layers)
    except (FileNotFoundError, ValueError, TypeError) as exc:
        _log(f"error: {exc}")
        return 2
    del probe
    damping = args.damping if args.damping is not None else setup.damping
    variant, gamma = setup.adafisher_variant
    _log(f"layers {layers}; figures for {figure_layers or 'none'}; λ={damping:g}; σ={args.sigma:g}; "
         f"grad scale '{args.grad_scale}'; {args.batches} batch(es) per factor; output {out}")

    rows, for_figures, examples = [], defaultdict(list), 0
    # snapshots are produced lazily (training up to each step, or reading a checkpoint): count what is asked for
    total = len(steps) if steps else (len(paths) if args.run_dir else 1)
    eta = Eta("fisher_analysis", total, unit="snapshots", every=0.0)
    for snap in snapshots:
        t0 = time.perf_counter()
        _log(f"step {snap.step} ({snap.source}): collecting factors of {len(layers)} layer(s)")
        factors = collect_factors(snap.model, setup.batches(), setup.loss_fn, layers, num_batches=args.batches,
                                  grad_scale=args.grad_scale, max_dim=args.max_dim, seed=args.seed, log=_log)
        for name in layers:
            lf = factors[name]
            examples = lf.examples
            for which, block, count in (("H", lf.H, lf.rows_H), ("S", lf.S, lf.rows_S)):
                if count < block.n:
                    _log(f"  note: {name} {which} is {block.n}x{block.n} but averages only {count} rows, so its "
                         f"rank is at most {count}: raise --batches for a full-rank estimate")
            la = analyse_layer(name, lf.kind, snap.step, lf.H, lf.S, damping=damping, sigma=args.sigma,
                               seed=args.seed, variant=variant, gamma=gamma, state=snap.adafisher_state.get(name))
            rows.append(layer_row(la))
            if name in figure_layers:
                for_figures[name].append(la)
            _log(f"  {name}: diag energy H {la.H.metrics['diag_energy_ratio']:.3f} S "
                 f"{la.S.metrics['diag_energy_ratio']:.3f}; SNR H {la.H.metrics['snr_db']:.1f} dB S "
                 f"{la.S.metrics['snr_db']:.1f} dB; diag-approx error {la.metrics['kron_diag_error']:.3f}")
        del factors
        eta.step(f"step {snap.step} done in {time.perf_counter() - t0:.1f}s")
    if not rows:
        _log(f"error: no checkpoint at the requested steps {steps}")
        return 2

    notes = [
        f"{examples} training examples ({args.batches} batches) per factor; S from {args.grad_scale!r}-scaled "
        "output gradients (batch: per-example loss gradients; mean: batch-mean loss as delivered); factors are "
        "means over rows (example x output position for convolutions); H includes the bias's appended 1.",
        f"SNR: paper Eq. 7 with symmetric off-diagonal N(0, {args.sigma:g}²) noise; λ = {damping:g}.",
        "official: AdaFisher's steady-state diagonal state (min-max of the factor's diagonal times the "
        f"running-average fixed point, variant {variant!r}, γ={gamma:g}); SH>λ = fraction of elements whose "
        "curvature S[o]H[i] exceeds λ; state: the run's actual AdaFisher state at that step.",
        "dim (k): a random principal k x k sub-block was analysed (--max-dim); its off-diagonal energy is "
        "extrapolated, its eigenvalues are the sub-block's.",
    ]
    written = write_tables(rows, out, notes)
    for name in figure_layers:
        _log(f"figures for {name}")
        from fisherbench.analysis.figures import write_layer_figures  # lazy: matplotlib, ~0.5 s; --no-figures skips it

        written += write_layer_figures(name, for_figures[name], out)
    if args.wandb:
        cfg = setup.cfg
        logger_cfg = cfg.get("logger") or {}
        project = args.wandb_project or (logger_cfg.get("project") if logger_cfg.get("name") == "wandb" else None)
        wandb_dir = log_wandb(out, written, rows, mode=args.wandb_mode, project=project or "fisherbench",
                              entity=logger_cfg.get("entity") if logger_cfg.get("name") == "wandb" else None,
                              run_id=args.run_dir.name if args.run_dir else None,
                              config={"layers": layers, "grad_scale": args.grad_scale, "sigma": args.sigma,
                                      "damping": damping, "batches": args.batches, "source": str(args.run_dir or
                                      f"{args.model}/{args.data}/{args.optimizer}")})
        if wandb_dir:
            _log(f"logged to W&B ({wandb_dir})")
    print(markdown_table(rows))
    _log(f"wrote {len(written)} files to {out} in {time.perf_counter() - t_start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
