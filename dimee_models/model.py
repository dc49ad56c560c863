"""A multi-exit encoder that can run any slice of itself.

Layers are numbered 1..L as in the paper: "exit i" reads the output of layer i. A slice
`run_layers(h, start, end)` runs the 0-based layers `[start, end)`, so mobile is `[0, m)`, edge
`[m, e)` and cloud `[m, L)` or `[e, L)`. A `MultiExitEncoder` may hold only some of the layers
(a tier module); it then refuses to run what it does not hold.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, PretrainedConfig
from transformers.masking_utils import create_bidirectional_mask
from transformers.models.mpnet.modeling_mpnet import MPNetEncoder

SUPPORTED_FAMILIES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet")


@dataclass
class HiddenState:
    """What travels between tiers: the output of layer `layer` and its padding mask."""

    hidden: torch.Tensor  # (B, T, H)
    attention_mask: torch.Tensor  # (B, T), 1 = real token
    layer: int


@dataclass
class ExitOutput:
    """One exit head applied to a batch; every field is per sample."""

    logits: torch.Tensor  # (B, C)
    confidence: torch.Tensor  # (B,) max softmax probability
    prediction: torch.Tensor  # (B,) argmax label id
    pooled: torch.Tensor  # (B, H) masked mean of the layer's tokens; the DIMEE embedding z
    layer: int


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the real tokens of each sample: (B, T, H), (B, T) -> (B, H)."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class ExitHead(nn.Module):
    """Masked mean pooling -> dropout -> linear. Mean pooling, not the shared [CLS] pooler:
    on MiniLM the pooler heads of layers 1-3 stayed at chance (docs/DECISIONS.md, "Model and training")."""

    def __init__(self, hidden_size: int, num_labels: int, dropout: float = 0.1):
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.classifier = nn.Linear(hidden_size, num_labels)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pooled = masked_mean(hidden, mask)  # (B, H)
        return self.classifier(self.dropout(pooled)), pooled  # (B, C), (B, H)


class RelativePositionBias(nn.Module):
    """MPNet's relative-position bias table, shared by all its layers; every tier carries it."""

    relative_position_bucket = staticmethod(MPNetEncoder.relative_position_bucket)

    def __init__(self, config: PretrainedConfig):
        super().__init__()
        self.relative_attention_bias = nn.Embedding(config.relative_attention_num_buckets, config.num_attention_heads)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return MPNetEncoder.compute_position_bias(self, hidden)  # (B, heads, T, T)


def _backbone_parts(backbone: nn.Module) -> tuple[nn.Module, nn.ModuleList, nn.Module | None]:
    """Embeddings, the layer stack, and MPNet's relative-position bias table (else None)."""
    stack = backbone.encoder if hasattr(backbone, "encoder") else backbone.transformer
    bias = None
    if hasattr(stack, "relative_attention_bias"):
        bias = RelativePositionBias(backbone.config)
        bias.relative_attention_bias = stack.relative_attention_bias
    return backbone.embeddings, stack.layer, bias


def skeleton(config: PretrainedConfig) -> nn.Module:
    """The backbone's module structure without allocating weights (meta device). Its `config`
    carries the attention implementation transformers picked, which the masks must match."""
    with torch.device("meta"):
        return AutoModel.from_config(config)


class MultiExitEncoder(nn.Module):
    """Embeddings (optional), the layers `[first_layer, first_layer + len(layers))` and exit heads
    for the 1-based layers in `heads`. The full model holds everything; a tier holds a slice."""

    def __init__(
        self,
        config: PretrainedConfig,
        num_labels: int,
        embeddings: nn.Module | None,
        layers: list[nn.Module],
        first_layer: int,
        heads: dict[int, nn.Module],
        position_bias: nn.Module | None = None,
    ):
        super().__init__()
        check_family(config)
        self.config = config
        self.num_labels = num_labels
        self.num_layers = config.num_hidden_layers
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.first_layer = first_layer
        self.heads = nn.ModuleDict({str(k): v for k, v in heads.items()})
        self.position_bias = position_bias
        self._embed_args = set(inspect.signature(embeddings.forward).parameters) if embeddings else set()

    # construction ---------------------------------------------------------------------------

    @classmethod
    def from_backbone(cls, backbone: nn.Module, num_labels: int, dropout: float = 0.1) -> MultiExitEncoder:
        """The full multi-exit model around a loaded transformers encoder; a fresh head per layer."""
        config = check_family(backbone.config)
        embeddings, layers, position_bias = _backbone_parts(backbone)
        heads = {i: ExitHead(config.hidden_size, num_labels, dropout) for i in range(1, config.num_hidden_layers + 1)}
        return cls(config, num_labels, embeddings, list(layers), 0, heads, position_bias)

    @classmethod
    def from_pretrained(cls, name_or_path: str, num_labels: int, dropout: float = 0.1) -> MultiExitEncoder:
        backbone = AutoModel.from_pretrained(name_or_path)
        return cls.from_backbone(backbone, num_labels, dropout)

    @classmethod
    def empty_tier(
        cls, config: PretrainedConfig, num_labels: int, start: int, end: int, embeddings: bool, head_layers: list[int]
    ) -> MultiExitEncoder:
        """A tier module with freshly constructed (untrained) parts; only the parts it holds are
        allocated, so a mobile replica never allocates cloud layers. Load weights into it next."""
        skel = skeleton(check_family(config))
        config = skel.config
        emb, layers, bias = _backbone_parts(skel)
        return cls(
            config,
            num_labels,
            _construct_like(emb, config) if embeddings else None,
            [_construct_like(layers[i], config) for i in range(start, end)],
            start,
            {i: ExitHead(config.hidden_size, num_labels) for i in head_layers},
            _construct_like(bias, config) if bias is not None else None,
        )

    def tier(self, start: int, end: int, embeddings: bool, head_layers: list[int]) -> MultiExitEncoder:
        """A view sharing this model's modules for layers `[start, end)` (used to save tiers)."""
        self._check_holds(start, end)
        return MultiExitEncoder(
            self.config,
            self.num_labels,
            self.embeddings if embeddings else None,
            [self.layers[i - self.first_layer] for i in range(start, end)],
            start,
            {i: self.heads[str(i)] for i in head_layers},
            self.position_bias,
        )

    # forward pieces -------------------------------------------------------------------------

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> HiddenState:
        if self.embeddings is None:
            raise RuntimeError("this tier holds no embeddings; it must be given a hidden state")
        kwargs = {"input_ids": input_ids}
        if token_type_ids is not None and "token_type_ids" in self._embed_args:
            kwargs["token_type_ids"] = token_type_ids
        return HiddenState(self.embeddings(**kwargs), attention_mask, 0)  # (B, T, H)

    def run_layers(self, state: HiddenState, end: int) -> HiddenState:
        """Run layers `[state.layer, end)` (0-based, so the result is the output of layer `end`)."""
        self._check_holds(state.layer, end)
        hidden = state.hidden
        mask = create_bidirectional_mask(config=self.config, inputs_embeds=hidden, attention_mask=state.attention_mask)
        extra = {}
        if self.position_bias is not None:
            extra["position_bias"] = self.position_bias(hidden)
        for i in range(state.layer, end):
            out = self.layers[i - self.first_layer](hidden, mask, **extra)
            hidden = out[0] if isinstance(out, tuple) else out  # MPNet layers return tuples
        return HiddenState(hidden, state.attention_mask, end)

    def exit(self, state: HiddenState) -> ExitOutput:
        """Apply the exit head of layer `state.layer` to every sample of the batch."""
        key = str(state.layer)
        if key not in self.heads:
            raise RuntimeError(f"this module holds no exit head for layer {state.layer}")
        logits, pooled = self.heads[key](state.hidden, state.attention_mask)
        confidence, prediction = logits.softmax(-1).max(-1)
        return ExitOutput(logits, confidence, prediction, pooled, state.layer)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> list[ExitOutput]:
        """The full pass with every held exit head applied (training and offline evaluation)."""
        state = self.embed(input_ids, attention_mask, token_type_ids)
        outputs = []
        for layer in range(1, self.num_layers + 1):
            state = self.run_layers(state, layer)
            if str(layer) in self.heads:
                outputs.append(self.exit(state))
        return outputs

    def _check_holds(self, start: int, end: int) -> None:
        held = range(self.first_layer, self.first_layer + len(self.layers))
        if not (0 <= start <= end <= self.num_layers) or (start < end and (start not in held or end - 1 not in held)):
            raise ValueError(
                f"cannot run layers [{start}, {end}): this module holds layers "
                f"[{held.start}, {held.stop}) of {self.num_layers}"
            )

    def parameter_bytes(self) -> tuple[int, int]:
        """(parameter count, bytes) of what this module actually holds."""
        params = list(self.parameters())
        return sum(p.numel() for p in params), sum(p.numel() * p.element_size() for p in params)


def check_family(config: PretrainedConfig) -> PretrainedConfig:
    if config.model_type not in SUPPORTED_FAMILIES:
        raise ValueError(f"backbone family {config.model_type!r} is not supported; use one of {SUPPORTED_FAMILIES}")
    return config


def _construct_like(module: nn.Module, config: PretrainedConfig) -> nn.Module:
    """A real (CPU) instance of a skeleton module's class."""
    return type(module)(config)
