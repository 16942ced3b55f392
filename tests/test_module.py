"""LocallyAdaptiveLoss as a module (issue 5): readable repr, pickles, follows .to(), no
parameters, the weight a buffer."""

import pickle

import torch

from cases import make_labels, make_logits
from lad_triton import LocallyAdaptiveLoss


def test_repr_names_every_option():
    criterion = LocallyAdaptiveLoss(kernel_size=3, power=2.0, stride=2, weight=torch.ones(4))
    text = repr(criterion)
    for part in ("LocallyAdaptiveLoss(", "kernel_size=3", "power=2.0", "stride=2",
                 "ignore_index=255", "normalizer='count'", "reduction='mean'",
                 "pooling='minkowski'", "lmp_ratio=0.3", "lmp_p=1.7", "topk_ratio=0.2",
                 "backend='auto'",
                 "sync=False", "weight=<4 class weights>"):
        assert part in text, (part, text)


def test_pickle_round_trip_computes_the_same_loss():
    criterion = LocallyAdaptiveLoss(kernel_size=3, weight=torch.tensor([1.0, 0.5, 2.0, 1.0]))
    clone = pickle.loads(pickle.dumps(criterion))
    logits = make_logits((2, 4, 6, 7))
    target = make_labels(2, (6, 7), 4)
    assert torch.equal(clone(logits, target), criterion(logits, target))
    assert torch.equal(clone.weight, criterion.weight)


def test_to_moves_the_weight_and_there_are_no_parameters():
    criterion = LocallyAdaptiveLoss(weight=torch.ones(3))
    assert list(criterion.parameters()) == []
    assert [name for name, _ in criterion.named_buffers()] == ["weight"]
    assert criterion.to(torch.float64).weight.dtype == torch.float64
    assert criterion.to("meta").weight.device.type == "meta"


def test_module_without_weight_has_a_none_buffer_and_state_dict():
    criterion = LocallyAdaptiveLoss()
    assert criterion.weight is None and criterion.state_dict() == {}
