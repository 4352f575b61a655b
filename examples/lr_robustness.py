"""Does Lookahead make its inner optimizer less sensitive to the learning rate? (digits)

Zhang et al. 2019 (arXiv 1907.08610, the robustness study on CIFAR) report that Lookahead
makes its inner optimizer less sensitive to its hyperparameters, the learning rate among
them: a good final accuracy over a wider range of settings than SGD or Adam alone. This
script checks that claim at laptop scale, with a protocol fixed before any run:

* Data: scikit-learn's digits (1797 8x8 images, ships offline), pixels scaled to [0, 1],
  one stratified 75/25 train/test split (split seed 0, the same for every run).
* Model: MLP 64-128-10 with ReLU (9,610 parameters): a non-convex network that reaches
  about 97 % on digits, small enough that the 96-run sweep takes a few minutes on two CPU
  cores. (A 64-256-256-10 net was tried first and costs about twice as much per step, over
  the 5-minute budget when the cores are shared; the switch was made before any full run
  finished, so no result informed it.)
* Training: minibatches of 64 (22 steps per epoch), 32 epochs = 704 steps, constant
  learning rate, no weight decay, no schedule. 704 is deliberately not a multiple of k = 5:
  the fast weights at the end are 4 inner steps past the last sync, so evaluating them
  beside the slow weights says something (at a multiple of k the two coincide).
* Optimizers: SGD (momentum 0.9) and Adam from torch.optim; LA(SGD) =
  `LookaheadSGD(momentum=0.9, k=5, alpha=0.5)` and LA(Adam) = `LookaheadAdam(k=5,
  alpha=0.5)` from lookahead_fused (backend "auto"). Every optimizer gets the same number of
  inner steps, as in the paper.
* Seeds: a seed fixes the initial weights and the minibatch order, identically for all four
  optimizers, so at a given (lr, seed) they start from the same point and see the same data.
* Learning rates: half-decade grids wide enough that the plain optimizers fail at the top:
  SGD 1e-3 .. 3, Adam 1e-4 .. 3e-1.
* Metrics: final training loss (cross-entropy over the whole training set) and test
  accuracy. Lookahead runs are scored on the slow weights φ (`opt.slow_weights()`):
  Algorithm 1 returns φ and the authors evaluate on it; the fast weights θ are recorded too.
* Divergence: a run whose minibatch loss becomes non-finite stops there and is recorded as
  diverged (accuracy and loss null in the JSON). Summaries count a diverged run as chance
  accuracy (10 %), which is what its NaN classifier scores at best.

Robustness is summarised per optimizer by: the number of grid learning rates whose mean test
accuracy reaches fixed thresholds (90 %, 95 %), the number of grid learning rates in the
contiguous range around the best one that stays within 2 points of it (counted in grid
points, not decades: 1-3-10 steps are 0.48 and 0.52 decades, so a decade width would favour
whichever range happens to start at a 3), the mean accuracy over the grid and the worst mean
accuracy on it. `check_claim` compares each Lookahead optimizer with its inner optimizer on
these and states whether the claim holds, fails or is mixed here.

Run:  python examples/lr_robustness.py --json docs/figures/lr_robustness.json \
          --plot docs/figures/lr_robustness.png
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lookahead_fused import LookaheadAdam, LookaheadSGD

OPTIMIZERS = ("SGD", "LA(SGD)", "Adam", "LA(Adam)")
FAMILY = {"SGD": "sgd", "LA(SGD)": "sgd", "Adam": "adam", "LA(Adam)": "adam"}
LOOKAHEAD_OF = {"sgd": ("SGD", "LA(SGD)"), "adam": ("Adam", "LA(Adam)")}  # (plain, lookahead)
LOOKAHEAD_NAMES = tuple(la for _, la in LOOKAHEAD_OF.values())
NUM_CLASSES = 10
CHANCE = 1.0 / NUM_CLASSES
ACC_THRESHOLDS = (0.90, 0.95)  # "keeps at least X accuracy" counts
WITHIN_BEST = 0.02  # the lr range within 2 accuracy points of the optimizer's own best
TIE = 0.005  # per-lr head-to-head: differences under half a point (~2 test images) are ties


@dataclass(frozen=True)
class Protocol:
    """Everything that defines the experiment; written into the JSON."""

    hidden: tuple[int, ...] = (128,)
    epochs: int = 32
    batch_size: int = 64
    seeds: tuple[int, ...] = (0, 1, 2)
    lrs: dict[str, tuple[float, ...]] = field(
        default_factory=lambda: {
            "sgd": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1, 1.0, 3.0),
            "adam": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1),
        }
    )
    momentum: float = 0.9
    k: int = 5
    alpha: float = 0.5
    test_fraction: float = 0.25
    split_seed: int = 0


QUICK = Protocol(
    epochs=5,
    seeds=(0,),
    lrs={"sgd": (1e-2, 1e-1, 3.0), "adam": (1e-3, 1e-2, 3e-1)},
)


class Data(NamedTuple):
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with `n` torch threads, then restore the previous count. The model is so
    small that one thread is fastest; on shared cores more threads mostly wait on each other."""
    previous = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def load_data(test_fraction: float, split_seed: int) -> Data:
    """Digits as float32 tensors in [0, 1], one stratified split that no training seed moves."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(x / 16.0, y, test_size=test_fraction, random_state=split_seed, stratify=y)
    as_x = lambda a: torch.as_tensor(a, dtype=torch.float32)
    as_y = lambda a: torch.as_tensor(a, dtype=torch.int64)
    return Data(as_x(x_tr), as_y(y_tr), as_x(x_te), as_y(y_te))


def make_model(seed: int, hidden: Sequence[int], in_features: int = 64) -> nn.Module:
    """The MLP with its initial weights drawn from `seed` (torch's default init)."""
    torch.manual_seed(seed)
    widths = (in_features, *hidden)
    layers: list[nn.Module] = []
    for fan_in, fan_out in zip(widths[:-1], widths[1:]):
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(widths[-1], NUM_CLASSES))


def make_optimizer(name: str, params: Iterable[Tensor], lr: float, protocol: Protocol) -> torch.optim.Optimizer:
    """One of OPTIMIZERS; the Lookahead ones through lookahead_fused's public API."""
    la = dict(k=protocol.k, alpha=protocol.alpha)
    factories: dict[str, Callable[[], torch.optim.Optimizer]] = {
        "SGD": lambda: torch.optim.SGD(params, lr=lr, momentum=protocol.momentum),
        "LA(SGD)": lambda: LookaheadSGD(params, lr=lr, momentum=protocol.momentum, **la),
        "Adam": lambda: torch.optim.Adam(params, lr=lr),
        "LA(Adam)": lambda: LookaheadAdam(params, lr=lr, **la),
    }
    return factories[name]()


def train(
    model: nn.Module, optimizer: torch.optim.Optimizer, data: Data, epochs: int, batch_size: int, seed: int
) -> tuple[int, bool]:
    """Minibatch training for a fixed number of epochs; the minibatch order comes from `seed`
    alone, so every optimizer sees the same batches. Returns (minibatches seen, diverged):
    training stops at the first minibatch whose loss is not finite."""
    order = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    step = 0
    for _ in range(epochs):
        perm = torch.randperm(n, generator=order)
        for start in range(0, n, batch_size):
            idx = perm[start : start + batch_size]
            step += 1
            loss = F.cross_entropy(model(data.x_train[idx]), data.y_train[idx])
            if not math.isfinite(loss.item()):
                return step, True
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return step, False


@torch.no_grad()
def evaluate(model: nn.Module, data: Data) -> tuple[float, float]:
    """(cross-entropy over the whole training set, test accuracy) of the current weights."""
    train_loss = F.cross_entropy(model(data.x_train), data.y_train).item()
    test_acc = (model(data.x_test).argmax(dim=1) == data.y_test).double().mean().item()
    return train_loss, test_acc


def finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def run_one(name: str, lr: float, seed: int, data: Data, protocol: Protocol) -> dict[str, Any]:
    """Train one (optimizer, lr, seed) and score it: the slow weights for Lookahead (the
    fast weights under "fast"), the only weights otherwise."""
    start = time.perf_counter()
    model = make_model(seed, protocol.hidden, data.x_train.shape[1])
    optimizer = make_optimizer(name, model.parameters(), lr, protocol)
    steps, diverged = train(model, optimizer, data, protocol.epochs, protocol.batch_size, seed)
    run: dict[str, Any] = dict(optimizer=name, lr=lr, seed=seed, steps=steps)
    lookahead = isinstance(optimizer, (LookaheadSGD, LookaheadAdam))
    if lookahead:
        run["backend"] = optimizer.backend
    loss, acc = (math.nan, math.nan) if diverged else evaluate(model, data)
    if lookahead and not diverged:
        run["fast"] = dict(train_loss=finite_or_none(loss), test_acc=finite_or_none(acc))
        with optimizer.slow_weights():
            loss, acc = evaluate(model, data)
    run["diverged"] = not math.isfinite(loss)
    run["train_loss"] = None if run["diverged"] else loss
    run["test_acc"] = None if run["diverged"] else acc
    run["seconds"] = time.perf_counter() - start
    return run


def sweep(protocol: Protocol, data: Data, log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    runs = []
    for name in OPTIMIZERS:
        for lr in protocol.lrs[FAMILY[name]]:
            for seed in protocol.seeds:
                runs.append(run_one(name, lr, seed, data, protocol))
        log(f"  {name:9s} done ({sum(r['seconds'] for r in runs if r['optimizer'] == name):.1f} s)")
    return runs


# ------------------------------------------------------------------------------------------
# Aggregation and the claim check
# ------------------------------------------------------------------------------------------


def scored_acc(run: dict[str, Any]) -> float:
    """Test accuracy with a diverged run counted at chance."""
    return CHANCE if run["diverged"] else run["test_acc"]


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(values) > 1 else 0.0)


def per_lr(runs: list[dict[str, Any]], name: str, lrs: Sequence[float]) -> list[dict[str, Any]]:
    """For each lr: accuracy mean/std/min/max over seeds (diverged = chance), loss mean/std
    /min/max over the seeds that did not diverge, the number of diverged seeds, and the same
    accuracy statistics for Lookahead's fast weights where recorded."""
    rows = []
    for lr in lrs:
        mine = [r for r in runs if r["optimizer"] == name and r["lr"] == lr]
        accs = [scored_acc(r) for r in mine]
        losses = [r["train_loss"] for r in mine if not r["diverged"]]
        acc_mean, acc_std = mean_std(accs)
        row: dict[str, Any] = dict(
            lr=lr,
            acc_mean=acc_mean,
            acc_std=acc_std,
            acc_min=min(accs),
            acc_max=max(accs),
            diverged=sum(r["diverged"] for r in mine),
            seeds=len(mine),
        )
        if losses:
            row["loss_mean"], row["loss_std"] = mean_std(losses)
            row["loss_min"], row["loss_max"] = min(losses), max(losses)
        if name in LOOKAHEAD_NAMES:
            fast = [r["fast"]["test_acc"] if r.get("fast", {}).get("test_acc") is not None else CHANCE for r in mine]
            row["fast_acc_mean"] = mean_std(fast)[0]
        rows.append(row)
    return rows


def robustness(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """The robustness numbers of one optimizer from its per-lr rows."""
    accs = [row["acc_mean"] for row in rows]
    best = max(range(len(rows)), key=lambda i: accs[i])
    lo = hi = best
    while lo > 0 and accs[lo - 1] >= accs[best] - WITHIN_BEST:
        lo -= 1
    while hi < len(rows) - 1 and accs[hi + 1] >= accs[best] - WITHIN_BEST:
        hi += 1
    return dict(
        best_lr=rows[best]["lr"],
        best_acc=accs[best],
        within_best_lrs=[rows[i]["lr"] for i in range(lo, hi + 1)],
        n_within_best=hi - lo + 1,
        **{f"n_ge_{round(t * 100)}": sum(a >= t for a in accs) for t in ACC_THRESHOLDS},
        lrs_ge_95=[row["lr"] for row in rows if row["acc_mean"] >= 0.95],
        mean_acc=sum(accs) / len(accs),
        worst_acc=min(accs),
        worst_run_acc=min(row["acc_min"] for row in rows),
        diverged_runs=sum(row["diverged"] for row in rows),
        runs=sum(row["seeds"] for row in rows),
        grid_points=len(rows),
    )


# (key, label, formatter); larger is more robust for each.
CRITERIA: tuple[tuple[str, str, Callable[[float], str]], ...] = (
    *((f"n_ge_{round(t * 100)}", f"lrs with mean acc >= {t:.0%}", lambda v: f"{v:d}") for t in ACC_THRESHOLDS),
    ("n_within_best", f"contiguous lrs within {WITHIN_BEST * 100:.0f} pts of own best", lambda v: f"{v:d}"),
    ("mean_acc", "mean acc over the grid", lambda v: f"{v:.1%}"),
    ("worst_acc", "worst mean acc on the grid", lambda v: f"{v:.1%}"),
)


def check_claim(summary: dict[str, dict[str, Any]], tables: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Compare each Lookahead optimizer with its inner optimizer on every robustness
    criterion and per learning rate. The verdict is "holds" when Lookahead is at least as
    robust on every criterion and strictly more on one, "fails" in the mirror case, "mixed"
    otherwise (including all ties)."""
    verdicts = {}
    for family, (plain, la) in LOOKAHEAD_OF.items():
        comparisons = []
        for key, label, fmt in CRITERIA:
            a, b = summary[la][key], summary[plain][key]
            comparisons.append(
                dict(criterion=label, lookahead=a, plain=b, sign=(a > b) - (a < b), text=(fmt(a), fmt(b)))
            )
        signs = {c["sign"] for c in comparisons}
        verdict = (
            "holds" if signs <= {0, 1} and 1 in signs else "fails" if signs <= {0, -1} and -1 in signs else "mixed"
        )
        deltas = [(x["lr"], x["acc_mean"] - y["acc_mean"]) for x, y in zip(tables[la], tables[plain], strict=True)]
        verdicts[family] = dict(
            plain=plain,
            lookahead=la,
            verdict=verdict,
            criteria=comparisons,
            lookahead_better_at=[lr for lr, d in deltas if d > TIE],
            lookahead_worse_at=[lr for lr, d in deltas if d < -TIE],
            best_acc_delta=summary[la]["best_acc"] - summary[plain]["best_acc"],
        )
    return verdicts


# ------------------------------------------------------------------------------------------
# Output
# ------------------------------------------------------------------------------------------


def acc_cell(row: dict[str, Any]) -> str:
    cell = f"{row['acc_mean'] * 100:5.1f} ± {row['acc_std'] * 100:4.1f}"
    return cell + (f" ({row['diverged']}/{row['seeds']} div)" if row["diverged"] else "")


def loss_cell(row: dict[str, Any]) -> str:
    if "loss_mean" not in row:
        return "diverged"
    return f"{row['loss_mean']:.2e} ± {row['loss_std']:.1e}"


def format_tables(tables: dict[str, list[dict[str, Any]]], protocol: Protocol) -> str:
    """One markdown table per family: rows lr; test accuracy (%) and final train loss,
    mean ± std over seeds, per optimizer; Lookahead's fast-weight accuracy last."""
    out = []
    for plain, la in LOOKAHEAD_OF.values():
        header = [
            "lr",
            f"{plain} acc %",
            f"{la} acc % (φ)",
            f"{plain} train loss",
            f"{la} train loss (φ)",
            f"{la} acc % (θ)",
        ]
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for p, q in zip(tables[plain], tables[la], strict=True):
            fast = f"{q['fast_acc_mean'] * 100:5.1f}" if "fast_acc_mean" in q else "-"
            cells = [f"{p['lr']:g}", acc_cell(p), acc_cell(q), loss_cell(p), loss_cell(q), fast]
            lines.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(lines))
    return "\n\n".join(out)


def format_summary(summary: dict[str, dict[str, Any]], claim: dict[str, Any]) -> str:
    lines = [
        "| optimizer | best lr | best acc | "
        + " | ".join(label for _, label, _ in CRITERIA)
        + " | which lrs >= 95% | worst single run | diverged runs |",
        "|" + "---|" * (6 + len(CRITERIA)),
    ]
    for name in OPTIMIZERS:
        s = summary[name]
        cells = [name, f"{s['best_lr']:g}", f"{s['best_acc']:.1%}"]
        cells += [fmt(s[key]) for key, _, fmt in CRITERIA]
        cells += [fmt_lrs(s["lrs_ge_95"]), f"{s['worst_run_acc']:.1%}", f"{s['diverged_runs']}/{s['runs']}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for c in claim.values():
        n = summary[c["plain"]]["grid_points"]
        parts = [f"{label}: {a} vs {b}" for (label, (a, b)) in ((x["criterion"], x["text"]) for x in c["criteria"])]
        lines.append(
            f"Claim for {c['lookahead']} vs {c['plain']} ({n} learning rates): {c['verdict'].upper()}. "
            + "; ".join(parts)
            + f". Lookahead better (> {TIE * 100:.1f} pts) at lr {fmt_lrs(c['lookahead_better_at'])}, "
            f"worse at lr {fmt_lrs(c['lookahead_worse_at'])}; best accuracy {c['best_acc_delta'] * 100:+.1f} pts."
        )
    return "\n".join(lines)


def fmt_lrs(lrs: Sequence[float]) -> str:
    return "{" + ", ".join(f"{lr:g}" for lr in lrs) + "}" if lrs else "none"


def plot(tables: dict[str, list[dict[str, Any]]], protocol: Protocol, path: Path) -> None:
    """2x2: test accuracy (top) and final train loss (bottom) against lr, SGD family left,
    Adam family right; mean over seeds with a min-max band. Diverged seeds count as chance
    in the accuracy panels; in the loss panels an x on the top edge marks an lr where at
    least one seed diverged (the line uses the seeds that did not)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(11, 7.5), sharex="col")
    styles = {"plain": dict(color="tab:blue", marker="o"), "la": dict(color="tab:orange", marker="s")}
    for col, names in enumerate(LOOKAHEAD_OF.values()):
        ax_acc, ax_loss = axes[0, col], axes[1, col]
        for name, style in zip(names, styles.values()):
            rows = tables[name]
            lrs = [r["lr"] for r in rows]
            label = name + (" (slow weights φ)" if name.startswith("LA") else "")
            ax_acc.plot(lrs, [r["acc_mean"] for r in rows], label=label, **style)
            ax_acc.fill_between(
                lrs, [r["acc_min"] for r in rows], [r["acc_max"] for r in rows], alpha=0.2, color=style["color"]
            )
            ok = [r for r in rows if "loss_mean" in r]
            ax_loss.plot([r["lr"] for r in ok], [r["loss_mean"] for r in ok], label=label, **style)
            ax_loss.fill_between(
                [r["lr"] for r in ok],
                [r["loss_min"] for r in ok],
                [r["loss_max"] for r in ok],
                alpha=0.2,
                color=style["color"],
            )
            bad = [r["lr"] for r in rows if r["diverged"]]
            if bad:
                ax_loss.plot(
                    bad,
                    [1.0] * len(bad),
                    "x",
                    color=style["color"],
                    markersize=10,
                    mew=2,
                    transform=ax_loss.get_xaxis_transform(),
                    clip_on=False,
                    label=f"{name}: a seed diverged",
                )
        ax_acc.axhline(CHANCE, color="grey", lw=0.8, ls=":", label="chance / diverged")
        ax_acc.set(xscale="log", ylim=(0, 1.02), ylabel="test accuracy", title=f"{names[0]} family: test accuracy")
        ax_loss.set(
            xscale="log",
            yscale="log",
            xlabel="learning rate",
            ylabel="final train loss (full set)",
            title=f"{names[0]} family: final training loss",
        )
        for ax in (ax_acc, ax_loss):
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8, loc="best")
    fig.suptitle(
        f"digits, MLP 64-{'-'.join(map(str, protocol.hidden))}-10, {protocol.epochs} epochs, "
        f"batch {protocol.batch_size}, k={protocol.k}, α={protocol.alpha}, "
        f"{len(protocol.seeds)} seed(s): mean and min-max over seeds",
        fontsize=10,
    )
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny grid, 1 seed, 5 epochs (the test)")
    parser.add_argument("--json", type=Path, help="write the runs, summary and claim check here")
    parser.add_argument("--plot", type=Path, help="write the 2x2 figure here (PNG)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny: 1 is fastest)")
    args = parser.parse_args(argv)

    protocol = QUICK if args.quick else Protocol()
    with torch_threads(args.threads):
        start, cpu_start = time.perf_counter(), time.process_time()
        data = load_data(protocol.test_fraction, protocol.split_seed)
        print(f"digits: {len(data.y_train)} train / {len(data.y_test)} test; protocol: {asdict(protocol)}")
        runs = sweep(protocol, data)
        elapsed, cpu_elapsed = time.perf_counter() - start, time.process_time() - cpu_start

    tables = {name: per_lr(runs, name, protocol.lrs[FAMILY[name]]) for name in OPTIMIZERS}
    summary = {name: robustness(tables[name]) for name in OPTIMIZERS}
    claim = check_claim(summary, tables)
    print()
    print(format_tables(tables, protocol))
    print()
    print(format_summary(summary, claim))
    print(f"\n{len(runs)} runs in {elapsed:.1f} s wall, {cpu_elapsed:.1f} s CPU, {args.threads} torch thread(s)")

    results = dict(
        protocol=asdict(protocol),
        evaluation="Lookahead scored on the slow weights (opt.slow_weights()); fast weights under 'fast'",
        diverged_counts_as_accuracy=CHANCE,
        runs=runs,
        per_lr=tables,
        summary=summary,
        claim=claim,
        elapsed_s=elapsed,
        cpu_s=cpu_elapsed,
        torch_threads=args.threads,
        torch_version=torch.__version__,
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=1, allow_nan=False) + "\n")
    if args.plot:
        plot(tables, protocol, args.plot)
    return results


if __name__ == "__main__":
    main()
