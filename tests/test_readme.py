"""The README's two set-up commands: CI runs the second verbatim; the slow test runs both in a
fresh virtual environment, as a newcomer would."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    setup = text.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.+?)\n```", setup, flags=re.S)


def test_readme_has_exactly_two_setup_commands_and_ci_runs_the_second():
    cmds = readme_commands()
    assert len(cmds) == 2, cmds
    main_cmd, test_cmd = cmds
    assert "zephyr_jax.train" in main_cmd and "pip install" in main_cmd
    assert "pytest" in test_cmd and ".[test]" in test_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci.splitlines(), "the CI script must run the README's test command verbatim"


@pytest.mark.slow
def test_readme_commands_in_a_fresh_venv(tmp_path):
    """Copy the tracked tree, make a venv, run command 1 (install + demo) and command 2's install."""
    main_cmd, test_cmd = readme_commands()
    repo = tmp_path / "repo"
    files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                           check=True).stdout.split()
    for f in files:
        (repo / f).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / f, repo / f)
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    env = {**os.environ, "PATH": f"{venv / 'bin'}:{os.environ['PATH']}", "VIRTUAL_ENV": str(venv)}
    env.pop("PYTHONPATH", None)
    run = subprocess.run(["bash", "-c", main_cmd], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=3600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    out = repo / "outputs" / "demo"
    assert (out / "hf" / "config.json").exists() and (out / "hf" / "tokenizer.json").exists()
    assert list((out / "checkpoints").iterdir()) and list((out / "runs").glob("events.out.tfevents.*"))
    import json

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in rows if "eval_rewards/accuracies" in r][-1]
    assert final_eval["eval_rewards/accuracies"] > 0.65, final_eval  # held-out split
    install_only = test_cmd.split("&&")[0]
    run = subprocess.run(["bash", "-c", install_only], cwd=repo, env=env, capture_output=True,
                         text=True, timeout=3600)
    assert run.returncode == 0, run.stderr[-3000:]
