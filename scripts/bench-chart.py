"""Draws scripts/bench's chart: one panel per figure, a bar per system.

Usage: bench-chart.py BENCH.csv BENCH.txt OUT.png
"""

import csv
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (row of the CSV, panel title): lower is better in every panel.
PANELS = [
    ("start: wall (s)", "start 1,000 sleepers: wall (s)"),
    ("memory per agent (KiB)", "supervisor memory per agent (KiB)"),
    ("stop all: wall (s)", "stop all: wall (s)"),
    ("yes x10: supervisor CPU (%)", "10 x yes: supervisor CPU (%)"),
    ("crash loop x100: supervisor CPU (%)", "crash loop x100: supervisor CPU (%)"),
    ("pause/resume: p99 (ms)", "pause/resume call p99 (ms)"),
]
COLORS = {"raw": "#999999", "agentplane": "#1f77b4", "supervisord": "#2ca02c", "pm2": "#d62728"}


def main(csv_path, txt_path, png_path):
    with open(csv_path, newline="") as f:
        rows = list(csv.reader(f))
    systems = rows[0][1:]
    table = {r[0]: r[1:] for r in rows[1:]}
    with open(txt_path) as f:
        title = f.readline().strip()
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5))
    for ax, (key, name) in zip(axes.flat, PANELS):
        values = table.get(key, [""] * len(systems))
        shown = [(s, float(v)) for s, v in zip(systems, values) if v != ""]
        bars = ax.bar(
            [s for s, _ in shown],
            [v for _, v in shown],
            color=[COLORS.get(s, "#555555") for s, _ in shown],
        )
        ax.bar_label(bars, labels=[f"{v:g}" for _, v in shown], fontsize=8)
        ax.set_title(name, fontsize=10)
        ax.margins(y=0.15)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)


if __name__ == "__main__":
    main(*sys.argv[1:4])
