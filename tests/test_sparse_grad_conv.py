"""The convolution whose backward pass visits only the positions with a gradient, against autograd's
dense convolution backward (float64, so any difference in the computation itself would show)."""
import pytest
import torch
from torch import nn

from network_files.ops import fast_path, sparse_grad_conv
from network_files.ops.sparse_grad_conv import sparse_grad_conv2d


def dense_and_sparse_gradients(conv: nn.Conv2d, x: torch.Tensor, density: float, seed: int = 0):
    """Gradients (input, weight[, bias]) of sum(conv(x) * g) for a g that is zero except at a
    random ``density`` of the output positions, by autograd's convolution and by ours."""
    generator = torch.Generator().manual_seed(seed)
    x_dense, x_sparse = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_dense, y_sparse = conv(x_dense), sparse_grad_conv2d(x_sparse, conv)
    assert torch.equal(y_dense, y_sparse)  # the forward pass is the usual convolution
    n, _, h, w = y_dense.shape
    keep = torch.rand(n, 1, h, w, generator=generator, dtype=x.dtype) < density
    g = torch.randn(y_dense.shape, generator=generator, dtype=x.dtype) * keep
    params = [conv.weight] + ([conv.bias] if conv.bias is not None else [])
    dense = torch.autograd.grad(y_dense, [x_dense, *params], g)
    sparse = torch.autograd.grad(y_sparse, [x_sparse, *params], g)
    return dense, sparse, int(keep.sum())


@pytest.mark.parametrize("kernel,stride,padding,dilation,bias,channels_last", [
    (3, 1, 1, 1, True, True),  # the RPN head's and the FPN outputs' convolution
    (3, 1, 1, 1, True, False),
    (3, 2, 1, 1, True, False),
    (3, 1, 2, 2, False, True),
    (1, 1, 0, 1, True, True),
    (5, 2, 2, 1, True, False),
    ((3, 1), 1, (1, 0), 1, False, False),
])
def test_gradients_equal_the_dense_backward(kernel, stride, padding, dilation, bias, channels_last, monkeypatch):
    # Small chunks: several chunks per call, and border positions (masked taps) in most of them.
    monkeypatch.setattr(sparse_grad_conv, "CHUNK", 7)
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 5, kernel, stride, padding, dilation, bias=bias).double()
    x = torch.randn(2, 6, 13, 11, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    dense, sparse, positions = dense_and_sparse_gradients(conv, x, density=0.2)
    assert positions > 14  # several chunks
    for name, d, s in zip(("input", "weight", "bias"), dense, sparse):
        assert s.shape == d.shape, name
        torch.testing.assert_close(s, d, rtol=1e-12, atol=1e-12, msg=name)
    assert sparse[0].is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def test_sparse_pass_runs_below_the_dense_fraction_and_dense_pass_above(monkeypatch):
    calls = []
    monkeypatch.setattr(sparse_grad_conv._SparseBackward, "add",
                        lambda self, positions: calls.append(len(positions)))
    conv = nn.Conv2d(4, 4, 3, padding=1).double()
    x = torch.randn(1, 4, 10, 10, dtype=torch.float64)
    dense_and_sparse_gradients(conv, x, density=0.1)
    assert calls and calls[0] < sparse_grad_conv.DENSE_FRACTION * 100
    calls.clear()
    dense, sparse, _ = dense_and_sparse_gradients(conv, x, density=0.9)
    assert not calls  # dense gradients take the usual backward pass, with equal results
    for d, s in zip(dense, sparse):
        torch.testing.assert_close(s, d, rtol=1e-12, atol=1e-12)


def test_all_zero_gradient_and_input_without_gradient():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 6, 6, requires_grad=True)
    y = sparse_grad_conv2d(x, conv)
    y.backward(torch.zeros_like(y))
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(conv.weight.grad, torch.zeros_like(conv.weight))
    frozen_input = torch.randn(1, 3, 6, 6)  # e.g. a frozen layer's output: only the weights need gradients
    y = sparse_grad_conv2d(frozen_input, conv)
    (y[0, :, 2, 3].sum()).backward()
    expected = torch.autograd.grad(conv(frozen_input)[0, :, 2, 3].sum(), conv.weight)[0]
    torch.testing.assert_close(conv.weight.grad, expected)


def test_other_convolutions_run_as_usual():
    x = torch.randn(1, 4, 8, 8)
    for conv in (nn.Conv2d(4, 4, 3, padding="same"), nn.Conv2d(4, 4, 3, padding=1, groups=2),
                 nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect")):
        y = sparse_grad_conv2d(x, conv)
        assert y.grad_fn is not None and "SparseGrad" not in type(y.grad_fn).__name__
        torch.testing.assert_close(y, conv(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_grad_conv2d(x, nn.Conv2d(4, 4, 3, padding=1))
    assert y.dtype == torch.bfloat16 and "SparseGrad" not in type(y.grad_fn).__name__


def test_rpn_head_gradient_is_sparse_in_training(tiny_detector, monkeypatch):
    """In a training step the RPN head's 3x3 conv gets a gradient only at the sampled anchors'
    positions, and the sparse pass computes it; in inference, or in reference mode, it is not used."""
    seen = []
    original = sparse_grad_conv._SparseBackward.add
    monkeypatch.setattr(sparse_grad_conv._SparseBackward, "add",
                        lambda self, positions: seen.append(len(positions)) or original(self, positions))
    torch.manual_seed(0)
    model = tiny_detector(min_size=256, max_size=256, rpn_batch_size_per_image=16).train()
    images = [torch.rand(3, 256, 256), torch.rand(3, 256, 256)]
    targets = [{"boxes": torch.tensor([[30.0, 40.0, 120.0, 150.0]]), "labels": torch.tensor([1])}] * 2
    sum(model(images, targets).values()).backward()
    assert seen and max(seen) <= 2 * 16  # at most the sampled anchors' positions of the two images
    seen.clear()
    with fast_path.reference_mode():
        sum(model(images, targets).values()).backward()
    assert not seen


def test_hooked_or_subclassed_convolutions_and_low_precision_run_as_usual():
    x = torch.randn(1, 4, 8, 8)
    hooked = nn.Conv2d(4, 4, 3, padding=1)
    calls = []
    hooked.register_forward_hook(lambda module, inputs, output: calls.append(1))

    class Scaled(nn.Conv2d):
        def forward(self, inputs):
            return super().forward(inputs) * 2

    for conv, inputs in ((hooked, x), (Scaled(4, 4, 3, padding=1), x), (nn.Conv2d(4, 4, 3, padding=1).bfloat16(), x.bfloat16())):
        y = sparse_grad_conv2d(inputs, conv)
        assert "SparseGrad" not in type(y.grad_fn).__name__
        torch.testing.assert_close(y, conv(inputs))
    assert calls


def test_second_derivative_is_refused_not_wrong():
    conv = nn.Conv2d(3, 4, 3, padding=1)
    x = torch.randn(1, 3, 6, 6)
    m = torch.randn(1, 4, 6, 6, requires_grad=True)
    (grad_w,) = torch.autograd.grad((sparse_grad_conv2d(x, conv) * m).sum(), conv.weight, create_graph=True)
    with pytest.raises(RuntimeError):
        torch.autograd.grad(grad_w.sum(), m)


def test_traced_model_keeps_plain_convolutions():
    """torch.jit.trace in training mode with autograd on records convolutions, not a Python op."""
    from network_files.rpn_function import RPNHead

    head = RPNHead(8, 3).train()
    traced = torch.jit.trace(head, ([torch.randn(1, 8, 6, 6)],), strict=False)
    assert "SparseGrad" not in str(traced.graph) and "conv" in str(traced.graph)
