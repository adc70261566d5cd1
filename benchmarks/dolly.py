"""Federated quality on real data: every method on the 8-client Dolly split, over several seeds.

Runs `florist-mpi run` once per (LoRA-rank variant, method, seed) on the paper's 8-client
Dolly split (../shared/data/dolly-8clients) and reads the logs:

- the base is one proxy model for every run: a tiny Llama (`model.seed` 0) pretrained
  centrally on the instructions, as plain text (no template, no contexts, no responses:
  `model.warmup_text: instructions`), of a share of every client's records that the clients
  then never train on (`model.warmup_data: held_out`), built once and cached; federated LoRA
  fine-tuning (every linear layer of the decoder blocks) then teaches it to answer;
- a seed (`run.seed`) fixes the LoRA initialisation and every client's data order, so two
  methods at the same seed differ only in how they aggregate: differences are paired;
- every method: FLoRIST at τ ∈ {0.8, 0.9, 0.95, 1.0}, FedIT, FLoRA, FlexLoRA, FFA-LoRA;
- two variants: heterogeneous ranks [16, 8, 8, 4, 4, 4, 2, 2] and homogeneous rank 8.

Prints (and writes to OUT/table.md) one table per variant with mean ± std over seeds of the
final eval loss, the paired differences to FLoRA and FedIT, traffic and aggregation time;
writes OUT/results.json and the loss-vs-cumulative-downlink figure OUT/loss_vs_downlink.png.
A finished run is reused when the script is run again with the same settings, so an
interrupted benchmark resumes where it stopped. `--readme` puts the tables into README.md
(between the dolly-benchmark markers) and copies the figure to docs/.

    python benchmarks/dolly.py [--seeds 3] [--variants heterogeneous,homogeneous] [--ranks 2] [--readme]
    python benchmarks/dolly.py --quick      # a smoke run: 1 seed, 2 rounds, 5 local steps
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import h5py
import numpy as np
from launch import run_labelled

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "dolly-8clients"
SECTION = "dolly-benchmark"  # README markers <!-- SECTION:begin --> ... <!-- SECTION:end -->
FIGURE_IN_DOCS = REPO / "docs" / "dolly_loss_vs_downlink.png"


def figure_in_docs(section: str) -> Path:
    """Where --readme copies the figure: the main section's historical name, else docs/<section>.png."""
    return FIGURE_IN_DOCS if section == SECTION else REPO / "docs" / f"{section}.png"

# (label, federation.method, federation.tau)
METHODS = [
    ("FLoRIST τ=0.8", "florist", 0.8),
    ("FLoRIST τ=0.9", "florist", 0.9),
    ("FLoRIST τ=0.95", "florist", 0.95),
    ("FLoRIST τ=1.0", "florist", 1.0),
    ("FedIT", "fedit", 1.0),
    ("FLoRA", "flora", 1.0),
    ("FlexLoRA", "flexlora", 1.0),
    ("FFA-LoRA", "ffa", 1.0),
    ("FedEx-LoRA", "fedex", 1.0),
    ("HetLoRA", "hetlora", 1.0),
]
REFERENCES = ("fedit", "flora")  # every table's paired differences are taken against these
VARIANTS = {
    "heterogeneous": {"lora.ranks": "[16,8,8,4,4,4,2,2]", "lora.alpha": "2r"},
    "homogeneous": {"lora.ranks": "null", "lora.rank": 8, "lora.alpha": "2r"},
}
TARGET = "FLoRIST τ=0.9"
# every linear layer of the decoder blocks (not the embeddings or the output layer)
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class RunSummary:
    """What one run's log says, in per-client, per-round units."""

    initial: float  # eval loss of the base, before round 1
    losses: list[float]  # eval loss after every round
    down: list[float]  # downlink parameters per client, every round
    up: float  # uplink parameters per client per round (mean)
    rank: float  # mean global rank over modules and rounds
    agg_ms: float  # median aggregation time per round

    @property
    def final(self) -> float:
        return self.losses[-1]


def mean_downlink(summaries: list[RunSummary]) -> float:
    """Downlink parameters per client per round, mean over rounds and seeds."""
    return float(np.mean([np.mean(s.down) for s in summaries]))


# ---------------------------------------------------------------------- running


def base_settings(args) -> dict:
    """Settings every run shares: the proxy base model, data, training budget."""
    return {
        "run.rounds": args.rounds,
        "federation.num_clients": 8,
        "model.seed": 0,
        "model.tiny.hidden_size": args.hidden,
        "model.tiny.intermediate_size": 2 * args.hidden,
        "model.tiny.num_hidden_layers": args.layers,
        "model.tiny.num_attention_heads": 4,
        "model.tiny.vocab_size": 2048,
        "model.warmup_steps": args.warmup_steps,
        "model.warmup_lr": 0.003,
        "model.warmup_data": "held_out",
        "model.warmup_fraction": args.warmup_fraction,
        "model.warmup_text": "instructions",
        "lora.target_modules": f"[{','.join(TARGET_MODULES)}]",
        "data.source": "json",
        "data.path": str(DATA),
        "data.max_length": 128,
        "train.local_steps": args.local_steps,
        "train.micro_batch_size": 8,
        "train.lr": args.lr,
        "eval.every": 1,
        "eval.batch_size": 40,
        "log.client_adapters": "false",
    }


def run_settings(args, variant: str, method: str, tau: float, seed: int, output: Path) -> dict:
    return {
        **base_settings(args),
        **VARIANTS[variant],
        "run.seed": seed,
        "run.output": output,
        "federation.method": method,
        "federation.tau": tau,
    }


def log_path(out_dir: Path, variant: str, label: str, seed: int) -> Path:
    name = label.replace(" ", "_").replace("τ=", "tau").replace("-", "")
    return out_dir / variant / f"{name}_seed{seed}.h5"


def run_or_reuse(
    args, variant: str, label: str, method: str, tau: float, seed: int, out_dir: Path
) -> tuple[Path, float]:
    """(the run's log, the run's wall seconds); runs only when no finished log with the same settings exists."""
    output = log_path(out_dir, variant, label, seed)
    settings = json.loads(json.dumps(run_settings(args, variant, method, tau, seed, output), default=str))
    stamp = output.with_name(output.name + ".settings.json")
    if output.is_file() and stamp.is_file():
        done = json.loads(stamp.read_text())
        if done["settings"] == settings:
            print(f"  {variant} {label} seed {seed}: reused {output}", flush=True)
            return output, done["wall_s"]
    output.parent.mkdir(parents=True, exist_ok=True)
    stamp.unlink(missing_ok=True)
    wall = run_labelled(f"{variant} {label} seed {seed}", "configs/demo.yaml", settings, args.ranks, REPO)
    stamp.write_text(json.dumps({"settings": settings, "wall_s": wall}))  # last: only a finished run is reused
    return output, wall


def summarise(log: Path) -> RunSummary:
    with h5py.File(log, "r") as handle:
        rounds = [handle["rounds"][k] for k in sorted(handle["rounds"].keys())]
        num_clients = int(handle.attrs["num_clients"])
        # bytes of float32 parameters: downlink counts every client, uplink the clients kept
        down = [r.attrs["bytes_down"] / 4 / num_clients for r in rounds]
        kept = [len(r["clients/id"]) - len(r["clients/excluded"]) for r in rounds]
        up = [r.attrs["bytes_up"] / 4 / k for r, k in zip(rounds, kept)]
        ranks = [np.mean([r["global"][m].attrs["rank"] for m in r["global"]]) for r in rounds]
        return RunSummary(
            initial=float(handle.attrs["initial_eval_loss"]),
            losses=[float(r.attrs["eval_loss"]) for r in rounds],
            down=[float(d) for d in down],
            up=float(np.mean(up)),
            rank=float(np.mean(ranks)),
            agg_ms=1000 * float(np.median([r.attrs["time_aggregate"] for r in rounds])),
        )


# ---------------------------------------------------------------------- statistics


# Two-sided 95% quantiles of Student's t by degrees of freedom (standard tables); above 30 the
# value at 30 is used, which slightly widens the interval.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def confidence_interval(values) -> tuple[float, float] | None:
    """95% t interval of the mean over seeds; None for a single seed (no spread to judge against)."""
    values = np.asarray(values, dtype=np.float64)
    if len(values) < 2:
        return None
    mean, std = mean_std(values)
    half = T_975[min(len(values) - 1, len(T_975)) - 1] * std / np.sqrt(len(values))
    return mean - half, mean + half


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def fmt(values, digits: int = 4, unit: str = "") -> str:
    """`mean ± std` over seeds; a single seed has no spread, so it shows the value alone."""
    mean, std = mean_std(values)
    if len(values) < 2:
        return f"{mean:.{digits}f}{unit}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}{unit}"


def paired(runs: dict[str, list[RunSummary]], label: str, reference: str) -> np.ndarray:
    """Per-seed final-loss differences label − reference (same seed = same data order and LoRA init)."""
    return np.array([a.final - b.final for a, b in zip(runs[label], runs[reference])])


def relative(runs: dict[str, list[RunSummary]], label: str, reference: str) -> np.ndarray:
    """Per-seed relative final-loss differences in percent."""
    return np.array([100 * (a.final / b.final - 1) for a, b in zip(runs[label], runs[reference])])


def variant_table(variant: str, runs: dict[str, list[RunSummary]]) -> list[str]:
    seeds = len(runs["FLoRA"])
    initial = runs["FLoRA"][0].initial
    fedit_down = mean_downlink(runs["FedIT"])
    lines = [
        f"**{variant} LoRA ranks** ({seeds} seed{'s' if seeds > 1 else ''}; initial eval loss {initial:.4f}, "
        "the same base for every run)",
        "",
        "| method | final eval loss | learned (nats) | vs FLoRA (paired) | vs FedIT (paired, nats) "
        "| mean global rank | downlink params/client/round | uplink params/client/round "
        "| FedIT downlink / this | aggregation ms |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for label, summaries in runs.items():
        finals = [s.final for s in summaries]
        down = mean_downlink(summaries)
        vs_flora = "—" if label == "FLoRA" else fmt(relative(runs, label, "FLoRA"), 2, "%")
        vs_fedit = "—" if label == "FedIT" else fmt(paired(runs, label, "FedIT"), 4)
        lines.append(
            f"| {label} | {fmt(finals)} | {fmt([s.initial - s.final for s in summaries], 3)} | {vs_flora} "
            f"| {vs_fedit} | {np.mean([s.rank for s in summaries]):.1f} | {down:,.0f} "
            f"| {np.mean([s.up for s in summaries]):,.0f} | {fedit_down / down:.2f}x "
            f"| {fmt([s.agg_ms for s in summaries], 1)} |"
        )
    return lines


def judged(values, holds: Callable[[float, float], bool], fails: Callable[[float, float], bool]) -> str:
    """met / NOT met / inconclusive: whether the 95% interval of the mean over seeds lies where the
    target holds, where it fails, or across the line. One seed has no interval: its value decides."""
    interval = confidence_interval(values)
    low, high = interval if interval is not None else (float(np.mean(values)),) * 2
    if holds(low, high):
        return "met"
    if fails(low, high):
        return "NOT met"
    return "inconclusive"


def verdict_lines(variant: str, runs: dict[str, list[RunSummary]]) -> list[str]:
    """The three FLoRIST τ = 0.9 targets, judged seed by seed and by the 95% interval over seeds."""
    seeds = len(runs[TARGET])
    vs_fedit = paired(runs, TARGET, "FedIT")
    vs_flora = relative(runs, TARGET, "FLoRA")
    saving = mean_downlink(runs["FedIT"]) / mean_downlink(runs[TARGET])
    below_fedit = judged(vs_fedit, lambda low, high: high <= 0, lambda low, high: low > 0)
    near_flora = judged(vs_flora, lambda low, high: -1 <= low and high <= 1, lambda low, high: low > 1 or high < -1)

    def interval(values, digits: int, unit: str) -> str:
        bounds = confidence_interval(values)
        return "one seed, no interval" if bounds is None else f"95% interval [{bounds[0]:+.{digits}f}, " \
            f"{bounds[1]:+.{digits}f}]{unit}"

    return [
        f"- {variant}: eval loss ≤ FedIT's: **{below_fedit}** (paired difference {fmt(vs_fedit)} nats, "
        f"{interval(vs_fedit, 4, ' nats')}, at or below FedIT at {int((vs_fedit <= 0).sum())}/{seeds} seeds); "
        f"within 1% of FLoRA: **{near_flora}** ({fmt(vs_flora, 2, '%')}, {interval(vs_flora, 2, '%')}, "
        f"{int((np.abs(vs_flora) <= 1).sum())}/{seeds} seeds within 1%); "
        f"≥ 3× less downlink than FedIT: **{'met' if saving >= 3 else 'NOT met'}** ({saving:.2f}×)",
    ]


# ---------------------------------------------------------------------- outputs


def plot(results: dict[str, dict[str, list[RunSummary]]], path: Path) -> None:
    """Eval loss vs cumulative downlink per client, mean over seeds with a ± std band; one panel per variant."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(6.5 * len(results), 4.6), squeeze=False)
    for ax, (variant, runs) in zip(axes[0], results.items()):
        for label, summaries in runs.items():
            x = np.mean([np.concatenate([[0.0], np.cumsum(s.down)]) for s in summaries], axis=0)
            y = np.array([[s.initial, *s.losses] for s in summaries])
            mean, std = y.mean(axis=0), (y.std(axis=0, ddof=1) if len(y) > 1 else np.zeros(y.shape[1]))
            style = "-" if label.startswith("FLoRIST") else "--"
            marker = "x" if label == "FLoRA" else "o"  # FLoRA and FLoRIST τ=1.0 coincide: both stay visible
            (line,) = ax.plot(x / 1e3, mean, style, marker=marker, markersize=4, label=label)
            ax.fill_between(x / 1e3, mean - std, mean + std, color=line.get_color(), alpha=0.15, linewidth=0)
        ax.set_title(f"Dolly, 8 clients, {variant} LoRA ranks ({len(summaries)} seed(s), band: ± std)", fontsize=10)
        ax.set_xlabel("cumulative downlink per client (thousand parameters)")
        ax.set_ylabel("held-out eval loss (nats)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def replace_readme_section(markdown: str, section: str) -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    begin, end = f"<!-- {section}:begin -->", f"<!-- {section}:end -->"
    if begin not in text or end not in text:
        sys.exit(f"README.md lacks the {begin} ... {end} markers: add them where the table goes")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    readme.write_text(f"{head}{begin}\n{markdown}\n{end}{tail}")


def command_line(args, parser: argparse.ArgumentParser) -> str:
    """The benchmark's command with every setting that differs from its default (output folder aside)."""
    changed = [
        f"--{name.replace('_', '-')} {value}"
        for name, value in sorted(vars(args).items())
        if name not in ("out", "readme", "quick", "section", "rows") and value != parser.get_default(name)
    ]
    return " ".join([".venv/bin/python benchmarks/dolly.py", *changed])


def report(args, parser, results, minutes: float) -> str:
    """The markdown the benchmark prints, writes to table.md and (with --readme) puts in README.md."""
    lines = [
        f"Measured with `{command_line(args, parser)}` ({len(results) * len(args.rows) * args.seeds} runs on "
        f"{args.ranks} MPI rank(s), {minutes:.0f} minutes summed over the runs on the 2-core CPU machine). A figure "
        "is the mean ± sample standard deviation over run seeds (one base model throughout); a paired difference is "
        "taken seed by seed before its mean and spread; a target is met when the 95% t interval of the mean over "
        "seeds lies on its side, NOT met when it lies on the other, inconclusive when it straddles the line.",
        "",
    ]
    for variant, runs in results.items():
        lines += [*variant_table(variant, runs), ""]
    if any(label == TARGET for label, _, _ in args.rows):
        lines += ["Targets for FLoRIST at τ = 0.9:", ""]
        for variant, runs in results.items():
            lines += verdict_lines(variant, runs)
        lines += [""]
    lines += [f"![eval loss vs cumulative downlink]({figure_in_docs(args.section).relative_to(REPO)})"]
    return "\n".join(lines)


# ---------------------------------------------------------------------- main


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0 .. N-1 (default 3)")
    parser.add_argument("--variants", default="heterogeneous,homogeneous", help="comma-separated LoRA-rank variants")
    parser.add_argument("--ranks", type=int, default=2, help="MPI ranks per run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=60)
    parser.add_argument("--lr", type=float, default=0.005, help="clients' LoRA learning rate")
    parser.add_argument("--hidden", type=int, default=128, help="proxy model hidden size (MLP: twice that)")
    parser.add_argument("--layers", type=int, default=2, help="proxy model decoder layers")
    parser.add_argument("--warmup-steps", type=int, default=1000, help="central warm-up steps of the proxy model")
    parser.add_argument("--warmup-fraction", type=float, default=0.2, help="share of client data set aside for it")
    parser.add_argument("--out", default="runs/bench-dolly")
    parser.add_argument("--methods", default="", help="comma-separated federation.method names to run (default: all; "
                        "FedIT and FLoRA, the paired references, are always included)")
    parser.add_argument("--readme", action="store_true", help="put the tables into README.md, the figure into docs/")
    parser.add_argument("--section", default=SECTION,
                        help="README section (between <!-- SECTION:begin/end --> markers) that --readme replaces")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1 seed, 2 rounds, 5 local steps")
    args = parser.parse_args()
    if args.quick and args.readme:
        parser.error("--readme puts the figures into README.md: run it without --quick")
    if args.quick:
        args.seeds, args.rounds, args.local_steps, args.warmup_steps = 1, 2, 5, 20
        args.out = args.out + "-quick"
    unknown = set(args.variants.split(",")) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s) {sorted(unknown)}: choose from {sorted(VARIANTS)}")
    if args.seeds < 1:
        parser.error("--seeds must be at least 1")
    chosen = set(args.methods.split(",")) - {""} if args.methods else {method for _, method, _ in METHODS}
    unknown = chosen - {method for _, method, _ in METHODS}
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}: choose from {sorted({m for _, m, _ in METHODS})}")
    args.rows = [row for row in METHODS if row[1] in chosen | set(REFERENCES)]
    return args, parser


def main() -> None:
    args, parser = parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} not found: this benchmark needs the shared Dolly split beside the checkout")
    out_dir = REPO / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    variants = args.variants.split(",")
    print(
        f"Dolly, 8 clients, proxy tiny Llama (h={args.hidden}, {args.layers} layers, warm-up {args.warmup_steps} "
        f"steps on the instructions of {args.warmup_fraction:.0%} of every client's records, set aside), "
        f"LoRA on {','.join(TARGET_MODULES)}, α=2r, "
        f"{args.rounds} rounds x {args.local_steps} local steps, lr {args.lr}, seeds 0..{args.seeds - 1}, "
        f"variants {variants}, {args.ranks} MPI ranks",
        flush=True,
    )
    results: dict[str, dict[str, list[RunSummary]]] = {}
    # seed-major order: an interrupted benchmark has whole seeds to show
    done = {
        (variant, label, seed): run_or_reuse(args, variant, label, method, tau, seed, out_dir)
        for seed in range(args.seeds)
        for variant in variants
        for label, method, tau in args.rows
    }
    for variant in variants:
        results[variant] = {
            label: [summarise(done[variant, label, seed][0]) for seed in range(args.seeds)] for label, _, _ in args.rows
        }
    # the runs' own wall times, so that a resumed benchmark still states what all of it cost
    minutes = sum(wall for _, wall in done.values()) / 60
    plot(results, out_dir / "loss_vs_downlink.png")
    markdown = report(args, parser, results, minutes)
    (out_dir / "table.md").write_text(markdown + "\n")
    (out_dir / "results.json").write_text(json.dumps(
        {v: {label: [asdict(s) for s in runs] for label, runs in r.items()} for v, r in results.items()}, indent=1
    ))
    print("\n" + markdown)
    if args.readme:
        figure = figure_in_docs(args.section)
        shutil.copyfile(out_dir / "loss_vs_downlink.png", figure)
        replace_readme_section(markdown, args.section)
        print(f"\nREADME.md and {figure.relative_to(REPO)} updated")
    print(f"(benchmark time {minutes:.1f} min summed over its runs, {args.ranks} MPI rank(s); outputs in {out_dir})")


if __name__ == "__main__":
    main()
