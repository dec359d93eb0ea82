import pytest
import torch
import torch.nn.functional as F

from ckaflow.config import ModelSpec
from ckaflow.layers import layer_registry
from ckaflow.models import Network, record_layers
from tests.tolerances import linear_atol, mean_rtol


def _net(arch, method, out=10):
    torch.manual_seed(0)
    net = Network(method, ModelSpec(arch, 8), 1, 28, out)
    # non-trivial BatchNorm statistics, so eval-mode BN is not the identity
    with torch.no_grad():
        net.train()(torch.randn(16, 1, 28, 28))
    return net.eval()


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
@pytest.mark.parametrize("method", ["simclr", "supervised"])
def test_hooks_capture_exactly_the_registry_in_forward_order(arch, method):
    net = _net(arch, method)
    with torch.no_grad(), record_layers(net) as captured:
        net(torch.randn(3, 1, 28, 28))
    assert list(captured) == [layer.name for layer in layer_registry(arch, method)]
    assert all(t.shape[0] == 3 and t.ndim == 2 for t in captured.values())


def test_registry_kinds_and_counts():
    r18 = layer_registry("resnet18", "supervised")
    assert [layer.kind for layer in r18[:5]] == ["stem", "relu1", "residual", "out", "relu1"]
    assert sum(layer.kind == "residual" for layer in r18) == 8
    r50 = layer_registry("resnet50", "simclr")
    assert sum(layer.kind == "relu2" for layer in r50) == 16
    assert [layer.name for layer in r50[-3:]] == ["pool", "head.0", "head.1"]
    assert [layer.index for layer in r50] == list(range(len(r50)))


def _hand_block(block, x):
    """A residual block recomputed by hand: returns relu1, relu2 (or None), residual, out."""
    relu1 = F.relu(block.bn1(block.conv1(x)))
    if hasattr(block, "conv3"):
        relu2 = F.relu(block.bn2(block.conv2(relu1)))
        residual = block.bn3(block.conv3(relu2))
    else:
        relu2 = None
        residual = block.bn2(block.conv2(relu1))
    identity = block.downsample(x) if block.downsample is not None else x
    return relu1, relu2, residual, F.relu(residual + identity)


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_captured_tensors_equal_a_hand_computation(arch):
    """torchvision reuses one in-place ReLU and adds the identity in place: every captured
    tensor must still be exactly the tensor the layer name promises."""
    net = _net(arch, "supervised")
    x = torch.randn(4, 1, 28, 28)
    with torch.no_grad(), record_layers(net) as cap:
        net(x)
        enc = net.encoder
        h = F.relu(enc.bn1(enc.conv1(x)))
        assert torch.equal(cap["stem"], h.flatten(1))
        for stage in range(1, 5):
            for b, block in enumerate(getattr(enc, f"layer{stage}")):
                relu1, relu2, residual, out = _hand_block(block, h)
                p = f"layer{stage}.{b}"
                assert torch.equal(cap[f"{p}.relu1"], relu1.flatten(1)), p
                if relu2 is not None:
                    assert torch.equal(cap[f"{p}.relu2"], relu2.flatten(1)), p
                assert torch.equal(cap[f"{p}.residual"], residual.flatten(1)), p
                assert torch.equal(cap[f"{p}.out"], out.flatten(1)), p
                assert cap[f"{p}.relu1"].min() >= 0
                assert cap[f"{p}.residual"].min() < 0  # the pre-addition branch is not ReLU'd
                h = out
        pooled = h.mean(dim=(2, 3))
        # two float32 means of the same H·W values (≥ 0, so mean|h| is the mean itself)
        exact = h.double().mean(dim=(2, 3))
        dpool = 2 * mean_rtol(h.shape[2] * h.shape[3]) * exact
        assert ((cap["pool"] - pooled).abs() <= dpool).all()
        # the classifier on those two inputs (`linear_atol`: |W|·their distance + rounding)
        bound = linear_atol(net.head, exact, (cap["pool"] - pooled).abs().double())
        assert ((cap["fc"] - net.head(pooled)).abs() <= bound).all()


def test_cifar_stem_keeps_resolution_and_width_scales_channels():
    net = _net("resnet18", "simclr", out=32)
    with torch.no_grad(), record_layers(net, ["stem", "layer4.1.out", "head.1"]) as cap:
        net(torch.randn(2, 1, 28, 28))
    assert cap["stem"].shape[1] == 8 * 28 * 28
    assert cap["layer4.1.out"].shape[1] == 64 * 4 * 4
    assert cap["head.1"].shape[1] == 32


def test_unknown_layer_name_is_refused():
    net = _net("resnet18", "simclr", out=16)
    with pytest.raises(KeyError, match="unknown layers"), record_layers(net, ["layer9.0.out"]):
        pass


@pytest.mark.parametrize(
    "arch,size,method", [("resnet18", 28, "simclr"), ("resnet50", 32, "supervised"),
                         ("resnet34", 96, "simclr"), ("resnet50", 65, "simclr")],
)  # fmt: skip
def test_layer_features_without_torch_match_the_network(arch, size, method):
    from ckaflow.layers import layer_features
    from ckaflow.models import Network, record_layers

    net = Network(method, ModelSpec(arch, 4), 3, size, 10).eval()
    with torch.no_grad(), record_layers(net) as captured:
        net(torch.zeros(2, 3, size, size))
    got = {name: t.shape[1] for name, t in captured.items()}
    assert layer_features(arch, 4, size, method, 10) == got
