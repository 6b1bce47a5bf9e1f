"""The audit report as HTML (one self-contained, printable file), Markdown or JSON."""

from __future__ import annotations

import json
from html import escape
from typing import Any

from revreg.audit.charts import bars

CSS = """
body{font:14px/1.45 -apple-system,'Segoe UI',Roboto,Helvetica,Arial,sans-serif;color:#1a202c;margin:24px auto;
max-width:1040px;padding:0 16px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #cbd5e0}
h3{font-size:15px;margin:18px 0 6px}.meta{color:#4a5568}
table{border-collapse:collapse;width:100%;margin:6px 0 12px}th,td{border:1px solid #e2e8f0;padding:4px 6px;
text-align:left;vertical-align:top}th{background:#f7fafc}code{font-size:12px;word-break:break-all}
.ok{color:#276749;font-weight:600}.bad{color:#c53030;font-weight:600}.state{font-weight:600}
.chart{display:block;margin:8px 0;max-width:100%;height:auto}.chart-title{font-size:12px;font-weight:600}
.tick{font-size:10px;fill:#4a5568}.grid{stroke:#edf2f7}.threshold{stroke:#c53030;stroke-dasharray:4 3}
.version{page-break-inside:avoid}
@media print{body{margin:0;max-width:none}h2{page-break-after:avoid}}
"""


class Markup(str):
    """HTML that this module built itself; every other cell and value is escaped on output."""


def _cell(value: Any) -> str:
    return value if isinstance(value, Markup) else escape(str(value))


def _real(x: Any) -> float | None:
    """A number from the report for a chart; anything else (a signed field is the verifier's
    word, not ours) is treated as missing."""
    if isinstance(x, bool) or not isinstance(x, int | float):
        return None
    value = float(x)
    return value if value == value and abs(value) != float("inf") else None


def _num(x: Any) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        if x == 1.0:
            return "1 (exact)"
        return f"1 - {1 - x:.2g}" if 0.99 < x < 1 else f"{x:.3g}"
    return str(x)


def _flag(ok: Any) -> Markup:
    return Markup(
        '<span class="ok">yes</span>' if ok is True else '<span class="bad">no</span>' if ok is False else "-"
    )


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_cell(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _cert_html(c: dict[str, Any]) -> str:
    if not c.get("verified"):
        return f'<p class="bad">Certification that does not verify: {escape(str(c.get("error", "")))}</p>'
    env = c.get("environment") or {}
    b = c.get("bitwise") or {}
    verdict_class = "ok" if c["verdict"] == "PASS" else "bad"
    names = c.get("metric_names")
    n1, n2 = (str(names[0]), str(names[1])) if isinstance(names, list | tuple) and len(names) == 2 else ("kl", "js")
    label = f"{n1.upper()} / {n2.upper()}"
    rows = [
        [
            "verdict",
            Markup(
                f'<span class="{verdict_class}">{escape(str(c["verdict"]))}</span>'
                + "".join(f"<br>{escape(str(r))}" for r in (c.get("reasons") or []))
            ),
        ],
        ["verifier key", Markup(f"{escape(str(c['verifier']['name']))} <code>{escape(c['verifier']['keyid'])}</code>")],
        ["certified", c.get("finished_at") or c["recorded_at"]],
        ["RF", _num(c.get("rf"))],
        [f"{label} adapted", f"{_num(c.get(f'{n1}_adapted'))} / {_num(c.get(f'{n2}_adapted'))}"],
        [f"{label} after reset", f"{_num(c.get(f'{n1}_reset'))} / {_num(c.get(f'{n2}_reset'))}"],
        [
            "bitwise restored",
            Markup(
                f"identity {_flag(b.get('identity'))}, state {_flag(b.get('state'))}, outputs {_flag(b.get('outputs'))}"
            ),
        ],
        ["cycles, device", f"{c.get('cycles')} on {c.get('device')}"],
        [
            "probe set",
            Markup(
                f"{escape(str((c.get('probes') or {}).get('name')))} "
                f"<code>{escape(str((c.get('probes') or {}).get('digest')))}</code>"
            ),
        ],
        ["environment", ", ".join(f"{k} {v}" for k, v in sorted(env.items())) if isinstance(env, dict) else env],
    ]
    out = _table(["", ""], rows)
    leakage = (c.get("leakage") or {}).get("per_probe") or []
    leakage = [_real(x) for x in leakage] if isinstance(leakage, list) else []
    series: dict[str, list[float | None]] = {"reversible (hooks)": leakage}
    for bl in c.get("baselines") or []:
        series[f"{bl['baseline']} (mutation)"] = [_real(x) for x in (bl.get("leakage_per_probe") or [])]
    if leakage:
        out += bars(
            "Per-probe leakage after reset (JS or MSE, log scale; outlined = exactly 0)",
            [str(i) for i in range(len(leakage))],
            series,
            _real((c.get("leakage") or {}).get("threshold")),
        )
    if c.get("baselines"):
        cats = [f"{n1.upper()} after reset", "max |delta| after reset"]
        comparison: dict[str, list[float | None]] = {
            "reversible (hooks)": [_real(c.get(f"{n1}_reset")), _real(c.get("max_abs_reset"))]
        }
        for bl in c["baselines"]:
            comparison[f"{bl['baseline']} (mutation)"] = [_real(bl.get(f"{n1}_reset")), _real(bl.get("max_abs_reset"))]
        out += bars("Reversible versus mutation baseline: divergence after reset (log scale)", cats, comparison)
        out += _table(
            [
                "baseline",
                "RF",
                f"{n1.upper()} after reset",
                "max |delta| after reset",
                "weights bitwise after its reset",
                "weight elements changed",
            ],
            [
                [
                    bl["baseline"],
                    _num(bl.get("rf")),
                    _num(bl.get(f"{n1}_reset")),
                    _num(bl.get("max_abs_reset")),
                    _flag(bl.get("weights_bitwise_after_subtract")),
                    _num(bl.get("weight_elements_changed")),
                ]
                for bl in c["baselines"]
            ],
        )
    return out


def html(report: dict[str, Any]) -> str:
    s = report["summary"]
    chain = report["audit_chain"]
    chain_html = (
        f'<span class="ok">intact</span> ({chain["rows"]} rows)'
        if chain["ok"]
        else f'<span class="bad">BROKEN</span>: {escape(chain["problem"] or "")}'
    )
    parts = [
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>revreg audit report</title>'
        f"<style>{CSS}</style></head><body>",
        "<h1>revreg audit report</h1>",
        f'<p class="meta">Registry {escape(report["registry"])} · scope: {escape(report["scope"])} · '
        f"generated {escape(report['generated_at'])}</p>",
        "<h2>Summary</h2>",
        _table(
            ["behaviors", "versions", "states", "certifications", "bases", "probe sets", "keys", "audit log"],
            [
                [
                    str(s["behaviors"]),
                    str(s["versions"]),
                    ", ".join(f"{k} {v}" for k, v in s["states"].items()) or "-",
                    str(s["certifications"]),
                    str(s["bases"]),
                    str(s["probe_sets"]),
                    str(s["keys"]),
                    Markup(chain_html),
                ]
            ],
        ),
    ]
    for b in report["behaviors"]:
        parts.append(f"<h2>Behavior {escape(b['name'])}</h2>")
        for v in b["versions"]:
            signer = escape(str(v["signer"]["name"])) + (
                ' <span class="bad">REVOKED</span>' if v["signer"]["revoked"] else ""
            )
            parts.append(
                f'<div class="version"><h3>{escape(b["name"])}:{escape(v["version"])} — '
                f'<span class="state">{escape(v["state"])}</span></h3>'
            )
            parts.append(
                _table(
                    ["", ""],
                    [
                        ["digest", Markup(f"<code>{escape(v['digest'])}</code>")],
                        ["signer", Markup(f"{signer} <code>{escape(v['signer']['keyid'])}</code>")],
                        [
                            "base identity",
                            Markup(
                                f"<code>{escape(v['base']['identity'])}</code>"
                                + ("" if v["base"]["registered"] else " (not registered)")
                            ),
                        ],
                        ["pushed", f"{v['pushed_at']} by {v['pushed_by']}"],
                        ["tags", ", ".join(v["tags"]) or "-"],
                        ["attachments", ", ".join(v["attachments"])],
                    ]
                    + ([["yank reason", v["yank_reason"]]] if v["yank_reason"] else []),
                )
            )
            parts.append("<p><b>Lifecycle</b></p>")
            parts.append(
                _table(
                    ["#", "time", "action", "actor", "details"],
                    [
                        [
                            e["seq"],
                            e["at"],
                            e["action"],
                            e["actor"],
                            Markup(f"<code>{escape(json.dumps(e['details'], sort_keys=True))}</code>"),
                        ]
                        for e in v["timeline"]
                    ],
                )
            )
            if not v["certifications"]:
                parts.append('<p class="bad">No certification.</p>')
            for i, c in enumerate(v["certifications"], 1):
                parts.append(f"<p><b>Certification {i}</b></p>{_cert_html(c)}")
            parts.append("</div>")
    parts.append("<h2>Keys</h2>")
    parts.append(
        _table(
            ["name", "role", "key id", "trust", "added"],
            [
                [
                    k["name"],
                    k["role"],
                    Markup(f"<code>{escape(k['keyid'])}</code>"),
                    Markup(
                        f'<span class="bad">revoked: {escape(k["revoked_reason"] or "")}</span>'
                        if k["revoked"]
                        else '<span class="ok">trusted</span>'
                    ),
                    k["added_at"],
                ]
                for k in report["keys"]
            ],
        )
    )
    parts.append(f"<h2>Audit log</h2><p>Hash chain: {chain_html}</p></body></html>\n")
    return "".join(parts)


def markdown(report: dict[str, Any]) -> str:
    s, chain = report["summary"], report["audit_chain"]
    lines = [
        "# revreg audit report",
        "",
        f"Registry `{report['registry']}`, scope: {report['scope']}, generated {report['generated_at']}.",
        "",
        f"- behaviors {s['behaviors']}, versions {s['versions']} "
        f"({', '.join(f'{k} {v}' for k, v in s['states'].items()) or '-'}), certifications {s['certifications']}",
        f"- audit log: {'intact' if chain['ok'] else 'BROKEN: ' + (chain['problem'] or '')} ({chain['rows']} rows)",
        "",
    ]
    for b in report["behaviors"]:
        lines += [f"## {b['name']}", ""]
        for v in b["versions"]:
            lines += [
                f"### {b['name']}:{v['version']} ({v['state']})",
                "",
                f"- digest `{v['digest']}`",
                f"- signer {v['signer']['name']} `{v['signer']['keyid']}`"
                + (" **REVOKED**" if v["signer"]["revoked"] else ""),
                f"- base `{v['base']['identity']}`",
                "",
                "| # | time | action | actor |",
                "| --- | --- | --- | --- |",
            ]
            lines += [f"| {e['seq']} | {e['at']} | {e['action']} | {e['actor']} |" for e in v["timeline"]]
            lines.append("")
            for c in v["certifications"]:
                if not c.get("verified"):
                    lines += [f"- certification that does not verify: {c.get('error')}", ""]
                    continue
                b_ = c.get("bitwise") or {}
                m1 = (c.get("metric_names") or ("kl", "js"))[0]
                lines += [
                    f"- certification **{c['verdict']}** by {c['verifier']['name']} on {c.get('device')}, "
                    f"{c.get('cycles')} cycles: RF {_num(c.get('rf'))}, {m1.upper()} adapted "
                    f"{_num(c.get(f'{m1}_adapted'))}, {m1.upper()} after reset {_num(c.get(f'{m1}_reset'))}, "
                    f"bitwise identity {b_.get('identity')} "
                    f"state {b_.get('state')} outputs {b_.get('outputs')}"
                ]
                for bl in c.get("baselines") or []:
                    lines.append(
                        f"  - baseline {bl['baseline']}: RF {_num(bl.get('rf'))}, {m1.upper()} after reset "
                        f"{_num(bl.get(f'{m1}_reset'))}, weights bitwise after its reset "
                        f"{bl.get('weights_bitwise_after_subtract')} (reset: {bl.get('reset')})"
                    )
            lines.append("")
    lines += ["## Keys", "", "| name | role | key id | state |", "| --- | --- | --- | --- |"]
    lines += [
        f"| {k['name']} | {k['role']} | `{k['keyid']}` | "
        f"{'revoked: ' + (k['revoked_reason'] or '') if k['revoked'] else 'trusted'} |"
        for k in report["keys"]
    ]
    return "\n".join(lines) + "\n"


def render(report: dict[str, Any], fmt: str) -> str:
    if fmt == "html":
        return html(report)
    if fmt == "md":
        return markdown(report)
    return json.dumps(report, indent=1, sort_keys=True) + "\n"
