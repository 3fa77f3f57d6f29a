"""GRPO's arithmetic on tensors: group-normalised advantages, the clipped policy loss averaged per token
under the action mask, the optional KL to a reference model, and per-token log-probabilities.

Pure functions with no model, engine or tools, so they are checked on fixed numbers. The conventions are
DeepEyesV2's (verl 0.4, `adv_estimator=grpo`, `loss_agg_mode=token-mean`) and TRL's GRPO with
`loss_type="dapo"`: advantage = (reward - group mean) / (group std + eps); loss = the mean over every
action token of the batch of -min(ratio * A, clip(ratio, 1-eps, 1+eps) * A); the KL, when on, is the k3
estimator exp(ref - logp) - (ref - logp) - 1. A group whose rewards are all equal carries no signal
(its advantages are 0) and is dropped: its tokens leave the mean's denominator, and it is counted.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.utils.checkpoint

EQUAL_REWARDS = 1e-9  # rewards of a group closer than this are equal: the group carries no signal


@dataclass(frozen=True)
class Advantages:
    values: torch.Tensor  # [episodes], 0 for dropped groups
    kept: torch.Tensor  # [episodes] bool: False for every episode of a dropped (equal-reward) group
    dropped_groups: int
    groups: int


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-6) -> Advantages:
    """`rewards` holds consecutive groups of `group_size` episodes of one prompt each."""
    if rewards.ndim != 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not form groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)
    equal = (grouped.max(dim=1).values - grouped.min(dim=1).values) <= EQUAL_REWARDS
    adv = torch.where(equal[:, None], torch.zeros_like(grouped), (grouped - mean) / (std + eps))
    kept = (~equal)[:, None].expand_as(grouped)
    return Advantages(adv.reshape(-1), kept.reshape(-1), int(equal.sum()), grouped.shape[0])


def has_signal(rewards: Sequence[float]) -> bool:
    """Whether a group's rewards differ, i.e. its advantages are not all zero."""
    return max(rewards) - min(rewards) > EQUAL_REWARDS


def groups_with_signal_first(groups: Sequence[Sequence[float]], want: int) -> list[int]:
    """Which `want` of the played groups (each a prompt's rewards) a step trains on, in the order played:
    every group whose rewards differ, up to `want`, then all-equal ones to keep the step its size (their
    advantages are zero and they are counted as dropped). DAPO's dynamic sampling keeps only groups with
    signal; the step keeps its size here because every rank must make the same updates over the same
    number of micro-batches, whatever its prompts gave."""
    if len(groups) < want:
        raise ValueError(f"{len(groups)} groups played, {want} needed")
    mixed = [i for i, g in enumerate(groups) if has_signal(g)]
    equal = [i for i, g in enumerate(groups) if not has_signal(g)]
    return sorted((mixed + equal)[:want])


@dataclass(frozen=True)
class LossParts:
    loss: torch.Tensor
    clip_fraction: torch.Tensor
    kl: torch.Tensor
    tokens: torch.Tensor


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    clip_ratio: float = 0.2,
    ref_logp: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    normaliser: float | None = None,
) -> LossParts:
    """Token-mean clipped surrogate over `mask` (1 on sampled action tokens of kept episodes).

    `logp`, `old_logp`, `ref_logp`, `mask`: [episodes, tokens]; `advantages`: [episodes]. `normaliser`
    replaces the mask's own token count when a step's batch is split into micro-batches: each then
    divides by the step's token count, and the micro-batch losses sum to the step's token mean.
    """
    mask = mask.to(logp.dtype)
    tokens = mask.sum()
    denom = torch.as_tensor(normaliser if normaliser is not None else tokens.clamp(min=1.0), dtype=logp.dtype)
    ratio = torch.exp(logp - old_logp)
    adv = advantages.to(logp.dtype)[:, None]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio) * adv
    per_token = -torch.minimum(unclipped, clipped)
    clip_fraction = ((clipped < unclipped).to(logp.dtype) * mask).sum() / tokens.clamp(min=1.0)
    kl = torch.zeros((), dtype=logp.dtype)
    if ref_logp is not None and kl_coef > 0:
        delta = ref_logp - logp
        per_kl = torch.exp(delta) - delta - 1.0
        per_token = per_token + kl_coef * per_kl
        kl = (per_kl * mask).sum() / tokens.clamp(min=1.0)
    loss = (per_token * mask).sum() / denom
    return LossParts(loss, clip_fraction.detach(), kl.detach(), tokens.detach())


LOGIT_ROWS = 1024  # token positions per chunk of the output projection (see `token_logprobs`)


def token_logprobs(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    temperature: float = 1.0,
    *,
    chunk: int = LOGIT_ROWS,
    media: Mapping[str, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log-probability of each token given its prefix, entropy of that distribution), [B, T-1] each.

    Position t scores token t+1, so callers shift their masks by one (`mask[:, 1:]`). Logits are divided
    by the sampling temperature, as the rollout engine samples from them.

    The output projection runs over `chunk` token positions at a time, never the whole batch: the full
    logits of a 7B episode are 16K positions x 152K vocabulary, about 10 GB in fp32, where one chunk of
    1,024 is 0.6 GB. With gradients on, each chunk is checkpointed, so backward keeps only the final
    hidden states and recomputes a chunk's logits when it reaches it. The model's backbone
    (`base_model`) and head (`get_output_embeddings`) are called as modules, so hooks on them (ZeRO-3's
    parameter gathering) still run. This holds for models whose logits are the head's output and
    nothing more (Qwen2, Qwen2.5-VL, Llama); the tests compare it with the model's own forward.

    `media`: a VL model's `pixel_values` and `image_grid_thw` of the batch's images, in row order. The
    backbone embeds them at their vision tokens and derives Qwen2.5-VL's multimodal rotary positions
    from the ids, the grids and the attention mask, as it does in SFT.
    """
    module: Any = getattr(model, "module", model)  # a DeepSpeed engine wraps the Hugging Face model
    hidden = module.base_model(input_ids=input_ids, attention_mask=attention_mask, **(media or {}))
    hidden = hidden.last_hidden_state[:, :-1]
    head = module.get_output_embeddings()
    batch, width = input_ids.shape[0], input_ids.shape[1] - 1
    rows, targets = hidden.reshape(batch * width, -1), input_ids[:, 1:].reshape(-1)

    def score(h: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logp_all = torch.log_softmax(head(h).float() / temperature, dim=-1)
        return logp_all.gather(-1, t[:, None]).squeeze(-1), -(logp_all.exp() * logp_all).sum(-1)

    parts = []
    for lo in range(0, rows.shape[0], chunk):
        h, t = rows[lo : lo + chunk], targets[lo : lo + chunk]
        if torch.is_grad_enabled() and h.requires_grad:
            parts.append(torch.utils.checkpoint.checkpoint(score, h, t, use_reentrant=False))
        else:
            parts.append(score(h, t))
    logp = torch.cat([p[0] for p in parts]).view(batch, width)
    entropy = torch.cat([p[1] for p in parts]).view(batch, width)
    return logp, entropy
