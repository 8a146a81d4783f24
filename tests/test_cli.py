"End-to-end tests of `scfs pretrain / knn / linear / export` through scfs.cli.main, a subprocess and torchrun."
import json, os, re, shutil, subprocess, sys
from pathlib import Path
import pytest
import torch

from scfs.cli import main
from scfs.data import generate_scenes

SMALL = ['epochs=1', 'batch_size=16', 'n_local=2', 'out_dim=128', 'head_hidden=64', 'head_bottleneck=32',
         'layer_out_dim=32', 'backbone_kw={"widths":[8,16,32,64]}', 'global_size=32', 'local_size=16', 'eval_size=32',
         'warmup_epochs=0', 'workers=0', 'threads=1', 'tensorboard=false']
VENV_BIN = Path(sys.executable).parent


@pytest.fixture(scope='module')
def scenes(tmp_path_factory):
    return generate_scenes(tmp_path_factory.mktemp('scenes') / 's', n_train=64, n_test=40, size=32, workers=1)


def test_pretrain_then_knn_reproduces_and_export(tmp_path, scenes, capsys):
    run = tmp_path / 'run'
    assert main(['pretrain', '--data', str(scenes), '--out', str(run), '--quiet', '--seed', '1', *SMALL]) == 0
    out = capsys.readouterr().out
    assert "preset 'tiny'" in out and '"n_local": 2' in out and '"lr"' not in out    # only the changed settings printed
    m = re.search(r'on \S*test \(k=20.*\): trained teacher ([\d.]+)% \| random-init backbone ([\d.]+)%', out)   # the test line
    assert m, out[-2000:]
    for f in ('config.json', 'metrics.jsonl', 'checkpoint_last.pth', 'loss_curve.png', 'results.json'):
        assert (run / f).exists(), f
    assert main(['knn', '--checkpoint', str(run), '--train', str(scenes / 'train'), '--val', str(scenes / 'test')]) == 0
    k = re.search(r'kNN top-1 \(k=20.*\): ([\d.]+)%', capsys.readouterr().out)
    assert k and k.group(1) == m.group(1)                                  # same number as printed by pretrain
    assert main(['export', '--checkpoint', str(run), '--out', str(tmp_path / 'bb.pth')]) == 0
    from scfs.backbone import SmallResNet
    SmallResNet(widths=(8, 16, 32, 64)).load_state_dict(torch.load(tmp_path / 'bb.pth'), strict=True)
    assert main(['knn', '--checkpoint', str(tmp_path / 'bb.pth'), '--train', str(scenes / 'train'),
                 '--val', str(scenes / 'test')]) == 0
    k2 = re.search(r'kNN top-1 \(k=20.*\): ([\d.]+)%', capsys.readouterr().out)
    assert k2.group(1) == m.group(1)                                       # the exported backbone gives it too
    assert main(['linear', '--checkpoint', str(run), '--train', str(scenes / 'train'), '--val', str(scenes / 'test'),
                 '--epochs', '20']) == 0
    assert 'linear probe top-1' in capsys.readouterr().out
    # resume a finished run with more epochs continues it
    assert main(['pretrain', '--out', str(run), '--resume', '--quiet', '--no-eval', 'epochs=2']) == 0
    assert [r['epoch'] for r in map(json.loads, (run / 'metrics.jsonl').read_text().splitlines())
            if r['type'] == 'epoch'] == [0, 1]


@pytest.mark.parametrize('argv,msg', [
    (['pretrain', '--preset', 'huge'], 'unknown preset'),
    (['pretrain', 'lrr=0.1'], "unknown config key 'lrr'"),
    (['pretrain', 'epochs=many'], 'bad value for epochs'),
    (['pretrain', 'oops'], 'expected key=value'),
    (['pretrain', '--resume', '--force'], 'incompatible'),
    (['pretrain', '--data', '/nonexistent/x', '--out', '{tmp}/r'], 'data folder not found'),
    (['pretrain', '--out', '{tmp}/none', '--resume'], 'nothing to resume'),
    (['knn', '--checkpoint', '{tmp}/no.pth', '--train', '{tmp}', '--val', '{tmp}'], 'checkpoint not found'),
    (['knn', '--train', '{tmp}', '--val', '{tmp}'], '--checkpoint'),
    (['export', '--checkpoint', '{tmp}/no.pth', '--out', '{tmp}/x.pth'], 'checkpoint not found'),
])
def test_errors_are_one_line_exit_2(tmp_path, capsys, argv, msg):
    argv = [a.replace('{tmp}', str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'scfs {argv[0]}: error:') and msg in err and '\n' not in err, err


def test_existing_run_folder_not_overwritten(tmp_path, scenes):
    run = tmp_path / 'r'; run.mkdir(); (run / 'keep.txt').write_text('precious')
    p = subprocess.run([str(VENV_BIN / 'scfs'), 'pretrain', '--data', str(scenes), '--out', str(run), *SMALL],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and 'already exists' in p.stderr and 'Traceback' not in p.stderr
    assert p.stderr.strip().count('\n') == 0 and (run / 'keep.txt').read_text() == 'precious'


def test_help_lists_presets():
    p = subprocess.run([str(VENV_BIN / 'scfs'), 'pretrain', '--help'], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and 'resnet50-imagenet' in p.stdout and 'key=value' in p.stdout


@pytest.mark.slow
def test_torchrun_two_processes_cpu_gloo(tmp_path, scenes):
    run = tmp_path / 'ddp'
    script = tmp_path / 'launch.py'
    script.write_text('import sys\nfrom scfs.cli import main\nsys.exit(main(sys.argv[1:]))\n')
    cmd = [str(VENV_BIN / 'torchrun'), '--standalone', '--nproc_per_node=2', str(script), 'pretrain',
           '--data', str(scenes), '--out', str(run), '--quiet', *SMALL, 'epochs=2', 'save_every_iters=1']
    env = {**os.environ, 'OMP_NUM_THREADS': '1'}
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env)
    assert p.returncode == 0, (p.stdout[-2000:], p.stderr[-3000:])
    steps = [json.loads(l) for l in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [r['step'] for r in steps if r['type'] == 'step'] == list(range(8))   # 64 images / (2 x 8) = 4 steps x 2 epochs
    assert len(re.findall(r'kNN top-1 on \S*test ', p.stdout)) == 1                # only rank 0 prints and evaluates
    assert p.stdout.count('trained teacher') == p.stdout.count('kNN top-1 on ') == 2   # val and test, once each
    from scfs.runfiles import load_checkpoint
    ck = load_checkpoint(run / 'checkpoint_last.pth')
    assert (ck['epoch'], ck['iteration'], ck['world_size']) == (2, 0, 2)


# the settings a new user tried at 306d154 (issue 24): trained silently, crashed late or wrote the run folder first
ISSUE_24 = ['clip_grad=-1', 'knn_k=0', 'knn_T=0', 'koleo_weight=-0.1', 'layer_weights=-1,0.03,0.03', 'momentum_teacher=1.5',
            'center_momentum=-0.1', 'student_temp=-0.1', 'jitter=0.4,0.4,0.4,0.6', 'search_layers=()', 'eval_size=0',
            'memory_size=0', 'teacher_temp=0', 'warmup_epochs=-2', 'blur_sigma=[0,0]', 'batch_size=1000', 'global_size=0',
            'n_local=-1', 'lr=-1', 'weight_decay=-1', 'out_dim=0', 'search_layers=[]', 'loc_temp=0', 'local_scale=[0.5,0.1]',
            'p_grey=1.5']


def _one_class(root, scenes):
    "A copy of `scenes` whose train/ and test/ hold a single class."
    for split in ('train', 'test'): shutil.copytree(scenes / split / 'circle', root / split / 'circle')
    return root


@pytest.mark.parametrize('bad', ISSUE_24 + ['one-class kNN folder', 'one-class monitor folder'])
def test_bad_settings_exit_2_before_anything_is_written(tmp_path, scenes, capsys, bad):
    "Each refused in one line naming its field, exit 2, before the run folder exists (the command of the issue)."
    data, kv = scenes, [bad]
    if bad.startswith('one-class'): data, kv = _one_class(tmp_path / 'one', scenes), ['batch_size=4']
    flags = ['--no-eval'] * (bad != 'one-class kNN folder')
    out = tmp_path / 'run'
    assert main(['pretrain', '--data', str(data), '--out', str(out), '--epochs', '1', *flags, '--quiet', 'max_iters=1', *kv]) == 2
    err = capsys.readouterr().err.strip()
    field = 'class' if bad.startswith('one-class') else bad.split('=')[0]
    assert err.startswith('scfs pretrain: error:') and field in err and '\n' not in err, err
    assert not out.exists()


@pytest.mark.parametrize('cmd', ['knn', 'linear'])
def test_one_class_folders_refused_by_knn_and_linear(tmp_path, scenes, capsys, cmd):
    one = _one_class(tmp_path / 'one', scenes)
    assert main([cmd, '--random', '--train', str(one / 'train'), '--val', str(one / 'test')]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f'scfs {cmd}: error:') and '1 class' in err and '\n' not in err, err
    assert main([cmd, '--random', '--train', str(scenes / 'train'), '--val', str(one / 'test')]) == 2   # numbered differently
    assert 'differently' in capsys.readouterr().err


def test_refused_start_then_corrected_rerun_needs_no_force(tmp_path, scenes, capsys):
    out = tmp_path / 'run'
    argv = ['pretrain', '--data', str(scenes), '--out', str(out), '--epochs', '1', '--no-eval', '--quiet', 'max_iters=1',
            'monitor_every=0', *SMALL[1:]]
    assert main(argv + ['batch_size=1000']) == 2 and 'too few' in capsys.readouterr().err and not out.exists()
    assert main(argv) == 0 and (out / 'checkpoint_last.pth').exists()


def test_overrides_anywhere_among_the_flags(tmp_path):
    "`scfs pretrain lr=0.02 --quiet epochs=3` (the console script itself): overrides before, between and after flags."
    p = subprocess.run([str(VENV_BIN / 'scfs'), 'pretrain', 'lr=0.02', '--quiet', 'epochs=3', '--print-config'],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    cfg = json.loads(p.stdout)
    assert (cfg['lr'], cfg['epochs'], cfg['progress']) == (0.02, 3, False)
    from scfs.cli import build_parser, parse
    a = parse(build_parser(), ['pretrain', '--quiet', 'lr=0.02', '--method', 'dino', 'epochs=3', '--no-eval'])
    assert (a.overrides, a.quiet, a.method, a.no_eval) == (['lr=0.02', 'epochs=3'], True, 'dino', True)
