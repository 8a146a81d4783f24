"Tests of training (scfs.config, scfs.loader, scfs.runfiles, scfs.train): config/presets, schedules, exact resume after SIGKILL, NaN stop, run-folder protection."
import json, math, os, signal, subprocess, sys
from dataclasses import asdict
from pathlib import Path
import numpy as np
import pytest
import torch

from scfs.data import ScfsError, generate_scenes
from scfs.config import Config, PRESETS, get_config, config_from_dict
from scfs.model import cosine_schedule
from scfs.runfiles import read_metrics, load_checkpoint
from scfs.loader import ResumableSampler, SeededDataset
from scfs.train import make_schedules, train

SMALL = dict(epochs=2, batch_size=16, n_local=2, out_dim=128, head_hidden=64, head_bottleneck=32, layer_out_dim=32,
             backbone_kw={'widths': [8, 16, 32, 64]}, global_size=32, local_size=16, warmup_epochs=0, workers=0,
             threads=1, progress=False, generate=False, eval=False, eval_size=32, tensorboard=False)


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp('scenes') / 's', n_train=96, n_test=40, size=32, workers=1)


def test_presets_and_overrides():
    r50 = get_config('resnet50-imagenet')
    assert (r50.optimizer, r50.lr, r50.min_lr, r50.weight_decay, r50.warmup_epochs, r50.batch_size) == ('sgd', 0.1, 0.0048, 1e-4, 10, 256)
    assert (r50.warmup_teacher_temp, r50.teacher_temp, r50.warmup_teacher_temp_epochs) == (0.04, 0.07, 50)
    assert (r50.momentum_teacher, r50.clip_grad, r50.global_size, r50.local_size, r50.n_local, r50.out_dim, r50.epochs) == (0.996, 3.0, 224, 96, 8, 65536, 200)
    assert r50.global_scale == (0.25, 1.0) and r50.local_scale == (0.05, 0.25)
    assert set(PRESETS) == {'tiny', 'tiny-official', 'resnet18', 'resnet50-imagenet'} and get_config('resnet18').backbone == 'resnet18'
    c = get_config('tiny', epochs='3', lr='0.01', eval='no', local_scale='0.1,0.3', backbone_kw='{"widths": [8,8,8,8]}')
    assert (c.epochs, c.lr, c.eval, c.local_scale, c.backbone_kw) == (3, 0.01, False, (0.1, 0.3), {'widths': [8, 8, 8, 8]})
    assert config_from_dict(json.loads(json.dumps(asdict(c)))) == c          # JSON round trip (tuples come back)
    for bad in [dict(preset='nope'), dict(lrr='1'), dict(epochs='two'), dict(method='byol'), dict(optimizer='lamb'),
                dict(resume=True, force=True), dict(n_local=0)]:
        preset = bad.pop('preset', 'tiny')
        with pytest.raises(ScfsError): get_config(preset, **bad)


def test_schedules():
    s = cosine_schedule(0.1, 0.0048, epochs=10, niter_per_ep=7, warmup_epochs=2)
    assert len(s) == 70 and s[0] == 0 and math.isclose(s[13], 0.1) and math.isclose(s[-1], 0.0048, rel_tol=0.03)
    assert np.all(np.diff(s[:14]) > 0) and np.all(np.diff(s[14:]) <= 1e-12)
    sc = make_schedules(get_config('tiny', batch_size=128, lr=0.2, warmup_epochs=1, epochs=3), niter_per_ep=5)
    assert math.isclose(sc['lr'].max(), 0.2 * 128 / 256) and sc['momentum'][0] == get_config().momentum_teacher
    assert math.isclose(sc['wd'][0], 0.04) and sc['wd'][-1] > 0.39


def test_sampler_order_is_function_of_seed_epoch():
    data = list(range(20))
    a = ResumableSampler(data, seed=1); a.set_epoch(3)
    b = ResumableSampler(data, seed=1); b.set_epoch(3); b.start = 5
    assert list(b) == list(a)[5:] and len(b) == 15
    halves = [ResumableSampler(data, num_replicas=2, rank=r, seed=1) for r in (0, 1)]
    assert sorted(list(halves[0]) + list(halves[1])) == data


def _run_cfg(tmp, scenes, name, **kw):
    return get_config('tiny', data=str(scenes), out=str(tmp / name), deterministic=True, **{**SMALL, **kw})


@pytest.mark.parametrize('loader', ['memory', 'folder'])
def test_sigkill_mid_epoch_then_resume_is_exact(tmp_path, scenes, loader):
    torch.set_num_threads(1)
    a = train(_run_cfg(tmp_path, scenes, 'a', save_every_iters=2, loader=loader))
    la = [r['loss'] for r in read_metrics(a['run_dir'])]
    assert len(la) == 12                                        # 96 images / 16 = 6 iterations x 2 epochs
    # the same run in a subprocess that SIGKILLs itself right after step 4 (mid epoch 0; last save after 4 iterations,
    # so step 4 is lost and redone)
    cfg_b = asdict(_run_cfg(tmp_path, scenes, 'b', save_every_iters=2, loader=loader))
    code = ('import json, sys; from scfs.config import config_from_dict; from scfs.train import train; '
            'train(config_from_dict(json.loads(sys.argv[1])))')
    p = subprocess.run([sys.executable, '-c', code, json.dumps(cfg_b)], capture_output=True, text=True,
                       env={**os.environ, 'SCFS_DEBUG_KILL_AT_STEP': '4'}, timeout=300)
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    ck = load_checkpoint(tmp_path / 'b' / 'checkpoint_last.pth')
    assert (ck['epoch'], ck['iteration']) == (0, 4)
    assert len(read_metrics(tmp_path / 'b')) == 5              # steps 0..4 were logged before the kill
    b = train(_run_cfg(tmp_path, scenes, 'b', save_every_iters=2, resume=True, loader=loader))
    lb = [r['loss'] for r in read_metrics(b['run_dir'])]
    assert lb == la                                             # bit-for-bit the same trajectory
    sa = load_checkpoint(tmp_path / 'a' / 'checkpoint_last.pth')['model']
    sb = load_checkpoint(tmp_path / 'b' / 'checkpoint_last.pth')['model']
    assert sa.keys() == sb.keys() and any('center' in k for k in sa)
    for k in sa: assert torch.equal(sa[k], sb[k]), k           # student, teacher and every loss centre
    assert [r['epoch'] for r in read_metrics(tmp_path / 'b', 'epoch')] == [0, 1]
    assert (tmp_path / 'b' / 'loss_curve.png').exists() and (tmp_path / 'b' / 'config.json').exists()


def test_online_monitor_logs_knn_and_collapse_state(tmp_path, scenes, capsys):
    r = train(_run_cfg(tmp_path, scenes, 'm', epochs=2, eval=True, eval_random=True, monitor_n=40, progress=True))
    mons = read_metrics(r['run_dir'], 'monitor')
    assert [m['epoch'] for m in mons] == [-1, 0, 1]
    assert [m['step'] for m in mons] == [-1, 5, 11]            # 6 iterations per epoch; -1: before the first step
    eps = read_metrics(r['run_dir'], 'epoch')
    assert [e['knn'] for e in eps] == [m['knn'] for m in mons[1:]]
    steps = read_metrics(r['run_dir'])
    diag = {f'{h}/{k}' for h in ('dino', 'layer2', 'layer3', 'layer4') for k in ('raw_entropy', 'mi', 'emb_std')}
    assert all(diag | {'teacher_entropy', 'teacher_kl_uniform', 'teacher_student_kl'} <= set(s) for s in steps)
    # each epoch line holds the epoch mean of its steps' diagnostics and the state of every head recomputed from them
    from scfs.train import collapse_states
    cfg_m = _run_cfg(tmp_path, scenes, 'm')
    for e in eps:
        mine = [s for s in steps if s['epoch'] == e['epoch']]
        assert e['dino/mi'] == pytest.approx(sum(s['dino/mi'] for s in mine) / len(mine))
        want = collapse_states(e, cfg_m)
        assert e['state'] == want['dino'] and all(e[f'{l}/state'] == want[l] for l in ('layer2', 'layer3', 'layer4'))
    out = capsys.readouterr().out
    last = eps[-1]
    assert (f"teacher raw entropy {last['dino/raw_entropy']:.2f} of ln K = {math.log(128):.2f} ({last['state']})" in out
            and 'search heads ' + '/'.join(last[f'{l}/state'] for l in ('layer2', 'layer3', 'layer4')) in out)
    assert 'kNN' in out
    # the monitor's queries are the val split: the first reading is the untrained teacher on val (a fresh model with
    # the same seed gives the same number), the last one the final teacher's
    from scfs.model import build_model
    from scfs.evaluate import KnnMonitor
    from scfs.evaluate import load_backbone, knn_checkpoint
    cfg = _run_cfg(tmp_path, scenes, 'm2')
    torch.manual_seed(cfg.seed); fresh = build_model(cfg)
    mon = KnnMonitor(scenes / 'train', scenes / 'val', cfg.eval_size, n=40, seed=cfg.seed)
    assert mon.source == 'val' and mon(fresh.teacher['backbone']) == mons[0]['knn']
    final, _ = load_backbone(r['run_dir'] / 'checkpoint_last.pth', which='teacher')
    assert mon(final) == mons[-1]['knn']
    # the final kNN reads test and val separately
    ck = r['run_dir'] / 'checkpoint_last.pth'
    assert r['val_knn'] == knn_checkpoint(ck, scenes / 'train', scenes / 'val', size=32)['acc']
    assert r['knn'] == knn_checkpoint(ck, scenes / 'train', scenes / 'test', size=32)['acc']
    rnd = dict(size=32, backbone=cfg.backbone, backbone_kw=cfg.backbone_kw, seed=cfg.seed)   # one pass per folder for both backbones (knn_backbones)
    for split, folder in (('val_', 'val'), ('', 'test')):
        assert r[f'random_{split}knn'] == knn_checkpoint(None, scenes / 'train', scenes / folder, **rnd)['acc']
    # monitor_every=0 turns it off
    r0 = train(_run_cfg(tmp_path, scenes, 'm0', epochs=1, max_iters=2, eval=False, monitor_every=0))
    assert read_metrics(r0['run_dir'], 'monitor') == []


def test_monitor_without_val_holds_out_part_of_train(tmp_path, scenes):
    "A labelled folder with train/ and test/ only: the monitor's queries are train images outside its memory bank, never test."
    import shutil
    from scfs.loader import resolve_data
    from scfs.evaluate import KnnMonitor
    d = tmp_path / 'noval'
    for s in ('train', 'test'): shutil.copytree(scenes / s, d / s)
    cfg = _run_cfg(tmp_path, d, 'x')
    tr, ktr, kva, val = resolve_data(cfg)
    assert (tr, ktr, kva, val) == (d / 'train', d / 'train', d / 'test', None)
    mon = KnnMonitor(ktr, val, 32, n=40)
    assert mon.source == 'held-out train' and (len(mon.train), len(mon.val)) == (40, 20)
    bank = torch.stack([mon.train[i][0] for i in range(len(mon.train))]).flatten(1)
    qry = torch.stack([mon.val[i][0] for i in range(len(mon.val))]).flatten(1)
    assert torch.cdist(qry, bank).min() > 0                      # no query is a bank image
    tests = torch.stack([x for x, _ in KnnMonitor._subset(d / 'test', 32, 40, 0)]).flatten(1)
    assert torch.cdist(qry, tests).min() > 0                     # and none is a test image
    # scenes with a val split: the monitor reads it
    assert resolve_data(_run_cfg(tmp_path, scenes, 'y'))[3] == scenes / 'val'


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, scenes, monkeypatch):
    monkeypatch.setenv('SCFS_DEBUG_NAN_AT_STEP', '3')
    with pytest.raises(ScfsError, match=r'step 3 \(epoch 0, iteration 3\)'):
        train(_run_cfg(tmp_path, scenes, 'nan', save_every_iters=2))
    ck = load_checkpoint(tmp_path / 'nan' / 'checkpoint_last.pth')
    assert (ck['epoch'], ck['iteration']) == (0, 2)
    assert all(torch.isfinite(v).all() for v in ck['model'].values() if v.is_floating_point())


def test_huge_lr_is_caught(tmp_path, scenes):
    # a real divergence (no hook): lr=1e30 without clipping makes the loss non-finite within a few steps
    with pytest.raises(ScfsError, match=r'loss is (nan|inf|-inf) at step \d+'):
        train(_run_cfg(tmp_path, scenes, 'lr', lr=1e30, clip_grad=0.0, optimizer='sgd', epochs=2))


def test_run_folder_is_protected(tmp_path, scenes):
    cfg = _run_cfg(tmp_path, scenes, 'r', epochs=1, max_iters=1)
    train(cfg)
    with pytest.raises(ScfsError, match='already exists'): train(cfg)
    with pytest.raises(ScfsError, match='nothing to resume'): train(_run_cfg(tmp_path, scenes, 'empty', resume=True))
    with pytest.raises(ScfsError, match='different config'):
        train(_run_cfg(tmp_path, scenes, 'r', epochs=1, max_iters=1, resume=True, lr=1.0))
    (tmp_path / 'r' / 'marker').write_text('x')
    train(_run_cfg(tmp_path, scenes, 'r', epochs=1, max_iters=1, force=True))
    assert not (tmp_path / 'r' / 'marker').exists()
    with pytest.raises(ScfsError, match='data folder not found'):
        train(_run_cfg(tmp_path, tmp_path / 'missing', 'x'))


def test_gpu_presets_keep_the_official_recipe_where_tiny_departs():
    "The tiny preset's CPU remedies (head BN, SK centring, KoLeo, search weight, hue jitter, frozen prototypes) must not leak into the official presets."
    from scfs.config import get_config
    tiny = get_config('tiny')
    assert tiny.head_bn and tiny.centering == 'sinkhorn' and tiny.koleo_weight > 0 and tiny.layer_weights == (0.03,) * 3
    assert tiny.loc_weight == 1.0                                  # the localisation term is ours: tiny only
    assert (tiny.p_shuffle, tiny.p_invert) == (1.0, 0.5)           # and so is colour scrambling
    for name in ('resnet18', 'resnet50-imagenet'):
        c = get_config(name)
        assert c.loc_weight == 0.0 and (c.p_shuffle, c.p_invert) == (0.0, 0.0), name
        assert (c.head_bn, c.centering, c.koleo_weight, c.layer_weights, c.freeze_last_layer) == (False, 'ema', 0.0, None, 1), name
        assert (c.jitter, c.p_jitter, c.p_grey) == ((0.4, 0.4, 0.2, 0.1), 0.8, 0.2), name
    r50 = get_config('resnet50-imagenet')
    assert (r50.global_size, r50.local_size, r50.n_local, r50.out_dim, r50.epochs, r50.teacher_temp) == (224, 96, 8, 65536, 200, 0.07)


def _xy_folder(root, n=16, S=64):
    "`n` copies of an S x S image whose red channel encodes x and green y: value (i + 0.5) * 255 / S at pixel i."
    ramp = np.round((np.arange(S) + 0.5) * 255 / S).astype(np.uint8)
    a = np.zeros((S, S, 3), np.uint8); a[..., 0], a[..., 1], a[..., 2] = ramp[None, :], ramp[:, None], 128
    from PIL import Image
    (root / 'xy').mkdir(parents=True)
    for i in range(n): Image.fromarray(a).save(root / 'xy' / f'{i}.png')
    return root


def _content_cells(crops, H, W, S=64):
    """From the pixels alone: for each local crop (crop-major, as `crop_cells`), the cell of global view 0's H x W map
    that holds the crop's centre, whether it lies inside the view, and whether the answer is clear-cut (not within
    0.1 cell of a cell edge)."""
    from scfs.augment import denormalize
    xy = lambda c: denormalize(c.float())[:, :2] * S                       # (B, 2, s, s): source x, y of each pixel
    g = xy(crops[0]); s = g.shape[-1]
    pos = torch.arange(s, dtype=torch.float64) + 0.5
    cells, inside, clear = [], [], []
    for loc in crops[2:]:
        centre = xy(loc).double().mean((2, 3))                            # (B, 2): a linear ramp averages to its centre
        for b in range(len(loc)):
            fx = np.polyfit(pos[2:-2], g[b, 0].double().mean(0)[2:-2], 1)  # x along the columns (falls if flipped)
            fy = np.polyfit(pos[2:-2], g[b, 1].double().mean(1)[2:-2], 1)
            u = float((centre[b, 0] - fx[1]) / fx[0]) / s; v = float((centre[b, 1] - fy[1]) / fy[0]) / s
            inside.append(0 <= u <= 1 and 0 <= v <= 1)
            cells.append(int(min(max(v, 0), 1 - 1e-6) * H) * W + int(min(max(u, 0), 1 - 1e-6) * W))
            edge = lambda t, n: min(abs(t * n - round(t * n)), 1) > 0.1
            clear.append(edge(u, W) and edge(v, H))
    return torch.tensor(cells), torch.tensor(inside), torch.tensor(clear)


@pytest.mark.parametrize('loader', ['memory', 'folder'])
def test_localisation_targets_match_the_pixels_through_both_loaders(tmp_path, loader, monkeypatch):
    """One training step on an image whose channels encode x and y: the crops, boxes and flips that reach the model
    agree with the pixels (each box's centre is its crop's mean position; a global view's left edge is its box's x0,
    or x1 if flipped), and every cell `crop_cells` names for the localisation term is the one that holds the crop's
    content in global view 0, flips included."""
    import scfs.model
    seen, cells = {}, []
    orig_forward, orig_cells = scfs.model.SCFS.forward, scfs.model.crop_cells
    def forward(self, crops, epoch=0, boxes=None, flips=None):
        seen.update(crops=[c.detach().clone() for c in crops], boxes=boxes, flips=flips)
        return orig_forward(self, crops, epoch, boxes, flips)
    def spy_cells(boxes, flips, H, W):
        out = orig_cells(boxes, flips, H, W); cells.append((H, W, *out)); return out
    monkeypatch.setattr(scfs.model.SCFS, 'forward', forward)
    monkeypatch.setattr(scfs.model, 'crop_cells', spy_cells)
    data = _xy_folder(tmp_path / 'xy')
    train(_run_cfg(tmp_path, data, 'run', loader=loader, epochs=1, max_iters=1, photometric=False, n_local=6,
                   memory_size=64, loc_layers=('layer2', 'layer3')))
    crops, boxes, flips = seen['crops'], seen['boxes'], seen['flips']
    assert flips[:, 0].any() and not flips[:, 0].all()                      # both kinds of first global view
    from scfs.augment import denormalize
    for k, c in enumerate(crops):
        centre = (denormalize(c.float())[:, :2] * 64).mean((2, 3))
        torch.testing.assert_close(centre, (boxes[:, k, :2] + boxes[:, k, 2:]) / 2, atol=1.0, rtol=0)
        left = denormalize(c.float())[:, 0, :, 2:-2].mean(1) * 64                 # x of columns 2..s-3
        s = c.shape[-1]; pos = torch.arange(2, s - 2) + 0.5
        slope = ((left - left.mean(1, keepdim=True)) * (pos - pos.mean())).sum(1) / ((pos - pos.mean()) ** 2).sum()
        edge = left.mean(1) - slope * pos.mean()                               # x at the view's left edge
        want = torch.where(flips[:, k], boxes[:, k, 2], boxes[:, k, 0])
        torch.testing.assert_close(edge.float(), want.float(), atol=1.0, rtol=0)
    assert sorted((h, w) for h, w, *_ in cells) == [(4, 4), (8, 8)]          # layer3 and layer2 of 32-px views
    n_checked = 0
    for H, W, got, got_inside in cells:
        want, want_inside, clear = _content_cells(crops, H, W)
        assert torch.equal(got_inside[clear], want_inside[clear]), (H, W)
        ok = clear & want_inside
        assert torch.equal(got[ok], want[ok]), (H, W, got[ok], want[ok])
        n_checked += int(ok.sum())
    assert n_checked >= 50, n_checked
