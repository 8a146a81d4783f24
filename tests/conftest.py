import os
os.environ.setdefault("MPLBACKEND", "Agg")

def pytest_configure(config):
    config.addinivalue_line("markers", "browser: drives JupyterLab in headless Chromium")
    config.addinivalue_line("markers", "slow: takes more than a few seconds")
