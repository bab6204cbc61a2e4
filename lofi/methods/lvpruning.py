"""LVPruning (Sun et al., NAACL 2025 Findings): trained, language-guided decision modules.

Paper section 3, scaled to any LLaVA. Per stage, a decision module reads the hidden states entering
its layer: two sequential cross-attention blocks (``blocks``; the bundled model's modules use one to stay
under 8% of its prefill FLOPs; visual tokens are the queries, text tokens the keys
and values; ``O = softmax(Q K^T / sqrt(d)) V + Q``, eq. 3), each followed by the FFN
[LayerNorm, Linear(C, 2C), SiLU, Linear(2C, C), LayerNorm], then ``W_O`` gives two logits
(keep, drop) per visual token (eq. 4). Three stages sit at the paper's relative depths (after layers
1, 8 and 16 of 32, i.e. K = 1, 8, 16; ``stage_layers``), keeping [rho, rho-0.2, rho-0.4] of the
image's visual tokens (cumulative, as eq. 10-11 train them).

* Inference (3.3): at each stage keep the top ceil(ratio x n_visual) present tokens by keep
  probability (at least one), dropped for real by the ``lofi`` runtime with original positions (eq. 14).
* Training (3.2) lives in ``lofi.training.lvpruning``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from lofi.registry import PruningMethod, StageInput, register

PAPER_LAYERS, PAPER_DEPTH = (1, 8, 16), 32
REFERENCE_RHO = 0.5  # where the paper's rule leaves a stage empty, the ratios keep the shape of its rho = 0.5 schedule
WEIGHTS, CONFIG = "decision_modules.safetensors", "decision_modules.json"
DEFAULT_FOLDER = "lvpruning"  # beside the model's weights


def stage_layers(num_layers: int) -> list[int]:
    """The paper's K = 1, 8, 16 of 32 at the same relative depth, at least 1 and increasing."""
    layers: list[int] = []
    for paper in PAPER_LAYERS:
        layer = max(1, round(paper * num_layers / PAPER_DEPTH), layers[-1] + 1 if layers else 1)
        layers.append(min(layer, num_layers - 1))
    if len(set(layers)) != len(layers):
        raise ValueError(f"a {num_layers}-layer model is too shallow for three LVPruning stages")
    return layers


class CrossAttentionBlock(nn.Module):
    """Visual queries attend to text keys/values; residual on the queries (eq. 3); then the FFN."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v = (nn.Linear(width, width) for _ in range(3))
        self.ffn = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.SiLU(),
                                 nn.Linear(2 * width, width), nn.LayerNorm(width))

    def forward(self, visual: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        q = self.q(visual)
        split = lambda t: t.view(*t.shape[:2], self.heads, -1).transpose(1, 2)  # noqa: E731
        attended = F.scaled_dot_product_attention(split(q), split(self.k(text)), split(self.v(text)),
                                                  attn_mask=text_mask[:, None, None, :])
        return self.ffn(attended.transpose(1, 2).reshape(q.shape) + q)


class DecisionModule(nn.Module):
    """``blocks`` cross-attention blocks (the paper's 2) and W_O: [batch, n_visual, 2] (keep, drop) logits."""

    def __init__(self, width: int, heads: int, blocks: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(CrossAttentionBlock(width, heads) for _ in range(blocks))
        self.out = nn.Linear(width, 2)

    def forward(self, visual, text, text_mask):
        for block in self.blocks:
            visual = block(visual, text, text_mask)
        return self.out(visual)


class DecisionModules(nn.Module):
    """One ``DecisionModule`` per stage, with the settings that rebuild them."""

    def __init__(self, width: int, layers: list[int], heads: int, blocks: int = 2):
        super().__init__()
        self.settings = {"width": width, "layers": list(layers), "heads": heads, "blocks": blocks}
        self.stages = nn.ModuleList(DecisionModule(width, heads, blocks) for _ in layers)

    @torch.no_grad()
    def start_at(self, targets: list[float]) -> "DecisionModules":
        """Start every stage's W_O at zero weights and the biases of its target keep probability.

        Stage s then keeps each token it sees with probability targets[s] / targets[s-1] (decisions are
        cumulative, eq. 10), so training starts on the ratios of eq. 11 and W_O's weights need learn only
        *which* tokens to keep. From a random W_O the ratio loss, far off target, steers W_O through
        whatever token features it happens to read; on the bundled model it was still 0.029 after 300
        steps, against 0.003 from here.
        """
        previous = 1.0
        for stage, target in zip(self.stages, targets):
            p = min(max(target / previous, 1e-3), 1 - 1e-3)
            stage.out.weight.zero_()
            stage.out.bias.copy_(torch.tensor([0.5, -0.5]) * math.log(p / (1 - p)))
            previous = target
        return self

    @classmethod
    def for_model(cls, model, blocks: int = 2) -> "DecisionModules":
        """Modules sized for ``model``: its width, ``stage_layers`` of its depth, a quarter of its heads, and
        ``blocks`` cross-attention blocks per stage (the paper's 2; 1 halves their cost, which on a shallow
        model is a large share of the whole)."""
        if blocks < 1:
            raise ValueError(f"a decision module needs at least one cross-attention block, got blocks={blocks}")
        text = model.config.text_config
        # the paper's 8 heads at width 4096 (32 model heads): a quarter of the model's heads
        heads = max(1, text.num_attention_heads // 4)
        while text.hidden_size % heads:
            heads -= 1
        return cls(text.hidden_size, stage_layers(text.num_hidden_layers), heads, blocks)

    def save(self, folder: str | Path, **metadata) -> Path:
        from safetensors.torch import save_file
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, folder / WEIGHTS)
        (folder / CONFIG).write_text(json.dumps({**self.settings, **metadata}, indent=1))
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> "DecisionModules":
        from safetensors.torch import load_file
        folder = Path(folder)
        if not (folder / WEIGHTS).is_file():
            raise FileNotFoundError(
                f"no trained LVPruning decision modules in {folder}; train them with "
                "`python -m analysis.train_lvpruning --model MODEL` or pass path=FOLDER")
        settings = json.loads((folder / CONFIG).read_text())
        modules = cls(settings["width"], settings["layers"], settings["heads"], settings.get("blocks", 2))
        modules.load_state_dict(load_file(folder / WEIGHTS))
        return modules.eval()


def text_tokens(hidden: torch.Tensor, text: torch.Tensor, width: int | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather each row's text tokens to the front: [batch, n_text_max, d] and its validity mask (``width``:
    n_text_max if the caller knows it on the host; otherwise one host sync reads it)."""
    counts = text.sum(1)
    width = int(counts.max()) if width is None else width
    order = torch.sort(text, dim=1, descending=True, stable=True).indices[:, :width]  # text first, in order
    mask = torch.arange(order.shape[1], device=text.device)[None] < counts[:, None]
    return hidden.gather(1, order[..., None].expand(-1, -1, hidden.shape[-1])), mask


def standard_gumbel(uniform: torch.Tensor) -> torch.Tensor:
    """G = -log(-log u): standard Gumbel noise from uniform draws u in (0, 1)."""
    return -torch.log(-torch.log(uniform.clamp(1e-12, 1 - 1e-7)))


def sample_without_replacement(log_weights: torch.Tensor, k: int, uniform: torch.Tensor) -> torch.Tensor:
    """[batch, k] indices drawn without replacement, each draw picking i with probability
    w_i / sum of the w_j not yet drawn, w = exp(log_weights) (Gumbel-top-k: the top k of
    log w_i + G_i, G = ``standard_gumbel(uniform)``)."""
    return (log_weights + standard_gumbel(uniform)).topk(k, dim=-1, sorted=False).indices


def decision_flops(width: int, n_text: int, n_visual: int, blocks: int = 2) -> float:
    """Multiply-adds x 2 of one decision module over n_visual queries and n_text keys."""
    c = width
    block = 2 * n_visual * c * c + 4 * n_text * c * c + 4 * n_visual * n_text * c + 8 * n_visual * c * c
    return float(blocks * block + 4 * n_visual * c)


@register
class LVPruning(PruningMethod):
    """LVPruning: trained cross-attention decision modules keep language-relevant visual tokens (3 stages).

    Options:
        keep: rho; the stages keep [rho, rho-0.2, rho-0.4] of the visual tokens (cumulative), the paper's
            rule, wherever every stage stays non-empty (rho > 0.4); at rho <= 0.4, rho x [1, 0.6, 0.2], the
            shape of the rho = 0.5 schedule (``ratios``).
        offsets: the per-stage reductions (default (0, 0.2, 0.4)); (0, 0, 0) with keep=1 keeps all.
        path: folder of trained modules (default: ``lvpruning/`` beside the model's weights).
        modules: trained (or random, for timing) ``DecisionModules`` in memory, instead of ``path``.
        selection: ``"topk"`` (default, paper 3.3: the highest keep probabilities) or ``"sample"``: k
            tokens drawn without replacement with weights = keep odds p / (1 - p) (Gumbel-top-k), close to
            training's independent keep decisions given their count. Not in the paper; on the bundled
            model top-k keeps one blob of near-copies and flips 2.7x as many answers (benchmarks/README.md).
        seed: with ``selection="sample"``, the run's seed; each sample and stage draws from its own
            generator, so a sample keeps the same tokens alone or in any batch.
    """

    name = "lvpruning"

    SELECTIONS = ("topk", "sample")

    def __init__(self, keep: float = 0.5, offsets=(0.0, 0.2, 0.4),
                 path: str | Path | None = None, selection: str = "topk", seed: int = 0,
                 modules: DecisionModules | None = None):
        super().__init__(keep, 1)  # its stages' layers come from the trained modules
        if modules is not None and path is not None:
            raise ValueError("lvpruning takes trained modules from path= or modules=, not both")
        if selection not in self.SELECTIONS:
            raise ValueError(f"unknown lvpruning selection {selection!r}; valid: {list(self.SELECTIONS)}")
        self.selection, self.seed = selection, int(seed)
        if len(offsets) != 3 or any(o < 0 for o in offsets):
            raise ValueError(f"lvpruning offsets must be three non-negative numbers, got {offsets!r}")
        self.offsets, self.path = tuple(offsets), path
        if any(r <= 0 for r in self.ratios()):
            raise ValueError(f"lvpruning keep={keep} with offsets {self.offsets} leaves stage ratios "
                             f"{[round(r, 3) for r in self.ratios()]}; every stage must keep a positive fraction "
                             "(raise keep or lower the offsets)")
        self.modules: DecisionModules | None = modules

    @property
    def draws(self) -> bool:  # type: ignore[override]
        return self.selection == "sample"

    def ratios(self) -> list[float]:
        """Each stage's keep ratio (cumulative, of the image's visual tokens).

        The paper's schedule, rho - offset, wherever it keeps every stage non-empty (rho > the largest
        offset: rho > 0.4 by default; rho = 0.45 keeps (0.45, 0.25, 0.05)). Below, it would leave nothing
        at the last stage (rho = 0.25: -0.15); the ratios then keep the shape of the paper's rho = 0.5
        schedule, rho x (0.5 - offset) / 0.5: (0.25, 0.15, 0.05) at rho = 0.25. The extension is not
        continuous with the paper's rule at rho = 0.4, where the paper's last stage reaches zero.
        """
        paper = [self.keep - o for o in self.offsets]
        if min(paper) > 0:
            return paper
        return [self.keep * (REFERENCE_RHO - o) / REFERENCE_RHO for o in self.offsets]

    def bind(self, model) -> None:
        """Load the decision modules for ``model`` once (from ``path``, or ``lvpruning/`` beside the model's
        weights) and keep them on its device and dtype."""
        folder = self.path
        if self.modules is None:
            if folder is None:
                base = getattr(model.config, "_name_or_path", "") or getattr(model, "name_or_path", "")
                folder = Path(base) / DEFAULT_FOLDER
            self.modules = DecisionModules.load(folder)
        width = model.config.text_config.hidden_size
        if self.modules.settings["width"] != width:
            raise ValueError(f"the decision modules{f' in {folder}' if folder else ''} are for width "
                             f"{self.modules.settings['width']}, the model has {width}")
        parameter = next(model.parameters())
        self.modules = self.modules.to(device=parameter.device, dtype=parameter.dtype)

    weights_hint = "train them with `python -m analysis.train_lvpruning --model MODEL` or pass path="

    def weight_files(self, model_folder: Path) -> list[Path]:
        if self.modules is not None and self.path is None:
            return []  # given in memory
        return [(Path(self.path) if self.path is not None else Path(model_folder) / DEFAULT_FOLDER) / WEIGHTS]

    def stages(self, num_layers: int) -> list[int]:
        layers = self.modules.settings["layers"] if self.modules is not None else stage_layers(num_layers)
        if max(layers) >= num_layers:
            raise ValueError(f"decision modules at layers {layers} do not fit a {num_layers}-layer model")
        return list(layers)

    def n_keep(self, stage: int, n_visual: torch.Tensor, n_present: torch.Tensor) -> torch.Tensor:
        ratio = self.ratios()[stage]
        # in Python on the rows' numbers (float64, as torch's): tensor ops on a few numbers cost more, per stage
        kept = [min(max(math.ceil(ratio * n - 1e-9), 1), present)
                for n, present in zip(n_visual.tolist(), n_present.tolist())]
        return torch.tensor(kept, dtype=torch.long, device=n_present.device)

    @torch.no_grad()
    def keep_log_odds(self, stage: int, hidden: torch.Tensor, visual: torch.Tensor, text: torch.Tensor,
                      text_width: int | None = None):
        """[batch, n_present] log(p / (1 - p)) of each present visual token's keep probability p (W_O's keep
        logit minus its drop logit)."""
        width = hidden.shape[-1]
        visual_hidden = hidden.gather(1, visual[..., None].expand(-1, -1, width))
        text_hidden, text_mask = text_tokens(hidden, text, text_width)
        logits = self.modules.stages[stage](visual_hidden, text_hidden, text_mask).float()
        return logits[..., 0] - logits[..., 1]

    def scores(self, state: StageInput) -> torch.Tensor:
        if self.modules is None:
            self.bind(state.model)
        scores = self.keep_log_odds(state.stage, state.hidden, state.visual, state.text, state.text_width)
        if self.selection == "topk":
            return scores
        # Gumbel-top-k: the top n_keep of log w + G draw without replacement with weights w = keep odds
        return scores + standard_gumbel(state.uniform(self.seed * 7919 + state.stage))

    def decision_flops(self, config, n_text: int, n_visual_per_stage: list[int]) -> float:
        """The stages' modules over the visual tokens each sees: their own block count once loaded, else the
        paper's 2."""
        width = config.text_config.hidden_size
        blocks = self.modules.settings.get("blocks", 2) if self.modules is not None else 2
        return sum(decision_flops(width, n_text, n, blocks) for n in n_visual_per_stage)
