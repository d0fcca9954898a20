"""``torpor completion bash|zsh|fish``: a completion script made from the CLI's own parser
(commands, their sub-commands and flags), so it never goes stale.

    source <(torpor completion bash)            # bash, this shell
    torpor completion zsh > "${fpath[1]}/_torpor" # zsh
    torpor completion fish > ~/.config/fish/completions/torpor.fish
"""

from __future__ import annotations

import argparse
import shlex

SHELLS = ("bash", "zsh", "fish")


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _flags(p: argparse.ArgumentParser) -> list[str]:
    return sorted({s for a in p._actions for s in a.option_strings if s.startswith("--")})


def tree(p: argparse.ArgumentParser) -> dict[str, tuple[list[str], list[str]]]:
    """``{"": (commands, global flags), "cmd": (sub-commands, flags), "cmd sub": ([], flags)}``."""
    out: dict[str, tuple[list[str], list[str]]] = {"": (sorted(_subparsers(p)), _flags(p))}
    for name, sp in _subparsers(p).items():
        subs = _subparsers(sp)
        out[name] = (sorted(subs), _flags(sp))
        for sub_name, ssp in subs.items():
            out[f"{name} {sub_name}"] = ([], _flags(ssp))
    return out


def _bash(t: dict[str, tuple[list[str], list[str]]]) -> str:
    entries = "\n".join(
        f"    [{shlex.quote(key or '_')}]={shlex.quote(' '.join(subs + flags))}"
        for key, (subs, flags) in t.items()
    )
    return f"""# bash completion for torpor (torpor completion bash)
declare -A _torpor_words=(
{entries}
)
_torpor() {{
    local cur="${{COMP_WORDS[COMP_CWORD]}}" key="_" cand w i
    for ((i = 1; i < COMP_CWORD; i++)); do
        w="${{COMP_WORDS[i]}}"
        [[ "$w" == -* ]] && continue
        if [[ "$key" == "_" ]]; then cand="$w"; else cand="$key $w"; fi
        [[ -n "${{_torpor_words[$cand]+x}}" ]] && key="$cand"
    done
    COMPREPLY=($(compgen -W "${{_torpor_words[$key]}}" -- "$cur"))
}}
complete -o default -F _torpor torpor
"""


def _zsh(t: dict[str, tuple[list[str], list[str]]]) -> str:
    return (
        "#compdef torpor\n# zsh completion for torpor (torpor completion zsh)\n"
        "autoload -U bashcompinit && bashcompinit\n" + _bash(t).split("\n", 1)[1]
    )


def _fish(t: dict[str, tuple[list[str], list[str]]]) -> str:
    lines = ["# fish completion for torpor (torpor completion fish)", "complete -c torpor -f"]
    cmds, flags = t[""]
    lines.append(f"complete -c torpor -n '__fish_use_subcommand' -a {shlex.quote(' '.join(cmds))}")
    for f in flags:
        lines.append(f"complete -c torpor -n '__fish_use_subcommand' -l {f[2:]}")
    for key, (subs, sflags) in t.items():
        if not key or " " in key:
            continue
        cond = f"__fish_seen_subcommand_from {key}"
        if subs:
            lines.append(
                f"complete -c torpor -n {shlex.quote(cond)} -a {shlex.quote(' '.join(subs))}"
            )
        for f in sflags:
            lines.append(f"complete -c torpor -n {shlex.quote(cond)} -l {f[2:]}")
        for sub in subs:
            for f in t[f"{key} {sub}"][1]:
                c2 = f"{cond}; and __fish_seen_subcommand_from {sub}"
                lines.append(f"complete -c torpor -n {shlex.quote(c2)} -l {f[2:]}")
    return "\n".join(lines) + "\n"


def completion_script(p: argparse.ArgumentParser, shell: str) -> str:
    t = tree(p)
    return {"bash": _bash, "zsh": _zsh, "fish": _fish}[shell](t)
