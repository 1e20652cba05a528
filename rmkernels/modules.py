"""``nn.Module`` forms of the ops."""
import torch
from torch import nn

from rmkernels.ops.pooling import last_token_reward


class LastTokenRewardHead(nn.Module):
    """A value head applied only at each sequence's last valid token.

    Put it on any backbone's last hidden state::

        head = rmk.LastTokenRewardHead(model.config.hidden_size)
        rewards = head(outputs.hidden_states[-1], attention_mask=batch["attention_mask"])  # [B, 1]

    Its ``weight``/``bias`` are those of ``nn.Linear(hidden_size, num_labels)``, so an HF
    ``score`` head's state dict loads into it unchanged (``bias=False`` as in HF's
    ``*ForSequenceClassification``).
    """

    def __init__(self, hidden_size, num_labels=1, bias=False, *, backend=None, device=None, dtype=None):
        super().__init__()
        linear = nn.Linear(hidden_size, num_labels, bias=bias, device=device, dtype=dtype)
        self.weight = linear.weight
        self.bias = linear.bias
        self.hidden_size, self.num_labels, self.backend = hidden_size, num_labels, backend

    def forward(self, hidden_states, *, attention_mask=None, lengths=None, cu_seqlens=None):
        return last_token_reward(hidden_states, self.weight, self.bias, attention_mask=attention_mask,
                                 lengths=lengths, cu_seqlens=cu_seqlens, backend=self.backend)

    def extra_repr(self):
        return f"hidden_size={self.hidden_size}, num_labels={self.num_labels}, bias={self.bias is not None}"
