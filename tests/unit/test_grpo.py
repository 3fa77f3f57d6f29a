"""GRPO's arithmetic on fixed tensors, and against TRL's own GRPO loss on the same batch."""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from trainers.rl.grpo import group_advantages, groups_with_signal_first, has_signal, policy_loss


def test_group_advantages_normalise_within_groups_and_drop_equal_groups() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.2, 0.2, 0.2, 0.2, 1.0, 0.0, 0.0, 0.0])
    adv = group_advantages(rewards, 4)
    assert adv.groups == 3 and adv.dropped_groups == 1
    # Group 1: mean 0.5, unbiased std 0.57735 -> +-0.866.
    assert torch.allclose(adv.values[:4], torch.tensor([0.8660, -0.8660, -0.8660, 0.8660]), atol=1e-4)
    assert adv.values[4:8].tolist() == [0.0] * 4 and adv.kept[4:8].tolist() == [False] * 4
    # Group 3: mean 0.25, std 0.5 -> 1.5 and -0.5.
    assert torch.allclose(adv.values[8:], torch.tensor([1.5, -0.5, -0.5, -0.5]), atol=1e-4)
    assert adv.kept.tolist() == [True] * 4 + [False] * 4 + [True] * 4
    with pytest.raises(ValueError, match="do not form groups of 4"):
        group_advantages(torch.zeros(6), 4)


def test_dynamic_sampling_trains_on_groups_with_signal_first_and_keeps_the_step_its_size() -> None:
    played = [[1.0, 1.0], [0.2, 1.0], [0.0, 0.0], [1.0, 0.0], [0.2, 0.2], [0.0, 1.0]]
    assert [has_signal(g) for g in played] == [False, True, False, True, False, True]
    # Enough groups with signal: only those, in the order played.
    assert groups_with_signal_first(played, 3) == [1, 3, 5]
    assert groups_with_signal_first(played, 2) == [1, 3]
    # Too few: all of them, then the first equal groups to keep the size (their advantages are 0).
    assert groups_with_signal_first(played, 5) == [0, 1, 2, 3, 5]
    assert groups_with_signal_first(played[:3], 2) == [0, 1]
    with pytest.raises(ValueError, match="3 groups played, 4 needed"):
        groups_with_signal_first(played[:3], 4)


def test_policy_loss_is_a_token_mean_of_the_clipped_surrogate() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    old = torch.log(torch.tensor([[0.25, 0.5, 0.5], [0.5, 0.25, 0.5]]))  # ratios 2 and 1, 2 and 1
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    parts = policy_loss(logp, old, adv, mask, clip_ratio=0.2)
    # Row 1 (A=+1): ratio 2 clipped to 1.2 -> -1.2; ratio 1 -> -1. Row 2 (A=-1): 1, min(-2, -1.2)*-1 = 2, 1.
    assert parts.loss.item() == pytest.approx((-1.2 - 1.0 + 1.0 + 2.0 + 1.0) / 5)
    assert parts.clip_fraction.item() == pytest.approx(1 / 5)  # only the A>0 ratio past 1+eps is clipped
    assert parts.tokens.item() == 5
    # A caller's normaliser replaces the mask's token count (micro-batches of one step).
    assert policy_loss(logp, old, adv, mask, normaliser=10.0).loss.item() == pytest.approx(parts.loss.item() / 2)


def test_kl_term_is_the_k3_estimator_and_off_by_default() -> None:
    logp = torch.log(torch.tensor([[0.5, 0.2]]))
    ref = torch.log(torch.tensor([[0.25, 0.2]]))
    mask = torch.ones(1, 2)
    assert policy_loss(logp, logp, torch.zeros(1), mask, ref_logp=ref).kl.item() == 0.0
    parts = policy_loss(logp, logp, torch.zeros(1), mask, ref_logp=ref, kl_coef=0.1)
    k3 = 0.5 - torch.log(torch.tensor(0.5)).item() - 1  # exp(d) - d - 1 with d = log(0.25/0.5)
    assert parts.kl.item() == pytest.approx(k3 / 2)
    assert parts.loss.item() == pytest.approx(0.1 * k3 / 2)


def test_observation_tokens_do_not_move_the_gradient() -> None:
    """Changing what the masked (observation) positions hold changes nothing the policy learns."""
    torch.manual_seed(0)
    base = torch.randn(2, 6)
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0], [0.0, 1.0, 1.0, 0.0, 0.0, 1.0]])
    adv = torch.tensor([0.7, -1.3])

    def grad(values: torch.Tensor) -> torch.Tensor:
        logp = values.clone().requires_grad_(True)
        policy_loss(logp, values.detach() - 0.1, adv, mask).loss.backward()
        assert logp.grad is not None
        return logp.grad

    changed = base.clone()
    changed[mask == 0] = torch.randn(int((mask == 0).sum())) * 5
    g1, g2 = grad(base), grad(changed)
    assert torch.equal(g1[mask == 1], g2[mask == 1])
    assert torch.all(g1[mask == 0] == 0) and torch.all(g2[mask == 0] == 0)


class _Accelerator:
    num_processes = 1
    sync_gradients = True

    def gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    gather_for_metrics = gather

    def reduce(self, x: torch.Tensor, reduction: str = "sum") -> torch.Tensor:
        return x


def trl_loss(
    logp: torch.Tensor,
    old: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    beta: float = 0.0,
    ref: torch.Tensor | None = None,
) -> torch.Tensor:
    """TRL 1.16's `GRPOTrainer._compute_loss` (loss_type "dapo", its default) on the given log-probs."""
    from trl.trainer.grpo_trainer import GRPOTrainer

    completion = logp.shape[1]
    trainer: Any = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logp, torch.zeros_like(logp), None),
        aux_loss_enabled=False,
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level="token",
        beta=beta,
        args=SimpleNamespace(delta=None, use_bias_correction_kl=False, steps_per_generation=1),
        loss_type="dapo",
        epsilon_low=0.2,
        epsilon_high=0.2,
        use_vllm=False,
        model=SimpleNamespace(training=True),
        accelerator=_Accelerator(),
        current_gradient_accumulation_steps=1,
        _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(logp.shape[0], 1, dtype=torch.long),
        "prompt_mask": torch.ones(logp.shape[0], 1, dtype=torch.long),
        "completion_ids": torch.zeros(logp.shape[0], completion, dtype=torch.long),
        "completion_mask": mask.long(),
        "advantages": adv,
        "old_per_token_logps": old,
        "num_items_in_batch": mask.sum(),
        **({"ref_per_token_logps": ref} if ref is not None else {}),
    }
    loss: torch.Tensor = GRPOTrainer._compute_loss(trainer, None, inputs)
    return loss


@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_loss_and_gradient_match_trl_grpo_on_the_same_batch(beta: float) -> None:
    torch.manual_seed(1)
    rewards = torch.tensor([1.0, 0.0, 0.2, 1.0, 0.0, 0.0, 0.0, 1.0])
    ours = group_advantages(rewards, 4, eps=1e-4)
    # TRL's group scaling: (r - group mean) / (group std + 1e-4).
    grouped = rewards.view(-1, 4)
    theirs = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
    assert torch.allclose(ours.values, theirs, atol=1e-6)

    values = torch.randn(8, 5) * 0.3 - 1.0
    old = values + torch.randn(8, 5) * 0.3  # off-policy enough that some ratios clip
    ref = values + torch.randn(8, 5) * 0.2
    mask = (torch.rand(8, 5) > 0.3).float()
    a = values.clone().requires_grad_(True)
    b = values.clone().requires_grad_(True)
    mine = policy_loss(a, old, ours.values, mask, clip_ratio=0.2, ref_logp=ref, kl_coef=beta).loss
    trl = trl_loss(b, old, theirs, mask, beta=beta, ref=ref)
    assert mine.item() == pytest.approx(trl.item(), rel=1e-5, abs=1e-7)
    mine.backward()
    trl.backward()
    assert a.grad is not None and b.grad is not None
    assert torch.allclose(a.grad, b.grad, atol=1e-7)


def _tiny_qwen2() -> Any:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
    )  # fmt: skip
    return Qwen2ForCausalLM(config).float()


def test_chunked_logprobs_equal_the_full_forward_and_its_gradients() -> None:
    from trainers.rl.grpo import token_logprobs

    model = _tiny_qwen2()
    ids = torch.randint(0, 97, (3, 11))
    attn = torch.ones_like(ids)
    attn[1, :4] = 0  # left padding, as rollouts batch their episodes
    # The reference: the model's own full-vocabulary logits, all positions at once.
    logits = model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / 0.7
    full = torch.log_softmax(logits, dim=-1)
    want_logp = full.gather(-1, ids[:, 1:, None]).squeeze(-1)
    want_entropy = -(full.exp() * full).sum(-1)
    (want_logp * attn[:, 1:]).sum().backward()
    want_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    # 30 positions in chunks of 7: chunks that cross rows, and a short last one.
    logp, entropy = token_logprobs(model, ids, attn, 0.7, chunk=7)
    assert logp.shape == entropy.shape == (3, 10)
    torch.testing.assert_close(logp, want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-5, atol=1e-5)
    (logp * attn[:, 1:]).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == want_grads.keys() and "lm_head.weight" in grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, want_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # the rollout scoring path: no checkpointing, same numbers
        again, _ = token_logprobs(model, ids, attn, 0.7, chunk=4)
    torch.testing.assert_close(again, want_logp, rtol=1e-5, atol=1e-5)
