"""The audit's report: ``audit.json`` (the summary, machine-readable) and ``report.html``, one self-contained
page (figures embedded as PNG, no script, no external file) that opens in any browser.

Figures (matplotlib, Agg): the similarity of each synthetic volume to its nearest training volume against
those of real subjects and the threshold; flagged pairs side by side in three planes (the closest pairs when
none is flagged); the diversity of each set; brain intensity histograms of real and synthetic volumes.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import numpy as np

from napari_meddiff.audit.grid import Prepared, view
from napari_meddiff.errors import MeddiffError
from napari_meddiff.io.files import (
    check_output_file,
    ensure_folder,
    new_files_removed_on_failure,
    removed_if_left_empty,
    write_text_atomic,
)

OUTPUTS = ("audit.json", "report.html")
MAX_PAIRS_SHOWN = 8
CLOSEST_SHOWN = 3
COLOURS = {"synthetic": "#d95f02", "real": "#1b9e77", "training": "#7570b3", "threshold": "#c0392b"}


def check_outputs(out: Path, overwrite: bool) -> None:
    """Refuse, before any work, an ``out`` that is a file or holds a report, unless ``overwrite``."""
    if out.exists() and not out.is_dir():
        raise MeddiffError(f"{out} exists and is not a folder; the report goes into a folder")
    for name in OUTPUTS:
        check_output_file(out / name, overwrite)


def write_report(result, out: Path, overwrite: bool = False) -> tuple[Path, Path]:
    """Write ``audit.json`` and ``report.html`` into ``out`` (both, or neither)."""
    check_outputs(out, overwrite)
    page = render_html(result)
    paths = (out / OUTPUTS[0], out / OUTPUTS[1])
    with removed_if_left_empty(out):
        ensure_folder(out)
        with new_files_removed_on_failure(paths):
            write_text_atomic(paths[0], json.dumps(_plain(result.summary), indent=2) + "\n", overwrite=overwrite)
            write_text_atomic(paths[1], page, overwrite=overwrite)
    return paths


def _plain(value):
    """``value`` with NumPy scalars and arrays turned into JSON types."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


# --- figures -------------------------------------------------------------------------------------------------


def _png(fig) -> str:
    """The figure as a base64 PNG ``<img>``; the figure is closed."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="figure">'


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def similarity_figure(summary: dict) -> str:
    """Histogram of nearest-training similarities: synthetic volumes, real subjects, and the threshold."""
    plt = _pyplot()
    memo, threshold = summary["memorization"], summary["thresholds"]["memorization"]
    synthetic = np.array([r["similarity"] for r in summary["synthetic"]])
    real = np.array([r["similarity"] for r in memo["reference"]])
    label = "real (held out)" if threshold["source"] == "real" else "training (leave-one-out)"
    lo = min(synthetic.min(), real.min(), threshold["similarity"])
    bins = np.linspace(lo - 0.01 * (1 - lo), 1.0, 40)
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    ax.hist(real, bins=bins, alpha=0.7, color=COLOURS["real"], label=f"{label}: {len(real)}")
    ax.hist(synthetic, bins=bins, alpha=0.7, color=COLOURS["synthetic"], label=f"synthetic: {len(synthetic)}")
    ax.axvline(threshold["similarity"], color=COLOURS["threshold"], linestyle="--", linewidth=2)
    left_side = threshold["similarity"] < 0.75 * bins[0] + 0.25 * bins[-1]
    ax.text(threshold["similarity"], ax.get_ylim()[1] * 0.97, f" threshold {threshold['similarity']:.4f} ",
            color=COLOURS["threshold"], va="top", ha="left" if left_side else "right",
            bbox={"facecolor": "white", "edgecolor": "none", "alpha": 0.8, "pad": 1})  # fmt: skip
    ax.set_xlabel("similarity to the nearest training volume (1 = identical)")
    ax.set_ylabel("volumes")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def _planes(array: np.ndarray) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through the centre of a RAS array, oriented for display
    (radiological: the patient's right on the left; anterior and superior up)."""
    i, j, k = (s // 2 for s in array.shape)
    return [array[::-1, :, k].T, array[::-1, j, :].T, array[i, :, :].T]


def _pair_views(synthetic: Prepared, training: Prepared, mirrored: bool) -> tuple[np.ndarray, np.ndarray]:
    """Both volumes at 2 mm (the synthetic one mirrored back when it matched mirrored), cut to the box around
    what either shows (above 0.1), 3 voxels more."""
    left, right = view(synthetic), view(training)
    left = left[::-1] if mirrored else left
    shown = np.argwhere((left > 0.1) | (right > 0.1))
    if not len(shown):
        return left, right
    box = tuple(slice(a, b) for a, b in zip(np.maximum(shown.min(0) - 3, 0), shown.max(0) + 4))
    return left[box], right[box]


def _padded(array: np.ndarray, shape: np.ndarray) -> np.ndarray:
    """``array`` centred in zeros of ``shape``."""
    before = (np.asarray(shape) - array.shape) // 2
    return np.pad(array, [(b, s - n - b) for b, s, n in zip(before, shape, array.shape)])


def _short(name: str, limit: int = 58) -> str:
    """``name`` cut in the middle to at most ``limit`` characters."""
    return name if len(name) <= limit else f"{name[: limit // 2 - 1]}...{name[-(limit // 2 - 2) :]}"


def pairs_figure(pairs: list[tuple[Prepared, Prepared, dict]]) -> str:
    """Each pair (synthetic, training, its summary row) in a row: three planes of each, side by side."""
    plt = _pyplot()
    views = [_pair_views(synthetic, training, row["mirrored"]) for synthetic, training, row in pairs]
    shape = np.max([a.shape for pair in views for a in pair], axis=0)
    x, y, z = (int(v) for v in shape)
    widths = [x, x, y] * 2
    inch = 11.6 / (sum(widths) * 1.04)  # per voxel: 12 inches less margins and gaps
    image_h, title_h, top_h = max(y, z) * inch, 0.45, 0.35
    height = len(pairs) * (image_h + title_h) + top_h
    fig, axes = plt.subplots(len(pairs), 6, figsize=(12, height), squeeze=False, gridspec_kw={"width_ratios": widths})
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - (top_h + title_h) / height, wspace=0.04,
                        hspace=title_h / image_h)  # fmt: skip
    for axes_row, (left, right), (_, _, row) in zip(axes, views, pairs):
        for axis, image in zip(axes_row, _planes(_padded(left, shape)) + _planes(_padded(right, shape))):
            axis.imshow(image, cmap="gray", vmin=0, vmax=1, origin="lower", interpolation="nearest")
            axis.set_axis_off()
        for axis in (*axes_row[:2], *axes_row[3:5]):
            axis.text(0.03, 0.04, "R", color="yellow", fontsize=8, transform=axis.transAxes)
        mirrored = " (shown mirrored)" if row["mirrored"] else ""
        verdict = "FLAGGED" if row["memorized"] else "not flagged"
        axes_row[0].set_title(
            f"{_short(Path(row['file']).name)}{mirrored}\nsimilarity {row['similarity']:.4f}, {verdict}",
            loc="left", fontsize=9, color=COLOURS["threshold"] if row["memorized"] else "black",
        )  # fmt: skip
        axes_row[3].set_title(f"nearest training volume\n{_short(Path(row['nearest_training']).name)}", loc="left",
                              fontsize=9)  # fmt: skip
    fig.suptitle("synthetic  |  nearest training volume   (axial, coronal, sagittal; R: patient's right)",
                 fontsize=10, y=1 - 0.1 / height, va="top")  # fmt: skip
    return _png(fig)


def diversity_figure(summary: dict) -> str:
    """Mean pairwise MS-SSIM of each set, with the SD of the pairs."""
    plt = _pyplot()
    details = summary["diversity"]["details"]
    names = list(details)
    means = [details[n]["ms_ssim"] or 0.0 for n in names]
    sds = [details[n]["sd"] or 0.0 for n in names]
    fig, ax = plt.subplots(figsize=(5, 1.2 + 0.5 * len(names)))
    ax.barh(names, means, xerr=sds, color=[COLOURS.get(n, "grey") for n in names], alpha=0.8, capsize=3)
    for y, (m, sd) in enumerate(zip(means, sds)):
        ax.text(m + sd + 0.02, y, f"{m:.3f}", va="center")
    ax.invert_yaxis()
    ax.set_xlim(0, 1.15)
    ax.set_xlabel("mean pairwise MS-SSIM (higher: less diverse)")
    ax.spines[["top", "right"]].set_visible(False)
    return _png(fig)


def intensity_figure(volumes: dict[str, list[Prepared]]) -> str:
    """Histograms of the normalised intensities inside each set's foreground."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 2.6))
    bins = np.linspace(0.0, 1.4, 57)
    for name in ("real", "training", "synthetic"):
        if name in volumes and (name != "training" or "real" not in volumes):
            values = np.concatenate([p.image[p.smooth > 0.25] for p in volumes[name]])
            ax.hist(values, bins=bins, density=True, histtype="step", linewidth=2, color=COLOURS[name], label=name)
    ax.set_xlabel("normalised intensity in the foreground (audit grid)")
    ax.set_ylabel("density")
    ax.set_title("intensity distributions", fontsize=10)
    ax.set_yticks([])
    ax.legend(frameon=False)
    ax.spines[["top", "right", "left"]].set_visible(False)
    return _png(fig)


# --- the page ------------------------------------------------------------------------------------------------

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1180px; padding: 24px 32px; color: #222; line-height: 1.45; }
h1 { margin-bottom: 4px; } h2 { margin-top: 36px; border-bottom: 1px solid #ddd; padding-bottom: 4px; }
.sub { color: #666; margin-top: 0; }
.cards { display: flex; gap: 16px; flex-wrap: wrap; margin: 20px 0; }
.card { flex: 1 1 300px; border-radius: 8px; padding: 14px 18px; background: #f6f6f6; border-left: 6px solid #999; }
.card.good { border-color: #1b9e77; } .card.bad { border-color: #c0392b; background: #fdf0ee; }
.card.info { border-color: #7570b3; }
.card .big { font-size: 1.6em; font-weight: 600; } .card .what { color: #555; font-size: 0.92em; }
table { border-collapse: collapse; font-size: 0.9em; margin: 8px 0; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e3e3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.flag td { background: #fdf0ee; font-weight: 600; }
img { max-width: 100%; } .note { color: #666; font-size: 0.9em; }
code { background: #f0f0f0; padding: 1px 4px; border-radius: 3px; }
"""


def render_html(result) -> str:
    """The whole report page (self-contained)."""
    from napari_meddiff import __version__

    s = result.summary
    body = [
        "<h1>Synthetic data audit</h1>",
        f'<p class="sub">{_count(s["inputs"]["synthetic"]["volumes"], "synthetic volume")} from '
        f"<code>{_e(s['inputs']['synthetic']['folder'])}</code> against "
        f"{_count(s['inputs']['training']['volumes'], 'training volume')} from "
        f"<code>{_e(s['inputs']['training']['folder'])}</code>{_real_inputs(s)}.</p>",
        _cards(s),
        _memorization_section(result),
        _diversity_section(s),
        _fidelity_section(result),
        _table_section(s),
        f'<p class="note">napari-meddiff {__version__} · audit grid {s["grid"]["spacing_mm"]:g} mm · '
        f"{s['seconds']:.0f} s · the numbers are in <code>audit.json</code>.</p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>Synthetic data audit</title>\n'
        f"<style>{STYLE}</style>\n</head>\n<body>\n" + "\n".join(body) + "\n</body>\n</html>\n"
    )


def _e(text) -> str:
    return html.escape(str(text))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _real_inputs(s: dict) -> str:
    real = s["inputs"]["real"]
    if not real["volumes"]:
        return ""
    return f" and {_count(real['volumes'], 'held-out real scan')} from <code>{_e(real['folder'])}</code>"


def _card(kind: str, title: str, big: str, what: str) -> str:
    return (
        f'<div class="card {kind}"><div>{title}</div><div class="big">{big}</div><div class="what">{what}</div></div>'
    )


def _cards(s: dict) -> str:
    memo, thr = s["memorization"], s["thresholds"]["memorization"]
    flagged = memo["flagged"]
    cards = [
        _card(
            "bad" if flagged else "good",
            "Memorization",
            f"{flagged} of {memo['volumes']} flagged",
            f"synthetic volumes closer to a training volume than {thr['similarity']:.4f} (real subjects: at most "
            f"{thr['real_nn_max']:.4f})",
        )
    ]
    d = s["diversity"]
    other, value = ("real", d["real_ms_ssim"]) if d["real_ms_ssim"] is not None else ("training", d["training_ms_ssim"])
    cards.append(
        _card(
            "info",
            "Diversity (MS-SSIM)",
            f"{_num(d['synthetic_ms_ssim'])} vs {_num(value)}",
            f"mean pairwise MS-SSIM, synthetic vs {other}; higher is less diverse",
        )  # fmt: skip
    )
    t = s["two_sample"]
    if t.get("computed"):
        low, high = t["ci95"]
        big = f"{t['accuracy']:.2f} [{low:.2f}, {high:.2f}]"
        what = "classifier accuracy, real vs synthetic (95 % CI); 0.5: cannot be told apart"
    else:
        big, what = "not measured", _e(t["reason"])
    cards.append(_card("info", "Fidelity (two-sample test)", big, what))
    return '<div class="cards">' + "".join(cards) + "</div>"


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _memorization_section(result) -> str:
    s = result.summary
    thr = s["thresholds"]["memorization"]
    who = "held-out real subjects" if thr["source"] == "real" else "training subjects (each against the others)"
    parts = [
        "<h2>Memorization</h2>",
        f"<p>Each synthetic volume is compared with every training volume: the correlation of their smoothed "
        f"images where both show anatomy, after aligning them, allowing a left-right mirror (robust to a rescale, "
        f"noise, another grid or voxel size, a shift or a crop). A volume is flagged when its similarity is above "
        f"<b>{thr['similarity']:.4f}</b>: the closest any of {thr['subjects']} {who} came to the training set "
        f"({thr['real_nn_max']:.4f}), plus {thr['margin_sd']:g} times the spread of real-to-training "
        f"similarities (the standard deviation of their Fisher z, of the nearest neighbours or of all pairs, "
        f"whichever is larger).</p>",
        similarity_figure(s),
    ]
    pairs, heading = pairs_to_show(result)
    if pairs:
        parts += [f"<h3>{heading}</h3>", pairs_figure(pairs)]
    return "\n".join(parts)


def pairs_to_show(result) -> tuple[list[tuple[Prepared, Prepared, dict]], str]:
    """The pairs worth a look (synthetic, nearest training, summary row): the flagged ones, most similar first
    (at most `MAX_PAIRS_SHOWN`), else the `CLOSEST_SHOWN` closest; and a heading that says which."""
    s = result.summary
    by_path = {str(p.path): p for name in ("synthetic", "training") for p in result.volumes.get(name, [])}
    rows = sorted(s["synthetic"], key=lambda r: -r["similarity"])
    flagged = [r for r in rows if r["memorized"]]
    if flagged:
        shown = flagged[:MAX_PAIRS_SHOWN]
        more = f" (the {len(shown)} most similar of {len(flagged)})" if len(flagged) > len(shown) else ""
        heading = f"Flagged pairs{more}"
    else:
        shown = rows[:CLOSEST_SHOWN]
        heading = "No volume is flagged; the closest pairs, for comparison"
    return [(by_path[r["file"]], by_path[r["nearest_training"]], r) for r in shown], heading


def _diversity_section(s: dict) -> str:
    d = s["diversity"]["details"]
    rows = "".join(
        f"<tr><td>{_e(n)}</td><td class='num'>{_num(v['ms_ssim'])}</td><td class='num'>{_num(v['sd'])}</td>"
        f"<td class='num'>{v['volumes']}</td><td class='num'>{v['pairs']}</td></tr>"
        for n, v in d.items()
    )
    return (
        "<h2>Diversity</h2><p>Mean MS-SSIM (MONAI, 3D) between pairs of volumes of a set on the audit grid. A "
        "generator that makes the same brain again and again scores higher than real subjects.</p>"
        f"<table><tr><th>set</th><th>MS-SSIM</th><th>SD</th><th>volumes</th><th>pairs</th></tr>{rows}</table>"
        + diversity_figure(s)
    )


def _fidelity_section(result) -> str:
    s = result.summary
    t, m = s["two_sample"], s["mmd"]
    parts = ["<h2>Fidelity</h2>"]
    if t.get("computed"):
        parts.append(
            f"<p><b>Classifier two-sample test</b>: a small CNN trained on axial slices of half the volumes tells "
            f"real from synthetic in the other half (both ways round) with accuracy <b>{t['accuracy']:.3f}</b> "
            f"(95 % CI {t['ci95'][0]:.3f}-{t['ci95'][1]:.3f}, {t['decisions']} decisions, p = {t['p_value']:.3g} "
            f"against chance). 0.5 means the sets cannot be told apart, 1.0 that they always can.</p>"
        )
    else:
        parts.append(f"<p><b>Classifier two-sample test</b>: {_e(t['reason'])}.</p>")
    if m.get("computed"):
        parts.append(
            f"<p><b>MMD</b> of image features ({_e(m['features'])}): MMD² = {m['mmd2']:.4g} (unbiased; about 0 "
            f"when the sets are alike), permutation p = {m['p_value']:.3g} ({m['permutations']} permutations; "
            "a small p: the distributions differ).</p>"
        )
    parts.append(f"<p><b>FID</b>: {_e(s['fid']['reason'])}.</p>")
    parts.append(intensity_figure(result.volumes))
    return "\n".join(parts)


def _table_section(s: dict) -> str:
    rows = sorted(s["synthetic"], key=lambda r: -r["similarity"])
    body = "".join(
        f"<tr class='{'flag' if r['memorized'] else ''}'><td>{_e(Path(r['file']).name)}</td>"
        f"<td>{_e(Path(r['nearest_training']).name)}</td><td class='num'>{r['similarity']:.4f}</td>"
        f"<td>{'yes' if r['mirrored'] else ''}</td><td>{'MEMORIZED' if r['memorized'] else ''}</td></tr>"
        for r in rows
    )
    opened = " open" if len(rows) <= 30 else ""
    return (
        f"<h2>All synthetic volumes</h2><details{opened}><summary>{len(rows)} volumes, most similar first"
        "</summary><table><tr><th>synthetic</th><th>nearest training</th><th>similarity</th><th>mirrored</th>"
        f"<th>flag</th></tr>{body}</table></details>"
    )


# --- the terminal's summary -----------------------------------------------------------------------------------


def summary_lines(s: dict, list_flagged: bool = True) -> str:
    """The key numbers of an audit summary, a few lines for the terminal (``list_flagged``: and a line per
    flagged volume)."""
    thr = s["thresholds"]["memorization"]
    memo = s["memorization"]
    lines = [
        f"memorization: {memo['flagged']} of {_count(memo['volumes'], 'synthetic volume')} flagged "
        f"(threshold {thr['similarity']:.4f} from {thr['subjects']} {thr['source']} subjects, "
        f"closest real {thr['real_nn_max']:.4f})"
    ]
    flagged = [r for r in s["synthetic"] if r["memorized"] and list_flagged]
    lines += [f"  {r['file']} ~ {r['nearest_training']} ({r['similarity']:.4f})" for r in flagged]
    d = s["diversity"]
    other = "real" if d["real_ms_ssim"] is not None else "training"
    lines.append(f"diversity: MS-SSIM synthetic {_num(d['synthetic_ms_ssim'])}, {other} {_num(d[f'{other}_ms_ssim'])}")
    t = s["two_sample"]
    if t.get("computed"):
        low, high = t["ci95"]
        lines.append(f"fidelity: two-sample accuracy {t['accuracy']:.3f} (95% CI {low:.3f}-{high:.3f}), "
                     f"MMD p = {s['mmd']['p_value']:.3g}")  # fmt: skip
    return "\n".join(lines)
