"""Top-k from counts, and §4.1's ten-crop averaging of the softmax."""

import torch

from pipeline.evaluate import EvalSums, score_batch, topk_correct


def test_topk_counts_and_caps_k_at_the_class_count():
    scores = torch.tensor([[0.1, 0.9, 0.0], [0.8, 0.05, 0.15], [0.2, 0.3, 0.5]])
    labels = torch.tensor([1, 2, 0])
    assert topk_correct(scores, labels, 1) == 1
    assert topk_correct(scores, labels, 2) == 2  # label 2 is second for row 1; label 0 is third for row 2
    assert topk_correct(scores, labels, 5) == 3  # only 3 classes: top-5 is every class


def test_sums_are_exact_counts_not_means_of_means():
    a, b = EvalSums(2.0, 1, 2, 2), EvalSums(6.0, 3, 3, 3)
    assert a.add(b).metrics() == {"val_loss": 8.0 / 5, "val_top1": 80.0, "val_top5": 100.0}


class Recorder(torch.nn.Module):
    """Logits that favour class 0 for flipped crops and class 1 otherwise, by the sign of a pixel."""

    def forward(self, x):
        sign = (x[:, 0, 0, 0] > 0).float()
        return torch.stack([sign * 3, (1 - sign) * 1, torch.zeros_like(sign)], dim=1)


def test_ten_crop_averages_the_softmax_over_the_patches():
    images = torch.zeros(1, 10, 4, 4, 3, dtype=torch.uint8)
    images[0, :3] = 255  # 3 of the 10 patches look like class 0, strongly; 7 like class 1, weakly
    sums = score_batch(Recorder(), images, torch.tensor([1]))
    p0 = torch.softmax(torch.tensor([3.0, 0.0, 0.0]), 0)
    p1 = torch.softmax(torch.tensor([0.0, 1.0, 0.0]), 0)
    mean = (3 * p0 + 7 * p1) / 10
    assert sums.correct1 == int(mean.argmax() == 1)
    assert abs(sums.loss - float(-mean[1].log())) < 1e-5
    single = score_batch(Recorder(), images[:, 0], torch.tensor([1]))  # one crop: the plain softmax
    assert single.correct1 == 0 and abs(single.loss - float(-p0[1].log())) < 1e-5
