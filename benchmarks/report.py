"""Raw runs -> medians with min/max, ratios, FLOP/s fractions; written as JSON, a markdown table and PNG plots."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path
from typing import Any

from benchmarks.config import PROJECT_ROOT

SYSTEMS = ("service", "naive", "ort_peer", "limit")
LABELS = {"service": "this service", "naive": "naive peer (diffusers torch)", "ort_peer": "ORT peer (optimum)",
          "limit": "limit (best schedule of the same ONNX files, in-process)"}  # fmt: skip
PEERS = ("naive", "ort_peer")
METRICS = ("images_per_s", "p50_s", "p95_s", "p99_s", "errors", "mean_unet_batch", "queue_share")
README_START, README_END = "<!-- results:start -->", "<!-- results:end -->"
# A markdown link or image in the results table: `[title](file)` or `![title](file)`.
_LINK = re.compile(r"!?\[([^\]]*)\]\(([^)\s]+)\)")


def spread(values: list[float | None]) -> dict[str, float] | None:
    present = [v for v in values if v is not None]
    if not present:
        return None
    return {"median": statistics.median(present), "min": min(present), "max": max(present), "n": len(present)}


def aggregate(model: dict[str, Any], peak_flops: float) -> dict[str, Any]:
    """Per system and concurrency level: each metric as median/min/max over the repeats; then the ratios."""
    table: dict[str, dict[str, dict[str, Any]]] = {}
    for system in SYSTEMS:
        runs_by_level = model["systems"].get(system, {}).get("closed", {})
        for level, runs in runs_by_level.items():
            row = {m: spread([r.get(m) for r in runs]) for m in METRICS}
            table.setdefault(system, {})[level] = {k: v for k, v in row.items() if v is not None}
    flops_per_image = model["flops"]["total"]
    for rows in table.values():
        for row in rows.values():
            ips = row.get("images_per_s")
            if ips:
                achieved = ips["median"] * flops_per_image
                row["achieved_flops_per_s"] = achieved
                row["fraction_of_matmul_peak"] = achieved / peak_flops
    out = {"table": table, "ratios": ratios(table), "limit_violations": limit_violations(table)}
    schedules = limit_schedules(model)
    if schedules:
        out["limit_schedules"] = schedules
    gateway = gateway_summary(model)
    if gateway is not None:
        out["gateway"] = gateway
    resident = resident_summary(model)
    if resident:
        out["resident_gib"] = resident
    return out


def resident_summary(model: dict[str, Any]) -> dict[str, float]:
    """Per process, the most resident memory seen after any service run: a model stub's after its largest batch
    (what onnxruntime's arena keeps for the life of the process)."""
    out: dict[str, float] = {}
    for runs in model["systems"].get("service", {}).get("closed", {}).values():
        for run in runs:
            for name, gib in run.get("resident_gib", {}).items():
                out[name] = max(out.get(name, 0.0), gib)
    return dict(sorted(out.items()))


GATEWAY_LEVEL = "8"  # the level the acceptance figures are read at (else the highest one run)


def gateway_summary(model: dict[str, Any]) -> dict[str, Any] | None:
    """Per level: gateway CPU ms per image and share of the service's CPU, per process and per stage (medians
    over the repeats); the level-8 figures at the top."""
    levels: dict[str, Any] = {}
    for level, runs in model["systems"].get("service", {}).get("closed", {}).items():
        cpus = [(r["cpu"], r["completed"]) for r in runs if "cpu" in r and r["completed"]]
        if not cpus:
            continue

        def med(values: list[float]) -> float:
            return statistics.median(values)

        names = sorted({n for cpu, _ in cpus for n in cpu["process_cpu_s"]})
        stages = sorted({n for cpu, _ in cpus for n in cpu["stage_cpu_ms_per_image"]})
        levels[level] = {
            "cpu_ms_per_image": med([c["gateway_cpu_ms_per_image"] for c, _ in cpus]),
            "cpu_share": med([c["gateway_cpu_share"] or 0.0 for c, _ in cpus]),
            "processes_ms_per_image": {
                n: med([c["process_cpu_s"].get(n, 0.0) * 1e3 / images for c, images in cpus]) for n in names
            },
            "processes_share": {
                n: med(
                    [
                        c["process_cpu_s"].get(n, 0.0) / c["service_cpu_s"] if c["service_cpu_s"] else 0.0
                        for c, _ in cpus
                    ]
                )
                for n in names
            },
            "stages_ms_per_image": {n: med([c["stage_cpu_ms_per_image"].get(n, 0.0) for c, _ in cpus]) for n in stages},
        }
    if not levels:
        return None
    level = GATEWAY_LEVEL if GATEWAY_LEVEL in levels else max(levels, key=int)
    return {"level": level, **levels[level], "levels": levels}


def _peer_ips(table: dict[str, Any], system: str, level: str) -> tuple[float | None, str]:
    """A one-at-a-time peer's throughput does not depend on load; use the level's own run when there is one."""
    rows = table.get(system, {})
    if level in rows:
        return rows[level]["images_per_s"]["median"], level
    if rows:
        return statistics.median(r["images_per_s"]["median"] for r in rows.values()), "median over " + ",".join(rows)
    return None, "missing"


def limit_violations(table: dict[str, Any]) -> list[dict[str, Any]]:
    """Every (level, system) where the service or a peer has a median images/s above the limit's at the same level
    (only levels where both were measured). The limit is the best schedule found of the same model work
    (benchmarks/systems/limit.py): an entry means it missed a faster one (or the machine's load changed)."""
    limits = table.get("limit", {})
    out = []
    for system in ("service", *PEERS):
        for level, row in sorted(table.get(system, {}).items(), key=lambda kv: int(kv[0])):
            limit = limits.get(level, {}).get("images_per_s")
            ips = row.get("images_per_s")
            if limit and limit["median"] and ips and ips["median"] > limit["median"]:
                out.append({"level": level, "system": system, "ratio": ips["median"] / limit["median"]})
    return sorted(out, key=lambda v: (int(v["level"]), v["system"]))


def limit_schedules(model: dict[str, Any]) -> dict[str, Any]:
    """Per level: the schedule that set the limit in most repeats, and each candidate's median images/s."""
    out: dict[str, Any] = {}
    for level, runs in model["systems"].get("limit", {}).get("closed", {}).items():
        won = [r["schedule"] for r in runs if r.get("schedule")]
        if not won:
            continue
        names = sorted({k for r in runs for k in r.get("candidates", {})})
        candidates = {k: spread([r.get("candidates", {}).get(k) for r in runs]) for k in names}
        schedule = max(sorted(set(won)), key=won.count)
        out[level] = {
            "schedule": schedule,
            "settings": next(r.get("settings") for r in runs if r.get("schedule") == schedule),
            "candidates": {k: v["median"] for k, v in candidates.items() if v is not None},
        }
    return out


def ratios(table: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for level, row in table.get("service", {}).items():
        service = row["images_per_s"]["median"]
        entry: dict[str, Any] = {}
        for name, system in (("service/naive", "naive"), ("service/ort_peer", "ort_peer")):
            peer, source = _peer_ips(table, system, level)
            entry[name] = service / peer if peer and service else None
            entry[f"{name} peer level"] = source
        limit_cell = table.get("limit", {}).get(level, {}).get("images_per_s")
        limit = limit_cell["median"] if limit_cell else None
        entry["service/limit"] = service / limit if limit and service else None
        for system in PEERS:  # where the peer was not run at this level: its median over its levels, as above
            peer, source = _peer_ips(table, system, level)
            entry[f"{system}/limit"] = peer / limit if peer and limit else None
            entry[f"{system}/limit peer level"] = source
        out[level] = entry
    return out


def build(results: dict[str, Any]) -> dict[str, Any]:
    peak = results["matmul_peak"]["flops_per_s"]
    results["summary"] = {size: aggregate(model, peak) for size, model in results["models"].items()}
    return results


def _ms(cell: dict[str, float] | None) -> str:
    if not cell:
        return "-"
    return f"{cell['median'] * 1e3:.0f} ({cell['min'] * 1e3:.0f}-{cell['max'] * 1e3:.0f})"


def _num(cell: dict[str, float] | None, fmt: str = "{:.2f}") -> str:
    if not cell:
        return "-"
    if cell["min"] == cell["max"]:
        return fmt.format(cell["median"])
    return f"{fmt.format(cell['median'])} ({fmt.format(cell['min'])}-{fmt.format(cell['max'])})"


def _r(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def markdown(results: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    m = results["machine"]
    p = results["pinning"]
    lines = [
        f"Taken {results['started_at']} on `{m['hostname']}`: {m['cpu']}, {m['cpus']} CPUs; "
        f"onnxruntime {m['onnxruntime']}, torch {m['torch']}. Mode `{results['config']['mode']}`, "
        f"{results['config']['repeats']} repeats (median, min-max); threads pinned: intra-op {p['intra_op_threads']}, "
        f"inter-op {p['inter_op_threads']} for every system. Large-matmul peak "
        f"{results['matmul_peak']['flops_per_s'] / 1e9:.1f} GFLOP/s. Run took {results['duration_s'] / 60:.1f} min.",
        "",
    ]
    for size, model in results["models"].items():
        summary = results["summary"][size]
        wl = model["workload"]
        shapes = model["work_shapes"]
        lines += [
            f"### {size} ({model['model']})",
            "",
            f"{shapes['width']}x{shapes['height']} px (latents {shapes['latent_w']}x{shapes['latent_h']}), "
            f"steps {wl['steps']} x strength {wl['strength']} = {wl['effective_steps']} UNet steps, guidance "
            f"{wl['guidance_scale']}; {model['flops']['total'] / 1e9:.2f} GFLOP/image "
            f"(UNet {model['flops']['per_image']['unet'] / 1e9:.2f}).",
            "",
            "| system | conc. | images/s | p50 ms | p95 ms | p99 ms | errors | UNet batch | queue share "
            "| % of matmul peak |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for system in SYSTEMS:
            for level, row in sorted(summary["table"].get(system, {}).items(), key=lambda kv: int(kv[0])):
                frac = row.get("fraction_of_matmul_peak")
                lines.append(
                    f"| {LABELS[system]} | {level} | {_num(row.get('images_per_s'))} | {_ms(row.get('p50_s'))} "
                    f"| {_ms(row.get('p95_s'))} | {_ms(row.get('p99_s'))} | {_num(row.get('errors'), '{:.0f}')} "
                    f"| {_num(row.get('mean_unet_batch'), '{:.1f}')} | {_num(row.get('queue_share'))} "
                    f"| {'-' if frac is None else f'{frac * 100:.1f}%'} |"
                )
        op = model["systems"]["service"]["open"]
        lines += [
            "",
            f"Open loop (Poisson, {op['rate_per_s']:.2f} req/s, {op['completed']} requests): "
            f"{op['images_per_s']:.2f} images/s, p50 {op['p50_s'] * 1e3:.0f} ms, p99 {op['p99_s'] * 1e3:.0f} ms, "
            f"errors {op['errors']}, UNet batch {op['mean_unet_batch'] or 0:.1f}, queue share "
            f"{(op['queue_share'] or 0):.2f}.",
            "",
            "| conc. | service/naive | service/ORT peer | service/limit | naive/limit | ORT peer/limit |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for level, r in sorted(summary["ratios"].items(), key=lambda kv: int(kv[0])):
            lines.append(
                f"| {level} | {_r(r['service/naive'])} | {_r(r['service/ort_peer'])} | {_r(r['service/limit'])} "
                f"| {_r(r.get('naive/limit'))} | {_r(r.get('ort_peer/limit'))} |"
            )
        lines += ["", violations_line(summary["limit_violations"])]
        lines += schedule_lines(summary.get("limit_schedules", {}))
        lines += cpu_tables(summary.get("gateway"), summary.get("resident_gib"))
        t = model["transport"]
        g, i = t["gateway"], t["identity_direct"]
        lines += [
            "",
            f"Transport: gateway overhead per request p50 {g['overhead_ms_p50']:.1f} ms, p99 "
            f"{g['overhead_ms_p99']:.1f} ms (request {g['latency_ms_p50']:.1f} ms, of which Triton-side "
            f"{g['triton_ms_p50']:.1f} ms incl. {g['triton_queue_ms_p50']:.1f} ms batcher queue; "
            f"{g['triton_calls_per_request']} Triton calls). Identity call of {i['bytes'] / 1024:.0f} KiB straight to "
            f"Triton with tritonclient: p50 {i['client_ms_p50']:.2f} ms, p99 {i['client_ms_p99']:.2f} ms "
            f"(Triton-side {i['server_ms_mean']:.2f} ms; gRPC + client {i['transport_ms_p50']:.2f} ms p50).",
            "",
        ]
    for title, path in (plots or {}).items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)


def violations_line(violations: list[dict[str, Any]]) -> str:
    """Markdown: every system above the limit at a level where both were measured, or none."""
    if not violations:
        return "Above the limit: none (no system beats the limit at any level where both were measured)."
    listed = ", ".join(f"{LABELS[v['system']]} at {v['level']} ({v['ratio']:.2f}x)" for v in violations)
    return f"**Above the limit** (the limit missed a faster schedule or the machine's load changed): {listed}."


def schedule_lines(schedules: dict[str, Any]) -> list[str]:
    """Markdown: which schedule set the limit at each level, and every candidate's images/s."""
    if not schedules:
        return []
    lines = ["", "Limit per level (schedule that won; every candidate's images/s):", ""]
    for level, entry in sorted(schedules.items(), key=lambda kv: int(kv[0])):
        candidates = ", ".join(f"{k} {v:.2f}" for k, v in sorted(entry["candidates"].items(), key=lambda kv: -kv[1]))
        settings = "; ".join(f"{k}: {v}" for k, v in (entry.get("settings") or {}).items())
        lines.append(f"- c={level}: **{entry['schedule']}**{f' ({settings})' if settings else ''}; {candidates}")
    return lines


def cpu_tables(gateway: dict[str, Any] | None, resident: dict[str, float] | None = None) -> list[str]:
    """Markdown: CPU per image of each process, then the gateway's CPU per stage, at the summary's level."""
    if gateway is None:
        return []
    level = gateway["level"]
    procs = sorted(gateway["processes_ms_per_image"].items(), key=lambda kv: -kv[1])
    lines = [
        "",
        f"CPU per image at concurrency {level} (user + system, per process): gateway "
        f"{gateway['cpu_ms_per_image']:.1f} ms/image, {gateway['cpu_share'] * 100:.1f} % of the service's CPU "
        "(gateway + tritonserver + model stubs; the load generator is not counted).",
        "",
        "| process | CPU ms/image | share of service CPU |",
        "|---|---:|---:|",
    ]
    for name, ms in procs:
        share = "-" if name == "loadgen" else f"{gateway['processes_share'].get(name, 0.0) * 100:.1f} %"
        lines.append(f"| {name} | {ms:.1f} | {share} |")
    if resident:
        held = ", ".join(f"{name} {gib:.2f}" for name, gib in resident.items())
        lines += ["", f"Resident memory after the runs (GiB, the most seen after any level): {held}."]
    stages = sorted(gateway["stages_ms_per_image"].items(), key=lambda kv: -kv[1])
    total = sum(ms for _, ms in stages) or 1.0
    lines += ["", f"Gateway CPU per stage at concurrency {level}:", ""]
    lines += ["| stage | CPU ms/image | share of gateway CPU |", "|---|---:|---:|"]
    for name, ms in stages:
        lines.append(f"| {name} | {ms:.2f} | {ms / total * 100:.1f} % |")
    return lines


def plot(results: dict[str, Any], out_prefix: Path) -> dict[str, str]:
    """throughput vs concurrency (all systems) and the latency CDF at concurrency 8, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    sizes = list(results["models"])
    files = {}
    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        table = results["summary"][size]["table"]
        for system in SYSTEMS:
            rows = sorted(table.get(system, {}).items(), key=lambda kv: int(kv[0]))
            if not rows:
                continue
            x = [int(level) for level, _ in rows]
            y = [row["images_per_s"]["median"] for _, row in rows]
            lo = [row["images_per_s"]["median"] - row["images_per_s"]["min"] for _, row in rows]
            hi = [row["images_per_s"]["max"] - row["images_per_s"]["median"] for _, row in rows]
            ax.errorbar(x, y, yerr=[lo, hi], marker="o", capsize=3, label=LABELS[system])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel("images/s")
        ax.set_title(f"{size}: throughput vs concurrency")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_prefix.with_name(out_prefix.name + "-throughput.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files["Throughput vs concurrency"] = path.name

    fig, axes = plt.subplots(1, len(sizes), figsize=(6 * len(sizes), 4.2), squeeze=False)
    for ax, size in zip(axes[0], sizes, strict=True):
        model = results["models"][size]
        for system in ("service", "naive", "ort_peer"):
            runs = model["systems"].get(system, {}).get("closed", {})
            level = "8" if "8" in runs else (max(runs, key=int) if runs else None)
            if level is None:
                continue
            lat = np.sort(np.concatenate([np.asarray(r["latencies_s"]) for r in runs[level]])) * 1e3
            if lat.size:
                ax.step(lat, np.arange(1, lat.size + 1) / lat.size, where="post", label=f"{LABELS[system]} (c={level})")
        ax.set_xlabel("latency (ms)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"{size}: latency CDF at concurrency 8")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    path = out_prefix.with_name(out_prefix.name + "-latency-cdf.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    files["Latency CDF at concurrency 8"] = path.name
    return files


def machine_slug(results: dict[str, Any]) -> str:
    m = results["machine"]
    cpu = re.sub(r"\(R\)|\(TM\)|CPU|@.*$", "", m["cpu"]).strip()
    slug = re.sub(r"[^A-Za-z0-9]+", "-", f"{cpu}-{m['cpus']}cpu").strip("-").lower()
    return slug or "unknown"


def _as_paths(table: str, out_dir: Path) -> str:
    """The table for the docs page (docs/benchmarks.md): each link to a result file becomes its repository path as a
    code span, `benchmarks/results/<file>`, since `mkdocs build --strict` refuses links out of docs/."""
    folder = out_dir.resolve()
    shown = folder.relative_to(PROJECT_ROOT).as_posix() if folder.is_relative_to(PROJECT_ROOT) else folder.as_posix()
    return _LINK.sub(lambda m: f"{m[1]}: `{shown}/{m[2]}`", table)


def write(results: dict[str, Any], out_dir: Path, *, readme: Path | None = None) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    build(results)
    stem = f"{results['started_at'][:10]}-{machine_slug(results)}"
    if results["config"]["mode"] != "full":
        stem += f"-{results['config']['mode']}"
    prefix = out_dir / stem
    plots = plot(results, prefix)
    json_path = prefix.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    table = markdown(results, plots)
    md_path = prefix.with_suffix(".md")
    md_path.write_text(f"# Benchmark results {stem}\n\n{table}\n")
    if readme is not None and readme.is_file():
        text = readme.read_text()
        if README_START in text and README_END in text:
            head, rest = text.split(README_START, 1)
            _, tail = rest.split(README_END, 1)
            readme.write_text(f"{head}{README_START}\n{_as_paths(table, out_dir)}\n{README_END}{tail}")
    return {"json": json_path, "markdown": md_path, **{k: out_dir / v for k, v in plots.items()}}


# --- `python -m benchmarks load`: one deployment under a closed-loop sweep and open-loop Poisson rates -----------

LOAD_METRICS = ("images_per_s", "requests_per_s", "p50_s", "p95_s", "p99_s", "errors", "slo_met_share")


def _by_number(items: dict[str, Any]) -> list[tuple[str, Any]]:
    return sorted(items.items(), key=lambda kv: float(kv[0]))


def build_load(results: dict[str, Any]) -> dict[str, Any]:
    """Each closed level and open rate: every metric as median/min/max over the repeats; the best level."""
    summary: dict[str, Any] = {}
    for loop in ("closed", "open"):
        summary[loop] = {}
        for key, runs in results["runs"][loop].items():
            row = {m: spread([r.get(m) for r in runs]) for m in LOAD_METRICS}
            summary[loop][key] = {k: v for k, v in row.items() if v is not None}
    closed = [(k, row["images_per_s"]["median"]) for k, row in summary["closed"].items() if "images_per_s" in row]
    if closed:
        level, ips = max(closed, key=lambda kv: kv[1])
        summary["best"] = {"concurrency": int(level), "images_per_s": ips}
    every = [r for loop in ("closed", "open") for runs in results["runs"][loop].values() for r in runs]
    sent = sum(r["requests"] for r in every)
    summary["requests"] = sent
    summary["errors"] = sum(r["errors"] for r in every)
    slo_ms = results["config"].get("slo_ms")
    if slo_ms is not None:
        met = sum(r["slo_met"] for r in every)
        summary["slo"] = {"ms": slo_ms, "met": met, "requests": sent, "met_share": met / sent if sent else None}
    results["summary"] = summary
    return results


def _ms_span(cell: dict[str, float] | None) -> str:
    """Like `_ms`, without a range when there is one run."""
    if cell and cell["min"] == cell["max"]:
        return f"{cell['median'] * 1e3:.0f}"
    return _ms(cell)


def _pct(cell: dict[str, float] | None) -> str:
    if not cell:
        return "-"
    if cell["min"] == cell["max"]:
        return f"{cell['median'] * 100:.0f}%"
    return f"{cell['median'] * 100:.0f}% ({cell['min'] * 100:.0f}-{cell['max'] * 100:.0f}%)"


def load_markdown(results: dict[str, Any], plots: dict[str, str] | None = None) -> str:
    t, c, req, cl = results["target"], results["config"], results["request"], results["client"]
    summary = results["summary"]
    slo_ms = c.get("slo_ms")
    img = req["image"]
    lines = [
        f"Taken {results['started_at']} against `{t['endpoint']}`, model `{t['model'] or '(server default)'}`, from "
        f"`{cl['hostname']}` ({cl['cpus']} CPUs). {c['repeats']} repeat(s) (median, min-max), {c['requests']} "
        f"requests per run after {c['warmup']} warm-up request(s). Run took {results['duration_s'] / 60:.1f} min.",
        "",
        f"Request: {img['width']}x{img['height']} {img['format']} input ({img['bytes'] / 1024:.0f} KiB, "
        f"{img['source']}), steps {req['steps']} x strength {req['strength']}, guidance {req['guidance_scale']}, "
        f"seed {req['seed']}; body {req['body_bytes'] / 1024:.0f} KiB.",
        "",
    ]
    slo_head = f" | ≤ {slo_ms:g} ms" if slo_ms is not None else ""
    slo_rule = "|---:" if slo_ms is not None else ""
    for loop, title, key_name in (("closed", "Closed loop", "conc."), ("open", "Open loop (Poisson)", "offered req/s")):
        rows = _by_number(summary[loop])
        if not rows:
            continue
        lines += [
            f"{title}:",
            "",
            f"| {key_name} | images/s | p50 ms | p95 ms | p99 ms | errors{slo_head} |",
            f"|---:|---:|---:|---:|---:|---:{slo_rule}|",
        ]
        for key, row in rows:
            slo_cell = f" | {_pct(row.get('slo_met_share'))}" if slo_ms is not None else ""
            lines.append(
                f"| {key} | {_num(row.get('images_per_s'))} | {_ms_span(row.get('p50_s'))} "
                f"| {_ms_span(row.get('p95_s'))} | {_ms_span(row.get('p99_s'))} "
                f"| {_num(row.get('errors'), '{:.0f}')}{slo_cell} |"
            )
        lines.append("")
    best = summary.get("best")
    tail = []
    if best:
        tail.append(
            f"Best closed-loop throughput {best['images_per_s']:.2f} images/s at concurrency {best['concurrency']}."
        )
    tail.append(f"{summary['errors']} of {summary['requests']} measured requests failed.")
    if "slo" in summary and summary["slo"]["met_share"] is not None:
        s = summary["slo"]
        tail.append(f"{s['met_share'] * 100:.1f}% of them ({s['met']}/{s['requests']}) finished within {s['ms']:g} ms.")
    lines += [" ".join(tail), ""]
    samples = sorted({e for loop in ("closed", "open") for runs in results["runs"][loop].values()
                      for r in runs for e in r["error_samples"]})  # fmt: skip
    if samples:
        lines += ["Error samples:", "", *[f"- `{e[:160]}`" for e in samples[:5]], ""]
    for title, path in (plots or {}).items():
        lines += [f"![{title}]({path})", ""]
    return "\n".join(lines)


def plot_load(results: dict[str, Any], out_prefix: Path) -> dict[str, str]:
    """throughput vs concurrency, the latency CDF of every run, latency vs offered load (open loop only)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    summary, runs = results["summary"], results["runs"]
    slo_ms = results["config"].get("slo_ms")
    title = results["target"]["endpoint"]
    files: dict[str, str] = {}

    def save(fig: Any, suffix: str, name: str) -> None:
        fig.tight_layout()
        path = out_prefix.with_name(out_prefix.name + suffix)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        files[name] = path.name

    every_ms = [
        1e3 * x for loop in ("closed", "open") for rl in runs[loop].values() for r in rl for x in r["latencies_s"]
    ]
    slo_note = ""

    def slo_line(draw: Any) -> None:
        """The SLO as a line where it fits the latencies drawn (a target far above them would flatten them)."""
        nonlocal slo_note
        if slo_ms is None:
            return
        if not every_ms or slo_ms <= 1.5 * max(every_ms):
            draw(slo_ms, color="red", linestyle=":", label=f"SLO {slo_ms:g} ms")
        else:
            slo_note = f" (SLO {slo_ms:g} ms: off the scale)"

    closed = [(k, row) for k, row in _by_number(summary["closed"]) if "images_per_s" in row]
    if closed:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        x = [int(k) for k, _ in closed]
        ips = [row["images_per_s"] for _, row in closed]
        y = [c["median"] for c in ips]
        yerr = [[c["median"] - c["min"] for c in ips], [c["max"] - c["median"] for c in ips]]
        ax.errorbar(x, y, yerr=yerr, marker="o", capsize=3, label="images/s (median, min-max)")
        if slo_ms is not None:
            for xi, yi, (_, row) in zip(x, y, closed, strict=True):
                share = row.get("slo_met_share")
                if share:
                    ax.annotate(f"{share['median'] * 100:.0f}% ≤ SLO", (xi, yi), textcoords="offset points",
                                xytext=(4, 6), fontsize=7)  # fmt: skip
        ax.set_xscale("log", base=2)
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("concurrency (closed loop)")
        ax.set_ylabel("images/s")
        ax.set_ylim(bottom=0)
        ax.set_title(f"throughput vs concurrency\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, "-throughput.png", "Throughput vs concurrency")

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = False
    for loop, label, style in (("closed", "c={}", "-"), ("open", "Poisson {} req/s", "--")):
        for key, run_list in _by_number(runs[loop]):
            lat = np.sort(np.concatenate([np.asarray(r["latencies_s"], dtype=float) for r in run_list])) * 1e3
            if lat.size:
                ax.step(lat, np.arange(1, lat.size + 1) / lat.size, style, where="post", label=label.format(key))
                drawn = True
    slo_line(ax.axvline)
    ax.set_xlabel("latency (ms)")
    ax.set_ylabel("fraction of successful requests")
    ax.set_ylim(0, 1.02)
    ax.set_title(f"latency CDF{slo_note}\n{title}", fontsize=9)
    ax.grid(alpha=0.3)
    if drawn or slo_ms is not None:
        ax.legend(fontsize=7)
    save(fig, "-latency-cdf.png", "Latency CDF")

    open_rows = [(k, row) for k, row in _by_number(summary["open"]) if "p50_s" in row]
    if open_rows:
        fig, ax = plt.subplots(figsize=(6.4, 4.2))
        x_rate = [float(k) for k, _ in open_rows]
        for metric, marker in (("p50_s", "o"), ("p95_s", "s"), ("p99_s", "^")):
            ax.plot(x_rate, [row[metric]["median"] * 1e3 for _, row in open_rows], marker=marker,
                    label=metric[:3])  # fmt: skip
        slo_line(ax.axhline)
        ax.set_xlabel("offered load (requests/s, Poisson)")
        ax.set_ylabel("latency (ms, from scheduled arrival)")
        ax.set_title(f"latency vs offered load{slo_note}\n{title}", fontsize=9)
        ax.grid(alpha=0.3)
        twin = ax.twinx()
        twin.plot(x_rate, [row["images_per_s"]["median"] for _, row in open_rows], "k:", marker=".",
                  label="achieved images/s")  # fmt: skip
        twin.set_ylabel("achieved images/s")
        handles = ax.get_legend_handles_labels()
        twin_handles = twin.get_legend_handles_labels()
        ax.legend(handles[0] + twin_handles[0], handles[1] + twin_handles[1], fontsize=7)
        save(fig, "-latency-vs-load.png", "Latency vs offered load")
    return files


def load_stem(results: dict[str, Any]) -> str:
    host = re.sub(r"^[a-z]+://", "", results["target"]["url"])
    slug = re.sub(r"[^A-Za-z0-9]+", "-", host).strip("-").lower()[:60] or "target"
    clock = re.sub(r"[^0-9]", "", results["started_at"][11:19])  # HHMMSS
    return f"{results['started_at'][:10]}-{clock}-load-{slug}"


def write_load(results: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """JSON, markdown and plots of one `load` run, named `<date>-<time>-load-<host>`; returns kind -> path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    build_load(results)
    prefix = out_dir / load_stem(results)
    plots = plot_load(results, prefix)
    json_path = prefix.with_suffix(".json")
    json_path.write_text(json.dumps(results, indent=1, default=str) + "\n")
    md_path = prefix.with_suffix(".md")
    md_path.write_text(f"# Load benchmark {prefix.name}\n\n{load_markdown(results, plots)}\n")
    return {"json": json_path, "markdown": md_path, **{k: out_dir / v for k, v in plots.items()}}
