"""Drive the region-match widget in a real JupyterLab, in headless Debian chromium (marker `browser`).

Starts `jupyter lab` on 127.0.0.1 (free port, token-less temporary config, root_dir = a temp folder holding a small
notebook that builds `scfs.widgets.RegionMatch`), opens the notebook with playwright's Python client driving
/usr/bin/chromium (never `playwright install`), waits for the kernel to be idle, runs the widget cell, moves the x slider
with the keyboard and asserts that the readout text and the displayed figure (a digest of its PNG bytes) changed. Then it
clicks view A with the real mouse at two points and drags a box on it (ipyevents), and asserts that the readout shows
the box the click/drag should give and that the x slider followed; once more with the figure displayed smaller than
its PNG. A negative control then freezes the widget (its
slider observers and mouse handler removed) and checks that the same slider move and a click change nothing, so the
assertions can fail.
CI installs chromium with `.ci/install_browser.sh`.
"""
import json, os, re, shutil, socket, subprocess, sys, tempfile, time, urllib.request
from pathlib import Path

import pytest

CHROMIUM = '/usr/bin/chromium'
FLAGS = ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
         '--disable-component-update', '--disable-sync']
ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.browser,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason='needs Debian chromium (.ci/install_browser.sh)')]

WIDGET_CELL = """\
import json, torch
torch.set_num_threads(1)
from scfs.widgets import RegionMatch
w = RegionMatch(image='scene', scene_index=0, view_size=64, seed=0)
print('VIEW_A_PX=' + json.dumps(w.view_a_px))
w"""

SCALE_CELL = """\
w.figure.layout.width = '420px'  # shown smaller than the PNG: a click must still land on the same view pixel
print('scaled')"""

FREEZE_CELL = """\
w.freeze()  # negative control: the widget stops reacting to its sliders and the mouse
print('frozen', w.readout.value[:20])"""


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _notebook(cells):
    return {'cells': [{'cell_type': 'code', 'execution_count': None, 'metadata': {}, 'outputs': [], 'source': c}
                      for c in cells],
            'metadata': {'kernelspec': {'display_name': 'Python 3', 'language': 'python', 'name': 'python3'}},
            'nbformat': 4, 'nbformat_minor': 5}


def _start_lab(tmp: Path):
    "Start JupyterLab with a throw-away, token-less config; return (process, base url)."
    port = _free_port()
    env = dict(os.environ)
    for k in ('JUPYTER_CONFIG_DIR', 'JUPYTER_RUNTIME_DIR', 'JUPYTER_DATA_DIR'): env.pop(k, None)
    env.update(JUPYTER_CONFIG_DIR=str(tmp/'cfg'), JUPYTER_RUNTIME_DIR=str(tmp/'runtime'),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp/'workspaces'), IPYTHONDIR=str(tmp/'ipython'),
               MPLBACKEND='Agg', OMP_NUM_THREADS='1', SCFS_QUICK='1')
    (tmp/'cfg').mkdir()
    (tmp/'cfg'/'jupyter_server_config.json').write_text(json.dumps({
        'ServerApp': {'open_browser': False, 'ip': '127.0.0.1', 'port': port, 'port_retries': 0,
                      'root_dir': str(tmp/'nb'), 'allow_root': True},
        'IdentityProvider': {'token': ''}, 'PasswordIdentityProvider': {'hashed_password': ''},
        'LabApp': {'news_url': None, 'check_for_updates_class': 'jupyterlab.NeverCheckForUpdate',
                   'extension_manager': 'readonly'}}))
    log = open(tmp/'lab.log', 'w')
    proc = subprocess.Popen([sys.executable, '-m', 'jupyter', 'lab', '--no-browser'], cwd=str(tmp/'nb'), env=env,
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f'http://127.0.0.1:{port}'
    for _ in range(120):
        if proc.poll() is not None: break
        try:
            with urllib.request.urlopen(url + '/api/status', timeout=2) as r:
                if r.status == 200: return proc, url
        except OSError: time.sleep(0.5)
    _stop(proc)
    raise RuntimeError('jupyter lab did not start:\n' + (tmp/'lab.log').read_text()[-3000:])


def _stop(proc):
    if proc.poll() is None:
        proc.terminate()
        try: proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill(); proc.wait(10)


def _run_cell(page, idx: int):
    "Select code cell `idx` and run it with Shift+Enter (retried if the keystroke was lost: the prompt stays '[ ]')."
    cell = page.locator('.jp-Notebook .jp-Cell').nth(idx)
    for _ in range(4):
        cell.locator('.jp-InputArea-editor').click()
        page.keyboard.press('Shift+Enter')
        for _ in range(20):
            if cell.locator('.jp-InputPrompt').inner_text().strip() != '[ ]:': return cell
            page.wait_for_timeout(250)
    raise AssertionError(f'cell {idx} did not start running')


def _wait_idle(page, timeout=90_000):
    "Wait until the kernel is connected and idle (status bar), not just the toolbar's initial state."
    page.wait_for_selector('.jp-StatusBar-TextItem:has-text("| Idle")', timeout=timeout)
    page.wait_for_selector('.jp-Notebook-ExecutionIndicator[data-status="idle"]', timeout=timeout)


_DIGEST = """async (src) => {
  const a = new Uint8Array(await (await fetch(src)).arrayBuffer());
  let h = 0; for (const x of a) h = (Math.imul(h, 31) + x) >>> 0;
  return a.length + ':' + h; }"""


def _state(page):
    "What the browser displays: the readout text and a digest of the figure's PNG (the <img> src is a blob: URL)."
    src = page.locator('img.scfs-figure').first.get_attribute('src')
    return (page.locator('.scfs-readout').first.inner_text(), page.evaluate(_DIGEST, src))


def _settle(page, timeout=60.0):
    "Wait until the displayed state stops changing (same for 2 s) with the kernel idle; return it."
    t, last, same = time.time(), None, 0
    while time.time() - t < timeout:
        _wait_idle(page)
        now = _state(page)
        same = same + 1 if now == last else 0
        if same >= 4: return now
        last = now
        page.wait_for_timeout(500)
    return last


def _press_slider(page, cls: str, key: str, n: int):
    "Move a slider with the keyboard (focus its handle, press `key` n times); return the slider's own readout."
    handle = page.locator(f'.{cls} .noUi-handle').first
    handle.focus()
    for _ in range(n): handle.press(key)
    return page.locator(f'.{cls} .widget-readout').first.inner_text()


def _query_box(readout: str) -> tuple:
    m = re.search(r'query box \((\d+), (\d+), (\d+), (\d+)\)', readout)
    assert m, readout
    return tuple(int(v) for v in m.groups())


def _view_to_page(page, view_a_px, x, y, S=64):
    "Page (CSS) coordinates of view-A pixel (x, y): view -> PNG pixels (the kernel's `view_a_px`) -> displayed <img>."
    img = page.locator('img.scfs-figure').first
    box = img.bounding_box()
    nat_w, nat_h = img.evaluate('e => [e.naturalWidth, e.naturalHeight]')
    x0, y0, x1, y1 = view_a_px
    px, py = x0 + x / S * (x1 - x0), y0 + y / S * (y1 - y0)
    return box['x'] + px * box['width'] / nat_w, box['y'] + py * box['height'] / nat_h


def _click(page, view_a_px, x, y):
    "A real mouse click (move, press, release) at view-A pixel (x, y)."
    page.mouse.click(*_view_to_page(page, view_a_px, x, y))


def _drag(page, view_a_px, a, b):
    "A real mouse drag from view-A pixel a to b."
    page.mouse.move(*_view_to_page(page, view_a_px, *a))
    page.mouse.down()
    page.mouse.move(*_view_to_page(page, view_a_px, *b), steps=5)
    page.mouse.up()


def _near(box, want, tol=1):
    return all(abs(u - v) <= tol for u, v in zip(box, want))


def _dump(page, tmp: Path):
    "On failure: save a screenshot and print what the notebook shows (cell outputs), for the CI log."
    try:
        page.screenshot(path=str(tmp/'failure.png'))
        print('screenshot:', tmp/'failure.png')
        for i, t in enumerate(page.locator('.jp-Cell').all_inner_texts()): print(f'--- cell {i}:\n{t[:1500]}')
    except Exception as e:  # the page may be gone
        print('could not dump the page:', e)


def test_region_match_in_jupyterlab(tmp_path):
    from playwright.sync_api import sync_playwright
    (tmp_path/'nb').mkdir()
    (tmp_path/'nb'/'widget.ipynb').write_text(json.dumps(_notebook([WIDGET_CELL, SCALE_CELL, FREEZE_CELL])))
    proc, url = _start_lab(tmp_path)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=FLAGS)
            page = browser.new_page(viewport={'width': 1400, 'height': 1000})
            try:
                page.goto(url + '/lab/tree/widget.ipynb', timeout=90_000)
                page.wait_for_selector('.jp-Notebook .jp-Cell', timeout=90_000)
                _wait_idle(page, 90_000)
                _run_cell(page, 0)
                page.wait_for_selector('.scfs-readout', timeout=120_000)
                page.wait_for_selector('img.scfs-figure[src]', timeout=60_000)
                _wait_idle(page)
                before = _settle(page)
                assert 'query box (16, 16, 48, 48)' in before[0] and 'layer4' in before[0], before[0]
                # move the x slider of the query region four steps to the right: 16 -> 20
                assert _press_slider(page, 'scfs-x', 'ArrowRight', 4).strip() == '20'
                after = _settle(page)
                assert 'query box (20, 16, 52, 48)' in after[0], f'readout did not follow the slider: {after[0]}'
                assert after[1] != before[1], 'figure did not change after moving the slider'
                # the mouse: a click on view A centres the query box there (size 32 kept), at two different points
                vpx = json.loads(re.search(r'VIEW_A_PX=(\[[^\]]*\])', page.locator('.jp-Cell').first.inner_text()).group(1))
                _click(page, vpx, 20, 22)
                click1 = _settle(page)
                assert _near(_query_box(click1[0]), (4, 6, 36, 38)), f'first click not handled: {click1[0]}'
                _click(page, vpx, 44, 40)
                click2 = _settle(page)
                assert _near(_query_box(click2[0]), (28, 24, 60, 56)), f'second click not handled: {click2[0]}'
                assert click1[0] != click2[0] != after[0] and click1[1] != click2[1], 'clicks did not change the display'
                x_box = _query_box(click2[0])[0]
                assert page.locator('.scfs-x .widget-readout').first.inner_text().strip() == str(x_box)  # slider follows
                # a drag draws a square box from the press point (side = the larger extent, 20 here)
                _drag(page, vpx, (8, 10), (28, 24))
                dragged = _settle(page)
                assert _near(_query_box(dragged[0]), (8, 10, 28, 30)), f'drag not handled: {dragged[0]}'
                # the figure displayed smaller than its PNG: ipyevents' dataX/dataY are in PNG pixels all the same
                _run_cell(page, 1)
                page.wait_for_selector('text=scaled', timeout=60_000)
                page.wait_for_function("() => document.querySelector('img.scfs-figure').width < 430", timeout=30_000)
                _settle(page)
                _click(page, vpx, 30, 34)                          # size 20 (from the drag): box (20, 24, 40, 44)
                scaled = _settle(page)
                assert _near(_query_box(scaled[0]), (20, 24, 40, 44)), f'click on the scaled figure: {scaled[0]}'
                x_now = int(page.locator('.scfs-x .widget-readout').first.inner_text())
                # negative control: a frozen widget must not react, so the checks above can fail
                _run_cell(page, 2)
                page.wait_for_selector('text=frozen', timeout=60_000)
                frozen = _settle(page)
                assert _press_slider(page, 'scfs-x', 'ArrowRight', 4).strip() == str(x_now + 4)  # the slider itself moves
                _click(page, vpx, 50, 50)
                page.wait_for_timeout(3000)
                still = _settle(page)
                assert still == frozen, 'a frozen widget changed: the test could not detect a dead widget'
            except Exception:
                _dump(page, tmp_path)
                raise
            finally:
                browser.close()
    finally:
        _stop(proc)
