"""Chrome trace JSON (open in chrome://tracing or https://ui.perfetto.dev) and a PNG timeline of a simulated
step. In the PNG each rank is one row; attention is blue, experts orange, the LM head green, and successive
micro-batches alternate light and dark, so zebra's stripes show."""

from __future__ import annotations

from pathlib import Path

from hf_hetermoe.files import write_json

from .simulator import SimResult

_COLORS = {
    "attn_fwd": ("#4c78a8", "#9ecae9"), "attn_bwd": ("#2c4f7c", "#6a9fd0"),
    "expert_fwd": ("#f58518", "#ffbf79"), "expert_bwd": ("#b35c00", "#e39c4a"),
    "head": ("#54a24b", "#88d27a"),
}


def chrome_trace(result: SimResult) -> dict:
    """Trace-event JSON: one process per GPU, one thread per stream, times in microseconds."""
    events = []
    tids = {"compute": 0, "dispatch": 1, "combine": 2, "grad": 3}
    ranks = sorted({result.rank_of_local.get(e.rank, e.rank) for e in result.events})
    label = " (EMULATED GPUs)" if result.emulated else ""
    for rank in ranks:
        events.append({"name": "process_name", "ph": "M", "pid": rank, "args": {"name": f"rank {rank}{label}"}})
        for stream, tid in tids.items():
            events.append({"name": "thread_name", "ph": "M", "pid": rank, "tid": tid, "args": {"name": stream}})
    for e in result.events:
        a = e.action
        events.append({
            "name": a.label(), "cat": a.kind, "ph": "X", "pid": result.rank_of_local.get(e.rank, e.rank),
            "tid": tids[e.stream], "ts": round(e.start * 1e3, 3), "dur": round((e.end - e.start) * 1e3, 3),
            "args": {"layer": a.layer, "micro_batch": a.mb, "group": a.group},
        })
    return {"traceEvents": events, "displayTimeUnit": "ms",
            "metadata": {"method": result.method, "step_ms": result.step_ms, "emulated": result.emulated}}


def write_chrome_trace(result: SimResult, path: str | Path) -> None:
    write_json(path, chrome_trace(result))


def write_timeline_png(result: SimResult, path: str | Path, title: str | None = None) -> None:
    """Compute-stream timeline, one row per rank (needs matplotlib)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    ranks = sorted({result.rank_of_local.get(e.rank, e.rank) for e in result.events})
    row = {r: i for i, r in enumerate(ranks)}
    height = 0.45 * len(ranks) + 1.9
    fig, ax = plt.subplots(figsize=(14, height))
    for e in result.events:
        if e.stream != "compute":
            continue
        dark, light = _COLORS.get(e.action.kind, ("#999999", "#cccccc"))
        color = dark if e.action.mb % 2 == 0 else light
        ax.broken_barh([(e.start, e.end - e.start)], (row[result.rank_of_local.get(e.rank, e.rank)] - 0.4, 0.8),
                       facecolors=color, edgecolors="none")
    ax.set_yticks(range(len(ranks)), [f"rank {r}" for r in ranks])
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_xlim(0, result.step_ms * 1.01)
    emulated = " [EMULATED GPUs]" if result.emulated else ""
    ax.set_title((title or f"{result.method}: step {result.step_ms:.1f} ms") + emulated + " (simulated)")
    # The legend gets its own strip at the bottom of the figure, below the x label (not inside the axes).
    fig.legend(handles=[Patch(color=c[0], label=k) for k, c in _COLORS.items()], loc="lower center",
               ncol=len(_COLORS), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.35 / height, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
