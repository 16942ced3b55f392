"""lad_triton.integrations.transformers against the real Hugging Face transformers (issue 13): a
tiny randomly initialised Segformer built from a config (no download) trains on LAD after
``apply_lad_to_segformer``, only the patched instance changes, and the Trainer's gradient
accumulation gets the documented per-micro-batch shares with both entry points."""

import copy
import inspect
import sys

import pytest
import torch
import torch.nn.functional as F

from cases import framework, make_labels, readme_example, rel_err
from lad_triton import locally_adaptive_loss

INSTALL = 'pip install -e ".[transformers]"'
transformers = framework("transformers", INSTALL)

from transformers import SegformerConfig, SegformerForSemanticSegmentation  # noqa: E402

from lad_triton.integrations import transformers as adapter  # noqa: E402


def tiny_segformer(seed=0, **config):
    torch.manual_seed(seed)
    config = SegformerConfig(**{**dict(
        num_labels=5, depths=[1, 1, 1, 1], hidden_sizes=[8, 16, 24, 32],
        num_attention_heads=[1, 1, 2, 2], decoder_hidden_size=16, drop_path_rate=0.0,
        classifier_dropout_prob=0.0), **config})
    return SegformerForSemanticSegmentation(config)


def batch(seed=0, size=32, ignore=255, batch_size=2):
    gen = torch.Generator().manual_seed(seed)
    images = torch.randn(batch_size, 3, size, size, generator=gen)
    labels = make_labels(batch_size, (size, size), 5, n_labels=4, ignore_index=ignore, seed=seed)
    return images, labels


def upsampled(logits, labels):
    return F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)


@pytest.fixture
def restore_classes():
    """Undo apply_lad_to_segformer(None, ...) after the test: other tests see the originals."""
    yield
    for cls in list(adapter._CLASS_OPTIONS):
        cls.forward = cls.__dict__["_lad_original_forward"]
        del cls._lad_original_forward
        del adapter._CLASS_OPTIONS[cls]


def test_only_unchanged_results_of_explicit_bilinear_calls_are_recorded():
    # What the loss may score at the head's resolution: the result of a bilinear call to an
    # explicit size, unchanged since; not a scale_factor or antialias call (other weights), not
    # a result edited in place, and nothing whose input is gone (the records are weak).
    functional = adapter._NN().functional
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    token = adapter._INTERPOLATED.set({})
    try:
        made = adapter._INTERPOLATED.get()
        x = torch.randn(1, 3, 4, 4)
        out = functional.interpolate(x, size=(8, 8), mode="bilinear", align_corners=True)
        assert adapter._interpolated_from(made, out, labels) == (x, True)
        for kwargs in (dict(scale_factor=2), dict(size=(8, 8), antialias=True)):
            other = functional.interpolate(x, mode="bilinear", **kwargs)
            assert adapter._interpolated_from(made, other, labels) == (None, None)
        edited = functional.interpolate(x, size=(8, 8), mode="bilinear")
        edited.mul_(2)
        assert adapter._interpolated_from(made, edited, labels) == (None, None)
        dropped = functional.interpolate(torch.randn(1, 3, 4, 4), size=(8, 8), mode="bilinear")
        assert adapter._interpolated_from(made, dropped, labels) == (None, None)
        assert adapter._interpolated_from(made, out, labels[:, :4]) == (None, None)
    finally:
        adapter._INTERPOLATED.reset(token)


def test_patched_loss_is_lad_on_the_upsampled_logits():
    model = tiny_segformer().eval()
    assert adapter.apply_lad_to_segformer(model, kernel_size=3, power=2.0) is model
    images, labels = batch()
    out = model(pixel_values=images, labels=labels)
    assert out.logits.shape == (2, 5, 8, 8)  # a quarter of the image: the model upsamples
    expected = locally_adaptive_loss(upsampled(out.logits, labels), labels, kernel_size=3,
                                     power=2.0)
    assert rel_err(out.loss, expected) < 1e-5
    assert not torch.allclose(out.loss, F.cross_entropy(upsampled(out.logits, labels), labels,
                                                        ignore_index=255))
    # Positional labels and return_dict=False go through the same patch.
    (loss, logits) = model(images, labels, return_dict=False)[:2]
    assert torch.equal(loss, out.loss)


def test_the_loss_takes_the_heads_logits(monkeypatch):
    # The model's bilinear interpolation is recorded and the loss gets the head's logits with
    # upsample="bilinear" and the model's align_corners (so that the fused kernels form their
    # gradient at the head's resolution), for the value and gradient of upsample-then-loss.
    calls = []
    real = adapter.locally_adaptive_loss

    def spy(logits, target, **kwargs):
        calls.append((tuple(logits.shape), kwargs["upsample"], kwargs["align_corners"]))
        assert "process_group" in kwargs  # the criterion's, as its own forward passes it
        return real(logits, target, **kwargs)

    monkeypatch.setattr(adapter, "locally_adaptive_loss", spy)
    model = tiny_segformer()
    plain = copy.deepcopy(model)
    adapter.apply_lad_to_segformer(model, kernel_size=3)
    images, labels = batch()
    out = model(pixel_values=images, labels=labels)
    assert calls == [((2, 5, 8, 8), "bilinear", False)]
    (grad,) = torch.autograd.grad(out.loss, model.decode_head.classifier.weight)
    logits = plain(pixel_values=images).logits
    expected = locally_adaptive_loss(upsampled(logits, labels), labels, kernel_size=3)
    (expected_grad,) = torch.autograd.grad(expected, plain.decode_head.classifier.weight)
    assert rel_err(out.loss, expected) < 1e-5 and rel_err(grad, expected_grad) < 1e-5
    # Outside a patched forward the module's interpolate is PyTorch's and records nothing.
    module = sys.modules[type(model).__module__]
    assert torch.equal(module.nn.functional.interpolate(logits, size=(16, 16), mode="bilinear"),
                       F.interpolate(logits, size=(16, 16), mode="bilinear"))
    assert adapter._INTERPOLATED.get() is None and len(calls) == 1


def test_the_model_ignore_index_is_used():
    # Label 7 is no class of the 5: it only passes as the config's ignore index.
    model = tiny_segformer(semantic_loss_ignore_index=7).eval()
    adapter.apply_lad_to_segformer(model, kernel_size=3)
    images, labels = batch(ignore=7)
    out = model(pixel_values=images, labels=labels)
    expected = locally_adaptive_loss(upsampled(out.logits, labels), labels, kernel_size=3,
                                     ignore_index=7)
    assert rel_err(out.loss, expected) < 1e-5


def test_only_the_patched_instance_changes():
    patched, plain = tiny_segformer().eval(), tiny_segformer().eval()
    adapter.apply_lad_to_segformer(patched, kernel_size=3)
    images, labels = batch()
    out = plain(pixel_values=images, labels=labels)
    assert torch.equal(out.loss, F.cross_entropy(upsampled(out.logits, labels), labels,
                                                 ignore_index=255))
    assert not torch.allclose(patched(pixel_values=images, labels=labels).loss, out.loss)
    # A deep copy (an EMA model, say) is patched like its original, and bound to itself.
    clone = copy.deepcopy(patched)
    assert torch.equal(clone(pixel_values=images, labels=labels).loss,
                       patched(pixel_values=images, labels=labels).loss)
    assert clone.forward.model is clone


def test_a_few_optimiser_steps_lower_the_loss():
    model = tiny_segformer().train()
    adapter.apply_lad_to_segformer(model, kernel_size=3)
    images, labels = batch()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(8):
        loss = model(pixel_values=images, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


def test_patching_the_class_reaches_every_instance(restore_classes):
    adapter.apply_lad_to_segformer(kernel_size=3)
    model = tiny_segformer().eval()
    images, labels = batch()
    out = model(pixel_values=images, labels=labels)
    expected = locally_adaptive_loss(upsampled(out.logits, labels), labels, kernel_size=3)
    assert rel_err(out.loss, expected) < 1e-5
    # An instance's own options outrank its class's.
    adapter.apply_lad_to_segformer(model, kernel_size=5)
    expected = locally_adaptive_loss(upsampled(out.logits, labels), labels, kernel_size=5)
    assert rel_err(model(pixel_values=images, labels=labels).loss, expected) < 1e-5
    # Other classes of the same modeling modules keep cross-entropy (no ignore_index call).
    module = inspect.getmodule(SegformerForSemanticSegmentation)
    assert type(module.CrossEntropyLoss()) is torch.nn.CrossEntropyLoss


@pytest.mark.parametrize("module_name,class_name", list(adapter.PATCHED_MODELS.items()))
def test_every_listed_model_creates_its_loss_by_the_module_name(module_name, class_name):
    # The patch relies on this pattern; a transformers release that changes it fails here.
    import importlib

    cls = getattr(importlib.import_module(module_name), class_name)
    source = inspect.getsource(cls)
    assert "CrossEntropyLoss(ignore_index=self.config." in source


@pytest.mark.parametrize("kwargs,message", [
    (dict(ignore_index=255), r"ignore_index must be left to the model"),
    (dict(reduction="none"), r"reduction must be 'mean'"),
    (dict(kernel_size=4), r"kernel_size must be an odd integer"),
    (dict(upsample="bilinear"), r"upsample must be left to the model"),
    (dict(align_corners=True), r"align_corners must be left to the model"),
])
def test_bad_options_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        adapter.apply_lad_to_segformer(tiny_segformer(), **kwargs)


def test_other_models_and_binary_segformer_raise():
    with pytest.raises(ValueError, match=r"model must be one of .*SegformerForSemanticSegmentation"
                                         r".*got model=Linear"):
        adapter.apply_lad_to_segformer(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match=r"model.config.num_labels must be >= 2.*got "
                                         r"model.config.num_labels=1"):
        adapter.apply_lad_to_segformer(tiny_segformer(num_labels=1))


def test_compute_loss_func_and_its_share_of_an_accumulated_batch():
    model = tiny_segformer().eval()
    loss_func = adapter.compute_loss_func(kernel_size=3)
    images, labels = batch()
    outputs = model(pixel_values=images)
    expected = locally_adaptive_loss(upsampled(outputs.logits, labels), labels, kernel_size=3)
    assert rel_err(loss_func(outputs, labels), expected) < 1e-5
    assert rel_err(loss_func(outputs.to_tuple(), labels), expected) < 1e-5
    # The Trainer counts labels != -100 over the accumulated step (255 counted); this
    # micro-batch's share is its own count over that.
    count = labels.numel()
    assert rel_err(loss_func(outputs, labels, num_items_in_batch=torch.tensor(3 * count)),
                   expected / 3) < 1e-5
    # The models' interpolation is fixed: the loss's upsample option is the function's to set.
    for name, value in (("upsample", "bilinear"), ("align_corners", True)):
        with pytest.raises(ValueError, match=f"{name} must be left to compute_loss_func"):
            adapter.compute_loss_func(**{name: value})


@pytest.mark.parametrize("route", ["compute_loss_func", "apply_lad_to_segformer"])
@pytest.mark.parametrize("ignore", [255, -100])
def test_trainer_gradient_accumulation(route, ignore, tmp_path):
    # Two micro-batches of one image, accumulated into one SGD step (lr 1, no clipping): the
    # update is minus the gradient of sum_i (n_i / (n_1 + n_2)) * LAD_i, n_i the Trainer's count
    # of labels != -100. With ignore label 255 every pixel counts (equal shares); with -100 a
    # band of it in one image makes the shares unequal.
    framework("accelerate", INSTALL)
    from transformers import Trainer, TrainingArguments

    model = tiny_segformer()
    start = copy.deepcopy(model)
    samples = []
    for seed in (1, 2):
        images, labels = batch(seed=seed, batch_size=1, ignore=ignore)
        if seed == 2 and ignore == -100:
            labels[:, :10] = -100
        samples.append(dict(pixel_values=images[0], labels=labels[0]))

    counts = [int((s["labels"] != -100).sum()) for s in samples]
    assert (counts[0] == counts[1]) == (ignore == 255)
    start.train()
    total = sum(counts[i] / sum(counts) * locally_adaptive_loss(
        upsampled(start(pixel_values=s["pixel_values"][None]).logits, s["labels"][None]),
        s["labels"][None], kernel_size=3, ignore_index=ignore) for i, s in enumerate(samples))
    grads = torch.autograd.grad(total, list(start.parameters()), allow_unused=True)

    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=1,
                             gradient_accumulation_steps=2, max_steps=1, learning_rate=1.0,
                             optim="sgd", lr_scheduler_type="constant", weight_decay=0.0,
                             max_grad_norm=0.0, report_to=[], save_strategy="no",
                             use_cpu=True, dataloader_num_workers=0, seed=0)
    if route == "compute_loss_func":
        trainer = Trainer(model=model, args=args, train_dataset=samples,
                          compute_loss_func=adapter.compute_loss_func(kernel_size=3,
                                                                      ignore_index=ignore))
    else:
        model.config.semantic_loss_ignore_index = ignore
        adapter.apply_lad_to_segformer(model, kernel_size=3)
        trainer = Trainer(model=model, args=args, train_dataset=samples)
    trainer.train()

    moved = [(before - after).detach() for before, after in
             zip(start.parameters(), model.parameters())]
    expected = [torch.zeros_like(m) if g is None else g for m, g in zip(moved, grads)]
    assert rel_err(torch.cat([m.flatten() for m in moved]),
                   torch.cat([g.flatten() for g in expected])) < 1e-4


def test_readme_example_runs():
    exec(readme_example("transformers"), {})
