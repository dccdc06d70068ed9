"""`kmsctl completion` (issue 14, item 6): the scripts for bash, zsh and fish, and what
a TAB completes as the shell asks it (commands, options, key names from the running
stack, nothing and no error when no stack answers)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.e2e.conftest import BIN, KmsStack


def _complete(words: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """What bash's completion function gets back for the line `words` (last word being
    completed), as `kmsctl completion bash` makes bash ask."""
    cword = len(words.split(" ")) - 1
    return subprocess.run(
        [str(BIN / "kmsctl")],
        env={
            **env,
            "_KMSCTL_COMPLETE": "bash_complete",
            "COMP_WORDS": words,
            "COMP_CWORD": str(cword),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("shell", "marker"),
    [("bash", "complete -o nosort -F"), ("zsh", "compdef"), ("fish", "complete --no-files")],
)
def test_completion_prints_each_shells_script(shell: str, marker: str) -> None:
    result = subprocess.run(
        [str(BIN / "kmsctl"), "completion", shell], capture_output=True, text=True, check=True
    )
    assert marker in result.stdout
    assert "_KMSCTL_COMPLETE" in result.stdout


def test_completion_of_an_unknown_shell_is_a_usage_error() -> None:
    result = subprocess.run(
        [str(BIN / "kmsctl"), "completion", "tcsh"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "tcsh" in result.stderr


def test_tab_completes_commands_options_and_key_names(kms_stack: KmsStack, tmp_path: Path) -> None:
    with kms_stack.client() as client:
        client.create_key("comp/alpha", "ec-p256")
        client.create_key("comp/beta", "ec-p256")
    # The names a TAB fetches are cached per user (mgmt/cli/completion.py): here, not in
    # the home of whoever runs the tests.
    env = {**kms_stack.env(), "XDG_CACHE_HOME": str(tmp_path / "cache")}
    assert _complete("kmsctl ke", env).stdout.split() == ["plain,key"]
    assert "plain,--in" in _complete("kmsctl key sign --i", env).stdout.split()
    names = _complete("kmsctl key sign comp/", env).stdout.split()
    assert names == ["plain,comp/alpha", "plain,comp/beta"]
    # --data-dir given on the line wins over the environment.
    other = {k: v for k, v in env.items() if k != "EDGEKMS_DATA_DIR"}
    named = _complete(f"kmsctl key show --data-dir {kms_stack.data_dir} comp/a", other)
    assert named.stdout.split() == ["plain,comp/alpha"]

    # No stack there: nothing offered, nothing printed, exit 0 (a TAB must not break
    # the line being typed).
    silent = _complete(
        "kmsctl key sign comp/",
        {**os.environ, "EDGEKMS_DATA_DIR": str(tmp_path), "XDG_CACHE_HOME": str(tmp_path / "c")},
    )
    assert silent.returncode == 0
    assert silent.stdout.split() == [] and silent.stderr == ""


def test_bash_itself_completes_with_the_installed_script(
    kms_stack: KmsStack, tmp_path: Path
) -> None:
    """The README's line (`eval "$(kmsctl completion bash)"`) in a real bash: the function
    it installs, called as bash calls it on a TAB, fills COMPREPLY with commands, options
    and key names (the other test speaks the protocol; this one runs the script)."""
    with kms_stack.client() as client:
        client.create_key("bashcomp/one", "ec-p256")
    env = {
        **kms_stack.env(),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    script = r"""
set -euo pipefail
eval "$(kmsctl completion bash)"
complete -p kmsctl
tab() {  # the words of a line, the last one being completed
    COMP_WORDS=("$@"); COMP_CWORD=$(( ${#COMP_WORDS[@]} - 1 )); COMPREPLY=()
    _kmsctl_completion kmsctl
    echo "${COMPREPLY[*]:-}"
}
tab kmsctl ke
tab kmsctl key sign --ou
tab kmsctl key sign bashcomp/
"""
    done = subprocess.run(
        ["bash", "-c", script], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    registered, commands, options, names = done.stdout.splitlines()
    assert registered == "complete -o nosort -F _kmsctl_completion kmsctl"
    assert commands.split() == ["key"]
    assert options.split() == ["--out", "--out-dir", "--output"]
    assert names.split() == ["bashcomp/one"]


@pytest.mark.parametrize("shell", ["fish", "zsh"])
def test_fish_and_zsh_complete_with_their_scripts(
    kms_stack: KmsStack, tmp_path: Path, shell: str
) -> None:
    """`kmsctl completion fish` in a real fish, asked as a TAB asks it (`complete -C`, the
    shell's own completion machinery), and `kmsctl completion zsh` in a real zsh. zsh
    completes only inside its line editor, so there the script's function is called as
    the editor calls it (`words`, `CURRENT`) with compsys's `compadd`, `_describe` and
    `compdef` replaced by functions that print what they are given: what is checked is
    the script and kmsctl's answers, not compsys."""
    if shutil.which(shell) is None:
        pytest.skip(f"needs Debian's {shell} (scripts/bootstrap.sh installs it)")
    with kms_stack.client() as client:
        client.create_key(f"{shell}comp/one", "ec-p256")
    env = {
        **kms_stack.env(),
        "XDG_CACHE_HOME": str(tmp_path / "cache"),
        "PATH": f"{BIN}:{os.environ.get('PATH', '/usr/bin:/bin')}",
    }
    if shell == "fish":
        argv = ["fish", "--no-config", "-c", f"""
kmsctl completion fish | source
complete -C"kmsctl ke"; echo ---
complete -C"kmsctl key sign --ou"; echo ---
complete -C"kmsctl key sign {shell}comp/"; echo ---
"""]  # fmt: skip
    else:
        argv = ["zsh", "-f", "-c", f"""
compdef() {{ print -r -- "compdef $*" }}
compadd() {{ print -rl -- "${{(@P)${{@[-1]}}}}" }}
_describe() {{ print -rl -- "${{(@P)3}}" }}
eval "$(kmsctl completion zsh)"
tab() {{ words=("$@"); CURRENT=$#; _kmsctl_completion; print -- --- }}
tab kmsctl ke
tab kmsctl key sign --ou
tab kmsctl key sign {shell}comp/
"""]  # fmt: skip
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    output = done.stdout
    if shell == "zsh":
        registered, output = output.split("\n", 1)
        assert registered == "compdef _kmsctl_completion kmsctl"
    commands, options, names, _ = output.split("---\n")
    # fish separates a description with a tab, zsh's _describe with a colon.
    sep = "\t" if shell == "fish" else ":"
    assert [line.split(sep)[0] for line in commands.splitlines()] == ["key"]
    assert sorted(line.split(sep)[0] for line in options.splitlines()) == [
        "--out",
        "--out-dir",
        "--output",
    ]
    assert names.splitlines() == [f"{shell}comp/one"]
