"Batch arithmetic on 1, 2 and 8 processes (batch_size_per_gpu, DINO's semantics) and the out-of-memory path of the first step (a fake step, no GPU)."
import math
from dataclasses import replace

import pytest
import torch

from scfs.config import get_config
from scfs.data import ScfsError, generate_scenes
from scfs.distributed import batch_sizes, fitting_batch, guard_first_step
from scfs.loader import build_loader
from scfs.train import make_schedules, train

SMALL = dict(epochs=1, n_local=2, out_dim=64, head_hidden=32, head_bottleneck=16, layer_out_dim=16,
             backbone_kw={'widths': [8, 8, 16, 16]}, global_size=32, local_size=16, warmup_epochs=0, workers=0,
             threads=1, progress=False, generate=False, eval=False, monitor_every=0, tensorboard=False, force=True)


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp('scenes') / 's', n_train=64, n_test=20, size=32, workers=1)


@pytest.mark.parametrize('world', [1, 2, 8])
def test_total_batch_is_divided(world):
    "batch_size_per_gpu=0: batch_size is the total, divided over the processes; the lr follows the (fixed) total."
    cfg = get_config('tiny', batch_size=128, lr=0.2)
    assert batch_sizes(cfg, world) == (128 // world, 128)
    assert math.isclose(make_schedules(cfg, 4, world)['lr'].max(), 0.2 * 128 / 256)


@pytest.mark.parametrize('world', [1, 2, 8])
def test_batch_per_gpu_multiplies(world):
    "batch_size_per_gpu > 0: each process gets it, the total is it x processes, and the lr is scaled by that total."
    cfg = get_config('tiny', batch_size=999, batch_size_per_gpu=32, lr=0.2)    # batch_size is then not used
    assert batch_sizes(cfg, world) == (32, 32 * world)
    assert math.isclose(make_schedules(cfg, 4, world)['lr'].max(), 0.2 * 32 * world / 256)


def test_gpu_presets_state_the_batch_per_gpu():
    r18, r50 = get_config('resnet18'), get_config('resnet50-imagenet')
    assert [batch_sizes(r18, w) for w in (1, 2, 8)] == [(64, 64), (64, 128), (64, 512)]
    assert [batch_sizes(r50, w) for w in (1, 2, 8)] == [(32, 32), (32, 64), (32, 256)]   # the paper's 256 on 8 GPUs


def test_indivisible_total_is_one_line():
    with pytest.raises(ScfsError, match=r'^batch_size 100 is not divisible by 8 processes'):
        batch_sizes(get_config('tiny', batch_size=100), 8)
    assert batch_sizes(get_config('tiny', batch_size=100, batch_size_per_gpu=3), 8) == (3, 24)
    with pytest.raises(ValueError): batch_sizes(get_config('tiny'), 0)


@pytest.mark.parametrize('world', [1, 2, 8])
def test_loader_gives_each_process_its_batch(scenes, world):
    "What setup_run does: the loader gets the total and splits it, so every process draws `per` images a step."
    cfg = get_config('tiny', data=str(scenes), batch_size_per_gpu=4, **SMALL)
    per, total = batch_sizes(cfg, world)
    for rank in {0, world - 1}:
        _, sampler, loader = build_loader(replace(cfg, batch_size=total), scenes / 'train', world, rank)
        batch = next(iter(loader))
        assert batch['crops'][0].shape[0] == per == 4 and sampler.num_samples == 64 // world


def fake_step(limit, tried):
    "A step on n images that runs out of CUDA memory above `limit` images."
    def step(n):
        tried.append(n)
        if n > limit: raise torch.cuda.OutOfMemoryError(f'fake: {n} > {limit}')
        return n
    return step


def test_fitting_batch_halves_until_a_step_fits():
    for limit, want, tries in [(40, 32, [32]), (20, 16, [32, 16]), (1, 1, [32, 16, 8, 4, 2, 1]), (0, 0, [32, 16, 8, 4, 2, 1])]:
        tried = []
        assert fitting_batch(fake_step(limit, tried), 64) == want and tried == tries


def test_guard_first_step_names_a_batch_that_fits():
    assert guard_first_step(lambda: 'ok', fake_step(0, []), 64) == 'ok'
    with pytest.raises(ScfsError) as e: guard_first_step(lambda: fake_step(10, [])(64), fake_step(10, []), 64)
    assert str(e.value).endswith('rerun with batch_size_per_gpu=8 (the lr follows the total batch)') and '\n' not in str(e.value)
    with pytest.raises(ScfsError, match='not even 1 image fits'): guard_first_step(lambda: fake_step(0, [])(64), fake_step(0, []), 64)
    with pytest.raises(ScfsError, match=r'batch_size_per_gpu=32 \(a guess'): guard_first_step(lambda: fake_step(10, [])(64), None, 64, world=4)
    with pytest.raises(KeyError): guard_first_step(lambda: {}['x'], fake_step(10, []), 64)     # other errors pass through


def _oom_above(limit, monkeypatch):
    "Make every model `train` builds run out of CUDA memory on a batch of more than `limit` images (CPU, no GPU needed)."
    import scfs.train
    real = scfs.train.build_model
    def build(cfg):
        m = real(cfg)
        forward = m.forward
        def fwd(crops, *a, **k):
            if len(crops[0]) > limit: raise torch.cuda.OutOfMemoryError(f'fake: {len(crops[0])} images > {limit}')
            return forward(crops, *a, **k)
        m.forward = fwd
        return m
    monkeypatch.setattr(scfs.train, 'build_model', build)


def test_train_stops_at_first_step_with_a_batch_that_fits(scenes, tmp_path, monkeypatch):
    _oom_above(6, monkeypatch)
    cfg = get_config('tiny', data=str(scenes), out=str(tmp_path / 'r'), batch_size_per_gpu=16, **SMALL)
    with pytest.raises(ScfsError, match=r'with 16 images per GPU; a step on 4 of them fits: rerun with batch_size_per_gpu=4 '):
        train(cfg)
    r = train(replace(cfg, batch_size_per_gpu=4))                    # the advice works
    assert r['history'][0]['iters'] == 64 // 4


def test_cli_exits_2_with_one_line(scenes, tmp_path, monkeypatch, capsys):
    from scfs.cli import main
    _oom_above(6, monkeypatch)
    args = ['pretrain', '--data', str(scenes), '--out', str(tmp_path / 'c'), '--quiet', '--no-eval', 'batch_size_per_gpu=16',
            *[f'{k}={v}' for k, v in SMALL.items() if k not in ('progress', 'eval', 'backbone_kw')], 'backbone_kw={"widths": [8, 8, 16, 16]}']
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('scfs pretrain: error: out of GPU memory') and err[0].endswith('(the lr follows the total batch)')


def test_gpu_check_writes_the_file_on_cpu(tmp_path):
    "What a learner sends back, written by a dry run on the CPU: device, torch, memory and measured step times."
    import json
    from scfs.launch import gpu_check
    res = gpu_check(out=str(tmp_path / 'gc'), device='cpu', presets=('tiny',), batches=(4, 8), steps=1, warmup=0, epochs=0)
    sent = json.loads((tmp_path / 'gc' / 'gpu_check.json').read_text())
    assert sent == json.loads(json.dumps(res, default=str))
    assert (sent['device'], sent['torch'], sent['memory_gb'], sent['pretrain']) == ('cpu', torch.__version__, None, None)
    assert [(s['preset'], s['batch_size']) for s in sent['steps']] == [('tiny', 4), ('tiny', 8)]
    assert all(s['step_s'] > 0 and s['images_per_s'] > 0 for s in sent['steps'])
    if not torch.cuda.is_available():
        with pytest.raises(ScfsError, match='gpu_check needs a CUDA device'): gpu_check(out=str(tmp_path / 'x'))
        assert not (tmp_path / 'x').exists()


def test_cli_batch_size_is_the_total_on_gpu_presets():
    "`--batch-size N` on a preset with batch_size_per_gpu > 0 sets the total (was silently ignored: per GPU won)."
    import argparse
    from scfs.pretrain import _cli_overrides
    from scfs.config import get_config
    from scfs.distributed import batch_sizes
    args = argparse.Namespace(overrides=[], data=None, method=None, epochs=None, batch_size='48', out=None, seed=None,
                              device=None, workers=None, no_eval=False, quiet=False, resume=False, force=False)
    cfg = get_config('resnet18', **_cli_overrides(args))
    assert batch_sizes(cfg, 1) == (48, 48) and batch_sizes(cfg, 2) == (24, 48)
    args.overrides = ['batch_size_per_gpu=16']          # an explicit per-GPU batch still wins
    assert batch_sizes(get_config('resnet18', **_cli_overrides(args)), 2) == (16, 32)
