"""The self-contained HTML report of a run: config, training curves, sample grids, every metric and plot.

Images are embedded as base64 data URIs, so the one .html file can be mailed or attached to an issue.
"""
from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Any

from ..errors import HybvitError
from .plots import line_plot


def read_scalars(run_dir: Path) -> dict[str, tuple[list[int], list[float]]]:
    """All logged scalars of the run: {tag: (steps, values)}, from its log.jsonl (one JSON object per logged step),
    or from the TensorBoard event files of runs written before log.jsonl existed (merged over resumed runs)."""
    log = Path(run_dir) / "log.jsonl"
    if log.exists():
        merged: dict[str, dict[int, float]] = {}
        for n, line in enumerate(log.read_text().splitlines()):
            try:
                row = json.loads(line)
                step = int(row.pop("step"))
            except (ValueError, KeyError, TypeError, AttributeError):
                raise HybvitError(f"'{log}' line {n + 1} is not a JSON object with a step; the log is damaged") from None
            for tag, v in row.items():
                if isinstance(v, (int, float)):
                    merged.setdefault(tag, {})[step] = float(v)
        return {tag: (sorted(d), [d[s] for s in sorted(d)]) for tag, d in merged.items()}
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    tb = Path(run_dir) / "tb"
    files = sorted(tb.glob("events.out.tfevents.*")) if tb.is_dir() else []
    if not files:
        raise HybvitError(f"no log.jsonl and no TensorBoard logs in '{run_dir}'")
    merged = {}
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            for e in acc.Scalars(tag):
                merged.setdefault(tag, {})[e.step] = e.value
    return {tag: (sorted(d), [d[s] for s in sorted(d)]) for tag, d in merged.items()}


def training_curves(run_dir: Path, out_dir: Path) -> dict[str, Any]:
    """PNG plots of the logged losses, train accuracy, learning rate and images/s; returns their file names and
    the last logged values."""
    scalars = read_scalars(run_dir)
    groups = {"losses": [t for t in ("loss/total", "loss/ce", "loss/diffusion") if t in scalars],
              "train accuracy": [t for t in ("train/accuracy",) if t in scalars],
              "learning rate": [t for t in ("lr",) if t in scalars],
              "images per second": [t for t in ("speed/images_per_s",) if t in scalars],
              "test accuracy": [t for t in ("eval/test_accuracy", "eval/test_accuracy_raw") if t in scalars],
              "sample quality": [t for t in ("eval/small_fd", "eval/fid") if t in scalars]}
    plots = {}
    for title, tags in groups.items():
        if not tags:
            continue
        name = "curve-" + title.replace(" ", "-") + ".png"
        # every tag of a group shares its steps (logged together)
        line_plot(out_dir / name, scalars[tags[0]][0], {t: scalars[t][1] for t in tags}, xlabel="step",
                  ylabel=title, title=title)
        plots[title] = name
    last = {t: round(v[-1], 5) for t, (_, v) in scalars.items() if v}
    return {"plots": plots, "last_logged": last}


def _img(path: Path) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode()
    return f'<img src="data:image/png;base64,{data}" alt="{html.escape(Path(path).name)}">'


def _plots_in(value: Any) -> list[str]:
    """File names of PNGs a metric's result mentions (under a 'plots' key, at any depth)."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            if k == "plots":
                if isinstance(v, dict):
                    found += [p for p in v.values() if isinstance(p, str) and p.endswith(".png")]
                elif isinstance(v, list):
                    found += [p for p in v if isinstance(p, str) and p.endswith(".png")]
                elif isinstance(v, str) and v.endswith(".png"):
                    found.append(v)
            else:
                found += _plots_in(v)
    elif isinstance(value, list):
        for v in value:
            found += _plots_in(v)
    return found


def _headline(name: str, r: dict[str, Any]) -> str:
    """A one-line summary of a metric's result for the table at the top."""
    try:
        if name == "accuracy":
            s = f"test top-1 {r['test_accuracy']:.4f} (EMA)"
            return s + (f", {r['test_accuracy_raw']:.4f} (raw)" if "test_accuracy_raw" in r else "")
        if name in ("fid", "small-fd", "pixel-fd"):
            return f"{r['value']:.3f} ({r['num_samples']} samples vs {r['reference']})"
        if name == "is":
            return f"{r['value']:.3f} +- {r['std']:.3f} ({r['num_samples']} samples)"
        if name == "kid":
            return f"{r['value']:.5f} +- {r['std']:.5f} ({r['num_samples']} samples vs {r['reference']})"
        if name == "prc":
            return (f"precision {r['precision']:.4f}, recall {r['recall']:.4f} ({r['num_samples']} samples vs "
                    f"{r['reference']})")
        if name == "bpd":
            return f"{r['bits_per_dim']:.4f} bits/dim ({r['estimator']}, {r['num_images']} test images)"
        if name == "ece":
            return ", ".join(f"ECE {v:.4f} ({k} bins)" for k, v in r["ece"].items()) + f", accuracy {r['accuracy']:.4f}"
        if name == "ood":
            return "; ".join(f"{s}: " + ", ".join(f"{k} {v:.3f}" for k, v in d["auroc"].items())
                             for s, d in r["sets"].items()) + " (AUROC)"
        if name == "pgd":
            return "; ".join(f"{n}: " + ", ".join(f"{e:g}/255 {a:.3f}" for e, a in zip(d["eps_255"], d["accuracy"],
                                                                                    strict=True))
                             for n, d in r["norms"].items()) + (f" ({r['num_images']} images, PGD-{r['steps']}, "
                                                               f"{r['protocol'].split(':')[0]} protocol)")
        if name == "sample-analysis":
            return (f"{r['num_samples']} samples; mean max p(y|x) {r['mean_max_softmax']['samples']:.3f} "
                    f"(test images {r['mean_max_softmax']['test']:.3f}); predicted class counts "
                    f"{r['predicted_class_counts']}")
        if name == "speed":
            tr = r["training"]
            s = (f"training {tr.get('images_per_second')} images/s, {tr.get('minutes_per_epoch')} min/epoch"
                 if "images_per_second" in tr else tr.get("note", ""))
            return s + "".join(f"; {x['sampler']}-{x['network_evaluations']} {x['images_per_second']} img/s"
                               for x in r.get("sampling", []))
    except (KeyError, TypeError):
        pass
    return ""


def samples_line(info: dict[str, Any] | None) -> str:
    """What the report's sample set is: a file, or what drew it."""
    if not info:
        return ""
    how = ", ".join(f"{k} {v}" for k, v in info.items() if k not in ("source", "num_samples"))
    src = info["source"] if info["source"].startswith("drawn") else f"from {info['source']}"
    return f"{info['num_samples']} samples {src}" + (f" ({how})" if how else "")


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = [f"{name}: {_headline(name, r) or 'see the report'}" for name, r in report["metrics"].items()]
    if report.get("samples"):
        lines.append(f"sample metrics scored {samples_line(report['samples'])}")
    return lines


def write_html(path: Path, report: dict[str, Any], run_dir: Path | None, cfg, plots_dir: Path) -> None:
    """The report as one self-contained page; without a run (evaluate --samples) it has no training sections."""
    esc = html.escape
    title = str(run_dir) if run_dir is not None else (report.get("samples") or {}).get("source", "samples")
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>hybvit report: {esc(title)}</title>",
             "<style>body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "img{max-width:100%;margin:4px;border:1px solid #ddd;image-rendering:pixelated}"
             "pre{background:#f6f6f6;padding:8px;overflow:auto;font-size:12px}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:4px 8px;text-align:left}"
             ".grid img{max-width:48%}</style></head><body>"]
    if cfg is not None:
        parts.append(f"<h1>hybvit run report</h1><p>run <code>{esc(str(run_dir))}</code>, preset "
                     f"<code>{esc(str(cfg.preset))}</code>, mode <b>{esc(cfg.train.mode)}</b>, data "
                     f"<code>{esc(str(report['data']))}</code>, device {esc(report['device'])}, seed {report['seed']}</p>")
    else:
        parts.append(f"<h1>hybvit sample report</h1><p>samples <code>{esc(title)}</code> against data "
                     f"<code>{esc(str(report['data']))}</code>, device {esc(report['device'])}</p>")
    if report.get("samples"):
        parts.append(f"<p>Every sample metric scores one set: {esc(samples_line(report['samples']))}.</p>")
    rows = "".join(f"<tr><td>{esc(n)}</td><td>{esc(_headline(n, r))}</td><td>{report['seconds'].get(n, '')} s</td>"
                   f"</tr>" for n, r in report["metrics"].items())
    parts.append(f"<h2>Summary</h2><table><tr><th>metric</th><th>result</th><th>time</th></tr>{rows}</table>")
    samples = Path(run_dir) / "samples.png" if run_dir is not None else None
    curves = report.get("training_curves", {})
    if (samples is not None and samples.exists()) or curves.get("plots"):
        parts.append("<h2>Training</h2><div class='grid'>")
        if samples is not None and samples.exists():
            parts.append(_img(samples))
        for name in curves.get("plots", {}).values():
            parts.append(_img(plots_dir / name))
        parts.append("</div>")
    for name, result in report["metrics"].items():
        parts.append(f"<h2>{esc(name)}</h2><div class='grid'>")
        for p in _plots_in(result):
            if (plots_dir / p).exists():
                parts.append(_img(plots_dir / p))
        parts.append(f"</div><pre>{esc(json.dumps(result, indent=2))}</pre>")
    if report.get("provenance"):
        rows = "".join(f"<tr><td>{esc(k)}</td><td><code>{esc(str(v))}</code></td></tr>"
                       for k, v in report["provenance"].items())
        parts.append(f"<h2>Provenance</h2><table>{rows}</table>")
    if cfg is not None:
        parts.append(f"<h2>Configuration</h2><pre>{esc(json.dumps(cfg.to_dict(), indent=2))}</pre>")
        metrics_json = Path(run_dir) / "metrics.json"
        if metrics_json.exists():
            parts.append(f"<h2>End-of-training metrics</h2><pre>{esc(metrics_json.read_text())}</pre>")
    parts.append("</body></html>")
    tmp = path.with_suffix(".html.tmp")
    tmp.write_text("".join(parts))
    os.replace(tmp, path)
