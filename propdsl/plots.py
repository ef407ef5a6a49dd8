"""PNG plots of a run: training curves, security against the radius, robustness curve, samples.

matplotlib is imported inside the functions, and only its object-oriented API with the Agg
canvas is used (no `pyplot`): plotting never opens a window, needs no display, and leaves the
process's matplotlib backend alone.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
    "adversarial_explanation_grid",
    "alignment_scatter",
    "ara_curves",
    "counterexample_grid",
    "flatness_histogram",
    "is_image",
    "landscape_curves",
    "landscape_surfaces",
    "robustness_curve",
    "sample_grid",
    "security_curve",
    "training_curves",
]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# Series drawn in one panel get different markers, line styles and marker sizes (the first the
# largest, hollow), so lines that coincide (two properties at 1.0 every epoch) stay visible.
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
_LINES = ("-", "--", "-.", ":")


def _style(i: int, count: int) -> dict[str, Any]:
    size = 4 + 2.5 * max(0, count - 1 - i) if count > 1 else 4
    return {
        "marker": _MARKERS[i % len(_MARKERS)],
        "ms": size,
        "ls": _LINES[i % len(_LINES)],
        "mfc": "none" if i < count - 1 else None,
        "mew": 1.2,
        "alpha": 0.9,
    }


def _save(fig: Any, path: Path) -> Path:
    path = Path(path)
    fig.savefig(path, format="png", dpi=100)
    return path


def is_image(shape: Sequence[int]) -> bool:
    """Inputs that can be drawn as images: [H, W], or [C, H, W] with 1 or 3 channels.

    >>> is_image((1, 8, 8)), is_image((30,))
    (True, False)
    """
    shape = tuple(shape)
    return (len(shape) == 2 and min(shape) > 1) or (
        len(shape) == 3 and shape[0] in (1, 3) and min(shape[1:]) > 1
    )


def training_curves(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Loss terms, validation accuracy and property satisfaction per epoch (metrics.jsonl rows).

    >>> import tempfile, pathlib
    >>> rows = [{"epoch": 1, "loss": 2.0, "val_accuracy": 0.5, "satisfied[p]": 0.1}]
    >>> training_curves(rows, pathlib.Path(tempfile.mkdtemp()) / "c.png").name
    'c.png'
    """
    from matplotlib.ticker import MaxNLocator

    epochs = [r.get("epoch", i + 1) for i, r in enumerate(rows)]
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    losses = [k for k in keys if k == "loss" or k.startswith("loss[")]
    sats = [k for k in keys if k.startswith("satisfied[")]
    fig = _figure(13, 3.8)
    ax_loss, ax_acc, ax_sat = fig.subplots(1, 3)
    for i, k in enumerate(losses):
        label = "total" if k == "loss" else k[len("loss[") : -1]
        ax_loss.plot(epochs, _column(rows, k), label=_short(label), **_style(i, len(losses)))
    ax_loss.set(title="training loss", xlabel="epoch")
    ax_acc.plot(epochs, _column(rows, "val_accuracy"), marker="o", ms=3, color="black")
    ax_acc.set(title="validation accuracy", xlabel="epoch", ylim=(0, 1.02))
    for i, k in enumerate(sats):
        label = k[len("satisfied[") : -1]
        ax_sat.plot(epochs, _column(rows, k), label=label, **_style(i, len(sats)))
    ax_sat.set(
        title="satisfied at the training attack (validation)", xlabel="epoch", ylim=(0, 1.05)
    )
    for ax, has in ((ax_loss, losses), (ax_sat, sats)):
        if has:
            ax.legend(fontsize=7)
    for ax in (ax_loss, ax_acc, ax_sat):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return _save(fig, path)


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [float(r[key]) if r.get(key) is not None else math.nan for r in rows]


def _short(text: str, width: int = 40) -> str:
    return text if len(text) <= width else text[: width - 3] + "..."


def security_curve(
    eps: Sequence[float],
    curves: Mapping[str, Sequence[float]],
    path: Path,
    *,
    nominal: float | None = None,
    clean: float | None = None,
    accuracy: Mapping[str, Sequence[float]] | None = None,
) -> Path:
    """Constraint security against the radius, one line per property, and (when given) its
    constraint accuracy (at uniformly random points) as a thin dotted line of the same colour.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "s.png"
    >>> security_curve([0, 0.1], {"robust": [0.9, 0.4]}, p, nominal=0.1).name
    's.png'
    """
    fig = _figure(6, 4)
    ax = fig.subplots()
    for i, (name, values) in enumerate(curves.items()):
        (line,) = ax.plot(
            list(eps), list(values), label=f"{name}: security", **_style(i, len(curves))
        )
        if accuracy is not None and name in accuracy:
            ax.plot(
                list(eps),
                list(accuracy[name]),
                color=line.get_color(),
                ls=":",
                marker="x",
                lw=1,
                label=f"{name}: accuracy (random points)",
            )
    if clean is not None:
        ax.axhline(clean, color="grey", ls="--", lw=1, label="clean accuracy")
    if nominal is not None:
        ax.axvline(nominal, color="grey", ls=":", lw=1, label=f"spec eps = {nominal:g}")
    ax.set(
        title="constraint security (and accuracy) against the radius",
        xlabel="eps (the spec's radius param)",
        ylabel="fraction of samples where it holds",
        ylim=(0, 1.05),
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def robustness_curve(distances: Sequence[float], num_classes: int, area: float, path: Path) -> Path:
    """Woods et al.'s accuracy-robustness curve A(e): the fraction of samples whose smallest
    adversarial RMSE exceeds e, with the chance level 1/K; the area between them is the ARA.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "a.png"
    >>> robustness_curve([0.0, 0.1, 0.3], 2, 0.0167, p).name
    'a.png'
    """
    from bisect import bisect_right

    d = sorted(float(v) for v in distances)
    n = max(1, len(d))
    # The exact step function, drawn from each distance on: A(e) = #{d > e} / n.
    xs = [0.0, *d]
    ys = [(len(d) - bisect_right(d, e)) / n for e in xs]
    fig = _figure(6, 4)
    ax = fig.subplots()
    ax.step(xs, ys, where="post", color="black")
    ax.axhline(1 / num_classes, color="grey", ls="--", lw=1, label=f"chance 1/{num_classes}")
    ax.set(
        title=f"accuracy-robustness curve (area {area:.4g})",
        xlabel="RMSE of the perturbation e",
        ylabel="A(e)",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def _image(t: Any) -> tuple[Any, str | None]:
    """A [C, H, W] or [H, W] tensor as an array imshow takes, and its colormap."""
    a = t.detach().float().cpu()
    if a.dim() == 3 and a.shape[0] == 3:
        return a.permute(1, 2, 0).clamp(0, 1).numpy(), None
    if a.dim() == 3:
        a = a[0]
    return a.numpy(), "gray"


def _heat(t: Any) -> Any:
    a = t.detach().float().cpu()
    return (a.sum(0) if a.dim() == 3 else a).numpy()


def sample_grid(
    x: Any,
    y: Any,
    predicted: Any,
    saliency: Any,
    path: Path,
    *,
    points: Any = None,
    point_pred: Any = None,
    holds: Any = None,
    title: str | None = None,
) -> Path:
    """One row per sample: the input (label, prediction), the attack's point (its prediction,
    and whether the property holds there: `holds[i]`) and its difference to the input (when
    given), and the saliency map of the label (summed over channels; red positive, blue
    negative). The difference and saliency panels have colour bars.

    >>> import tempfile, pathlib, torch
    >>> x = torch.rand(2, 1, 4, 4)
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "g.png"
    >>> sample_grid(x, [0, 1], [0, 0], torch.randn(2, 1, 4, 4), p, points=x).name
    'g.png'
    """
    k = int(x.shape[0])
    cols = 4 if points is not None else 2
    fig = _figure(2.6 * cols, 2.3 * k + (0.4 if title else 0))
    axes = fig.subplots(k, cols, squeeze=False)
    for i in range(k):
        yi, pi = int(y[i]), int(predicted[i])
        img, cmap = _image(x[i])
        axes[i][0].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[i][0].set_title(f"sample {i}: label {yi}, pred {pi}", fontsize=8)
        c = 1
        if points is not None:
            img, cmap = _image(points[i])
            axes[i][1].imshow(img, cmap=cmap, vmin=0, vmax=1)
            text = "attack point"
            if point_pred is not None:
                q = int(point_pred[i])
                text += f": pred {q}" + (" (unchanged)" if q == pi else f" (was {pi})")
            if holds is not None:
                text += "\nproperty holds" if bool(holds[i]) else "\nviolated: counterexample"
            axes[i][1].set_title(text, fontsize=8)
            diff = _heat(points[i] - x[i])
            bound = float(abs(diff).max()) or 1.0
            im = axes[i][2].imshow(diff, cmap="RdBu_r", vmin=-bound, vmax=bound)
            axes[i][2].set_title(f"point - input (max {bound:.3g})", fontsize=8)
            fig.colorbar(im, ax=axes[i][2], shrink=0.8)
            c = 3
        heat = _heat(saliency[i])
        bound = float(abs(heat).max()) or 1.0
        im = axes[i][c].imshow(heat, cmap="RdBu_r", vmin=-bound, vmax=bound)
        axes[i][c].set_title(f"saliency of label {yi}", fontsize=8)
        fig.colorbar(im, ax=axes[i][c], shrink=0.8)
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    return _save(fig, path)


def counterexample_grid(
    x: Any,
    points: Any,
    index: Sequence[int],
    labels: Sequence[int] | None,
    pred_x: Sequence[int],
    pred_point: Sequence[int],
    margins: Sequence[float],
    path: Path,
    *,
    title: str,
    limit: int = 8,
) -> Path:
    """Counterexamples of one property, one column each (the first `limit`): the sample (its
    index in the split, label and prediction), the counterexample (its prediction and the
    logit margin there), and their difference with a colour bar.

    `margins[i]`: the logit margin of the reference class at the counterexample (the label,
    else the class predicted at the sample): `f[c] - max_{j != c} f[j]`, negative where the
    decision changed.

    >>> import tempfile, pathlib, torch
    >>> x = torch.rand(2, 1, 4, 4)
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "c.png"
    >>> counterexample_grid(x, x, [3, 9], [1, 2], [1, 2], [1, 0], [0.5, -0.2], p, title="t").name
    'c.png'
    """
    n = min(limit, int(x.shape[0]))
    fig = _figure(2.0 * n + 1.0, 6.6)
    axes = fig.subplots(3, n, squeeze=False)
    bound = max(float(abs(_heat(points[i] - x[i])).max()) for i in range(n)) or 1.0
    im = None
    for i in range(n):
        img, cmap = _image(x[i])
        axes[0][i].imshow(img, cmap=cmap, vmin=0, vmax=1)
        label = "" if labels is None else f"label {int(labels[i])}, "
        axes[0][i].set_title(f"#{int(index[i])}: {label}pred {int(pred_x[i])}", fontsize=8)
        img, cmap = _image(points[i])
        axes[1][i].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[1][i].set_title(
            f"pred {int(pred_point[i])}, margin {float(margins[i]):.3g}", fontsize=8
        )
        im = axes[2][i].imshow(_heat(points[i] - x[i]), cmap="RdBu_r", vmin=-bound, vmax=bound)
        for row in range(3):
            axes[row][i].set_xticks([])
            axes[row][i].set_yticks([])
    axes[0][0].set_ylabel("sample")
    axes[1][0].set_ylabel("counterexample")
    axes[2][0].set_ylabel("difference")
    if im is not None:
        fig.colorbar(im, ax=list(axes[2]), shrink=0.8, label="counterexample - sample")
    fig.suptitle(title, fontsize=9)
    return _save(fig, path)


# -- metrics named after papers (propdsl.metrics) ------------------------------------------------


def alignment_scatter(
    alignment: Sequence[float],
    rho: Sequence[float],
    rho_tilde: Sequence[float],
    path: Path,
    *,
    found: Sequence[bool] | None = None,
) -> Path:
    """Etmann et al. (2019): per sample, alignment against robustness rho (by attack; samples
    where none was found are hollow) and against the linearised robustness rho~, with the
    diagonal alpha = rho for scale.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "e.png"
    >>> alignment_scatter([0.1, 0.5, 0.9], [0.2, 0.4, 1.0], [0.3, 0.5, 0.8], p).name
    'e.png'
    """
    fig = _figure(10, 4)
    left, right = fig.subplots(1, 2)
    a = [float(v) for v in alignment]
    ok = [True] * len(a) if found is None else [bool(v) for v in found]
    xs = [float(v) for v in rho]
    left.scatter(
        [x for x, k in zip(xs, ok, strict=True) if k],
        [v for v, k in zip(a, ok, strict=True) if k],
        s=14,
        label="rho found by the attack",
    )
    if not all(ok):
        left.scatter(
            [x for x, k in zip(xs, ok, strict=True) if not k],
            [v for v, k in zip(a, ok, strict=True) if not k],
            s=14,
            facecolors="none",
            edgecolors="grey",
            label="none found: rho capped",
        )
    tilde = [float(v) for v in rho_tilde]
    right.scatter(
        [t for t in tilde if math.isfinite(t)],
        [v for v, t in zip(a, tilde, strict=True) if math.isfinite(t)],
        s=14,
        color="tab:orange",
        label="rho~ (closed form)",
    )
    for ax, what in (
        (left, "robustness rho, L2 (attack: an upper bound)"),
        (right, "linearised robustness rho~, L2"),
    ):
        finite = [v for v in a if math.isfinite(v)]
        top = max(finite, default=1.0)
        ax.plot([0, top], [0, top], color="grey", ls=":", lw=1, label="alignment = distance")
        ax.set(xlabel=what, ylabel="alignment |<x, g>| / ||g||_2 (input units)")
        ax.legend(fontsize=8)
    fig.suptitle("alignment against robustness per sample (Etmann et al. 2019)", fontsize=10)
    return _save(fig, path)


def ara_curves(
    distances: Mapping[str, Sequence[float]],
    num_classes: int,
    areas: Mapping[str, float],
    path: Path,
) -> Path:
    """Woods et al. (2019): A(e), the fraction of samples whose near-minimal RMSE perturbation
    exceeds e, one step line per criterion (attack, BTR), with the chance level 1/C.

    >>> import tempfile, pathlib
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "w.png"
    >>> d = {"attack": [0.0, 0.1], "btr": [0.0, 0.2]}
    >>> ara_curves(d, 2, {"attack": 0.0, "btr": 0.0}, p).name
    'w.png'
    """
    from bisect import bisect_right

    fig = _figure(6, 4)
    ax = fig.subplots()
    for i, (name, values) in enumerate(distances.items()):
        d = sorted(float(v) for v in values)
        n = max(1, len(d))
        xs = [0.0, *d]
        ys = [(len(d) - bisect_right(d, e)) / n for e in xs]
        ax.step(
            xs,
            ys,
            where="post",
            ls=_LINES[i % len(_LINES)],
            label=f"{name} ARA {areas.get(name, math.nan):.4g}",
        )
    ax.axhline(1 / num_classes, color="grey", ls="--", lw=1, label=f"chance 1/{num_classes}")
    ax.set(
        title="accuracy-robustness curves (Woods et al. 2019)",
        xlabel="RMSE of the perturbation e",
        ylabel="A(e): fraction of samples with m_i > e",
        ylim=(0, 1.02),
    )
    ax.legend(fontsize=8)
    return _save(fig, path)


def adversarial_explanation_grid(
    x: Any,
    labels: Sequence[int],
    points: Any,
    targets: Sequence[int],
    probability: Any,
    path: Path,
    *,
    radius: float,
) -> Path:
    """Woods et al. (2019)'s adversarial explanations: one row per sample, the input then
    x + delta toward each target class t (RMSE at most `radius`), titled with p_t there.

    >>> import tempfile, pathlib, torch
    >>> p = pathlib.Path(tempfile.mkdtemp()) / "x.png"
    >>> x = torch.rand(2, 1, 4, 4)
    >>> pts = torch.rand(2, 3, 1, 4, 4)
    >>> probs = torch.rand(2, 3)
    >>> adversarial_explanation_grid(x, [0, 1], pts, [0, 1, 2], probs, p, radius=0.1).name
    'x.png'
    """
    k, t = int(x.shape[0]), len(targets)
    fig = _figure(1.6 * (t + 1), 1.75 * k + 0.5)
    axes = fig.subplots(k, t + 1, squeeze=False)
    for i in range(k):
        img, cmap = _image(x[i])
        axes[i][0].imshow(img, cmap=cmap, vmin=0, vmax=1)
        axes[i][0].set_title(f"input, label {int(labels[i])}", fontsize=7)
        for j, target in enumerate(targets):
            img, cmap = _image(points[i, j])
            axes[i][j + 1].imshow(img, cmap=cmap, vmin=0, vmax=1)
            axes[i][j + 1].set_title(
                f"toward {int(target)}: p={float(probability[i, j]):.2f}", fontsize=7
            )
        for ax in axes[i]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"adversarial explanations x + delta, RMSE <= {radius:g} (Woods et al. 2019)", fontsize=9
    )
    return _save(fig, path)


def landscape_curves(landscape: Any, path: Path) -> Path:
    """The CE and the explanation loss along the adversarial and a random direction
    (`propdsl.metrics.Landscape`), one panel each.

    >>> import tempfile, pathlib, torch
    >>> from propdsl.metrics import Landscape
    >>> s = torch.linspace(-1, 1, 3)
    >>> land = Landscape(s, s**2, s**2, s.abs(), s.abs(), None, None, 2)
    >>> landscape_curves(land, pathlib.Path(tempfile.mkdtemp()) / "l.png").name
    'l.png'
    """
    fig = _figure(10, 4)
    left, right = fig.subplots(1, 2)
    steps = [float(v) for v in landscape.steps]
    for ax, adv, rnd, name in (
        (left, landscape.ce_adversarial, landscape.ce_random, "cross-entropy loss"),
        (
            right,
            landscape.explanation_adversarial,
            landscape.explanation_random,
            "explanation loss ||saliency(x') - saliency(x)||_2",
        ),
    ):
        ax.plot(
            steps, [float(v) for v in adv], marker="o", ms=3, label="adversarial: sign(grad CE)"
        )
        ax.plot(steps, [float(v) for v in rnd], marker="s", ms=3, ls="--", label="random sign")
        ax.set(xlabel="offset a along the direction (L-inf distance)", ylabel=name, title=name)
        ax.legend(fontsize=8)
    fig.suptitle(f"input loss landscapes, mean over {landscape.n} samples", fontsize=10)
    return _save(fig, path)


def landscape_surfaces(landscape: Any, path: Path) -> Path:
    """The CE and the explanation loss on `x + a d_adv + b d_random`, as filled contours."""
    fig = _figure(10, 4.2)
    axes = fig.subplots(1, 2)
    steps = [float(v) for v in landscape.steps]
    for ax, surface, name in (
        (axes[0], landscape.ce_surface, "cross-entropy loss"),
        (axes[1], landscape.explanation_surface, "explanation loss"),
    ):
        z = surface.detach().double().cpu().numpy().T  # rows: b (random), columns: a
        im = ax.contourf(steps, steps, z, levels=20, cmap="viridis")
        fig.colorbar(im, ax=ax, shrink=0.85, label=name)
        ax.set(
            xlabel="a: adversarial direction (L-inf)",
            ylabel="b: random direction (L-inf)",
            title=name,
        )
    fig.suptitle(f"input loss surfaces, mean over {landscape.n} samples", fontsize=10)
    return _save(fig, path)


def flatness_histogram(values: Sequence[float], path: Path) -> Path:
    """The per-sample top eigenvalue of the input Hessian of the CE loss.

    >>> import tempfile, pathlib
    >>> flatness_histogram([0.1, 0.5, 2.0], pathlib.Path(tempfile.mkdtemp()) / "h.png").name
    'h.png'
    """
    fig = _figure(6, 4)
    ax = fig.subplots()
    v = [float(a) for a in values if math.isfinite(float(a))]
    ax.hist(v, bins=min(30, max(5, len(v) // 3)), color="tab:blue")
    mean = sum(v) / len(v) if v else math.nan
    ax.axvline(mean, color="black", ls="--", lw=1, label=f"mean {mean:.4g}")
    ax.set(
        title="flatness: top eigenvalue of the input Hessian of the CE loss",
        xlabel="largest eigenvalue (per sample; lower is flatter)",
        ylabel="samples",
    )
    ax.legend(fontsize=8)
    return _save(fig, path)
