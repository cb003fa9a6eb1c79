"""``ttrpc completion bash|zsh``: shell completion scripts, generated from the parser.

Subcommands, their flags and flag values (files, directories, choices) come
from the argparse definition, so they never drift from it. The built-in
containerd services and methods are written into the script for ``call``,
``list`` and ``describe``. zsh uses the same function through
``bashcompinit``.
"""

from __future__ import annotations

import argparse
import shlex

from ttrpc.cli.descriptors import Descriptors

__all__ = ["completion_script"]

_FILE_METAVARS = {"FILE"}
_DIR_METAVARS = {"DIR"}


def completion_script(shell: str, parser: argparse.ArgumentParser) -> str:
    """The completion script for ``shell`` (``bash`` or ``zsh``)."""
    body = _bash_function(parser)
    if shell == "zsh":
        return (
            "# zsh completion for ttrpc; in ~/.zshrc, after compinit:\n"
            "#   source <(ttrpc completion zsh)\n"
            "autoload -U +X bashcompinit && bashcompinit\n" + body
        )
    return (
        "# bash completion for ttrpc; in ~/.bashrc:\n#   source <(ttrpc completion bash)\n" + body
    )


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _words(words: list[str]) -> str:
    return shlex.quote(" ".join(words))


def _builtin_names() -> tuple[list[str], list[str]]:
    """Built-in service names, and their methods as SERVICE/METHOD."""
    descriptors = Descriptors()
    services = descriptors.service_names()
    methods = [
        f"{name}/{method.name}"
        for name in services
        for method in descriptors.find_service(name)[0].methods
    ]
    return services, methods


def _bash_function(parser: argparse.ArgumentParser) -> str:
    commands = _subcommands(parser)
    services, methods = _builtin_names()
    value_cases: list[str] = []
    flag_cases: list[str] = []
    takes_value: set[str] = set()
    for name, sub in commands.items():
        flags: list[str] = []
        for action in sub._actions:
            if not action.option_strings:
                continue
            flags.extend(action.option_strings)
            if action.nargs == 0:
                continue
            takes_value.update(action.option_strings)
            if action.choices is not None:
                reply = f'compgen -W {_words([str(c) for c in action.choices])} -- "$cur"'
            elif action.metavar in _FILE_METAVARS:
                reply = 'compgen -f -- "$cur"'
            elif action.metavar in _DIR_METAVARS:
                reply = 'compgen -d -- "$cur"'
            else:
                reply = ""
            value = f"COMPREPLY=($({reply}))" if reply else "COMPREPLY=()"
            patterns = "|".join(f"{name}:{option}" for option in action.option_strings)
            value_cases.append(f"            {patterns}) {value}; return;;")
        flag_cases.append(f"        {name}) flags={_words(flags)};;")

    positional = {
        "call": [
            'COMPREPLY=($(compgen -f -- "$cur"))',
            f'COMPREPLY=($(compgen -W {_words(methods)} -- "$cur"))',
        ],
        "list": [f'COMPREPLY=($(compgen -W {_words(services)} -- "$cur"))'],
        "describe": [f'COMPREPLY=($(compgen -W {_words(services + methods)} -- "$cur"))'],
        "completion": ['COMPREPLY=($(compgen -W "bash zsh" -- "$cur"))'],
    }
    positional_cases = [
        f"        {name}:{index}) {reply};;"
        for name, replies in positional.items()
        for index, reply in enumerate(replies)
    ]
    top_flags = [o for a in parser._actions for o in a.option_strings]
    return f"""\
_ttrpc() {{
    # Walks the words up to the cursor without indexing (bash arrays start at 0, zsh's
    # at 1). bash splits unix:///x at ':' (COMP_WORDBREAKS): ':' and the piece after it
    # belong to the word before.
    local cmd="" npos=0 skip=0 flags cur="" prev="" last="" word count=0 total
    local -a before
    before=("${{COMP_WORDS[@]:0:$((COMP_CWORD + 1))}}")
    total=${{#before[@]}}
    for word in "${{before[@]}}"; do
        count=$((count + 1))
        if ((count == total)); then cur=$word; break; fi
        prev=$word
        if ((count == 1)); then continue; fi
        if [[ $word == ":" || $last == ":" ]]; then last=$word; continue; fi
        last=$word
        if [[ -z $cmd ]]; then
            case $word in
                {"|".join(commands)}) cmd=$word;;
            esac
            continue
        fi
        if ((skip)); then skip=0; continue; fi
        case " {" ".join(sorted(takes_value))} " in
            *" $word "*) skip=1; continue;;
        esac
        [[ $word == -* ]] || npos=$((npos + 1))
    done
    if [[ $cur == ":" || $prev == ":" ]]; then COMPREPLY=(); return; fi
    if [[ -z $cmd ]]; then
        COMPREPLY=($(compgen -W {_words([*commands, *top_flags])} -- "$cur"))
        return
    fi
    if ((skip)); then
        case "$cmd:$prev" in
{chr(10).join(value_cases)}
        esac
    fi
    if [[ $cur == -* ]]; then
        case $cmd in
{chr(10).join(flag_cases)}
        esac
        COMPREPLY=($(compgen -W "$flags" -- "$cur"))
        return
    fi
    case "$cmd:$npos" in
{chr(10).join(positional_cases)}
    esac
}}
complete -F _ttrpc ttrpc
"""
