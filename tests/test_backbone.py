import pytest
import torch
import torch.nn as nn
import torchvision

from scfs.backbone import MultiLayerBackbone, SmallResNet, build_backbone, backbone_state_dict_for_export

torch.set_num_threads(2)


@pytest.mark.parametrize('name,size,want', [
    ('small', 56, {'layer2': (64, 14), 'layer3': (128, 7), 'layer4': (256, 4)}),
    ('small', 28, {'layer2': (64, 7), 'layer3': (128, 4), 'layer4': (256, 2)}),
    ('resnet18', 96, {'layer2': (128, 12), 'layer3': (256, 6), 'layer4': (512, 3)}),
    ('resnet50', 64, {'layer2': (512, 8), 'layer3': (1024, 4), 'layer4': (2048, 2)}),
])
def test_shapes_and_channels(name, size, want):
    b = build_backbone(name)
    out = b(torch.randn(2, 3, size, size))
    assert set(out) == {'layer2', 'layer3', 'layer4', 'pooled'}
    for layer, (c, s) in want.items():
        assert tuple(out[layer].shape) == (2, c, s, s)
        assert b.channels[layer] == c
    assert b.embed_dim == want['layer4'][0]
    assert tuple(out['pooled'].shape) == (2, b.embed_dim)
    torch.testing.assert_close(out['pooled'], out['layer4'].mean((2, 3)))
    assert isinstance(b.net.fc, nn.Identity)


def test_channels_read_from_model():
    b = MultiLayerBackbone(SmallResNet(widths=(8, 16, 24, 40)))
    assert b.channels == {'layer1': 8, 'layer2': 16, 'layer3': 24, 'layer4': 40}
    assert b(torch.randn(1, 3, 32, 32))['layer3'].shape[1] == 24
    b34 = build_backbone('resnet34')
    assert [b34.channels[f'layer{i}'] for i in (2, 3, 4)] == [128, 256, 512]


def test_matches_torchvision_forward_and_channels_last():
    b = build_backbone('resnet18').eval()
    x = torch.randn(2, 3, 80, 80)
    with torch.no_grad():
        ref = b.net(x)
        out = b(x)
        torch.testing.assert_close(out['pooled'], ref)
        bcl = b.to(memory_format=torch.channels_last)
        out_cl = bcl(x.to(memory_format=torch.channels_last))
    for k in out:
        torch.testing.assert_close(out_cl[k], out[k], atol=1e-4, rtol=1e-4)


def test_unknown_backbone():
    with pytest.raises(Exception, match='unknown backbone'):
        build_backbone('vgg16')


@pytest.mark.parametrize('name', ['small', 'resnet18', 'resnet50'])
def test_export_strict_roundtrip(name):
    b = build_backbone(name)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.01 * torch.randn_like(p))
    sd = backbone_state_dict_for_export(b)
    m = SmallResNet() if name == 'small' else getattr(torchvision.models, name)()
    m.load_state_dict(sd, strict=True)
    # trained weights are copied, fc comes from a fresh init
    torch.testing.assert_close(m.conv1.weight, b.net.conv1.weight)
    assert m.fc.weight.shape[0] == 1000
    m.fc = nn.Identity()
    m.eval(); b.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(m(x), b(x)['pooled'])


def test_small_trains_end_to_end():
    """Every parameter of the backbone gets a gradient from a loss on `pooled`, and the backbone alone (under a fixed
    random linear readout) learns random labels of noise images: a stage that is skipped, detached or frozen fails one
    of the two (minimising pooled**2 did not: any ReLU network does that by switching off)."""
    import torch.nn.functional as F
    torch.manual_seed(0)
    b = build_backbone('small', widths=(8, 16, 32, 64))
    x, y = torch.randn(16, 3, 24, 24), torch.randperm(16) % 2
    readout = torch.randn(64, 2)                                     # fixed: only the backbone can fit the labels
    F.cross_entropy(b(x)['pooled'] @ readout, y).backward()
    assert not [n for n, p in b.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    opt = torch.optim.Adam(b.parameters(), lr=1e-2)
    for step in range(100):
        logits = b(x)['pooled'] @ readout
        if (logits.argmax(1) == y).all(): break
        opt.zero_grad(); F.cross_entropy(logits, y).backward(); opt.step()
    assert (logits.argmax(1) == y).all(), step


def test_export_custom_small_and_deepcopy():
    import copy
    b = build_backbone('small', widths=(8, 16, 24, 32), layers=(1, 2, 1, 1))
    assert b.embed_dim == 32 and b.channels['layer2'] == 16
    sd = backbone_state_dict_for_export(b)
    m = SmallResNet(widths=(8, 16, 24, 32), layers=(1, 2, 1, 1))
    m.load_state_dict(sd, strict=True)
    t = copy.deepcopy(b)   # the teacher is a deepcopy of the student backbone
    assert t.channels == b.channels and t.arch == 'small'
    with pytest.raises(Exception):
        SmallResNet().load_state_dict(sd, strict=True)   # a different architecture must not load
