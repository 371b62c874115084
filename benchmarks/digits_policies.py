"""Accuracy vs epoch and vs hardware cycles for wop, sync-1f1b and async on digits.

Runs ``configs/digits-analog.yaml`` (4-stage analog FCN, soft-bounds τ=1) under each policy,
for the analog-sgd rule and for digital-sgd, and plots test accuracy against epochs (sample
efficiency) and against cost-model cycles (what a pipelined accelerator would take: the
asynchronous pipeline of arXiv 2410.15155 needs fewer cycles for the same epochs).
Run::

    PYTHONPATH=. .venv/bin/python benchmarks/digits_policies.py

writes ``benchmarks/results/digits_policies.json`` and ``docs/img/digits_policies.png``.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

from aimcpipe.launch.train import train

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("wop", "sync-1f1b", "async")
RULES = ("analog-sgd", "digital-sgd")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "digits-analog.yaml"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--img", type=Path, default=ROOT / "docs" / "img" / "digits_policies.png")
    args = parser.parse_args()
    runs = []
    for rule, policy in itertools.product(RULES, POLICIES):
        result = train(
            args.config,
            overrides=[f"analog.rule={rule}", f"pipeline.policy={policy}"],
            progress=False,
        )
        metrics = result.to_dict()
        runs.append({"rule": rule, "policy": policy, "metrics": metrics, "history": result.history})
        final = metrics["final"]
        print(
            f"{rule:12s} {policy:10s} test acc {100 * final['test_accuracy']:6.2f}%  "
            f"train loss {final['train_loss']:.4f}  cycles {metrics['cycles']['makespan']}  "
            f"wall {metrics['measured']['wall_s']:.1f}s"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "benchmark": "digits_policies",
        "command": "PYTHONPATH=. .venv/bin/python benchmarks/digits_policies.py",
        "config": "configs/digits-analog.yaml",
        "runs": runs,
    }
    (args.out / "digits_policies.json").write_text(json.dumps(record, indent=2) + "\n")
    plot(runs, args.img)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    colors = {"wop": "tab:gray", "sync-1f1b": "tab:blue", "async": "tab:red"}
    for run in runs:
        hist = run["history"]
        epochs = [h["epoch"] for h in hist]
        acc = [100 * h["test_accuracy"] for h in hist]
        cycles = list(itertools.accumulate(h["cycles"] for h in hist))
        style = "-" if run["rule"] == "analog-sgd" else ":"
        label = f"{run['policy']} ({run['rule']})"
        axes[0].plot(epochs, acc, style, color=colors[run["policy"]], label=label)
        axes[1].plot(cycles, acc, style, color=colors[run["policy"]], label=label)
    axes[0].set_xlabel("epoch")
    axes[0].set_ylabel("test accuracy (%)")
    axes[1].set_xlabel("cycles (cost model F=B=U=1)")
    axes[1].set_xscale("log")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.suptitle("digits, analog FCN in 4 stages (soft-bounds τ=1)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
