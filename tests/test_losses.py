import torch
import torch.nn.functional as F

from ablate.losses import FocalLoss, OneHotMSELoss


def seed_label_smoothing(x, target, smoothing):
    """The seed report's LabelSmoothingCrossEntropy.forward, written out."""
    logprobs = F.log_softmax(x, dim=-1)
    nll = -logprobs.gather(dim=-1, index=target.unsqueeze(1)).squeeze(1)
    smooth = -logprobs.mean(dim=-1)
    return ((1.0 - smoothing) * nll + smoothing * smooth).mean()


def test_torch_label_smoothing_equals_seed_formula():
    g = torch.Generator().manual_seed(0)
    for eps in (0.0, 0.1, 0.15, 0.2, 0.5):
        x = torch.randn(64, 10, generator=g) * 3
        t = torch.randint(0, 10, (64,), generator=g)
        ours = torch.nn.CrossEntropyLoss(label_smoothing=eps)(x, t)
        torch.testing.assert_close(ours, seed_label_smoothing(x, t, eps), rtol=1e-6, atol=1e-6)


def test_focal_loss_matches_its_definition():
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(32, 10, generator=g), torch.randint(0, 10, (32,), generator=g)
    p_t = F.softmax(x, dim=1)[torch.arange(32), t]
    expected = (0.25 * (1 - p_t) ** 2 * -torch.log(p_t)).mean()
    torch.testing.assert_close(FocalLoss(alpha=0.25, gamma=2)(x, t), expected)


def test_focal_loss_with_gamma_zero_is_scaled_cross_entropy():
    x, t = torch.randn(16, 10), torch.randint(0, 10, (16,))
    torch.testing.assert_close(FocalLoss(alpha=0.5, gamma=0)(x, t), 0.5 * F.cross_entropy(x, t))


def test_focal_loss_down_weights_easy_examples():
    t = torch.tensor([0])
    easy, hard = torch.tensor([[5.0, 0, 0]]), torch.tensor([[0.5, 0, 0]])
    ratio_focal = FocalLoss(gamma=2)(easy, t) / FocalLoss(gamma=2)(hard, t)
    ratio_ce = F.cross_entropy(easy, t) / F.cross_entropy(hard, t)
    assert ratio_focal < ratio_ce / 10


def test_mse_loss_is_against_one_hot_targets():
    x = torch.tensor([[0.9, 0.1, 0.0], [0.0, 0.0, 2.0]])
    t = torch.tensor([0, 1])
    one_hot = torch.tensor([[1.0, 0, 0], [0, 1.0, 0]])
    torch.testing.assert_close(OneHotMSELoss(num_classes=3)(x, t), ((x - one_hot) ** 2).mean())
