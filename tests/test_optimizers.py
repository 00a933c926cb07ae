import pytest
import torch

from ablate.optimizers import SignSGD


def test_sign_sgd_moves_each_weight_by_lr_against_the_gradient_sign():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0, 0.5]))
    p.grad = torch.tensor([0.3, -5.0, 0.0, -1e-8])
    SignSGD([p], lr=0.1).step()
    torch.testing.assert_close(p.detach(), torch.tensor([0.9, -1.9, 3.0, 0.6]))


def test_sign_sgd_momentum_uses_the_sign_of_the_buffer():
    p = torch.nn.Parameter(torch.zeros(1))
    opt = SignSGD([p], lr=1.0, momentum=0.9)
    p.grad = torch.tensor([1.0])
    opt.step()   # buffer 1.0 -> step -1
    p.grad = torch.tensor([-0.5])
    opt.step()   # buffer 0.9 - 0.5 = 0.4 > 0 -> step -1 again, although this gradient is negative
    torch.testing.assert_close(p.detach(), torch.tensor([-2.0]))


def test_sign_sgd_weight_decay_enters_before_the_sign():
    p = torch.nn.Parameter(torch.tensor([2.0]))
    p.grad = torch.tensor([-0.1])          # alone it would push p up
    SignSGD([p], lr=0.5, weight_decay=1.0).step()  # -0.1 + 1.0 * 2.0 > 0 -> p goes down
    torch.testing.assert_close(p.detach(), torch.tensor([1.5]))


def test_sign_sgd_trains_a_linear_model():
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    y = x @ torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    model = torch.nn.Linear(5, 1)
    opt = SignSGD(model.parameters(), lr=0.01)
    first = None
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(model(x).squeeze(1), y)
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 50


@pytest.mark.parametrize("kwargs", [dict(lr=-1.0), dict(lr=0.1, momentum=1.0), dict(lr=0.1, weight_decay=-1)])
def test_sign_sgd_rejects_impossible_settings(kwargs):
    with pytest.raises(ValueError):
        SignSGD([torch.nn.Parameter(torch.zeros(1))], **kwargs)
