"""Markdown tables of a benchmark result (the dictionary written to the JSON file)."""

from __future__ import annotations

from typing import Any

__all__ = ["markdown"]

_STEP_COLUMNS = {
    "a_plain": "(a) plain",
    "b_multiview": "(b) views, cls only",
    "c_consistency": "(c) views + consistency",
    "d_multiscale": "(d) + side heads (MSAC)",
    "e_gradcam": "(e) (c) with Grad-CAM maps",
}


def _ms(seconds: float) -> str:
    ms = seconds * 1e3
    if ms >= 100:
        return f"{ms:.0f}"
    if ms >= 10:
        return f"{ms:.1f}"
    if ms >= 1:
        return f"{ms:.2f}"
    return f"{ms:.3f}"


def _time(stats: dict[str, Any]) -> str:
    """Median [q1-q3] in ms."""
    return f"{_ms(stats['median'])} [{_ms(stats['q1'])}-{_ms(stats['q3'])}]"


def _ratio(stats: dict[str, Any]) -> str:
    return f"{stats['median']:.3f} [{stats['q1']:.3f}-{stats['q3']:.3f}]"


def _mib(memory: dict[str, Any] | None) -> str:
    if not memory or memory.get("call_peak_bytes") is None:
        return "n/a"
    text = f"{memory['call_peak_bytes'] / 2**20:.1f}"
    if memory.get("peak_bytes") is not None:
        text += f" ({memory['peak_bytes'] / 2**20:.0f})"
    return text


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(" --- " for _ in header) + "|",
        *("| " + " | ".join(row) + " |" for row in rows),
        "",
    ]


def _header(result: dict[str, Any]) -> list[str]:
    env = result["environment"]
    machine = f"{env['cpu']}, {env['cpu_count']} logical CPUs, torch threads {env['torch_threads']}"
    if "gpu" in env:
        machine = (
            f"{env['gpu']} ({env['gpu_memory_gib']} GiB, CUDA {env['cuda']}, cuDNN {env['cudnn']}); host {machine}"
        )
    load = result["load_average"]
    return [
        f"Run {env['date_utc']} on {machine}; {env['platform']}.",
        (
            f"Python {env['python']}, torch {env['torch']}, torchvision {env['torchvision']}, "
            f"kornia {env['kornia']}, attn_consistency {env['attn_consistency']}."
        ),
        f"Load average (1/5/15 min) at start {load['start']}, at end {load['end']}.",
        "",
        f"Command: `{result['command']}`",
        "",
    ]


def _step_tables(steps: list[dict[str, Any]]) -> list[str]:
    rounds = steps[0]["variants"]["a_plain"]["n"]
    with_process = all("process_ratios" in step for step in steps)
    lines = [
        f"### Training step: wall ms per step, median [IQR] over {rounds} alternating rounds",
        "",
        (
            "Ratios: ratio of the medians; then the median [IQR] of the round-by-round ratios. "
            "Pixels: input pixels of (b) over (a), the compute ratio the extra views should cost."
        ),
        "",
    ]
    names = [name for name in _STEP_COLUMNS if all(name in step["variants"] for step in steps)]
    multiscale = "d_multiscale" in names
    header = ["case", *(_STEP_COLUMNS[name] for name in names), "(c)/(b)", "(b)/(a)", "pixels (b)/(a)"]
    header += ["(d)/(c)"] if multiscale else []
    header += ["(e)/(c)"] if "e_gradcam" in names else []
    lines += _table(header, [_step_row(step, names, "ratios", "paired_ratios", None) for step in steps])
    if with_process:
        lines += [
            (
                "The same steps in process CPU time (all threads; does not count waiting for a core on a "
                "shared machine), ms:"
            ),
            "",
        ]
        lines += _table(
            header, [_step_row(step, names, "process_ratios", "process_paired_ratios", "process") for step in steps]
        )
    methods = sorted({step["variants"][name]["memory"]["method"] for step in steps for name in names})
    lines += [
        "Peak memory of one step, MiB above what was allocated when the step started "
        "(absolute peak in parentheses where known); measured with " + ", ".join(methods) + ".",
        "",
    ]
    rows = [[step["label"], *(_mib(step["variants"][name]["memory"]) for name in names)] for step in steps]
    lines += _table(["case", *(_STEP_COLUMNS[name] for name in names)], rows)
    return lines


def _loss_tables(loss: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    if loss["scale_term"]:
        rounds = loss["scale_term"][0]["variants"]["closed_form"]["n"]
        lines += [
            f"### Scale term alone: ms, median [IQR] over {rounds} alternating rounds",
            "",
            (
                "N maps of h x w against N maps of h' x w'. Closed form: `scale_consistency(m, m_t).mean()`; "
                'API: `attention_consistency(m, m_t, "scale")` (adds argument and finiteness checks); '
                "materialised: nearest `F.interpolate` of both to the LCM grid + `mse_loss`."
            ),
            "",
        ]
        rows = [
            [
                entry["label"],
                entry["direction"],
                _time(entry["variants"]["closed_form"]),
                _time(entry["variants"]["attention_consistency"]),
                _time(entry["variants"]["materialised_lcm"]),
                f"{entry['speedups']['closed_form']:.1f}x / {entry['speedups']['attention_consistency']:.1f}x",
            ]
            for entry in loss["scale_term"]
        ]
        header = ["maps", "pass", "closed form", "API", "materialised LCM", "materialised / (closed, API)"]
        lines += _table(header, rows)
    if loss["consistency"]:
        timed = [entry for entry in loss["consistency"] if "skipped" not in entry]
        rounds = timed[0]["variants"]["library"]["n"] if timed else 0
        lines += [
            f"### Four-view consistency from features, forward + backward: ms, median [IQR] over {rounds} rounds",
            "",
            (
                "Heatmaps of (original, flip) at two sizes from the pooled features (2N maps per size), two flip "
                "terms and the scale term, plus the GAP-FC forward for the logits in both. Library: CAMHook + "
                "`attention_consistency`; authors: broadcast-multiply-and-sum heatmaps, `grid_sample` flip, LCM "
                "`F.interpolate` scale. Values and gradients are checked equal first (max relative error shown). "
                "N is reduced where the authors' broadcast tensor would not fit the memory cap."
            ),
            "",
        ]
        rows = []
        for entry in loss["consistency"]:
            if "skipped" in entry:
                rows.append([entry["label"], "skipped", entry["skipped"], "", "", ""])
                continue
            library, authors = entry["variants"]["library"], entry["variants"]["authors"]
            rows.append(
                [
                    entry["label"],
                    _time(library),
                    _time(authors),
                    f"{entry['speedup']:.1f}x; {_ratio(entry['paired_speedup'])}",
                    f"{_mib(library['memory'])} / {_mib(authors['memory'])}",
                    f"{entry['max_relative_error']:.1e}",
                ]
            )
        header = ["shape", "library", "authors", "authors / library", "peak MiB library / authors", "max rel. error"]
        lines += _table(header, rows)
    return lines


def markdown(result: dict[str, Any]) -> str:
    """The result as markdown: a header (machine, versions, load, command) and one table per part."""
    lines = [f"## `{result['settings']['preset']}` preset", "", *_header(result)]
    if result["step"]:
        lines += _step_tables(result["step"])
    lines += _loss_tables(result["loss"])
    return "\n".join(lines)


def _step_row(step: dict, names: list[str], ratios_key: str, paired_key: str, clock: str | None) -> list[str]:
    """One table row: the variants' times, then the ratios (wall clock or process time)."""
    ratios, paired = step[ratios_key], step[paired_key]
    timings = (step["variants"][name] if clock is None else step["variants"][name][clock] for name in names)
    return [
        step["label"],
        *(_time(t) for t in timings),
        f"{ratios['c/b']:.3f}; {_ratio(paired['c/b'])}",
        f"{ratios['b/a']:.2f}; {_ratio(paired['b/a'])}",
        f"{step['pixel_ratio']:.2f}",
        *([f"{ratios['d/c']:.2f}; {_ratio(paired['d/c'])}"] if "d/c" in ratios else []),
        *([f"{ratios['e/c']:.2f}; {_ratio(paired['e/c'])}"] if "e/c" in ratios else []),
    ]
