"Tests for scfs.bench: the JSON contract of `scfs bench` and the timing helpers (no timing assertions)."
import gc, json, statistics, time
import pytest, torch
from scfs import bench
from scfs.cli import main

KEYS = ('search_over_floor', 'search_speedup', 'scfs_over_dino_step', 'room_scfs_over_dino_step', 'step_over_bare', 'loader_over_step',
        'batch_over_v2_loader')


def test_time_interleaved_counts_and_order():
    calls = []
    t = bench.time_interleaved({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, repeats=2, warmup=1)
    assert calls == ['a', 'b'] * 3
    assert [len(v) for v in t.values()] == [2, 2] and all(x >= 0 for v in t.values() for x in v)


def test_time_interleaved_alternates_and_restores_gc():
    calls, seen = [], []
    fns = {k: (lambda k=k: (calls.append(k), seen.append(gc.isenabled()))) for k in 'abc'}
    bench.time_interleaved(fns, repeats=3, warmup=0, alternate=True)
    assert calls == list('abc' 'cba' 'abc') and not any(seen) and gc.isenabled()   # gc off while timing only
    def boom(): raise RuntimeError('x')
    with pytest.raises(RuntimeError): bench.time_interleaved({'a': boom}, repeats=1, warmup=0)
    assert gc.isenabled()


def test_pair_ratios():
    r = bench.pair_ratios([1.2, 3.0, 1.3, 1.1, 1.25], [1.0, 1.0, 1.0, 1.0, 1.0])
    assert r['n'] == 5 and r['median'] == pytest.approx(1.25) and (r['lo'], r['hi']) == (pytest.approx(1.1), 3.0)
    # the median of per-pair ratios is not the ratio of medians: a slow outlier pair does not drag it
    assert bench.pair_ratios([2., 2., 9.], [1., 1., 9.])['median'] == 2.0


def test_settings_scale_down():
    q, f, g = bench.bench_settings('cpu', True), bench.bench_settings('cpu'), bench.bench_settings('cuda')
    assert q['batch'] <= f['batch'] <= g['batch'] and g['backbone'] == 'resnet50' and q['backbone'] == 'small'
    assert {l: v[0] for l, v in bench.OFFICIAL_SEARCH_SHAPES.items()} == {'layer2': 512, 'layer3': 1024, 'layer4': 2048}


def test_cli_quick_json(capsys):
    rc = main(['bench', '--device', 'cpu', '--quick', '--json', '--repeats', '1', '--batch', '4'])
    assert rc == 0
    out = capsys.readouterr().out.strip()
    assert '\n' not in out  # one JSON object on one line
    r = json.loads(out)
    for k in KEYS: assert isinstance(r[k], float) and r[k] > 0, k
    for k in ('timings', 'settings', 'device', 'torch', 'threads'): assert k in r
    from scfs.config import get_config
    assert r['device'] == 'cpu' and r['torch'] == torch.__version__ and r['threads'] == (get_config('tiny').threads or 1)
    t = r['timings']
    assert t['scfs_step_s'] > 0 and t['dino_step_s'] > 0 and t['bare_step_s'] > 0 and t['loader_images_per_s'] > 0
    raw = t['raw_step_times']
    ratios = [a / b for a, b in zip(raw['scfs'], raw['dino'])]
    assert abs(r['scfs_over_dino_step'] - statistics.median(ratios)) < 1e-9
    lo, hi = t['scfs_over_dino_step_range']
    assert lo <= r['scfs_over_dino_step'] <= hi and t['step_pairs'] == len(ratios) == 1
    assert abs(r['search_speedup'] - t['search_loop_s'] / t['search_vectorised_s']) < 1e-9
    room = t['room_raw_step_times']   # the room ratio: SCFS and DINO steps of the same run, round by round
    assert sorted(room) == ['dino', 'scfs'] and len(room['scfs']) == len(room['dino']) == t['room_step_pairs'] == 1
    assert r['room_scfs_over_dino_step'] == pytest.approx(room['scfs'][0] / room['dino'][0], rel=1e-12)
    assert t['room_map_sides'] == {'layer2': 16, 'layer3': 8, 'layer4': 4} and t['room_scfs_step_s'] > 0
    assert abs(r['search_over_floor'] - t['search_vectorised_s'] / t['search_write_floor_s']) < 1e-9
    assert r['settings']['batch'] == 4 and t['loader_images'] == 12  # 4 batches of 4, the first is warm-up
    b, v = t['batch_loader_images_per_s'], t['v2_loader_images_per_s']   # one repeat: the ratio is the two rates' ratio
    assert abs(r['batch_over_v2_loader'] - b / v) < 1e-6 * b / v


@pytest.mark.skipif(torch.cuda.is_available(), reason='checks the no-GPU error path')
def test_cli_cuda_without_gpu_is_a_clean_error(capsys):
    assert main(['bench', '--device', 'cuda', '--quick']) == 2
    err = capsys.readouterr().err
    assert err.startswith('scfs bench: error:') and 'CUDA' in err and 'Traceback' not in err


def test_cli_rejects_batch_of_one(capsys):
    assert main(['bench', '--device', 'cpu', '--quick', '--batch', '1']) == 2
    assert 'batch' in capsys.readouterr().err


def test_format_bench_marks_misses():
    r = dict(search_over_floor=1.1, search_speedup=10.0, scfs_over_dino_step=2.0, room_scfs_over_dino_step=1.3, step_over_bare=1.0,
             loader_over_step=3.0, batch_over_v2_loader=4.0, device='cpu', device_name='x', torch='t', threads=2, quick=True,
             timings=dict(scfs_step_s=.2, dino_step_s=.1, bare_step_s=.2, loader_images_per_s=100., step_images_per_s=40.,
                          scfs_over_dino_step_range=[1.5, 2.5], step_pairs=7, room_scfs_over_dino_step_range=[1.2, 1.4],
                          room_step_pairs=3, room_scfs_step_s=.4, room_dino_step_s=.3, room_map_sides=dict(layer2=16, layer3=8)))
    s = bench.format_bench(r)
    assert 'scfs_over_dino_step' in s and s.count('MISSED') == 2 and s.count(' ok') == 5
    assert 'range 1.50-2.50 over 7 pairs' in s and 'search_speedup' in s and '(GPU)' in s
    room = next(l for l in s.splitlines() if l.startswith('room_scfs_over_dino_step'))
    assert 'MISSED' in room and 'range 1.20-1.40 over 3 pairs' in room and 'teacher maps 16x16, 8x8' in s
    assert 'ok' in bench.format_bench(dict(r, room_scfs_over_dino_step=1.25)).splitlines()[4]   # the goal is <= 1.25


def test_step_ratio_is_the_median_of_same_round_ratios():
    "Made-up timings: each ratio pairs the SCFS and DINO steps of one round; a slow round does not drag the median."
    t = {'scfs': [2., 3., 10.], 'dino': [1., 2., 1.], 'bare': [1., 1., 1.]}
    r = bench.step_ratios(t, batch=8)
    assert r['scfs_over_dino_step'] == 2.0 and r['scfs_over_dino_step_range'] == [1.5, 10.0] and r['step_pairs'] == 3
    assert r['scfs_step_s'] / r['dino_step_s'] == 3.0   # the ratio of the medians would be 3
    assert r['step_over_bare'] == 3.0 and r['step_images_per_s'] == 8 / 3.0 and r['raw_step_times'] is t
    assert 'step_over_bare' not in bench.step_ratios({k: t[k] for k in ('scfs', 'dino')}, 8)


def test_room_ratio_from_one_interleaved_run(monkeypatch):
    "The room ratio comes from one `time_interleaved` call timing both steps of the room model (fake timings, no clock)."
    calls = []
    def fake(fns, device, repeats, warmup, alternate=False):
        calls.append((sorted(fns), repeats, alternate))
        return {'scfs': [1.3, 1.1, 5.0], 'dino': [1.0, 1.0, 1.0]}
    monkeypatch.setattr(bench, 'time_interleaved', fake)
    r = bench.bench_room_steps('cpu', dict(bench.bench_settings('cpu', quick=True), batch=4), repeats=3, warmup=0)
    assert calls == [(['dino', 'scfs'], 3, True)]
    assert r['room_scfs_over_dino_step'] == pytest.approx(1.3) and r['room_scfs_over_dino_step_range'] == [pytest.approx(1.1), 5.0]
    assert r['room_step_pairs'] == 3 and 'room_step_over_bare' not in r


def test_room_settings_are_the_room_regime():
    "`get_config('tiny-official', global_size=64, local_size=32)`: the tiny model, official objective, 16/8/4 maps."
    from dataclasses import asdict
    from scfs.config import get_config, same_setting
    s = bench.room_settings(bench.bench_settings('cpu', quick=True))
    cfg = bench.bench_config('scfs', s)
    assert same_setting(asdict(cfg), asdict(get_config('tiny-official', global_size=64, local_size=32))) and cfg.preset == 'tiny-official'
    assert not same_setting(asdict(cfg), asdict(get_config('tiny-official', global_size=64)))   # the comparison can fail
    assert bench.map_sides(cfg) == {'layer2': 16, 'layer3': 8, 'layer4': 4}
    assert bench.map_sides(get_config('tiny')) == {'layer2': 8, 'layer3': 4, 'layer4': 2}
    assert s['batch'] == bench.bench_settings('cpu', quick=True)['batch']   # the run's batch and repeats are kept


@pytest.mark.parametrize('method', ['scfs', 'dino'])
def test_bench_times_the_model_scfs_pretrain_trains(method):
    "The benchmark's model is `build_model` of the tiny preset: same modules, parameters and loss terms (issue 14)."
    from scfs.config import get_config
    from scfs.model import build_model
    s = bench.bench_settings('cpu', quick=True)
    b, t = bench._model(method, s, 'cpu'), build_model(get_config('tiny', method=method))
    assert [(n, type(m).__name__) for n, m in b.named_modules()] == [(n, type(m).__name__) for n, m in t.named_modules()]
    assert [(n, p.shape) for n, p in b.named_parameters()] == [(n, p.shape) for n, p in t.named_parameters()]
    crops = bench._batch(dict(s, batch=4), 'cpu')
    from scfs.augment import random_geometry
    geo = dict(zip(('boxes', 'flips'), random_geometry(4, len(crops), generator=torch.Generator().manual_seed(0))))
    ob, ot = b(crops, epoch=1, **geo), t(crops, epoch=1, **geo)
    assert sorted(ob) == sorted(ot)
    cfg = get_config('tiny', method=method)
    assert (b.losses['dino'].centering, b.koleo_weight, b.layer_weights) == (cfg.centering, cfg.koleo_weight, t.layer_weights)
    assert (b.loc_weight, b.loc_layers) == (cfg.loc_weight, t.loc_layers) and 'loc' in ob
