"""The loss modules (``rmk.BradleyTerryLoss``, ``PairwiseRewardLoss``, ``RankingLoss``) equal the
functions they wrap."""
import pytest
import torch
from test_bt_loss import _pair
from test_pairwise import sample_inputs as pairwise_inputs
from utils import assert_close

import rmkernels as rmk


def test_modules():
    c, r = _pair(10, torch.float32, "cpu")
    m = torch.rand(10)
    loss_fn = rmk.BradleyTerryLoss(center_rewards_coefficient=0.01, label_smoothing=0.1)
    assert_close(loss_fn(c, r, margin=m), rmk.bradley_terry_loss(c, r, margin=m, center_coef=0.01,
                                                                 label_smoothing=0.1), rtol=0, atol=0)
    assert_close(rmk.BradleyTerryLoss(margin=0.5, reduction="none")(c, r),
                 rmk.bradley_terry_loss(c, r, margin=0.5, reduction="none"), rtol=0, atol=0)
    assert "center_rewards_coefficient=0.01" in repr(loss_fn)
    head = rmk.PairwiseRewardLoss(8, bias=True, center_rewards_coefficient=0.01)
    h, _, _, lengths, _ = pairwise_inputs(3, 5, 8, torch.float32, "cpu")
    out = head(h, lengths=lengths, margin=0.2)
    exp = rmk.pairwise_reward_loss(h, head.weight, head.bias, lengths=lengths, margin=0.2, center_coef=0.01)
    for o, e in zip(out, exp):
        assert_close(o, e, rtol=0, atol=0)
    out[0].backward()
    assert head.weight.grad is not None and head.bias.grad is not None
    x = torch.randn(4, 3)
    assert_close(rmk.RankingLoss(reduction="sum")(x), rmk.ranking_loss(x, reduction="sum"), rtol=0, atol=0)
    with pytest.raises(ValueError, match="label_smoothing"):
        rmk.BradleyTerryLoss(label_smoothing=0.5)
    with pytest.raises(ValueError, match="reduction"):
        rmk.PairwiseRewardLoss(8, reduction="avg")
    with pytest.raises(TypeError, match="margin"):
        rmk.BradleyTerryLoss(margin=torch.zeros(3))
    # a head given hidden states of another size names its hidden_size (it named `weight`)
    for module in (rmk.LastTokenRewardHead(9), rmk.PairwiseRewardLoss(9)):
        with pytest.raises(ValueError, match="hidden_states' last dim is 8, this head's hidden_size is 9"):
            module(h, lengths=lengths)
