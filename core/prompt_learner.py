"""CoOp-style learner of the PQ-Map quality prompts (g-refine.txt eq. 2-3, Fig. 3; METHODS.md 1.2).

Each quality factor has a (positive, negative) prompt whose token sequence is
``[SOT] ctx_1 .. ctx_n <class words> [EOT] pad..``: the ``n`` context vectors are learned, the class words
("good photo." / "bad photo.") come from the text pair and stay fixed, and the whole sequence is fed to the text
encoder past its token-embedding layer (:meth:`SurgeryCLIP.encode_token_embeddings`). The image tower is frozen,
so image features are computed once and training touches only ``4 x 2 x n x W`` numbers.

Supervision: per-image quality labels in [0, 1] per factor (1 = good), fitted through the eq. 3 probability
``L_raw[i]`` of the CLS embedding with binary cross-entropy; optionally per-patch labels through the surgery
patch features (``patch_weight``; the paper uses image-level labels only, so the default is 0).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from .clip_surgery import ImageFeatures, SurgeryCLIP
from .pq_map import DEFAULT_TEXT_PROMPTS, QUALITY_FACTORS, QualityPrompts

logger = logging.getLogger(__name__)

CONTEXT_PLACEHOLDER = "X"


class QualityPromptLearner(torch.nn.Module):
    """Learnable contexts for the 4 x 2 quality prompts of one tower.

    n_context: number of learned context tokens per prompt (Q-Refine uses 16); init_std: normal init of the
    contexts (0 starts from the placeholder token's embedding, i.e. from the text prompt "X X .. good photo.").
    """

    def __init__(
        self,
        encoder: SurgeryCLIP,
        pairs: dict[str, tuple[str, str]] | None = None,
        n_context: int = 8,
        init_std: float = 0.02,
        seed: int = 0,
    ):
        super().__init__()
        pairs = pairs or DEFAULT_TEXT_PROMPTS
        if n_context < 1:
            raise ValueError(f"n_context must be >= 1, got {n_context}.")
        texts = [
            " ".join([CONTEXT_PLACEHOLDER] * n_context + [pairs[factor][polarity]])
            for factor in QUALITY_FACTORS
            for polarity in (0, 1)
        ]
        sequences, eot_positions = encoder.token_embeddings(texts)  # (8, L, W), (8,)
        if int(eot_positions.min()) <= n_context + 1:
            raise ValueError("The class words of a quality prompt were truncated: shorten them or use fewer contexts.")
        self.n_context = n_context
        self.register_buffer("sequences", sequences.detach().float().clone())  # fixed parts: SOT, class, EOT, pad
        self.register_buffer("eot_positions", eot_positions.clone())
        generator = torch.Generator().manual_seed(seed)
        initial = self.sequences[:, 1 : 1 + n_context].clone()
        if init_std > 0:
            initial = torch.randn(initial.shape, generator=generator) * init_std
        self.context = torch.nn.Parameter(initial)  # (8, n_context, W)

    def embeddings(self) -> torch.Tensor:
        """(8, L, W) token sequences, factor-major, positive then negative."""
        return torch.cat(
            [self.sequences[:, :1], self.context, self.sequences[:, 1 + self.n_context :]], dim=1
        )

    def text_features(self, encoder: SurgeryCLIP) -> torch.Tensor:
        """(4, 2, D) L2-normalised text features, differentiable in the contexts."""
        return encoder.encode_token_embeddings(self.embeddings(), self.eot_positions).view(len(QUALITY_FACTORS), 2, -1)

    def to_quality_prompts(self, source: str = "learned") -> QualityPrompts:
        """Freeze into :class:`QualityPrompts` (save with :func:`pq_map.save_prompt_embeddings`)."""
        sequences = self.embeddings().detach().cpu().view(len(QUALITY_FACTORS), 2, *self.sequences.shape[1:])
        positions = self.eot_positions.cpu().view(len(QUALITY_FACTORS), 2)
        return QualityPrompts(
            embeddings={factor: sequences[i] for i, factor in enumerate(QUALITY_FACTORS)},
            eot_positions={factor: positions[i] for i, factor in enumerate(QUALITY_FACTORS)},
            source=source,
        )


@dataclass(frozen=True)
class PromptTrainingResult:
    prompts: QualityPrompts
    losses: list[float]


def quality_prompt_loss(
    text_features: torch.Tensor,
    features: ImageFeatures,
    labels: torch.Tensor,
    logit_scale: float,
    patch_labels: torch.Tensor | None = None,
    patch_weight: float = 0.0,
) -> torch.Tensor:
    """Binary cross-entropy between eq. 3's ``L_raw`` and quality labels.

    text_features: (4, 2, D); labels: (B, 4) in [0, 1] (1 = good) per factor; patch_labels: (B, gh, gw, 4) in [0, 1]
    or None. Returns a scalar.
    """
    def logits(image_features: torch.Tensor) -> torch.Tensor:  # (..., 4): log-odds of eq. 3's L_raw
        cosines = torch.einsum("...d,fkd->...fk", image_features, text_features)
        return logit_scale * (cosines[..., 0] - cosines[..., 1])

    # with logits: a saturated probability still has a gradient (a clamped one would not)
    loss = F.binary_cross_entropy_with_logits(logits(features.cls_embedding), labels.to(text_features))
    if patch_labels is not None and patch_weight > 0:
        loss = loss + patch_weight * F.binary_cross_entropy_with_logits(
            logits(features.patch_features), patch_labels.to(text_features)
        )
    return loss


def train_quality_prompts(
    encoder: SurgeryCLIP,
    features: ImageFeatures,
    labels: torch.Tensor,
    steps: int = 500,
    batch_size: int = 64,
    learning_rate: float = 1e-3,
    n_context: int = 8,
    patch_labels: torch.Tensor | None = None,
    patch_weight: float = 0.0,
    seed: int = 0,
    progress: bool = True,
) -> PromptTrainingResult:
    """Fit the quality prompts to precomputed image features of a frozen tower.

    features: :class:`ImageFeatures` of N training images (one surgery forward each); labels: (N, 4) in [0, 1];
    patch_labels: optional (N, gh, gw, 4). AdamW on the contexts only, cosine learning-rate decay.
    """
    count = features.cls_embedding.shape[0]
    if labels.shape != (count, len(QUALITY_FACTORS)):
        raise ValueError(f"labels must be ({count}, 4) for {count} images, got {tuple(labels.shape)}.")
    if steps < 1 or batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}.")
    learner = QualityPromptLearner(encoder, n_context=n_context, seed=seed).to(encoder.device)
    optimizer = torch.optim.AdamW(learner.parameters(), lr=learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / steps)))
    generator = torch.Generator().manual_seed(seed)
    losses = []
    for _ in tqdm(range(steps), desc="quality prompts", disable=not progress):
        index = torch.randint(count, (min(batch_size, count),), generator=generator)
        batch = ImageFeatures(features.cls_embedding[index], features.patch_features[index], features.image_size)
        loss = quality_prompt_loss(
            learner.text_features(encoder),
            batch,
            labels[index],
            encoder.logit_scale,
            None if patch_labels is None else patch_labels[index],
            patch_weight,
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if not math.isfinite(loss.item()):
            raise FloatingPointError(f"Prompt training diverged (loss {loss.item()}) at step {len(losses)}.")
        losses.append(loss.item())
    return PromptTrainingResult(learner.to_quality_prompts(), losses)
