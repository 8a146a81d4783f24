"""Package-wide rules: what exported modules may import, that `scfs` modules import each other without cycles,
and that importing scfs pulls in no dev tooling."""
import ast, pathlib, subprocess, sys
import pytest

PKG = pathlib.Path(__file__).resolve().parent.parent / 'scfs'
ALLOWED = {'torch', 'torchvision', 'numpy', 'PIL', 'matplotlib', 'tqdm', 'scfs'}
OPTIONAL = {'widgets': {'ipywidgets', 'ipyevents', 'IPython'}, 'runfiles': {'torch.utils.tensorboard'}}
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

def scfs_imports(path, package='scfs') -> set:
    "The `scfs` modules that `path` imports, at any depth (top level and inside functions), relative or absolute."
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name.split('.')[1] for a in node.names if a.name.startswith(package + '.')}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1:                          # from .x import y / from . import x
                out |= {node.module.split('.')[0]} if node.module else {a.name for a in node.names}
            elif node.level == 0 and node.module and node.module.split('.')[0] == package:
                mod = node.module.split('.')
                out |= {mod[1]} if len(mod) > 1 else {a.name for a in node.names}   # from scfs import train
    return out | dynamic_imports(path, package)

def dynamic_imports(path, package='scfs') -> set:
    """Modules loaded with `importlib.import_module`: a literal 'scfs.x', or an f-string f'scfs.{name}' whose names
    come from the module's constant lists of strings (as `cli.CLI_MODULES`); the caller keeps those that are modules."""
    tree, out, dynamic = ast.parse(path.read_text()), set(), False
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and getattr(node.func, 'attr', getattr(node.func, 'id', None)) == 'import_module' and node.args:
            a = node.args[0]
            if isinstance(a, ast.Constant) and str(a.value).startswith(package + '.'): out.add(a.value.split('.')[1])
            elif isinstance(a, ast.JoinedStr) and a.values and isinstance(a.values[0], ast.Constant) \
                    and a.values[0].value == package + '.': dynamic = True
    if dynamic:
        for node in tree.body:
            if isinstance(node, ast.Assign) and isinstance(node.value, (ast.List, ast.Tuple)):
                out |= {e.value for e in node.value.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)}
    return out

def import_graph(pkg=PKG) -> dict:
    "{module: set of scfs modules it imports} for every module of the package (the package itself excluded)."
    mods = {p.stem: p for p in pkg.glob('*.py') if p.name not in ('__init__.py', '_modidx.py')}
    return {m: {d for d in scfs_imports(p, pkg.name) if d in mods and d != m} for m, p in mods.items()}

def find_cycle(graph: dict):
    "One import cycle of `graph` as a list [a, b, ..., a], or None if the graph is acyclic (depth-first search)."
    state, stack = {}, []
    def visit(m):
        state[m] = 'open'; stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 'open': return stack[stack.index(d):] + [d]
            if d not in state and (c := visit(d)): return c
        state[m] = 'done'; stack.pop()
    for m in sorted(graph):
        if m not in state and (c := visit(m)): return c
    return None

def test_no_import_cycles():
    c = find_cycle(import_graph())
    assert c is None, 'import cycle between scfs modules: ' + ' -> '.join(c)

def test_cycle_check_can_fail(tmp_path):
    pkg = tmp_path / 'scfs'; pkg.mkdir()
    (pkg / '__init__.py').write_text('')
    (pkg / 'a.py').write_text('from .b import f\n')
    (pkg / 'b.py').write_text('def f():\n    import scfs.c\n')                   # a function-local import
    (pkg / 'c.py').write_text('import torch\ndef g():\n    from scfs.a import h\n')
    (pkg / 'd.py').write_text('from . import a\nfrom scfs import c\n')
    g = import_graph(pkg)
    assert g == {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a', 'c'}}
    assert find_cycle(g) == ['a', 'b', 'c', 'a']
    (pkg / 'c.py').write_text('import torch\n')
    assert find_cycle(import_graph(pkg)) is None
    # a sub-command loader (as scfs.cli) that imports by name is seen too
    (pkg / 'c.py').write_text("import importlib\nMODS = ['a', 'nope']\ndef load(n): return importlib.import_module(f'scfs.{n}')\n")
    assert import_graph(pkg)['c'] == {'a'} and find_cycle(import_graph(pkg)) == ['a', 'b', 'c', 'a']
    (pkg / 'c.py').write_text("import importlib\ndef load(): return importlib.import_module('scfs.d')\n")
    assert import_graph(pkg)['c'] == {'d'}

def test_cli_sub_command_modules_are_in_the_graph():
    assert {'data', 'pretrain', 'evaluate', 'maps', 'bench'} <= import_graph()['cli']


ROOT = PKG.parent

def test_readme_results_are_generated_from_the_stored_runs():
    "README's Results block is what `readme_results` renders from nbs/results/*.json today; a hand-edited number fails."
    from scfs.recipes import readme_results
    block = readme_results(ROOT / 'nbs' / 'results')
    readme = (ROOT / 'README.md').read_text()
    assert '| run |' in block and '| recipe |' in block
    assert block.strip() in readme, 'README.md Results disagree with nbs/results/*.json: re-execute nbs/index.ipynb, run .ci/readme.py'
    # the check can fail: one changed digit in a stored number is seen
    import json, shutil
    tmp = ROOT / 'nbs' / 'results'
    d = json.loads((tmp / 'main_job.json').read_text())
    d['runs'][0]['knn'] = d['runs'][0]['knn'] + 1.0
    alt = pathlib.Path(__import__('tempfile').mkdtemp())
    for f in tmp.glob('*.json'): shutil.copy(f, alt / f.name)
    (alt / 'main_job.json').write_text(json.dumps(d))
    assert readme_results(alt).strip() not in readme


# --- sizes a maintainer can hold in mind (issue 14): modules of ~400 lines at most, export cells of ~40 ---
MAX_MODULE_LINES, MAX_EXPORT_CELL_LINES = 420, 45

def _long_export_cells(nbs_dir, limit):
    import json
    out = []
    for p in sorted(pathlib.Path(nbs_dir).glob('*.ipynb')):
        for c in json.loads(p.read_text())['cells']:
            src = ''.join(c['source'])
            if c['cell_type'] == 'code' and src.startswith('#| export') and len(src.splitlines()) > limit:
                out.append((p.name, c.get('id'), len(src.splitlines())))
    return out

def test_modules_and_export_cells_stay_small():
    long_modules = [(p.name, n) for p in PKG.glob('*.py') if p.name != '_modidx.py'
                    and (n := len(p.read_text().splitlines())) > MAX_MODULE_LINES]
    assert not long_modules, long_modules
    assert not _long_export_cells(ROOT / 'nbs', MAX_EXPORT_CELL_LINES), _long_export_cells(ROOT / 'nbs', MAX_EXPORT_CELL_LINES)

def test_size_rule_can_fail(tmp_path):
    import json
    cell = dict(cell_type='code', id='x', metadata={}, outputs=[], execution_count=None,
                source=['#| export\n'] + ['x = 1\n'] * MAX_EXPORT_CELL_LINES)
    (tmp_path / 'a.ipynb').write_text(json.dumps(dict(cells=[cell], metadata={}, nbformat=4, nbformat_minor=5)))
    assert _long_export_cells(tmp_path, MAX_EXPORT_CELL_LINES) == [('a.ipynb', 'x', MAX_EXPORT_CELL_LINES + 1)]
