"Tests of scfs.evaluate: kNN (against a loop from the formula), linear probe, loading and strict export."
import math
from dataclasses import asdict
import pytest
import torch
import torch.nn.functional as F
import torchvision

from scfs.core import ScfsError
from scfs.evaluate import knn_eval, knn_classify, linear_probe, load_backbone, export_backbone, extract_features
from scfs.backbone import SmallResNet


def _blobs(n, g, centres, noise=0.3):
    y = torch.randint(0, len(centres), (n,), generator=g)
    return F.normalize(centres[y] + noise * torch.randn(n, centres.shape[1], generator=g), dim=1), y


def _ref(trf, trl, tef, tel, k, T):
    C, ok = int(trl.max()) + 1, 0
    for x, y in zip(tef, tel):
        s = trf @ x; top = s.argsort(descending=True)[:k]
        v = torch.zeros(C)
        for i in top: v[trl[i]] += math.exp(s[i] / T)
        ok += int(v.argmax() == y)
    return 100.0 * ok / len(tel)


def test_knn_matches_formula_and_handles_small_sets():
    g = torch.Generator().manual_seed(1)
    c = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    trf, trl = _blobs(150, g, c); tef, tel = _blobs(33, g, c)     # < 100 test images (the official code crashes)
    for k in (1, 5, 20):
        assert math.isclose(knn_classify(trf, trl, tef, tel, k=k), _ref(trf, trl, tef, tel, k, 0.07))
    acc = knn_eval(trf, trl, tef, tel, ks=(10, 20, 100, 200))
    assert set(acc) == {10, 20, 100, 150} and acc[10] > 80            # k is capped at the train-set size
    assert math.isclose(knn_eval(trf, trl, tef, tel, ks=(20,), chunk=7)[20], acc[20])   # chunking does not matter
    perfect = knn_classify(trf, trl, trf, trl, k=1)
    assert perfect == 100.0


def test_linear_probe_learns_and_fails_on_noise():
    g = torch.Generator().manual_seed(2)
    c = F.normalize(torch.randn(5, 16, generator=g), dim=1)
    trf, trl = _blobs(400, g, c); tef, tel = _blobs(100, g, c)
    assert linear_probe(trf, trl, tef, tel) > 80
    assert linear_probe(trf, trl[torch.randperm(400, generator=g)], tef, tel) < 45


def _fake_checkpoint(path, backbone, **kw):
    from scfs.config import get_config
    from scfs.model import build_model
    cfg = get_config('tiny', backbone=backbone, out_dim=64, head_hidden=32, head_bottleneck=16, layer_out_dim=16, **kw)
    torch.manual_seed(0)
    m = build_model(cfg)
    with torch.no_grad():                      # make teacher != student so that `which` matters
        for p in m.teacher.parameters(): p.add_(0.01)
    torch.save(dict(config=asdict(cfg), model=m.state_dict(), epoch=1), path)
    return m


@pytest.mark.parametrize('arch,kw', [('small', dict(backbone_kw={'widths': [8, 16, 32, 64]})), ('resnet18', dict(backbone_kw={}))])
def test_export_loads_strict_and_matches_teacher(tmp_path, arch, kw):
    m = _fake_checkpoint(tmp_path / 'ck.pth', arch, **kw)
    out = export_backbone(tmp_path / 'ck.pth', tmp_path / 'exp' / 'bb.pth')
    sd = torch.load(out)
    net = SmallResNet(widths=(8, 16, 32, 64)) if arch == 'small' else torchvision.models.resnet18()
    net.load_state_dict(sd, strict=True)
    tsd = m.teacher['backbone'].net.state_dict()
    assert all(torch.equal(sd[k], v) for k, v in tsd.items())
    bb, info = load_backbone(tmp_path / 'ck.pth', which='student')
    assert torch.equal(bb.net.conv1.weight, m.student['backbone'].net.conv1.weight)
    bb2, info2 = load_backbone(out)                                     # exported file (+ side json) loads back
    x = torch.randn(2, 3, 32, 32)
    bb2.eval(); t = m.teacher['backbone'].eval()
    torch.testing.assert_close(bb2(x)['pooled'], t(x)['pooled'])


def test_load_errors(tmp_path):
    with pytest.raises(ScfsError, match='checkpoint not found'): load_backbone(tmp_path / 'nope.pth')
    (tmp_path / 'junk.pth').write_text('not a checkpoint')
    with pytest.raises(ScfsError, match='cannot read'): load_backbone(tmp_path / 'junk.pth')
    with pytest.raises(ScfsError): load_backbone(None, which='neither')


def test_extract_features_normalised_and_mode_restored():
    from torch.utils.data import TensorDataset
    bb, _ = load_backbone(None, backbone='small', backbone_kw={'widths': [8, 8, 16, 16]})
    bb.train()
    ds = TensorDataset(torch.randn(10, 3, 32, 32), torch.arange(10) % 3)
    f, l = extract_features(bb, ds, batch_size=4)
    assert f.shape == (10, 16) and torch.allclose(f.norm(dim=1), torch.ones(10)) and l.tolist() == (torch.arange(10) % 3).tolist()
    assert bb.training


def _labelled(root, classes, n=3, size=8):
    "A labelled folder: `n` random `size`-px images in each class sub-folder of `classes`."
    from PIL import Image
    g = torch.Generator().manual_seed(len(classes))
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            a = torch.randint(0, 256, (size, size, 3), generator=g, dtype=torch.uint8).numpy()
            Image.fromarray(a).save(root / c / f'{i}.png')
    return root


def test_one_class_and_misnumbered_folders_are_refused_before_any_feature(tmp_path, monkeypatch):
    "A bank of one class reads 100 % for any backbone; a val whose classes are numbered otherwise reads garbage."
    import scfs.evaluate as E
    from scfs.evaluate import check_knn_folders, labelled_classes, knn_checkpoint, linear_checkpoint, KnnMonitor, labelled_features
    tr, va, one = _labelled(tmp_path / 'tr', 'abc'), _labelled(tmp_path / 'va', 'ab'), _labelled(tmp_path / 'one', 'b')
    assert check_knn_folders(tr, va) == ['a', 'b', 'c'] and labelled_classes(va) == ['a', 'b']
    monkeypatch.setattr(E, 'extract_features', lambda *a, **k: pytest.fail('features extracted before the check'))
    for fn in (knn_checkpoint, linear_checkpoint):
        with pytest.raises(ScfsError, match='has 1 class'): fn(None, one, va, size=8)
        with pytest.raises(ScfsError, match='differently'): fn(None, tr, one, size=8)    # 'b' would be class 0 there
    monkeypatch.undo()
    with pytest.raises(ScfsError, match='at least 2 classes'): KnnMonitor(one, None, 8, n=3)
    from torch.utils.data import TensorDataset
    bb, _ = load_backbone(None, backbone='small', backbone_kw={'widths': [8, 8, 16, 16]})
    same = TensorDataset(torch.randn(4, 3, 16, 16), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ScfsError, match='at least 2 classes'): labelled_features(bb, same, same, size=16)
    assert KnnMonitor(tr, va, 8, n=6).source == 'val'
