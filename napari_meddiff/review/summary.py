"""Analysis of a finished (or running) study: accuracy vs chance, realism by source, reader agreement.

It needs the study key (kept outside the study folder), and writes its files next to the key, never into the
study folder the readers open. Lines of a results file that are damaged or name a case not in the study are
not counted, and are reported (how many, which lines).

"Positive" is *synthetic*: sensitivity = synthetic cases called synthetic, specificity = real cases called
real. Accuracy has a Wilson 95% interval and a two-sided exact binomial test against 50%. Pooled numbers
treat every reading as independent (readers see the same cases), so read them as descriptive.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
import os
import statistics
from pathlib import Path
from typing import Any

from napari_meddiff.errors import MeddiffError
from napari_meddiff.review.results import (
    ARTEFACTS,
    CALLS,
    RESULTS_PREFIX,
    RESULTS_SUFFIX,
    Answer,
    AnswerLines,
    latest,
    scan_answers,
)
from napari_meddiff.review.study import Study, read_key

Z95 = 1.959963984540054
SUMMARY_SUFFIXES = ("-summary.json", "-summary.csv", "-realism_by_source.png")
SHOWN_LINES = 10


def summary_paths(key: str | os.PathLike) -> list[Path]:
    """Where the summary of the study with ``key`` goes: next to the key, named after it."""
    key = Path(key)
    return [key.with_name(key.name.removesuffix(".json") + suffix) for suffix in SUMMARY_SUFFIXES]


def wilson_ci(k: int, n: int, z: float = Z95) -> tuple[float, float] | None:
    """Wilson score interval for k successes out of n (None when n == 0)."""
    if n == 0:
        return None
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = max(0.0, centre - half), min(1.0, centre + half)
    return (0.0 if k == 0 else lo), (1.0 if k == n else hi)


def binom_p(k: int, n: int) -> float | None:
    """Two-sided exact binomial test of k/n against 0.5."""
    if n == 0:
        return None
    from scipy.stats import binomtest

    return float(binomtest(k, n, 0.5, alternative="two-sided").pvalue)


def cohen_kappa(a: list[str], b: list[str]) -> float | None:
    """Cohen's kappa of two readers' real/synthetic calls on the same cases (None when undefined)."""
    n = len(a)
    if n == 0 or n != len(b):
        return None
    po = sum(x == y for x, y in zip(a, b)) / n
    pe = sum((a.count(c) / n) * (b.count(c) / n) for c in CALLS)
    return None if math.isclose(pe, 1.0) else (po - pe) / (1 - pe)


def _ratio(k: int, n: int) -> float | None:
    return k / n if n else None


def _describe(values: list[int]) -> dict[str, Any]:
    return {
        "mean": statistics.fmean(values) if values else None,
        "sd": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
    }


def group_metrics(pairs: list[tuple[Answer, str]]) -> dict[str, Any]:
    """Metrics for (answer, true source) pairs."""
    n = len(pairs)
    correct = sum(a.real_or_synthetic == truth for a, truth in pairs)
    by = {s: [a for a, truth in pairs if truth == s] for s in CALLS}
    hits = {s: sum(a.real_or_synthetic == s for a in by[s]) for s in CALLS}
    ci = wilson_ci(correct, n)
    return {
        "n": n,
        "correct": correct,
        "accuracy": _ratio(correct, n),
        "ci95": list(ci) if ci else None,
        "p_value": binom_p(correct, n),
        "sensitivity": _ratio(hits["synthetic"], len(by["synthetic"])),
        "specificity": _ratio(hits["real"], len(by["real"])),
        "calls": {s: {f"called_{c}": sum(a.real_or_synthetic == c for a in by[s]) for c in CALLS} for s in CALLS},
        "realism": {s: _describe([a.realism for a in by[s]]) for s in CALLS},
        "realism_counts": {s: [sum(a.realism == r for a in by[s]) for r in range(1, 6)] for s in CALLS},
        "artefacts": {s: {art: sum(art in a.artefacts for a in by[s]) for art in ARTEFACTS} for s in CALLS},
    }


def load_readers(study: str | os.PathLike) -> dict[str, tuple[str, AnswerLines]]:
    """Reader id -> (results file name, its answers with line numbers), for every results file in the study."""
    out = {}
    for path in sorted(Path(study).glob(f"{RESULTS_PREFIX}*{RESULTS_SUFFIX}")):
        out[path.name[len(RESULTS_PREFIX) : -len(RESULTS_SUFFIX)]] = (path.name, scan_answers(path))
    return out


def summarize(study: str | os.PathLike, key: str | os.PathLike, *, write: bool = True) -> dict[str, Any]:
    """Compute the summary with the study ``key``; with ``write``, save the files of `summary_paths` next to it."""
    loaded = Study.load(study)
    folder, ids = loaded.folder, loaded.ids
    truth = {cid: v["source"] for cid, v in read_key(key, loaded).items()}
    readers: dict[str, dict[str, Answer]] = {}
    per_reader: dict[str, Any] = {}
    pooled: list[tuple[Answer, str]] = []
    for rid, (file_name, lines) in load_readers(folder).items():
        answers = latest(a for _, a in lines.answers if a.case_id in truth)
        readers[rid] = answers
        pairs = [(answers[cid], truth[cid]) for cid in ids if cid in answers]
        pooled += pairs
        names = sorted({a.reader for a in answers.values()})
        per_reader[rid] = {
            "name": names[-1] if names else rid,
            "file": file_name,
            "answered": len(pairs),
            "of": len(ids),
            "damaged_lines": lines.damaged_lines,
            "unknown_case_lines": [n for n, a in lines.answers if a.case_id not in truth],
            **group_metrics(pairs),
        }
    if not any(readers.values()):
        skipped = sum(len(m["damaged_lines"]) + len(m["unknown_case_lines"]) for m in per_reader.values())
        note = f" ({skipped} damaged or unknown-case line(s) skipped)" if skipped else ""
        raise MeddiffError(f"no answers yet in {folder}{note}")
    agreement = []
    for r1, r2 in itertools.combinations(sorted(readers), 2):
        common = [c for c in ids if c in readers[r1] and c in readers[r2]]
        a = [readers[r1][c].real_or_synthetic for c in common]
        b = [readers[r2][c].real_or_synthetic for c in common]
        agreement.append(
            {
                "readers": [r1, r2],
                "n": len(common),
                "kappa": cohen_kappa(a, b),
                "agreement": _ratio(sum(x == y for x, y in zip(a, b)), len(common)),
            }
        )
    summary = {
        "study": str(folder.resolve()),
        "n_cases": len(ids),
        "n_real": sum(v == "real" for v in truth.values()),
        "n_synthetic": sum(v == "synthetic" for v in truth.values()),
        "positive_class": "synthetic",
        "readers": per_reader,
        "pooled": {"readers": len(per_reader), **group_metrics(pooled)},
        "agreement": agreement,
        "notes": "accuracy: Wilson 95% CI, two-sided exact binomial test vs 0.5 (scipy.stats.binomtest); "
        "pooled treats readings as independent; kappa: Cohen's, pairwise on cases both rated; "
        "damaged lines and answers for cases not in the study are not counted (line numbers listed).",
    }
    if write:
        write_summary(key, summary)
    return summary


def _rows(summary: dict[str, Any]) -> list[tuple[str, str, Any]]:
    rows: list[tuple[str, str, Any]] = [("study", k, summary[k]) for k in ("n_cases", "n_real", "n_synthetic")]
    scopes = [(f"reader:{rid}", m) for rid, m in summary["readers"].items()] + [("pooled", summary["pooled"])]
    for scope, m in scopes:
        for k in (
            "name",
            "answered",
            "of",
            "readers",
            "n",
            "correct",
            "accuracy",
            "p_value",
            "sensitivity",
            "specificity",
        ):
            if k in m:
                rows.append((scope, k, m[k]))
        for k in ("damaged_lines", "unknown_case_lines"):
            if k in m:
                rows.append((scope, k, " ".join(map(str, m[k]))))
        ci = m["ci95"] or [None, None]
        rows += [(scope, "ci95_low", ci[0]), (scope, "ci95_high", ci[1])]
        for s in CALLS:
            rows += [(scope, f"realism_{k}[{s}]", v) for k, v in m["realism"][s].items()]
            rows += [(scope, f"realism_count_{r}[{s}]", c) for r, c in enumerate(m["realism_counts"][s], 1)]
            rows += [(scope, f"called_{c}[{s}]", m["calls"][s][f"called_{c}"]) for c in CALLS]
            rows += [(scope, f"artefact:{a}[{s}]", m["artefacts"][s][a]) for a in ARTEFACTS]
    for ag in summary["agreement"]:
        scope = "pair:" + "|".join(ag["readers"])
        rows += [(scope, "n", ag["n"]), (scope, "cohen_kappa", ag["kappa"]), (scope, "agreement", ag["agreement"])]
    return rows


def _cell(v: Any) -> Any:
    return "" if v is None else f"{v:.6g}" if isinstance(v, float) else v


def write_summary(key: str | os.PathLike, summary: dict[str, Any]) -> list[Path]:
    """Write the summary JSON, CSV (long format: scope, metric, value) and realism plot next to ``key``.

    Each file is replaced atomically: a rerun with more answers refreshes them, an interrupted one leaves the
    previous summary whole (they are derived from the answer files, which are never touched)."""
    import io

    from napari_meddiff.io.files import write_atomic, write_text_atomic

    paths = summary_paths(key)
    write_text_atomic(paths[0], json.dumps(summary, indent=1) + "\n")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\r\n")
    w.writerow(["scope", "metric", "value"])
    w.writerows((s, k, _cell(v)) for s, k, v in _rows(summary))
    write_text_atomic(paths[1], buf.getvalue())
    write_atomic(paths[2], lambda tmp: plot_realism(summary, tmp), suffix=".png")
    return paths


def plot_realism(summary: dict[str, Any], path: Path) -> None:
    """Realism scores by source: pooled distribution (left), mean +- SD per reader (right). Agg only."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    colours = {"real": "#4c72b0", "synthetic": "#dd8452"}
    fig = Figure(figsize=(9, 3.8), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, width_ratios=[1, 1.2])
    pooled = summary["pooled"]
    for k, s in enumerate(CALLS):
        left.bar(
            [x + (k - 0.5) * 0.38 for x in range(1, 6)],
            pooled["realism_counts"][s],
            width=0.38,
            color=colours[s],
            label=f"{s} (n={pooled['realism'][s]['n']})",
        )
    left.set(
        xlabel="realism (1 = clearly artificial, 5 = fully realistic)",
        ylabel="readings",
        title="All readers",
        xticks=range(1, 6),
    )
    left.legend(frameon=False, loc="upper left")
    names = list(summary["readers"]) + ["pooled"]
    groups = [*summary["readers"].values(), pooled]
    for k, s in enumerate(CALLS):
        xs = [i + (k - 0.5) * 0.25 for i in range(len(names))]
        means = [g["realism"][s]["mean"] for g in groups]
        sds = [g["realism"][s]["sd"] or 0.0 for g in groups]
        ok = [i for i, m in enumerate(means) if m is not None]
        right.errorbar(
            [xs[i] for i in ok],
            [means[i] for i in ok],
            yerr=[sds[i] for i in ok],
            fmt="o",
            color=colours[s],
            capsize=4,
            label=s,
        )
    right.set(xticks=range(len(names)), ylim=(0.5, 5.5), ylabel="mean realism (± SD)", title="By reader")
    right.set_xticks(range(len(names)), names, rotation=20 if len(names) > 4 else 0)
    right.legend(frameon=False)
    fig.savefig(path)


def format_summary(summary: dict[str, Any]) -> str:
    """The key numbers as a few lines of text."""

    def pct(x: float | None) -> str:
        return "n/a" if x is None else f"{100 * x:.1f}%"

    def line(label: str, m: dict[str, Any]) -> str:
        if not m["n"]:
            return f"{label}: no answers"
        ci = m["ci95"]
        r = m["realism"]
        real = "n/a" if r["real"]["mean"] is None else f"{r['real']['mean']:.2f}"
        syn = "n/a" if r["synthetic"]["mean"] is None else f"{r['synthetic']['mean']:.2f}"
        return (
            f"{label}: accuracy {pct(m['accuracy'])} ({m['correct']}/{m['n']}), 95% CI {pct(ci[0])}-{pct(ci[1])}, "
            f"p={m['p_value']:.3g} vs chance; sens {pct(m['sensitivity'])}, spec {pct(m['specificity'])}; "
            f"realism real {real}, synthetic {syn}"
        )

    head = (
        f"{summary['n_cases']} cases ({summary['n_real']} real, {summary['n_synthetic']} synthetic), "
        f"{len(summary['readers'])} reader(s)"
    )
    out = [head]
    out += [line(f"{m['name']} [{m['answered']}/{m['of']}]", m) for m in summary["readers"].values()]
    out += [note for m in summary["readers"].values() if (note := skipped_lines_note(m))]
    if len(summary["readers"]) > 1:
        out.append(line("pooled", summary["pooled"]))
    for ag in summary["agreement"]:
        k = "n/a" if ag["kappa"] is None else f"{ag['kappa']:.2f}"
        out.append(f"kappa {ag['readers'][0]} vs {ag['readers'][1]}: {k} (n={ag['n']})")
    return "\n".join(out)


def _lines(numbers: list[int]) -> str:
    shown = ", ".join(map(str, numbers[:SHOWN_LINES]))
    more = f" and {len(numbers) - SHOWN_LINES} more" if len(numbers) > SHOWN_LINES else ""
    return f"line{'s' if len(numbers) > 1 else ''} {shown}{more}"


def skipped_lines_note(reader: dict[str, Any]) -> str:
    """What was not counted in one reader's results file, with line numbers ('' when nothing was skipped)."""
    parts = []
    if reader["damaged_lines"]:
        parts.append(f"{len(reader['damaged_lines'])} damaged line(s) ({_lines(reader['damaged_lines'])})")
    if reader["unknown_case_lines"]:
        lines = reader["unknown_case_lines"]
        parts.append(f"{len(lines)} answer(s) for cases not in this study ({_lines(lines)})")
    return f"WARNING {reader['file']}: skipped {' and '.join(parts)}" if parts else ""
