"""The training objective against hand computation (plain Python math), plus a tiny real Llama that learns."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cyclealign_pl.objective import (
    LossParts,
    cycle_loss,
    default_sft_weight,
    mean_response_logprob,
    pad_rankings,
    pro_loss,
    rrhf_loss,
    target_logprobs,
)
from cyclealign_pl.ranking import rank_by_scores

# --- hand references: plain Python, one prompt at a time -----------------------------------------


def rrhf_by_hand(scores: list[float], ranking: tuple[int, ...]) -> float:
    """sum over (better, worse) pairs of max(0, p_worse - p_better)."""
    return sum(
        max(0.0, scores[worse] - scores[better])
        for i, better in enumerate(ranking)
        for worse in ranking[i + 1 :]
    )


def pro_by_hand(scores: list[float], ranking: tuple[int, ...]) -> float:
    """-sum_j log( exp(p_{r_j}) / sum_{i >= j} exp(p_{r_i}) ), j up to the second last."""
    total = 0.0
    for j in range(len(ranking) - 1):
        denominator = sum(math.exp(scores[i]) for i in ranking[j:])
        total -= math.log(math.exp(scores[ranking[j]]) / denominator)
    return total


def batch_by_hand(per_prompt, scores: list[list[float]], rankings: list[tuple[int, ...]]) -> float:
    """Mean over prompts with at least two ranked candidates; 0 when there is none."""
    values = [per_prompt(s, r) for s, r in zip(scores, rankings) if len(r) >= 2]
    return sum(values) / len(values) if values else 0.0


def as_tensors(
    scores: list[list[float]], rankings: list[tuple[int, ...]]
) -> tuple[torch.Tensor, torch.Tensor]:
    width = len(scores[0])
    return torch.tensor(scores, dtype=torch.float64, requires_grad=True), pad_rankings(rankings, width)


# --- target_logprobs ------------------------------------------------------------------------------


def linear_head(vocab: int, hidden: int, seed: int, dtype=torch.float64) -> torch.nn.Linear:
    torch.manual_seed(seed)
    return torch.nn.Linear(hidden, vocab, bias=False).to(dtype)


def test_target_logprobs_matches_hand_loop() -> None:
    head = linear_head(7, 4, seed=0, dtype=torch.float32)
    hidden = torch.randn(2, 5, 4)
    targets = torch.randint(0, 7, (2, 5))
    out = target_logprobs(hidden, head, targets)
    assert out.shape == (2, 5)
    for b in range(2):
        for t in range(5):
            row = head(hidden[b, t]).tolist()  # the prediction for target t
            expected = row[targets[b, t]] - math.log(sum(math.exp(x) for x in row))
            assert out[b, t].item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("chunk", [None, 1, 2, 5, 64])
def test_target_logprobs_in_chunks_equals_log_softmax_in_value_and_gradient(chunk) -> None:
    head = linear_head(11, 6, seed=1)
    hidden = torch.randn(3, 7, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (3, 7))
    out = target_logprobs(hidden, head, targets, chunk_positions=chunk)
    reference = torch.log_softmax(head(hidden), -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    weights = torch.randn(3, 7, dtype=torch.float64)
    grads = torch.autograd.grad((out * weights).sum(), [hidden, head.weight])
    expected = torch.autograd.grad((reference * weights).sum(), [hidden, head.weight])
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_target_logprobs_chunks_across_rows_so_the_logits_stay_bounded_for_any_number_of_rows() -> None:
    """A chunk takes (row, token) positions across rows: with 64 rows and a chunk of 3 positions, no call of
    the head (forward or its recomputation in backward) holds more than 3 x V logits."""
    head = linear_head(11, 6, seed=4)
    sizes: list[int] = []

    def measured(hidden: torch.Tensor) -> torch.Tensor:
        logits = head(hidden)
        sizes.append(logits.numel())
        return logits

    hidden = torch.randn(64, 5, 6, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 11, (64, 5))
    out = target_logprobs(hidden, measured, targets, chunk_positions=3)
    out.sum().backward()
    reference = torch.log_softmax(head(hidden), -1).gather(-1, targets[..., None]).squeeze(-1)
    torch.testing.assert_close(out, reference, rtol=0, atol=1e-12)
    assert len(sizes) == 2 * -(-64 * 5 // 3)  # every chunk, and again in backward
    assert max(sizes) == 3 * 11


def test_target_logprobs_upcasts_bf16() -> None:
    head = linear_head(9, 4, seed=2, dtype=torch.bfloat16)
    hidden = (torch.randn(2, 4, 4) * 5).to(torch.bfloat16).requires_grad_()
    targets = torch.randint(0, 9, (2, 4))
    out = target_logprobs(hidden, head, targets, chunk_positions=2)
    assert out.dtype == torch.float32  # upcast, not bf16 arithmetic
    reference = (
        torch.log_softmax(head(hidden.detach()).float(), -1).gather(-1, targets[..., None]).squeeze(-1)
    )
    torch.testing.assert_close(out.detach(), reference)
    out.sum().backward()
    assert hidden.grad is not None and hidden.grad.dtype == torch.bfloat16
    assert torch.isfinite(hidden.grad.float()).all()


def test_target_logprobs_refuses_mismatched_shapes_and_chunks() -> None:
    head = linear_head(7, 4, seed=3, dtype=torch.float32)
    with pytest.raises(ValueError, match="targets"):
        target_logprobs(torch.randn(2, 5, 4), head, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="chunk_positions"):
        target_logprobs(torch.randn(2, 5, 4), head, torch.zeros(2, 5, dtype=torch.long), chunk_positions=0)


# --- mean_response_logprob -----------------------------------------------------------------------


def test_mean_response_logprob_masks_prompt_and_padding() -> None:
    logps = torch.tensor([[[0.0, -9.0, -1.0, -2.0, -9.0], [0.0, -0.5, -9.0, -9.0, -9.0]]])
    mask = torch.tensor([[[0, 0, 1, 1, 0], [0, 1, 0, 0, 0]]])
    out = mean_response_logprob(logps, mask)
    assert out.shape == (1, 2)
    assert out[0, 0].item() == pytest.approx((-1.0 + -2.0) / 2)
    assert out[0, 1].item() == pytest.approx(-0.5)


def test_mean_response_logprob_empty_mask_is_zero_with_finite_gradient() -> None:
    # -inf at masked positions must not leak NaN through 0 * inf.
    logps = torch.tensor([[0.0, -math.inf, -1.0], [0.0, -2.0, -4.0]], requires_grad=True)
    mask = torch.tensor([[False, False, False], [False, True, True]])
    out = mean_response_logprob(logps, mask)
    assert out[0].item() == 0.0
    assert out[1].item() == pytest.approx(-3.0)
    out.sum().backward()
    assert torch.isfinite(logps.grad).all()
    assert logps.grad[0].abs().sum().item() == 0.0
    assert logps.grad[1].tolist() == pytest.approx([0.0, 0.5, 0.5])


# --- rrhf_loss / pro_loss: hand values ---------------------------------------------------------


def test_rrhf_full_ranking_by_hand() -> None:
    # Ranking (0, 1, 2) with p = (1, 2, 4): every worse candidate outscores the better one.
    scores, rankings = as_tensors([[1.0, 2.0, 4.0]], [(0, 1, 2)])
    expected = (2.0 - 1.0) + (4.0 - 1.0) + (4.0 - 2.0)
    assert rrhf_loss(scores, rankings).item() == pytest.approx(expected)


def test_rrhf_is_zero_when_scores_agree_with_ranking() -> None:
    # The paper's Eq. (3) has a sign slip; the loss to minimise is 0 for a model that already agrees.
    scores, rankings = as_tensors([[3.0, 2.0, 1.0]], [(0, 1, 2)])
    assert rrhf_loss(scores, rankings).item() == 0.0


def test_ties() -> None:
    scores, rankings = as_tensors([[-1.0, -1.0]], [(0, 1)])
    assert rrhf_loss(scores, rankings).item() == 0.0
    assert pro_loss(scores, rankings).item() == pytest.approx(math.log(2))  # -log(1/2)
    scores, rankings = as_tensors([[0.5, 0.5, 0.5]], [(2, 0, 1)])
    assert pro_loss(scores, rankings).item() == pytest.approx(math.log(3) + math.log(2))


def test_pro_two_candidates_is_logistic() -> None:
    # -log(e^a / (e^a + e^b)) = log(1 + e^(b - a)).
    a, b = 0.3, 1.1
    scores, rankings = as_tensors([[b, a]], [(1, 0)])
    assert pro_loss(scores, rankings).item() == pytest.approx(math.log(1 + math.exp(b - a)))


def test_batch_with_partial_and_invalid_rows_by_hand() -> None:
    rows = [
        [-1.0, -2.5, -0.5, -3.0],
        [-2.0, -2.0, -1.0, -4.0],
        [-0.1, -0.2, -0.3, -0.4],
        [-1.0, -3.0, -2.0, -0.5],
    ]
    rankings = [(1, 3, 0, 2), (3, 2), (2,), (0, 3, 1)]  # full, partial, invalid (one entry), partial
    scores, padded = as_tensors(rows, rankings)
    assert padded[1].tolist() == [3, 2, -1, -1]
    for loss_fn, by_hand in ((rrhf_loss, rrhf_by_hand), (pro_loss, pro_by_hand)):
        expected = batch_by_hand(by_hand, rows, rankings)
        assert loss_fn(scores, padded).item() == pytest.approx(expected)
        # The invalid row is excluded (not a preference): same value as the batch without it.
        kept = [0, 1, 3]
        without = loss_fn(scores[kept], padded[kept]).item()
        assert without == pytest.approx(expected)
        (grad,) = torch.autograd.grad(loss_fn(scores, padded), scores)
        assert grad[2].abs().sum().item() == 0.0
        assert torch.isfinite(grad).all()
        # Unranked candidates of partial rankings get no gradient either.
        assert grad[1, 0].item() == 0.0 and grad[1, 1].item() == 0.0 and grad[3, 2].item() == 0.0


score_rows = st.lists(st.floats(-6, 6), min_size=4, max_size=4)
partial_rankings = st.permutations(range(4)).flatmap(lambda p: st.integers(0, 4).map(lambda k: tuple(p[:k])))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4).flatmap(
        lambda b: st.tuples(
            st.lists(score_rows, min_size=b, max_size=b), st.lists(partial_rankings, min_size=b, max_size=b)
        )
    )
)
def test_losses_match_hand_reference(batch: tuple[list[list[float]], list[tuple[int, ...]]]) -> None:
    rows, rankings = batch
    scores, padded = as_tensors(rows, rankings)
    expected_rrhf = batch_by_hand(rrhf_by_hand, rows, rankings)
    expected_pro = batch_by_hand(pro_by_hand, rows, rankings)
    assert rrhf_loss(scores, padded).item() == pytest.approx(expected_rrhf, abs=1e-9)
    assert pro_loss(scores, padded).item() == pytest.approx(expected_pro, abs=1e-9)


def test_fully_invalid_batch_is_zero_with_working_backward() -> None:
    scores = torch.tensor([[1.0, 2.0, 3.0], [0.0, -1.0, 5.0]], requires_grad=True)
    rankings = pad_rankings([(1,), None], 3)
    for loss_fn in (rrhf_loss, pro_loss):
        loss = loss_fn(scores, rankings)
        assert loss.item() == 0.0
        assert loss.grad_fn is not None
        loss.backward()
        assert scores.grad is not None and scores.grad.abs().sum().item() == 0.0
        scores.grad = None


def test_gradients_finite_for_extreme_scores_and_gradcheck() -> None:
    scores = torch.tensor([[1e4, -1e4, 0.0], [-50.0, 80.0, -1e3]], requires_grad=True)
    rankings = pad_rankings([(1, 0, 2), (2, 0)], 3)
    for loss_fn in (rrhf_loss, pro_loss):
        (grad,) = torch.autograd.grad(loss_fn(scores, rankings), scores)
        assert torch.isfinite(grad).all()
    # Away from RRHF's kinks (no ties, no zero differences) both are differentiable: check numerically.
    torch.manual_seed(3)
    smooth = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    ranks = pad_rankings([(3, 1, 0, 2), (0, 2), (1, 2, 3)], 4)
    assert torch.autograd.gradcheck(lambda s: pro_loss(s, ranks), (smooth,))
    assert torch.autograd.gradcheck(lambda s: rrhf_loss(s, ranks), (smooth,))


def test_bf16_scores_accepted() -> None:
    scores = torch.tensor([[-1.0, -2.0, -0.5]], dtype=torch.bfloat16)
    rankings = pad_rankings([(0, 1, 2)], 3)
    assert pro_loss(scores, rankings).dtype == torch.float32
    expected = pro_by_hand([-1.0, -2.0, -0.5], (0, 1, 2))  # these values are exact in bf16
    assert pro_loss(scores, rankings).item() == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(
    ("rankings", "match"),
    [
        (torch.tensor([[0, 1, 3]]), "indices must be in"),
        (torch.tensor([[0, -2, 1]]), "indices must be in"),
        (torch.tensor([[0, 0, -1]]), "twice"),
        (torch.tensor([[0, -1, 1]]), "padding must come after"),
        (torch.tensor([[0.0, 1.0, 2.0]]), "integer"),
        (torch.tensor([[0, 1, 2], [2, 1, 0]]), "prompts"),
    ],
)
def test_malformed_rankings_raise(rankings: torch.Tensor, match: str) -> None:
    scores = torch.zeros(1, 3)
    for loss_fn in (rrhf_loss, pro_loss):
        with pytest.raises(ValueError, match=match):
            loss_fn(scores, rankings)


def test_pad_rankings() -> None:
    assert pad_rankings([(2, 0), None, (0, 1, 2)], 3).tolist() == [[2, 0, -1], [-1, -1, -1], [0, 1, 2]]
    assert pad_rankings([], 3).shape == (0, 3)
    with pytest.raises(ValueError, match="ranking 0"):
        pad_rankings([(0, 1, 2, 3)], 3)


# --- cycle_loss -----------------------------------------------------------------------------


def test_default_sft_weight() -> None:
    assert default_sft_weight(3) == (3 - 1) ** 2
    assert default_sft_weight(1) == 0.0
    with pytest.raises(ValueError):
        default_sft_weight(0)


def test_cycle_loss_combines_parts() -> None:
    scores = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -0.4, -0.1], [-0.3, -0.6, -0.9]], requires_grad=True)
    rankings = pad_rankings([(0, 1, 2), (2, 0), (1,)], 3)  # the third prompt has no preference: masked out
    sft_by_hand = (1.0 + 0.1) / 2  # minus the best responses' scores (their mean token NLL)
    for objective, by_hand in (("rrhf", rrhf_by_hand), ("pro", pro_by_hand)):
        parts = cycle_loss(scores, rankings, objective, sft_weight=default_sft_weight(3))
        assert isinstance(parts, LossParts)
        rank = batch_by_hand(by_hand, scores.tolist()[:2], [(0, 1, 2), (2, 0)])
        assert parts.rank.item() == pytest.approx(rank)
        assert parts.sft.item() == pytest.approx(sft_by_hand)
        assert parts.total.item() == pytest.approx(rank + (3 - 1) ** 2 * sft_by_hand)
        explicit = cycle_loss(scores, rankings, objective, sft_weight=0.5)
        assert explicit.total.item() == pytest.approx(rank + 0.5 * sft_by_hand)
        parts.total.backward()
        assert scores.grad[2].abs().sum() == 0  # the unranked prompt contributes nothing
        scores.grad = None
    with pytest.raises(ValueError, match="objective"):
        cycle_loss(scores, rankings, "dpo", sft_weight=4.0)  # type: ignore[arg-type]


def test_cycle_loss_sft_equals_the_best_replys_token_level_nll() -> None:
    logps = torch.tensor([[0.0, -1.0, -3.0, -0.5], [0.0, -2.0, -9.0, -4.0]])
    mask = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1]])
    scores = mean_response_logprob(logps, mask).view(2, 1).expand(2, 2).contiguous()
    parts = cycle_loss(scores, pad_rankings([(0, 1), (1, 0)], 2), "rrhf", sft_weight=1.0)
    nll = [(1.0 + 3.0) / 2, (2.0 + 9.0 + 4.0) / 3]  # mean token NLL of each prompt's best reply
    assert parts.sft.item() == pytest.approx(sum(nll) / 2)


def test_cycle_loss_has_no_default_lambda_to_miscount() -> None:
    """A default lambda from the score columns counted the judge's better reply as a candidate: 3 candidates
    plus the better reply gave (4-1)^2 = 9 instead of the paper's (3-1)^2 = 4. The weight must be given."""
    scores = torch.tensor([[-0.5, -1.0, -2.0, -3.0]])  # column 0: the judge's better reply, 1..3: candidates
    rankings = pad_rankings([(0, 1, 2, 3)], 4)
    with pytest.raises(TypeError):
        cycle_loss(scores, rankings, "rrhf")  # type: ignore[call-arg]
    parts = cycle_loss(scores, rankings, "rrhf", sft_weight=default_sft_weight(3))
    assert parts.total.item() == pytest.approx(parts.rank.item() + 4 * 0.5)


# --- a tiny real Llama learns the ranking -----------------------------------------------------


PROMPTS = ["Human: Say hi. Assistant:", "Human: Name a colour. Assistant:"]
CANDIDATES = [[" Hello there!", " Go away.", " hi"], [" Blue.", " Seven.", " Blue is a colour."]]


def tiny_batch() -> dict[str, torch.Tensor]:
    """prompt + response + EOS per candidate, right-padded; the mask covers response and EOS once."""
    from transformers import ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    rows, masks = [], []
    for prompt, candidates in zip(PROMPTS, CANDIDATES):
        prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
        for response in candidates:
            response_ids = tokenizer(response, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
            rows.append(prompt_ids + response_ids)
            masks.append([0] * len(prompt_ids) + [1] * len(response_ids))
    width = max(map(len, rows))
    input_ids = torch.tensor([r + [tokenizer.pad_token_id] * (width - len(r)) for r in rows])
    response_mask = torch.tensor([m + [0] * (width - len(m)) for m in masks])
    attention_mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    shape = (len(PROMPTS), len(CANDIDATES[0]), width)
    return {
        "input_ids": input_ids.view(shape),
        "attention_mask": attention_mask.view(shape),
        "response_mask": response_mask.view(shape),
    }


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=384,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return LlamaForCausalLM(config)


def forward_scores(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    b, c, t = batch["input_ids"].shape
    ids = batch["input_ids"].view(b * c, t)
    logits = model(input_ids=ids, attention_mask=batch["attention_mask"].view(b * c, t)).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    logps = torch.nn.functional.pad(logps, (1, 0)).view(b, c, t)
    return logps, mean_response_logprob(logps, batch["response_mask"])


@pytest.mark.parametrize("objective", ["rrhf", "pro"])
def test_adam_steps_on_tiny_llama_lower_the_loss(objective: str) -> None:
    model = tiny_llama()
    batch = tiny_batch()
    # Prefer the reverse of the model's own ranking: the preferred candidate starts with the lowest score.
    with torch.no_grad():
        _, initial = forward_scores(model, batch)
    target = [tuple(reversed(rank_by_scores(row))) for row in initial.tolist()]
    rankings = pad_rankings(target, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)

    def step_loss() -> LossParts:
        _, scores = forward_scores(model, batch)
        return cycle_loss(scores, rankings, objective, sft_weight=default_sft_weight(3))  # type: ignore[arg-type]

    first = step_loss()
    for _ in range(30):
        optimizer.zero_grad()
        parts = step_loss()
        parts.total.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        optimizer.step()
    with torch.no_grad():
        last = step_loss()
        _, scores = forward_scores(model, batch)
    assert last.total.item() < first.total.item()
    assert last.rank.item() < first.rank.item() or last.rank.item() == 0.0
    assert last.sft.item() < first.sft.item()
    for b, ranking in enumerate(target):
        assert initial[b, ranking[0]].item() < min(initial[b, i].item() for i in ranking[1:])
        others = [scores[b, i].item() for i in ranking[1:]]
        assert scores[b, ranking[0]].item() > max(others)
