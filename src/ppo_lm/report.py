"""``ppo-lm report RUN_DIR``: one self-contained HTML page about a training run.

The page holds everything inline (the curves as PNG data URIs, no script, no stylesheet or font from the
network), so that it opens from a file anywhere: the run's status and the run doctor's verdicts, the training
curves (with the doctor's thresholds drawn on the metrics it watches), the evaluations of ``train.eval_every``,
sample completions across iterations, the manifest and the config.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path

import yaml

from . import doctor
from .errors import UserError

#: the curves, in the order of the page: what PPO optimises first, then what keeps it honest
CURVES = ("reward_mean", "kl", "entropy", "clipfrac", "approx_kl", "explained_variance", "value_loss",
          "response_length", "eos_fraction", "sampling_kl", "grad_norm", "kl_coef")

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       color: #1d1d1f; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; } h2 { margin-top: 1.6em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: 0.6em 0; font-size: 0.92em; }
th, td { border: 1px solid #ddd; padding: 4px 8px; text-align: left; vertical-align: top; }
th { background: #f4f4f6; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.ok { color: #16794c; font-weight: 600; } .fired { color: #b42318; font-weight: 600; }
.status { font-size: 1.05em; } .cause { background: #fff4e5; border-left: 4px solid #f79009; padding: 0.5em 1em;
         margin: 0.6em 0; } .healthy { background: #ecfdf3; border-left: 4px solid #16794c; padding: 0.5em 1em; }
pre { background: #f6f8fa; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; } td.text { max-width: 480px; white-space: pre-wrap; word-break: break-word; }
"""


def thresholds(d) -> dict[str, float]:
    """The doctor's thresholds on the metrics it compares with a fixed value (drawn as dashed lines)."""
    return {"clipfrac": d.clipfrac, "approx_kl": d.approx_kl, "sampling_kl": d.sampling_kl,
            "explained_variance": d.explained_variance, "kl": d.kl}


def curves_png(rows: list[dict], keys: list[str], lines: dict[str, float], columns: int = 4) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_rows = -(-len(keys) // columns)
    fig, axes = plt.subplots(n_rows, columns, figsize=(4.0 * columns, 2.9 * n_rows), squeeze=False)
    for ax in axes.flat[len(keys):]:
        ax.axis("off")
    for ax, key in zip(axes.flat, keys):
        pts = [(r["iteration"], v) for r in rows for v in [doctor.number(r.get(key))] if v is not None]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", linewidth=1.4, color="#1f6feb")
        high = max((p[1] for p in pts), default=0.0)
        if key in lines and pts and not (key == "kl" and lines[key] > 2 * high):  # a far KL limit would flatten it
            ax.axhline(lines[key], color="#b42318", linestyle="--", linewidth=1, label="doctor's threshold")
            ax.legend(fontsize=7, loc="best")
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("iteration", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90)
    plt.close(fig)
    return buf.getvalue()


def _img(png: bytes, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{base64.b64encode(png).decode()}">'


def _fmt(value) -> str:
    number = doctor.number(value)
    if number is None:
        return html.escape(str(value)) if value is not None else "-"
    return f"{number:.4g}" if isinstance(value, float) else html.escape(str(value))


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(rows_) + "</tr>" for rows_ in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _doctor_section(diagnosis) -> str:
    out = []
    if diagnosis.causes:
        for k, v in enumerate(diagnosis.causes, 1):
            out.append(f'<div class="cause"><b>Most likely cause {k}: {html.escape(v.rule.name)}</b> — '
                       f"{html.escape(v.rule.cause)}.<br>Try: {html.escape(v.rule.advice)} "
                       f"(docs/tuning.md#{html.escape(v.rule.name)})</div>")
    else:
        out.append('<div class="healthy">No rule fired: nothing in the metrics points to a problem.</div>')
    rows = [[f"<td>{html.escape(v.rule.name)}</td>", f"<td>{html.escape(v.rule.title)}</td>",
             '<td class="ok">ok</td>' if v.ok else f'<td class="fired">fired at {doctor.spans(v.iterations)}</td>',
             f"<td>{html.escape(v.evidence)}</td>"] for v in diagnosis.verdicts]
    out.append(_table(["rule", "what it watches", "verdict", "evidence (first time it fired)"], rows))
    return "\n".join(out)


def _eval_section(rows: list[dict], best: dict | None) -> str:
    evaluated = [r for r in rows if any(k.startswith("eval/") for k in r)]
    if not evaluated:
        return "<p>No evaluation during training (set <code>train.eval_every</code> and <code>eval.data</code>).</p>"
    keys = list(dict.fromkeys(k for r in evaluated for k in r if k.startswith("eval/")))
    table = _table(["iteration", *[k.removeprefix("eval/") for k in keys]],
                   [[f'<td class="num">{r["iteration"]}</td>', *[f'<td class="num">{_fmt(r.get(k))}</td>'
                                                                  for k in keys]] for r in evaluated])
    chart = _img(curves_png(evaluated, keys, {}), "evaluation curves")
    kept = (f"<p>Best by {html.escape(best['metric'])}: {best['value']:.4g} at iteration {best['iteration']}, kept in "
            "<code>best/</code>.</p>") if best else ""
    return table + kept + chart


def _samples_section(samples: list[dict]) -> str:
    if not samples:
        return "<p>No samples.jsonl in the run (train.log_samples is 0).</p>"
    rows = [[f'<td class="num">{s.get("iteration", "")}</td>', f'<td class="text">{html.escape(str(s["prompt"]))}</td>',
             f'<td class="text">{html.escape(str(s["completion"]))}</td>', f'<td class="num">{_fmt(s.get("reward"))}</td>']
            for s in samples]
    return _table(["iteration", "prompt", "completion", "reward"], rows)


def _manifest_section(manifest: dict) -> str:
    if not manifest:
        return "<p>No manifest.json in the run (a run from before ppo-lm wrote one).</p>"
    flat = []
    for key, value in manifest.items():
        if isinstance(value, dict):
            flat += [(f"{key}.{k}", v) for k, v in value.items()]
        else:
            flat.append((key, " ".join(value) if key == "command" else value))
    return _table(["field", "value"], [[f"<td>{html.escape(k)}</td>", f"<td>{html.escape(str(v))}</td>"]
                                       for k, v in flat])


def build(run_dir: str | Path) -> str:
    """The page of the run in ``run_dir``, as HTML text."""
    run_dir = Path(run_dir)
    diagnosis = doctor.diagnose(run_dir)
    rows, config, manifest, samples = doctor.read_run(run_dir)
    if not rows:
        raise UserError("metrics.jsonl is empty: the run did not finish an iteration", str(run_dir / "metrics.jsonl"))
    best_file = run_dir / "best" / "best.json"
    best = json.loads(best_file.read_text()) if best_file.is_file() else None
    keys = [k for k in CURVES if any(doctor.number(r.get(k)) is not None for r in rows)]
    curves = _img(curves_png(rows, keys, thresholds(doctor.doctor_config(config))), "training curves")
    last = rows[-1]
    headline = ", ".join(f"{k} {_fmt(last[k])}" for k in ("reward_mean", "kl", "entropy") if k in last)
    title = f"ppo-lm run {run_dir.name or run_dir}"
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<p class="status">{html.escape(str(run_dir))}: {html.escape(diagnosis.status)}. Last iteration: {headline}.</p>
<h2 id="doctor">Run doctor</h2>
{_doctor_section(diagnosis)}
<h2 id="curves">Training curves</h2>
{curves}
<h2 id="eval">Evaluation during training</h2>
{_eval_section(rows, best)}
<h2 id="samples">Samples across iterations</h2>
{_samples_section(samples)}
<h2 id="manifest">Manifest</h2>
{_manifest_section(manifest)}
<h2 id="config">Config</h2>
<details><summary>config.yaml</summary><pre>{html.escape(yaml.safe_dump(config, sort_keys=False))}</pre></details>
<p><small>Written by ppo-lm report; self-contained (no network needed to view it).</small></p>
</body></html>
"""


def write(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Write the page (default ``RUN_DIR/report.html``) through a temporary file; returns its path."""
    page = build(run_dir)
    out = Path(out) if out else Path(run_dir) / "report.html"
    if out.parent and not out.parent.exists():
        raise UserError(f"no such directory: {out.parent}", "--output")
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out
