"""Figures of ``apps.em_gradients`` (matplotlib, imported on first use): one function per study, each taking
the study's results dict (:mod:`imgmw.studies`) and returning ``{file stem: matplotlib Figure}``."""
from __future__ import annotations

from apps._mixture_plots import draw_ellipses

LABELS = {"unrolled": "AD", "one_step": "OS", "implicit": "IMP", "dense_ai": "AI", "warm_start": "warm start"}
MODES = ("unrolled", "one_step", "implicit")
PLOT_ZERO = 1e-30  # exact zeros (e.g. OS = AD at T=1) are drawn here on log axes


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _band(ax, xs, stats: list[dict], label: str, **kw) -> None:
    """Median line with a quartile band (exact zeros drawn at ``PLOT_ZERO``)."""
    def col(key: str) -> list[float]:
        return [s[key] if s[key] > 0 else PLOT_ZERO for s in stats]

    line, = ax.plot(xs, col("median"), marker="o", ms=3, label=label, **kw)
    ax.fill_between(xs, col("q25"), col("q75"), color=line.get_color(), alpha=0.2)


def accuracy_figures(results: dict) -> dict:
    plt = _pyplot()
    figures = {}
    for sweep, axis in (("sweep_n", "n"), ("sweep_T", "T")):
        conds = list(results[sweep])
        fig, axes = plt.subplots(len(conds), 3, figsize=(13, 3.2 * len(conds)), squeeze=False)
        for row, name in enumerate(conds):
            rows = results[sweep][name]
            xs = [r[axis] for r in rows]
            ax_fp, ax_j, ax_err = axes[row]
            _band(ax_fp, xs, [r["fixed_point_error"] for r in rows], "‖θ_T − F(θ_T)‖²/p")
            _band(ax_j, xs, [r["jacobian_norm"] for r in rows], "‖∂_φF̃‖₂")
            _band(ax_j, xs, [r["spectral_radius"] for r in rows], "ρ(∂_φF̃)")
            for key, label in (("rel_err_one_step", "OS"), ("rel_err_implicit", "IMP"),
                               ("rel_err_dense_ai", "AI (dense)")):
                _band(ax_err, xs, [r[key] for r in rows], label, ls="--" if key == "rel_err_dense_ai" else "-")
            ax_fp.set_yscale("log")
            ax_err.set_yscale("log")
            ax_fp.set_ylabel(name)
            for ax, title in ((ax_fp, "fixed-point error"), (ax_j, "norm and spectral radius of ∂F"),
                              (ax_err, "relative error vs AD")):
                ax.set_title(title, fontsize=9)
                ax.set_xlabel(axis)
                ax.legend(fontsize=7)
        fig.suptitle(f"gradient accuracy, d=3, K=3 ({results['loss']}); median and quartiles", fontsize=10)
        fig.tight_layout()
        figures[f"accuracy_vs_{axis}"] = fig
    return figures


def flow_figures(results: dict, trajectories: dict, target) -> dict:
    """Trajectories ``{mode: [S+1, N, 2]}`` over the target's ellipses, and the energies against the step."""
    plt = _pyplot()
    n = len(trajectories)
    fig, axes = plt.subplots(1, n, figsize=(4 * n, 4), squeeze=False, sharex=True, sharey=True)
    for ax, (mode, frames) in zip(axes[0], trajectories.items()):
        frames = frames.cpu()
        for i in range(0, frames.shape[1], 4):
            ax.plot(frames[:, i, 0], frames[:, i, 1], lw=0.5, color="0.6")
        ax.scatter(frames[0, :, 0], frames[0, :, 1], s=4, color="0.7", label="start")
        ax.scatter(frames[-1, :, 0], frames[-1, :, 1], s=5, color="C3", label="end")
        draw_ellipses(ax, target, color="C0", lw=1)
        ax.set_title(f"{LABELS[mode]}: E={results['modes'][mode]['final_energy']:.3g}", fontsize=9)
        ax.set_aspect("equal")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig2, ax = plt.subplots(figsize=(5, 3.5))
    for mode, rec in results["modes"].items():
        ax.semilogy(rec["energies"], label=f"{LABELS[mode]} ({rec['seconds']:.2g} s)")
    ax.set_xlabel("step")
    ax.set_ylabel("MW2²(fit, ν) seen by the step")
    ax.legend(fontsize=7)
    fig2.tight_layout()
    return {"flow_trajectories": fig, "flow_energy": fig2}


def stability_figures(results: dict) -> dict:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ns = results["n_values"]
    for level, rec in results["levels"].items():
        _band(ax, ns, rec["rows"], f"{level} (slope {rec['loglog_slope_of_median']:.2f})")
    first = next(iter(results["levels"].values()))["rows"][0]["median"]
    ax.plot(ns, [first * (n / ns[0]) ** -0.5 for n in ns], "k:", label="n^-1/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("n")
    ax.set_ylabel("MW2²(EM fit, truth)")
    ax.legend(fontsize=7)
    ax.set_title(f"K=3, d=2, {results['repeats']} repeats, {results['em_steps']} EM steps", fontsize=9)
    fig.tight_layout()
    return {"stability": fig}


def scaling_figures(results: dict) -> dict:
    plt = _pyplot()
    figures = {}
    for sweep, axis in (("sweep_T", "T"), ("sweep_d", "d")):
        rows = results[sweep]["rows"]
        xs = [r[axis] for r in rows]
        fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 3.8))
        steps = results[sweep].get("em_steps", {})
        for mode in MODES:
            label = LABELS[mode] + (f" (T={steps[mode]})" if mode in steps else "")
            ax_t.plot(xs, [r[mode]["backward_s"] for r in rows], marker="o", label=label)
            ax_m.plot(xs, [r[mode]["saved_forward_bytes"] + r[mode]["saved_backward_bytes"] for r in rows],
                      marker="o", label=label)
        if sweep == "sweep_d":
            dense = [(r["d"], r["dense_ai"]) for r in rows]
            timed = [(dd, a["total_s"]) for dd, a in dense if "total_s" in a]
            if timed:
                ax_t.plot(*zip(*timed), marker="s", ls="--", label="AI (dense, total)")
            ax_m.plot([dd for dd, _ in dense], [a["estimated_bytes"] for _, a in dense], ls="--", marker="s",
                      label="AI dense Jacobians (estimate)")
            ax_m.axhline(results[sweep]["dense_limit_bytes"], color="0.5", lw=0.8, ls=":")
        for ax, title in ((ax_t, "backward time [s]"), (ax_m, "saved for backward [bytes]")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(axis)
            ax.set_title(title, fontsize=9)
            ax.legend(fontsize=7)
        fig.tight_layout()
        figures[f"scaling_vs_{axis}"] = fig
    return figures
