"""Benchmark output: the JSON record, the terminal table and the speed-up plot."""
from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from rich.console import Console
from rich.table import Table

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def record_stem(bench: str, machine_kind: str) -> str:
    """Return a file name stem such as ``models-cpu-2threads-20261204-201500``."""
    return f"{bench}-{machine_kind}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}"


def write_record(record: Dict[str, object], out_dir: Path, stem: str) -> Path:
    """Write ``record`` as indented JSON to ``out_dir/stem.json`` and return the path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.json"
    path.write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
    return path


def format_ms(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.2f}"


def format_ratio(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_bytes(value: Optional[int]) -> str:
    if value is None:
        return "-"
    return f"{value / 2**20:.0f} MiB" if value >= 2**20 else f"{value / 2**10:.0f} KiB"


def print_table(title: str, columns: Sequence[str], rows: List[Sequence[str]], console: Optional[Console] = None) -> None:
    """Print a rich table whose first column is left-aligned and the others right-aligned."""
    table = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        table.add_column(column, justify="left" if index == 0 else "right", no_wrap=index == 0)
    for row in rows:
        table.add_row(*row)
    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped output has no width of its own; rich's default of 80 columns would truncate every figure.
            console = Console(width=200)
    console.print(table)


def plot_model_speedups(record: Dict[str, object], path: Path) -> Path:
    """Plot spconv's speed-up over the faster masked layout against the mask ratio, per model and benchmark."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = record["results"]
    benches = list(dict.fromkeys(result["benchmark"] for result in results))
    figure, axes = plt.subplots(1, len(benches), figsize=(4.2 * len(benches), 3.6), squeeze=False, sharey=True)
    for axis, bench in zip(axes[0], benches):
        for model in dict.fromkeys(result["model"] for result in results):
            points = sorted(
                (result["mask_ratio"], result["speedup"])
                for result in results
                if result["benchmark"] == bench and result["model"] == model
            )
            ratios = [point[0] for point in points]
            medians = [point[1]["median"] for point in points]
            lower = [point[1]["median"] - point[1]["q1"] for point in points]
            upper = [point[1]["q3"] - point[1]["median"] for point in points]
            axis.errorbar(ratios, medians, yerr=[lower, upper], marker="o", capsize=3, label=model)
        axis.axhline(1.0, color="grey", linewidth=0.8, linestyle="--")
        axis.set_title(bench.replace("_", " "))
        axis.set_xlabel("mask ratio")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel("speed-up of spconv over\nfaster masked layout (x)")
    axes[0][0].legend()
    machine = record["machine"]
    where = machine.get("gpu") or f"{machine['cpu_model']}, {machine['torch_threads']} threads"
    settings = record["settings"]
    figure.suptitle(
        f"{where}; batch {settings['batch_size']}, input {settings['input_size']}, {machine['dtype']}", fontsize=9
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_layer_speedups(record: Dict[str, object], path: Path) -> Path:
    """Plot, per layer shape, spconv's forward and forward-plus-backward speed-up over the faster masked layout."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = record["layers"]
    names = [layer["name"] for layer in layers]
    positions = list(range(len(layers)))
    figure, axis = plt.subplots(figsize=(7.5, 0.28 * len(layers) + 1.5))
    for offset, key, label in ((-0.2, "speedup_forward", "forward"), (0.2, "speedup_forward_backward", "forward + backward")):
        values = [layer[key]["median"] if layer.get(key) else math.nan for layer in layers]
        axis.barh([position + offset for position in positions], values, height=0.4, label=label)
    axis.axvline(1.0, color="grey", linewidth=0.8, linestyle="--")
    axis.set_yticks(positions, names, fontsize=7)
    axis.invert_yaxis()
    axis.set_xlabel("speed-up of the spconv backend's layer over the faster masked layout (x)")
    axis.legend(fontsize=8)
    settings = record["settings"]
    axis.set_title(
        f"{settings['model']} layers, batch {settings['batch_size']}, input {settings['input_size']}, "
        f"mask ratio {settings['mask_ratio']}",
        fontsize=9,
    )
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path
