"""Turn a comparison's ``results.json`` into ``report.md`` and PNG plots.

Everything here reads the :class:`ComparisonResults` only (plus the held-out shards, for thumbnails):
every number in the report is a value of ``results.json`` printed with one of the formats below.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image

from retrieval.compare_results import ComparisonResults, DirectionVerdict, MeanStd, Standing, TextSide
from retrieval.io import atomic_path

REPORT_FILE = "report.md"
PLOTS = {"training": "training_curves.png", "signals": "training_signals.png", "recall": "recall_at_k.png",
         "examples": "examples.png"}
RANK_METRICS = ("MedR", "MeanR")  # printed with one decimal, and lower is better
DASH = "–"


# -- formatting --------------------------------------------------------------------------------
def label(metric: str) -> str:
    """``text_to_image/R@5`` → ``text→image R@5``."""
    direction, _, name = metric.partition("/")
    return f"{direction.replace('_to_', '→')} {name}"


def fmt(value: float | None, metric: str = "") -> str:
    """A metric value: ranks with one decimal, everything else with three."""
    if value is None:
        return DASH
    return f"{value:.1f}" if metric.split("/")[-1] in RANK_METRICS else f"{value:.3f}"


def fmt_signed(value: float, metric: str = "") -> str:
    return f"{value:+.1f}" if metric.split("/")[-1] in RANK_METRICS else f"{value:+.3f}"


def fmt_stats(stats: MeanStd | Standing | None, metric: str = "") -> str:
    """``mean ± std`` of a summary entry."""
    return DASH if not stats else f"{fmt(stats.mean, metric)} ± {fmt(stats.std, metric)}"


def _seconds(stats: MeanStd) -> str:
    return f"{stats.mean:.1f} ± {stats.std:.1f}"


def _runs(a: Standing, b: Standing) -> str:
    return f"{a.runs} seeds" if a.runs == b.runs else f"{a.runs} vs {b.runs} runs"


def _better(margin: float, metric: str, first: str, second: str) -> str:
    """Which of two retrieves better, given ``margin = first - second`` on ``metric``."""
    if margin == 0:
        return "the two tie"
    return f"**{first if (margin > 0) != (metric.split('/')[-1] in RANK_METRICS) else second}** retrieves better"


def _vs(a: Standing, b: Standing, metric: str) -> str:
    """``(0.450 ± 0.020 vs 0.330 ± 0.030, 3 seeds)``."""
    return f"({fmt_stats(a, metric)} vs {fmt_stats(b, metric)}, {_runs(a, b)})"


# -- markdown -----------------------------------------------------------------------------------
def _verdict_lines(results: ComparisonResults) -> list[str]:
    verdict = results.verdict
    if not verdict:
        return ["No variant ran; see the skipped variants below."]
    metric = verdict.metric
    winner, lines = verdict.winner, []
    if verdict.runner_up is not None:
        other = verdict.runner_up
        lines.append(f"- **`{winner.name}` wins**: it beats `{other.name}` by "
                     f"{fmt_signed(other.margin, metric)} {label(metric)} {_vs(winner, other, metric)}.")
    else:
        lines.append(f"- Only `{winner.name}` ran: {label(metric)} {fmt_stats(winner, metric)}.")
    if verdict.best_cross_entropy is not None:
        other = verdict.best_cross_entropy
        lines.append(f"- Over the best cross-entropy variant `{other.name}`: {fmt_signed(other.margin, metric)} "
                     f"{_vs(winner, other, metric)}.")
    if verdict.triplet_vs_cross_entropy is not None:
        pair = verdict.triplet_vs_cross_entropy
        triplet, ce = pair.triplet, pair.cross_entropy
        better = _better(ce.margin, metric, "triplet", "cross-entropy")
        lines.append(f"- Triplet vs cross-entropy on `{pair.vectors}` targets: "
                     f"best triplet `{triplet.name}` minus best cross-entropy `{ce.name}` = "
                     f"{fmt_signed(ce.margin, metric)} {label(metric)} "
                     f"{_vs(triplet, ce, metric)}: {better}.")
    for side in results.text_sides:
        lines.append(_text_side_line(side, metric))
    if metric in results.chance:
        lines.append(f"- Chance level of {label(metric)}: {fmt(results.chance[metric], metric)}.")
    return lines


def _text_side_line(side: TextSide, metric: str) -> str:
    better = _better(side.margin, metric, f"`{side.vectors}`", f"`{side.counterpart_vectors}`")
    recipe = "same recipe" if side.same_recipe else "best variant on those vectors"
    return (f"- Text targets: `{side.vectors}` (`{side.variant.name}`) vs `{side.counterpart_vectors}` "
            f"(`{side.counterpart.name}`, {recipe}): {fmt_signed(side.margin, metric)} {label(metric)} "
            f"{_vs(side.variant, side.counterpart, metric)}, at {side.time_ratio:.1f}× the time per run "
            f"({side.wall_seconds:.1f} s vs {side.counterpart_wall_seconds:.1f} s): {better}.")


def _metric_table(results: ComparisonResults, direction: str, zero_shot: bool = False) -> list[str]:
    ks = results.ks
    names = [f"R@{k}" for k in ks] + [f"P@{k}" for k in ks] + ["mAP", "MedR"]
    lines = ["| variant | runs | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for variant in results.ran():
        stats = variant.summary.zero_shot if zero_shot else variant.summary.metrics
        cells = [fmt_stats((stats or {}).get(f"{direction}/{n}"), n) for n in names]
        lines.append(f"| `{variant.name}` | {variant.summary.num_runs} | " + " | ".join(cells) + " |")
    chance = (results.zero_shot_chance if zero_shot else results.chance) or {}
    lines.append("| chance | | " + " | ".join(fmt(chance.get(f"{direction}/{n}"), n) for n in names) + " |")
    return lines


def _cost_table(results: ComparisonResults) -> list[str]:
    lines = ["| variant | kind | loss | text targets | seconds per run | of which epochs |",
             "|---|---|---|---|---|---|"]
    for variant in results.ran():
        summary = variant.summary
        loss = "ConSE (no training)" if variant.kind == "conse" else f"`{variant.loss}`"
        if variant.kind == "train" and variant.family == "triplet" and variant.negatives:
            loss += f" (`{variant.negatives}` negatives)"
        lines.append(f"| `{variant.name}` | {variant.kind} | {loss} | `{variant.text_vectors}` | "
                     f"{_seconds(summary.wall_seconds)} | {_seconds(summary.train_seconds)} |")
    return lines


#: how each loss turns its terms into one value (what its active fraction counts is in its module)
LOSS_AVERAGING = {
    "triplet": "mean over every triplet of the batch, zero terms included (hinge: sum — summed per anchor, "
               "then the mean over anchors)",
    "triplet-mined": "mean over the mined triplets with a non-zero term only (pytorch-metric-learning's "
                     "AvgNonZeroReducer)",
    "triplet-offline": "mean over every row with a negative, zero terms included",
    "quadruplet": "mean over every anchor with a negative, zero terms included",
    "contrastive": "mean over the positive pairs with a non-zero term plus the mean over the negative pairs "
                   "with a non-zero term (AvgNonZeroReducer)",
    "double-margin": "as contrastive: means over the non-zero positive and negative pairs",
    "multi-similarity": "mean over image anchors of the soft terms of their mined pairs",
    "circle": "mean over the image anchors with a non-zero term (AvgNonZeroReducer)",
    "histogram": "one value per batch (the overlap of the two similarity histograms)",
    "sigmoid-ce": "mean over every image's binary cross-entropy against its rescaled caption vector",
    "mse": "mean over every image", "cosine": "mean over every image",
    "softmax-ce": "mean over every image's cross-entropy over the classes",
}


def _reading_lines(results: ComparisonResults) -> list[str]:
    """What the metrics mean, how ties count, how each loss averages, and why class captions tie."""
    lines = ["- **R@K** is the share of queries with *at least one* relevant item among the top K (the "
             "VSE++/CLIP convention); P@K is the share of relevant items in the top K; mAP averages, over "
             "queries, the precision at the rank of every relevant item, so it reads the whole list.",
             "- **Ties** are counted pessimistically: an item that scores exactly as high as a relevant one is "
             "ranked ahead of it (identical embeddings never help a variant).",
             "- **Loss values** are averaged as follows (the active fraction is the share of terms that are "
             "non-zero):"]
    losses = sorted({v.loss for v in results.ran() if v.kind == "train"})
    lines += [f"  - `{loss}`: {LOSS_AVERAGING[loss]}." for loss in losses if loss in LOSS_AVERAGING]
    if results.data.relevance == "class":
        lines.append("- **Class captions tie.** Every caption here is a class name, so all images of a class share "
                     "one caption vector and a query's relevant captions score identically. In image→text an image "
                     "finds its class's copies together: R@K for every K below the copies per class is 1 exactly "
                     "when the nearest class name is the right one, so R@1 = R@5 = R@10 = top-1 class accuracy and "
                     "variants tie in R@K whenever they classify alike; mAP still tells them apart. In text→image "
                     "all queries of a class are one query repeated.")
    return lines


def _direction_lines(results: ComparisonResults) -> list[str]:
    """Per direction: the best variant, and the best triplet against the best cross-entropy on R@K and mAP."""
    lines = []
    for found in results.directions or []:
        title = label(found.direction + "/").strip()
        chooser = f"{found.direction}/{found.chosen_by}"
        lines += ["", f"### {title}", "",
                  f"Best variant by {found.chosen_by}: `{found.best.name}`, {fmt_stats(found.best, chooser)}."]
        if not found.metrics:
            lines.append("No triplet and cross-entropy variant both ran on the base text vectors.")
            continue
        lines += ["", f"Best triplet `{found.triplet}` against best cross-entropy `{found.cross_entropy}` "
                  f"(each chosen by {found.chosen_by}):", "",
                  "| metric | triplet | cross-entropy | triplet − cross-entropy | reading |", "|---|---|---|---|---|"]
        for pair in found.metrics:
            lines.append(f"| {pair.metric} | {fmt_stats(pair.triplet)} | {fmt_stats(pair.cross_entropy)} | "
                         f"{fmt_signed(pair.margin)} | {_reading(pair.margin, pair.clear)} |")
        lines.append("")
        lines.append(_direction_summary(found))
    return lines


def _reading(margin: float, clear: bool) -> str:
    if margin == 0:
        return "tie"
    winner = "triplet" if margin > 0 else "cross-entropy"
    return f"**{winner}**, beyond the seeds' spread" if clear else f"{winner}, within the seeds' spread"


def _direction_summary(found: DirectionVerdict) -> str:
    clear_wins = {side: [p.metric for p in found.metrics if p.clear and (p.margin > 0) == (side == "triplet")]
                  for side in ("triplet", "cross-entropy")}
    parts = [f"{side} is ahead beyond the spread on {', '.join(metrics)}"
             for side, metrics in clear_wins.items() if metrics]
    undecided = [p.metric for p in found.metrics if not p.clear]
    if undecided:
        parts.append(f"{', '.join(undecided)} {'is' if len(undecided) == 1 else 'are'} within the seeds' spread")
    return "In this direction " + "; ".join(parts) + "."


def _signal_table(results: ComparisonResults) -> list[str]:
    """Per trained variant: its active fraction and embedding spread over the epochs (mean over seeds)."""
    lines = ["| variant | active fraction: first → last epoch (lowest – highest) | embedding spread: first → last "
             "(lowest) |", "|---|---|---|"]
    for variant in results.ran():
        curves = variant.summary.curves
        if curves is None:
            continue
        active = [v for v in curves.active_fraction if v is not None]
        spread = [v for v in (curves.embedding_spread or []) if v is not None]
        active_text = (f"{fmt(active[0])} → {fmt(active[-1])} ({fmt(min(active))} – {fmt(max(active))})"
                       if active else DASH)
        spread_text = f"{fmt(spread[0])} → {fmt(spread[-1])} ({fmt(min(spread))})" if spread else DASH
        lines.append(f"| `{variant.name}` | {active_text} | {spread_text} |")
    return lines


def _alarm_lines(results: ComparisonResults) -> list[str]:
    """What the collapse alarm (``retrieval.collapse``) said in each run, or that it stayed silent."""
    lines = []
    for variant in results.ran():
        for run in variant.runs:
            lines += [f"- `{variant.name}` seed {run.seed}: {warning}" for warning in run.warnings or []]
    trained = [variant for variant in results.ran() if variant.kind == "train"]
    if not lines:
        return ["Silent in every training run" + ("" if trained else " (none ran)") + ": no margin loss kept its "
                "active fraction under the alarm's floor, and no run's embedding spread fell under its floor, for "
                "the alarm's patience in epochs (the train.collapse_* settings)."]
    return ["Warnings raised during training (the train.collapse_* settings):", "", *lines]


def render_report(results: ComparisonResults) -> str:
    """The markdown report of a comparison, from its results alone."""
    data, metric = results.data, results.primary_metric
    seeds = ", ".join(str(s) for s in results.seeds)
    lines = [f"# Comparison `{results.name}`", "", f"Command: `{results.command}`", "",
             f"Held-out split: {data.num_val_images} images and {data.num_val_captions} captions "
             f"(`{data.shard_dir}`), relevance by {data.relevance}. Each trained variant ran with "
             f"{results.num_seeds} seeds ({seeds}) on the same data, backbone and schedule, and each run is "
             f"evaluated with its `{results.checkpoint}` checkpoint. Values are mean ± sample standard deviation "
             f"over runs; variants are ranked by {label(metric)}.", "", "## Verdict", "", *_verdict_lines(results)]
    if results.directions:
        lines += ["", "## Triplet or cross-entropy, in each direction", *_direction_lines(results)]
    lines += ["", "## How to read the numbers", "", *_reading_lines(results)]
    for direction in ("text_to_image", "image_to_text"):
        title = label(direction + "/").strip()
        lines += ["", f"## Held-out retrieval: {title}", "", *_metric_table(results, direction)]
    lines += ["", "## Training cost", "", "Wall-clock seconds per run (setup, text targets and training) and the "
              "part spent in training epochs.", "", *_cost_table(results)]
    if results.setup_seconds:
        setup = results.setup_seconds
        loads = ", ".join(f"`{k}` {v:.1f} s" for k, v in setup.text.items())
        lines += ["", f"Done once before the first run and not counted above: backbone features of both splits "
                  f"into the shared cache, {setup.features:.1f} s"
                  + (f"; a first load of each text side, so that no run pays a cold start: {loads}." if loads else ".")]
    if results.zero_shot_queries:
        names = ", ".join(f"`{q.name}`" for q in results.zero_shot_queries)
        held_out, relevant = (("classes", "the images of that class") if data.relevance == "class" else
                              ("items (no training caption names them)", "every image that shows that item"))
        lines += ["", "## Zero-shot retrieval", "", f"Text→image with the names of the {held_out} held out of "
                  f"training as queries ({names}), each against all {data.num_val_images} held-out images; "
                  f"relevant: {relevant}.", "", *_metric_table(results, "text_to_image", zero_shot=True)]
    lines += ["", "## Training signals", "", "Mean over seeds per epoch; the curves are in the plots below.", "",
              *_signal_table(results), "", "### Collapse alarm", "", *_alarm_lines(results)]
    skipped = [v for v in results.variants if not v.ok]
    if skipped:
        lines += ["", "## Skipped variants", ""] + [f"- `{v.name}`: `{v.note}`" for v in skipped]
    lines += ["", "## Plots", "", f"![training curves]({PLOTS['training']})", "",
              f"![active fraction and embedding spread]({PLOTS['signals']})", "", f"![R@K curves]({PLOTS['recall']})",
              "", f"![example queries]({PLOTS['examples']})", ""]
    return "\n".join(lines)


# -- plots --------------------------------------------------------------------------------------
def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100, bbox_inches="tight")
    return path


def _colors(results: ComparisonResults) -> dict[str, tuple]:
    """One colour per variant, the same in every plot."""
    cmap = colormaps["tab10"]
    return {v.name: cmap(i % 10) for i, v in enumerate(results.variants)}


def plot_training_curves(results: ComparisonResults, path: Path) -> Path:
    """Loss, active fraction and the held-out ranking metric per epoch, mean over seeds per variant."""
    figure = Figure(figsize=(15, 4))
    axes = figure.subplots(1, 3)
    colors, metric = _colors(results), results.primary_metric
    for variant in results.ran():
        curves, color = variant.summary.curves, colors[variant.name]
        if curves is None:  # no training (ConSE): a level line in the metric panel
            axes[2].axhline(variant.summary.metrics[metric].mean, color=color, linestyle="--",
                            label=f"{variant.name} (no training)")
            continue
        axes[0].plot(curves.epoch, _nan_for_none(curves.loss), color=color, label=variant.name)
        axes[1].plot(curves.epoch, _nan_for_none(curves.active_fraction), color=color, label=variant.name)
        axes[2].plot(curves.eval_epoch, curves.primary, color=color, marker="o", label=variant.name)
    if metric in results.chance:
        axes[2].axhline(results.chance[metric], color="gray", linestyle=":", label="chance")
    titles = ("training loss", "active fraction", f"held-out {label(metric)}")
    for axis, title in zip(axes, titles):
        axis.set_title(title)
        axis.set_xlabel("epoch")
        axis.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    figure.suptitle(f"{results.name}: mean over seeds", y=1.03)
    return _save(figure, path)


def plot_training_signals(results: ComparisonResults, path: Path) -> Path:
    """The collapse alarm's two signals per epoch, mean over seeds: active fraction and embedding spread."""
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 2)
    colors = _colors(results)
    for variant in results.ran():
        curves = variant.summary.curves
        if curves is None:
            continue
        axes[0].plot(curves.epoch, _nan_for_none(curves.active_fraction), color=colors[variant.name],
                     label=variant.name)
        if curves.embedding_spread:
            axes[1].plot(curves.epoch, _nan_for_none(curves.embedding_spread), color=colors[variant.name],
                         label=variant.name)
    titles = ("active fraction (share of non-zero loss terms)", "embedding spread (RMS distance between images)")
    for axis, title in zip(axes, titles):
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
        axis.set_ylim(bottom=0)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle(f"{results.name}: training signals, mean over seeds", y=1.03)
    return _save(figure, path)


def _nan_for_none(values: list[float | None]) -> list[float]:
    """A curve with gaps where results.json holds null (a loss that was not finite)."""
    return [float("nan") if v is None else v for v in values]


def plot_recall_curves(results: ComparisonResults, path: Path) -> Path:
    """Mean held-out R@K against K for both directions, with the chance level at the reported K."""
    figure = Figure(figsize=(11, 4))
    axes = figure.subplots(1, 2)
    colors = _colors(results)
    for axis, direction in zip(axes, ("text_to_image", "image_to_text")):
        for variant in results.ran():
            curve = variant.summary.recall_curve[direction]
            axis.plot(range(1, len(curve) + 1), curve, color=colors[variant.name], label=variant.name)
        chance = {k: results.chance.get(f"{direction}/R@{k}") for k in results.ks}
        points = [(k, v) for k, v in chance.items() if v is not None]
        if points:
            axis.plot(*zip(*points), "kx", label="chance")
        axis.set_title(f"held-out {label(direction + '/')}R@K")
        axis.set_xlabel("K")
        axis.set_ylim(0, 1.02)
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _save(figure, path)


def plot_examples(results: ComparisonResults, thumbnails: dict, path: Path) -> Path:
    """Rows: variants; columns: the top images of each example query (first run of each variant)."""
    variants, queries, k = results.ran(), results.example_queries, results.example_top_k
    rows, cols = max(1, len(variants)), max(1, len(queries) * k)
    figure = Figure(figsize=(1.3 * cols + 1.5, 1.4 * rows + 0.8))
    axes = np.atleast_2d(figure.subplots(rows, cols, squeeze=False))
    for axis in axes.flat:
        axis.set_xticks([])
        axis.set_yticks([])
        for spine in axis.spines.values():
            spine.set_visible(False)
    for row, variant in enumerate(variants):
        axes[row, 0].set_ylabel(variant.name, rotation=0, ha="right", va="center", fontsize=9)
        first = variant.runs[0].evaluation
        examples, matches = first.examples, first.example_matches
        for q, query in enumerate(queries):
            if not examples.get(query):
                axes[row, q * k].text(0.5, 0.5, "no known word\nin this query", ha="center", va="center", fontsize=8)
            for rank, key in enumerate(examples.get(query, [])[:k]):
                axis = axes[row, q * k + rank]
                image = thumbnails.get(key)
                axis.imshow(image if image is not None else np.full((8, 8, 3), 0.8))
                if matches.get(query, [False] * k)[rank]:  # the query is this image's caption or class name
                    for spine in axis.spines.values():
                        spine.set(visible=True, color="green", linewidth=3)
    for q, query in enumerate(queries):
        axes[0, q * k].set_title(f"“{query}”", loc="left", fontsize=9)
    figure.suptitle(f"top {k} held-out images per query (green frame: the query is the image's caption or class)")
    return _save(figure, path)


def load_thumbnails(shards: Iterable[str], keys: set[str], size: int = 128) -> dict:
    """RGB thumbnails (numpy arrays) of the images with these keys; shards that are gone give none."""
    from torchvision.transforms.v2.functional import to_pil_image

    from retrieval.data import iter_samples

    found = {}
    try:
        for sample in iter_samples(list(shards)):
            if sample.key in keys:
                image = to_pil_image(sample.image)
                scale = size / max(image.size)  # small images (Fashion-MNIST's 28 px) are enlarged too
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
                square = Image.new("RGB", (size, size), "white")  # letterboxed: every cell the same shape
                square.paste(image, ((size - image.width) // 2, (size - image.height) // 2))
                found[sample.key] = np.asarray(square)
    except Exception:  # noqa: BLE001 - thumbnails are decoration; a missing shard leaves grey boxes
        pass
    return found


def write_report(results: ComparisonResults, out_dir: str | Path) -> dict[str, Path]:
    """``report.md`` and its plots in ``out_dir``; returns their paths."""
    out_dir = Path(out_dir)
    keys = {key for v in results.ran() for found in v.runs[0].evaluation.examples.values() for key in found}
    thumbnails = load_thumbnails(results.data.val_shards, keys)
    paths = {"training": plot_training_curves(results, out_dir / PLOTS["training"]),
             "signals": plot_training_signals(results, out_dir / PLOTS["signals"]),
             "recall": plot_recall_curves(results, out_dir / PLOTS["recall"]),
             "examples": plot_examples(results, thumbnails, out_dir / PLOTS["examples"])}
    with atomic_path(out_dir / REPORT_FILE) as tmp:
        tmp.write_text(render_report(results))
    paths["report"] = out_dir / REPORT_FILE
    return paths
