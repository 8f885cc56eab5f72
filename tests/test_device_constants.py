"""Small constant tensors (normalisation mean/std, box-coder weights) made once per dtype and
device instead of a host-to-device copy per call: same values, same results."""
import torch

from network_files.det_utils import BoxCoder, device_constant
from network_files.transform import GeneralizedRCNNTransform


def test_device_constant_is_made_once_per_values_dtype_and_device():
    cache = {}
    first = device_constant(cache, [0.5, 2.0], torch.float32, torch.device("cpu"))
    assert torch.equal(first, torch.tensor([0.5, 2.0])) and not torch.is_inference(first)
    assert device_constant(cache, (0.5, 2.0), torch.float32, torch.device("cpu")) is first
    other = device_constant(cache, [0.5, 2.0], torch.float64, torch.device("cpu"))
    assert other.dtype == torch.float64 and len(cache) == 2
    assert torch.equal(device_constant(cache, [1.0, 3.0], torch.float32, torch.device("cpu")), torch.tensor([1.0, 3.0]))


def test_normalisation_uses_cached_constants_with_unchanged_results():
    transform = GeneralizedRCNNTransform(64, 96, [0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
    image = torch.rand(3, 20, 30)
    expected = (image - torch.tensor(transform.image_mean)[:, None, None]) / torch.tensor(transform.image_std)[:, None, None]
    with torch.inference_mode():  # the constants cached here must serve autograd below
        assert torch.equal(transform.normalize(image), expected)
    assert len(transform._constants) == 2
    leaf = image.clone().requires_grad_()
    transform.normalize(leaf).sum().backward()
    torch.testing.assert_close(leaf.grad, (1 / torch.tensor(transform.image_std))[:, None, None].expand(3, 20, 30))
    assert len(transform._constants) == 2
    transform.image_mean = [0.0, 0.0, 0.0]  # changed values are honoured
    assert torch.equal(transform.normalize(image), image / torch.tensor(transform.image_std)[:, None, None])


def test_box_coder_weights_are_cached_and_encoding_is_unchanged():
    coder = BoxCoder((10.0, 10.0, 5.0, 5.0))
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 25.0, 15.0]])
    boxes = torch.tensor([[1.0, 2.0, 12.0, 18.0], [4.0, 6.0, 20.0, 16.0]])
    codes = coder.encode_single(boxes, anchors)
    aw, ah = anchors[:, 2] - anchors[:, 0], anchors[:, 3] - anchors[:, 1]
    bw, bh = boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]
    expected = torch.stack([10 * ((boxes[:, 0] + 0.5 * bw) - (anchors[:, 0] + 0.5 * aw)) / aw,
                            10 * ((boxes[:, 1] + 0.5 * bh) - (anchors[:, 1] + 0.5 * ah)) / ah,
                            5 * torch.log(bw / aw), 5 * torch.log(bh / ah)], dim=1)
    torch.testing.assert_close(codes, expected, rtol=1e-6, atol=1e-6)
    assert list(coder._constants) == [((10.0, 10.0, 5.0, 5.0), torch.float32, torch.device("cpu"))]
    assert torch.equal(coder.encode_single(boxes, anchors), codes) and len(coder._constants) == 1
