import math

import torch

from rose_select.losses import dpo_loss, sequence_logprob, sft_loss_per_example, token_logprobs


def test_losses_against_manual():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7, dtype=torch.float64)
    labels = torch.tensor([[-100, -100, 3, 4, -100], [-100, 1, 2, 6, 5]])
    lp = torch.log_softmax(logits, -1)
    tl = token_logprobs(logits, labels)
    assert tl.shape == (2, 4)
    assert tl[0, 0] == 0 and tl[0, 3] == 0
    assert math.isclose(tl[0, 1].item(), lp[0, 1, 3].item())
    seq = sequence_logprob(logits, labels)
    assert math.isclose(seq[0].item(), (lp[0, 1, 3] + lp[0, 2, 4]).item())
    assert math.isclose(seq[1].item(), (lp[1, 0, 1] + lp[1, 1, 2] + lp[1, 2, 6] + lp[1, 3, 5]).item())
    sft = sft_loss_per_example(logits, labels)
    assert math.isclose(sft[0].item(), -seq[0].item() / 2)
    assert math.isclose(sft[1].item(), -seq[1].item() / 4)


def test_dpo_loss():
    z = dpo_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([0.5]), torch.tensor([0.5]), beta=0.1)
    assert math.isclose(z.item(), -math.log(1 / (1 + math.exp(-0.1))), rel_tol=1e-6)
    assert math.isclose(dpo_loss(*[torch.zeros(1)] * 4).item(), math.log(2), rel_tol=1e-6)
