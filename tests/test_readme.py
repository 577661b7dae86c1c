"""The README's two set-up commands stay true: CI runs the README's test command, and the main command exists."""
import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def readme_commands():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", readme, re.DOTALL).group(1)
    return [line for line in block.splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_the_main_and_the_test_command():
    main_command, test_command = readme_commands()
    assert main_command.endswith("attn-fast verify && attn-fast bench")
    assert "pytest" in test_command


def test_ci_runs_the_readme_test_command():
    _, test_command = readme_commands()
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()
