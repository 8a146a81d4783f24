"""Package-wide rules: what exported modules may import, and that importing scfs pulls in no dev tooling."""
import ast, pathlib, subprocess, sys
import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / 'scfs'
ALLOWED = {'torch', 'torchvision', 'numpy', 'PIL', 'matplotlib', 'tqdm', 'scfs'}
OPTIONAL = {'widgets': {'ipywidgets', 'ipyevents', 'IPython'}, 'train': {'torch.utils.tensorboard'}}
STDLIB = set(sys.stdlib_module_names)
MODULES = sorted(p for p in PKG.glob('*.py') if p.name not in ('__init__.py', '_modidx.py'))

def imported_roots(path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for a in node.names: yield a.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            yield node.module

@pytest.mark.parametrize('path', MODULES, ids=[p.stem for p in MODULES])
def test_runtime_imports_are_allowed(path):
    bad = []
    for name in imported_roots(path):
        root = name.split('.')[0]
        if root in STDLIB or root in ALLOWED: continue
        if any(name.startswith(o) for o in OPTIONAL.get(path.stem, ())): continue
        bad.append(name)
    assert not bad, f'{path.name} imports {bad}: exported modules may only use torch, torchvision, numpy, pillow, matplotlib, tqdm'

def test_rule_can_fail(tmp_path):
    p = tmp_path / 'x.py'; p.write_text('import fastcore\nfrom nbdev import show_doc\nimport numpy\n')
    assert [n for n in imported_roots(p) if n.split('.')[0] not in ALLOWED | STDLIB] == ['fastcore', 'nbdev']

def test_import_pulls_no_dev_tooling():
    mods = ' '.join(f'scfs.{p.stem}' for p in MODULES if p.stem != 'widgets')
    code = (f'import importlib, sys\nfor m in "{mods}".split(): importlib.import_module(m)\n'
            'bad = [m for m in sys.modules if m.split(".")[0] in ("nbdev", "fastcore", "execnb", "IPython", "ipywidgets")]\n'
            'print(bad); sys.exit(1 if bad else 0)')
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
