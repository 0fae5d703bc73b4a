"""The frames benchmark's report: the markdown section and the latency-vs-throughput plot."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from report import RunInfo
from sections import Spread, load_text, ratio_text

from models import BenchModel

#: Issue 11's targets at 64 sessions per frame.
VS_ECHO_TARGET = 15.0
CPU_MARGIN_US = 3.0


@dataclass(frozen=True)
class Point:
    """One setting against one server (frame 0: one session's step per message)."""

    server: str
    model: str
    sessions: int
    frame: int
    #: Session-steps per second.
    steps_per_s: float
    messages_per_s: float
    #: Per message (a frame's round trip for frames).
    p50_us: float
    p99_us: float
    #: Per session-step.
    server_cpu_us: float
    client_cpu_us: float
    errors: int


@dataclass
class ModelRun:
    model: BenchModel
    #: In-process ONNX Runtime CPU µs per run, by batch.
    ort_us: dict[int, float]
    points: list[Point]
    #: Per round at the target frame size: frames session-steps/s over echo one-step steps/s.
    vs_echo: Spread
    #: Per round at the target frame size: server CPU µs per session-step.
    cpu: Spread
    #: As ``vs_echo`` with one frame alone in flight (as many sessions as the echo's).
    alone_vs_echo: Spread
    #: Per round: the floor's (echo_server.py --run-model) frames over echo one-step steps/s.
    floor_vs_echo: Spread
    #: Per round: rnnserve's frames over the floor's, session-steps/s.
    vs_floor: Spread


@dataclass
class Report:
    started: str
    load_before: tuple[float, ...]
    args: dict[str, Any]
    runs: list[ModelRun]
    plot: Path


def _layout(p: Point) -> str:
    if p.frame:
        return f"frames of {p.frame} ({p.sessions // p.frame} in flight)"
    return "one step per message"


def _pass(ok: bool) -> str:
    return "PASS" if ok else "**MISS**"


def render(report: Report, out: Path) -> str:
    """The section's body (markers are added by sections.write_section)."""
    args = report.args
    k = args["target_frame"]
    info = RunInfo.collect("", "", report.load_before)
    loop = "uvloop" if args["uvloop"] else "asyncio"
    lines = [
        "## Frames: many sessions' steps in one message (bench/frames.py)",
        "",
        f"Measured {report.started} at commit {info.commit}; {loop} (client and servers).",
        "",
        f"- Machine: {info.cpu_model}, {info.cpus} CPUs, shared by the client, the echo and "
        f"rnnserve; {load_text(report.load_before)}.",
        f"- Versions: {info.versions}.",
        "- Models: " + "; ".join(f"{r.model.label}: {r.model.origin}" for r in report.runs) + ".",
        f"- Runs: {args['rounds']} round(s) per model, the settings back to back, order reversed "
        f"every other round; each run a {args['seconds']:g} s window after {args['warmup']:g} s "
        f"warmup. Frames: {args['inflight']} in flight, each on its own Stream with its own "
        "sessions. Figures are medians over the rounds"
        + ("; quick run" if args["quick"] else "")
        + ".",
        "",
        f"### Against the targets of issue 11 (frames of {k}, in this run)",
        "",
        f"| model | frames of {k}: session-steps/s over the echo's steps/s at 64 sessions, one "
        f"step per message (target at least {VS_ECHO_TARGET:g}x) | | the floor's frames of {k} "
        f"over the same | rnnserve over the floor | server CPU µs per "
        f"session-step | ONNX Runtime in-process at batch {k}, per session-step, + "
        f"{CPU_MARGIN_US:g} µs | |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    for run in report.runs:
        budget = run.ort_us[k] / k + CPU_MARGIN_US
        lines.append(
            f"| {run.model.label} | {ratio_text(run.vs_echo)} | "
            f"{_pass(run.vs_echo[0] >= VS_ECHO_TARGET)} | {ratio_text(run.floor_vs_echo)} | "
            f"{ratio_text(run.vs_floor)} | {run.cpu[0]:.1f} ({run.cpu[1]:.1f}-"
            f"{run.cpu[2]:.1f}) | {budget:.1f} | {_pass(run.cpu[0] <= budget)} |"
        )
    alone = "; ".join(f"{r.model.label} {ratio_text(r.alone_vs_echo)}" for r in report.runs)
    lines += [
        "",
        "Ratios and CPU: median over the rounds (lowest-highest round); each ratio within one "
        f"round's adjacent runs. With one frame of {k} alone in flight ({k} sessions in all, as "
        f"many as the echo's), session-steps/s over the echo's: {alone}.",
        "",
        f"The floor is bench/echo_server.py --run-model, frames of {k}, {args['inflight']} in "
        "flight: the bare gRPC server running the model on each frame as rnnserve does (one "
        "Engine run, each session's state a SlotPool row found by one dict lookup, gathered "
        "and scattered, the real outputs in the reply) and nothing else: no seq checked, no "
        "retry cache, no metrics, no limits. A target above the floor's ratio lies below what "
        "any server doing that work in-process on this stack can reach.",
        "",
        "### Every setting",
        "",
        "| model | server | layout | sessions | session-steps/s | p50 µs | p99 µs | server CPU "
        "µs/session-step | ONNX Runtime µs/session-step at that batch |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report.runs:
        for p in run.points:
            ort = f"{run.ort_us[p.frame] / p.frame:.1f}" if p.frame in run.ort_us else ""
            errors = f" ({p.errors} errors)" if p.errors else ""
            lines.append(
                f"| {p.model} | {p.server}{errors} | {_layout(p)} | "
                f"{p.sessions} | {p.steps_per_s:,.0f} | {p.p50_us:,.0f} | {p.p99_us:,.0f} | "
                f"{p.server_cpu_us:.1f} | {ort} |"
            )
    ort_rows = ", ".join(
        f"{r.model.label} " + " / ".join(f"{us:,.0f}" for us in r.ort_us.values())
        for r in report.runs
    )
    batches = " / ".join(str(b) for b in report.runs[0].ort_us)
    lines += [
        "",
        f"ONNX Runtime in-process (rnnserve's Engine, one intra-op thread, one step, back to "
        f"back, CPU µs per run at batch {batches}): {ort_rows}.",
        "",
        f"![p50 latency per message against session-steps/s]"
        f"({os.path.relpath(report.plot, out.parent)})",
    ]
    return "\n".join(lines)


def plot(report: Report, path: Path) -> None:
    """Latency (p50 per message) against session-steps/s: the first model's one-step and frame
    curves on both servers, and every model's frame curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter
    from rnnserve.export.curves import save_figure

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 5.6))
    first = report.runs[0]
    inflight = int(report.args.get("inflight", 1))
    styles = {
        ("echo", False): ("echo, one step per message", "tab:gray", "o--"),
        ("rnnserve", False): ("rnnserve, one step per message", "tab:blue", "o-"),
        ("echo", True): ("echo, frames", "tab:olive", "s--"),
        ("rnnserve", True): ("rnnserve, frames", "tab:red", "s-"),
    }
    for (server, framed), (label, color, style) in styles.items():
        points = sorted(
            (
                p
                for p in first.points
                if p.server == server
                and bool(p.frame) == framed
                and (not p.frame or p.sessions == inflight * p.frame)
            ),
            key=lambda p: p.frame or p.sessions,
        )
        if not points:
            continue
        xs = [p.steps_per_s for p in points]
        ys = [p.p50_us / 1000 for p in points]
        left.plot(xs, ys, style, color=color, label=label)
        for p, x, y in zip(points, xs, ys, strict=True):
            tag = f"K={p.frame}" if p.frame else f"N={p.sessions}"
            left.annotate(tag, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    alone = [p for p in first.points if p.frame and p.sessions == p.frame and inflight > 1]
    if alone:
        left.plot(
            [p.steps_per_s for p in alone],
            [p.p50_us / 1000 for p in alone],
            "D",
            color="tab:purple",
            label=f"rnnserve, one frame of {alone[0].frame} alone in flight",
        )
    left.set_title(f"{first.model.label} ({first.model.name})")
    for run in report.runs:
        frames = sorted(
            (
                p
                for p in run.points
                if p.server == "rnnserve" and p.frame and p.sessions == inflight * p.frame
            ),
            key=lambda p: p.frame,
        )
        line = right.plot(
            [p.steps_per_s for p in frames],
            [p.p50_us / 1000 for p in frames],
            "s-",
            label=f"{run.model.label}, frames of K={', '.join(str(p.frame) for p in frames)} "
            f"({inflight} in flight)",
        )
        single = [
            p for p in run.points if p.server == "rnnserve" and not p.frame and p.sessions == 64
        ]
        right.plot(
            [p.steps_per_s for p in single],
            [p.p50_us / 1000 for p in single],
            "o",
            color=line[0].get_color(),
            fillstyle="none",
            label=f"{run.model.label}, 64 sessions one step per message",
        )
    right.set_title("rnnserve, every model")
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("session-steps/s")
        ax.set_ylabel("p50 latency per message, ms")
        ax.grid(True, which="both", alpha=0.3)
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=2)
    fig.suptitle(
        f"Latency against throughput, {report.started}, client and servers on one 2-CPU machine",
        fontsize=10,
    )
    save_figure(fig, path)
