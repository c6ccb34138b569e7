"""The label loss against a hand computation; accuracy; picking the answer position."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layercard.errors import LayercardError
from layercard.train.label_loss import answer_position_logits, answer_token_ids, label_accuracy, label_logits, label_loss

LOGITS = torch.tensor([
    [0.0, 2.0, 9.0, -1.0, 0.5, 3.0],   # label tokens (4, 1) → (0.5, 2.0)
    [1.0, math.log(3.0), 0.0, 0.0, 0.0, 0.0],  # → (0, ln 3)
    [0.0, 0.0, 0.0, 0.0, 0.0, 50.0],  # → (0, 0): a coin flip, whatever token 5 gets
], dtype=torch.float64)
LABEL_IDS = [4, 1]
TARGET = torch.tensor([0, 1, 0])


def test_label_loss_equals_hand_computation():
    # row 0: −log(e^0.5 / (e^0.5 + e^2)) = log(1 + e^1.5); row 1: −log(3/4); row 2: log 2
    hand = (math.log(1 + math.exp(1.5)) - math.log(3 / 4) + math.log(2)) / 3
    assert label_loss(LOGITS, LABEL_IDS, TARGET).item() == pytest.approx(hand, rel=1e-12)


def test_label_loss_ignores_the_rest_of_the_vocabulary():
    shifted = LOGITS.clone()
    shifted[:, [0, 2, 3, 5]] += 100.0  # mass on other tokens: the full CE explodes, the label loss does not move
    assert label_loss(shifted, LABEL_IDS, TARGET).item() == pytest.approx(label_loss(LOGITS, LABEL_IDS, TARGET).item())
    full = F.cross_entropy(shifted, torch.tensor(LABEL_IDS)[TARGET])
    assert full.item() > 90


def test_label_accuracy():
    # row 0 predicts index 1 (2.0 > 0.5), wrong; row 1 predicts 1, right; row 2 ties → index 0, right
    assert label_accuracy(LOGITS, LABEL_IDS, TARGET) == pytest.approx(2 / 3)
    assert label_accuracy(LOGITS, LABEL_IDS, torch.tensor([1, 1, 0])) == 1.0


def test_half_precision_is_upcast():
    z = label_logits(LOGITS.to(torch.bfloat16), LABEL_IDS)
    assert z.dtype == torch.float32 and z.shape == (3, 2)


def test_answer_position_logits_picks_the_last_prompt_token():
    logits = torch.arange(2 * 5 * 3, dtype=torch.float32).reshape(2, 5, 3)
    labels = torch.tensor([[-100, -100, 7, 8, -100],   # first answer token at t=2 → logits at t=1
                           [-100, -100, -100, -100, 9]])  # → t=3
    picked = answer_position_logits(logits, labels)
    assert torch.equal(picked, torch.stack([logits[0, 1], logits[1, 3]]))
    with pytest.raises(LayercardError, match="no supervised answer token"):
        answer_position_logits(logits, torch.full((2, 5), -100))


def test_answer_token_ids():
    class WordTokenizer:
        vocab = {" negative": [11], " positive": [12, 3], " neutral": [11, 4]}

        def encode(self, text):
            return self.vocab[text]

    assert answer_token_ids(WordTokenizer(), [" negative", " positive"]) == [11, 12]
    with pytest.raises(LayercardError, match="share a first token"):
        answer_token_ids(WordTokenizer(), [" negative", " neutral"])


def _sequence_batch():
    """[3, 4, 6] logits whose answer-position rows are LOGITS, with labels starting each answer at t=2 or 3."""
    logits = torch.randn(3, 4, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.full((3, 4), -100)
    starts = [2, 3, 2]
    for row, (t, target) in enumerate(zip(starts, TARGET.tolist())):
        logits[row, t - 1] = LOGITS[row]
        labels[row, t] = LABEL_IDS[target]
        labels[row, t + 1:] = 0   # later answer tokens do not matter
    return logits, labels


def test_label_sums_equal_the_hand_computation():
    from layercard.train.losses import label_sums

    logits, labels = _sequence_batch()
    sums = label_sums(logits, labels, LABEL_IDS)
    hand = math.log(1 + math.exp(1.5)) - math.log(3 / 4) + math.log(2)
    assert sums["label_loss_sum"] == pytest.approx(hand, rel=1e-12)
    assert sums["label_correct"] == 2 and sums["label_examples"] == 3


def test_label_targets_refuse_an_answer_outside_the_labels():
    from layercard.train.label_loss import label_targets

    _, labels = _sequence_batch()
    labels[1, 3] = 5
    with pytest.raises(LayercardError, match="row 1 starts its answer with token 5") as exc:
        label_targets(labels, LABEL_IDS)
    assert "\n" not in str(exc.value)


def test_eval_metrics_prefer_the_label_loss_as_quality():
    from layercard.train.training import eval_metrics, evaluate

    logits, labels = _sequence_batch()
    batch = {"input_ids": torch.zeros(3, 4, dtype=torch.long), "attention_mask": torch.ones(3, 4), "labels": labels}
    forward = lambda ids, mask: logits  # noqa: E731  (the logits of a fixed model)
    with_labels = eval_metrics(evaluate(forward, [batch, batch], "cpu", LABEL_IDS), with_accuracy=True)
    hand = (math.log(1 + math.exp(1.5)) - math.log(3 / 4) + math.log(2)) / 3
    assert with_labels["label_loss"] == pytest.approx(hand, rel=1e-12)
    assert with_labels["quality"] == with_labels["label_loss"] and with_labels["quality_name"] == "label_loss"
    assert with_labels["metric"] == pytest.approx(2 / 3) and with_labels["metric_name"] == "label_accuracy"
    plain = eval_metrics(evaluate(forward, [batch], "cpu"), with_accuracy=True)
    assert plain["label_loss"] is None and plain["metric_name"] == "accuracy"
    assert plain["quality"] == plain["eval_loss"] == pytest.approx(with_labels["eval_loss"], rel=1e-12)
