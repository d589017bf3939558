"""The MTP layer is a full block: its indexer learns its KL and its MoE is balanced; the sequence-wise
balance loss is summed over MoE layers (DeepSeek-V3 eq. 17-20 per layer).

Run: ``pytest packages/core/tests/test_core_mtp_balance.py``.
"""

from __future__ import annotations

import torch

from dsv.core.model import DSVForCausalLM
from dsv.core.model.moe import MoE
from dsv.core.presets import tiny


def test_mtp_indexer_gets_its_kl_gradient_dense_and_sparse() -> None:
    torch.manual_seed(0)
    model = DSVForCausalLM(tiny(index_topk=8)).train()
    x = torch.randint(0, 1024, (2, 24))
    mtp = model.mtp_layers[0]
    for sparse in (False, True):  # the warm-up's dense target, then the sparse stage's selected set
        model.zero_grad()
        out = model(x, use_sparse=sparse, indexer_loss=True, return_mtp=True, return_indices=True)
        assert out.indexer_loss is not None
        out.indexer_loss.backward()
        for name, p in mtp.named_parameters():
            has_grad = p.grad is not None and bool(p.grad.abs().sum() > 0)
            # the KL reaches the MTP indexer and nothing else of the MTP block (inputs detached)
            assert has_grad == name.startswith("self_attn.indexer."), (sparse, name)
        assert out.mtp_indices is not None and out.mtp_indices[0] is not None
        assert out.mtp_indices[0].shape == (2, 23, 8)
    # the mean covers the MTP indexer: without the MTP layers the loss is the main layers' alone
    with torch.no_grad():
        both = model(x, use_sparse=False, indexer_loss=True, return_mtp=True)
        main = model(x, use_sparse=False, indexer_loss=True)
    assert both.indexer_loss is not None and main.indexer_loss is not None
    assert not torch.allclose(both.indexer_loss, main.indexer_loss)


def test_mtp_moe_reports_load_and_balance_loss() -> None:
    torch.manual_seed(0)
    model = DSVForCausalLM(tiny()).train()
    x = torch.randint(0, 1024, (2, 16))
    out = model(x, return_mtp=True)
    assert len(model.mtp_moe_layers) == 1 and len(out.mtp_expert_load) == 1
    k = model.config.num_experts_per_tok
    assert int(out.mtp_expert_load[0].sum()) == 2 * 15 * k  # every MTP position routed to k experts
    mtp_moe = model.mtp_moe_layers[0]
    assert mtp_moe.aux_loss is not None
    main_aux = sum(m.aux_loss for m in model.moe_layers)  # type: ignore[misc]
    assert out.aux_loss is not None
    torch.testing.assert_close(out.aux_loss, main_aux + mtp_moe.aux_loss)
    # a forward without the MTP layers neither reports nor counts them, whatever they held before
    out2 = model(x)
    assert out2.mtp_expert_load == [] and out2.mtp_logits is None
    torch.testing.assert_close(out2.aux_loss, sum(m.aux_loss for m in model.moe_layers))


def test_sequence_balance_loss_by_hand_for_two_layers() -> None:
    """Two MoE layers, one sequence of T=2 tokens, E=4 experts, K=1: V3's eq. 17-20 by hand.

    f_i = E / (K T) * (tokens choosing i); P_i = mean over tokens of s_i / sum_j s_j; L = sum_i f_i P_i
    per layer, and the model's balance loss is the sum of the two layers' (not their mean).
    """
    # layer A: affinities of two tokens, token 0 picks expert 0, token 1 picks expert 2
    sa = torch.tensor([[[0.4, 0.2, 0.2, 0.2], [0.1, 0.1, 0.6, 0.2]]])
    ia = torch.tensor([[[0], [2]]])
    # f = 4/2 * [1, 0, 1, 0] = [2, 0, 2, 0]; P = [(0.4+0.1)/2, (0.2+0.1)/2, (0.2+0.6)/2, (0.2+0.2)/2]
    # L_A = 2 * 0.25 + 2 * 0.40 = 1.3
    # layer B: both tokens pick expert 1 (unnormalised affinities: rows sum to 2 and 1)
    sb = torch.tensor([[[0.5, 1.0, 0.25, 0.25], [0.25, 0.5, 0.125, 0.125]]])
    ib = torch.tensor([[[1], [1]]])
    # normalised rows are both [0.25, 0.5, 0.125, 0.125]; f = [0, 4, 0, 0]; L_B = 4 * 0.5 = 2.0
    moe = MoE(tiny(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=1))
    la = moe._sequence_balance_loss(sa, ia)
    lb = moe._sequence_balance_loss(sb, ib)
    torch.testing.assert_close(la, torch.tensor(1.3))
    torch.testing.assert_close(lb, torch.tensor(2.0))

    # the model sums its layers: a 3-layer tiny model (one dense, two MoE) against each layer's own
    torch.manual_seed(0)
    model = DSVForCausalLM(tiny(num_hidden_layers=3, num_nextn_predict_layers=0)).train()
    out = model(torch.randint(0, 1024, (2, 12)))
    per_layer = [m.aux_loss for m in model.moe_layers]
    assert len(per_layer) == 2 and all(a is not None for a in per_layer)
    assert out.aux_loss is not None
    torch.testing.assert_close(out.aux_loss, per_layer[0] + per_layer[1])  # type: ignore[operator]
