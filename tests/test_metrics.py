"""Confusion-matrix metrics and the training losses against hand computations."""
import math

import pytest
import torch

from hyperseg.losses import BootstrappedCrossEntropy, CrossEntropy, build_loss
from hyperseg.metrics import ConfusionMatrix

# Labels (255 = ignored) and predictions of 8 pixels, 3 classes. Counted pairs (true, predicted):
# (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) (1,2); the (255, 2) pixel is ignored.
TARGET = torch.tensor([[0, 0, 1, 1], [2, 2, 255, 1]])
PREDICTED = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
HAND_MATRIX = [[1, 1, 0],
               [0, 2, 1],
               [1, 0, 1]]


def test_confusion_matrix_and_scores_match_a_hand_computation():
    m = ConfusionMatrix(3)
    m.update(PREDICTED, TARGET)
    assert m.matrix.tolist() == HAND_MATRIX
    # IoU = hits / (labelled + predicted - hits): 1 / (2 + 2 - 1), 2 / (3 + 3 - 2), 1 / (2 + 2 - 1)
    assert m.iou().tolist() == pytest.approx([1 / 3, 1 / 2, 1 / 3])
    assert m.miou() == pytest.approx((1 / 3 + 1 / 2 + 1 / 3) / 3)
    assert m.pixel_accuracy() == pytest.approx(4 / 7)
    assert m.class_accuracy().tolist() == pytest.approx([1 / 2, 2 / 3, 1 / 2])
    assert m.mean_class_accuracy() == pytest.approx((1 / 2 + 2 / 3 + 1 / 2) / 3)
    assert m.miou(exclude=[1]) == pytest.approx(1 / 3)
    assert m.total == 7


def test_updates_accumulate_and_reset():
    m = ConfusionMatrix(3)
    m.update(PREDICTED[0], TARGET[0])
    m.update(PREDICTED[1], TARGET[1])
    assert m.matrix.tolist() == HAND_MATRIX
    m.reset()
    assert m.total == 0 and math.isnan(m.miou()) and math.isnan(m.pixel_accuracy())


def test_absent_classes_are_left_out_of_the_mean_and_false_positives_count():
    m = ConfusionMatrix(5)
    m.update(PREDICTED, TARGET)
    iou = m.iou()
    assert math.isnan(iou[3]) and math.isnan(iou[4])          # never labelled nor predicted
    assert m.miou() == pytest.approx(7 / 18)
    m.update(torch.tensor([4]), torch.tensor([0]))          # class 4 predicted, never labelled
    assert m.iou()[4] == 0.0
    assert m.miou() == pytest.approx((1 / 4 + 1 / 2 + 1 / 3 + 0.0) / 4)


def test_ignore_index_is_not_counted():
    m = ConfusionMatrix(3)
    m.update(torch.tensor([0, 1, 2]), torch.tensor([255, 255, 255]))
    assert m.total == 0
    m = ConfusionMatrix(3, ignore_index=0)
    m.update(torch.tensor([1, 1]), torch.tensor([0, 1]))
    assert m.matrix.tolist() == [[0, 0, 0], [0, 1, 0], [0, 0, 0]]


def test_labels_outside_the_classes_are_an_error():
    m = ConfusionMatrix(3)
    with pytest.raises(ValueError, match=r"class ids \[3, 7\] outside 0..2"):
        m.update(torch.tensor([0, 0, 0]), torch.tensor([3, 7, 255]))
    with pytest.raises(ValueError, match="differ in shape"):
        m.update(torch.zeros(2, 2, dtype=torch.long), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="num_classes"):
        ConfusionMatrix(0)


# -- losses -----------------------------------------------------------------------------------

def _two_class_logits(margins):
    """(1, 2, 1, N) logits whose pixel i scores class 0 with margin ``margins[i]`` over class 1."""
    m = torch.tensor(margins, dtype=torch.float64)
    return torch.stack([m, torch.zeros_like(m)])[None, :, None, :]


def _ce(margin, target):
    """Cross-entropy of two-class logits (margin, 0) by hand."""
    return math.log1p(math.exp(-margin)) if target == 0 else math.log1p(math.exp(margin))


MARGINS = [3.0, -2.0, 0.5, 1.0, -0.5, 4.0]
TARGETS = [0, 0, 0, 1, 1, 255]


def _hand_losses():
    return [0.0 if t == 255 else _ce(m, t) for m, t in zip(MARGINS, TARGETS)]


def test_cross_entropy_is_the_mean_over_labelled_pixels():
    logits, target = _two_class_logits(MARGINS), torch.tensor([[TARGETS]])
    expected = sum(_hand_losses()) / 5
    assert CrossEntropy()(logits, target).item() == pytest.approx(expected, rel=1e-6)
    all_ignored = torch.full_like(target, 255)
    assert CrossEntropy()(logits, all_ignored).item() == 0.0


def test_bootstrapped_ce_takes_all_pixels_above_the_threshold_when_more_than_k_are():
    logits, target = _two_class_logits(MARGINS), torch.tensor([[TARGETS]])
    losses = sorted(_hand_losses(), reverse=True)   # 2.127, 1.313, 0.474, 0.474, 0.049, 0
    loss = BootstrappedCrossEntropy(k=2, threshold=0.3)(logits, target).item()
    # the 3rd largest (0.474) exceeds 0.3: the mean of the four losses above 0.3
    assert loss == pytest.approx(sum(x for x in losses if x > 0.3) / 4, rel=1e-6)


def test_bootstrapped_ce_takes_the_k_largest_otherwise():
    logits, target = _two_class_logits(MARGINS), torch.tensor([[TARGETS]])
    losses = sorted(_hand_losses(), reverse=True)
    loss = BootstrappedCrossEntropy(k=2, threshold=1.0)(logits, target).item()
    # the 3rd largest (0.474) does not exceed 1.0: the mean of the two largest
    assert loss == pytest.approx((losses[0] + losses[1]) / 2, rel=1e-6)
    # ignored pixels count as zero losses when they are among the k largest
    loss = BootstrappedCrossEntropy(k=5, threshold=5.0)(logits, target).item()
    assert loss == pytest.approx(sum(losses[:5]) / 5, rel=1e-6)


def test_bootstrapped_ce_averages_per_image_and_small_images_use_all_pixels():
    logits = torch.cat([_two_class_logits(MARGINS), _two_class_logits([0.0] * 6)])
    target = torch.tensor([[TARGETS], [[0, 1, 0, 1, 0, 1]]])
    first = sum(sorted(_hand_losses(), reverse=True)[:2]) / 2
    second = math.log(2.0)                  # every pixel of image 2 loses log 2 < threshold 1
    loss = BootstrappedCrossEntropy(k=2, threshold=1.0)(logits, target).item()
    assert loss == pytest.approx((first + second) / 2, rel=1e-6)
    # at most k pixels: the mean of all of them (zeros of ignored pixels included)
    loss = BootstrappedCrossEntropy(k=6, threshold=0.3)(logits[:1], target[:1]).item()
    assert loss == pytest.approx(sum(_hand_losses()) / 6, rel=1e-6)


def test_losses_have_gradients_and_reject_bad_shapes():
    logits = _two_class_logits(MARGINS).float().requires_grad_()
    build_loss("bootstrapped_ce")(logits, torch.tensor([[TARGETS]])).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="same batch and size"):
        build_loss("ce")(logits, torch.zeros(1, 2, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("dice")
    with pytest.raises(ValueError, match="k must be"):
        BootstrappedCrossEntropy(k=0)
