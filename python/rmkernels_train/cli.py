"""``rmkernels-train {reward,ppo} [options]`` (also ``python -m rmkernels_train``)."""
import importlib
import os
import sys

USAGE = """usage: rmkernels-train {reward,ppo} [options]    (--version: the installed rmkernels)

  reward   train a reward model with the fused Bradley-Terry head (rmk.pairwise_reward_loss)
  ppo      RL against a reward model with the fused advantages: GRPO and the other critic-free
           estimators (rmk.group_advantages, the default), or PPO with a value model
           (--advantage gae: rmk.ppo_advantages)

With no options each runs on a built-in default (generated data, a small random-init
model) that needs no network. `rmkernels-train reward --help` lists the options."""

COMMANDS = ("reward", "ppo")  # each is the module rmkernels_train.<command>, with main(argv) and build_parser()


def missing_train_extras():
    """The requirements of rmkernels' ``train`` extra (setup.py's list, read from the installed
    package's metadata) whose module is not installed; [] when the metadata is not there (run
    from a source tree)."""
    import importlib.util
    import re
    from importlib import metadata

    try:
        reqs = metadata.requires("rmkernels") or []
    except metadata.PackageNotFoundError:
        return []
    names = [re.match(r"[A-Za-z0-9_.-]+", r).group(0) for r in reqs if re.search(r"extra\s*==\s*['\"]train['\"]", r)]
    return [n for n in names if importlib.util.find_spec(n.replace("-", "_")) is None]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    if argv[0] == "--version":
        from rmkernels import __version__

        print(f"rmkernels-train (rmkernels {__version__})")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd not in COMMANDS:
        print(f"rmkernels-train: unknown command {cmd!r}\n\n{USAGE}", file=sys.stderr)
        return 2
    module = f"rmkernels_train.{cmd}"
    missing = missing_train_extras()
    if missing:
        line = (f"rmkernels-train {cmd}: needs the training extras, not installed: {', '.join(missing)} "
                f"(pip install 'rmkernels[train]', or \".[train]\" from a checkout)")
        if "-h" in rest or "--help" in rest:  # the options need none of them: the help, then what a run needs
            importlib.import_module(module).build_parser().print_help()
            print(f"\n{line}", file=sys.stderr)
            return 0
        print(line, file=sys.stderr)
        return 2
    return importlib.import_module(module).main(rest)


def entry():
    """The process entry point (``rmkernels-train``, ``python -m rmkernels_train``): :func:`main`,
    then :func:`rmkernels_train.utils.exit_process` (a torchrun worker skips the interpreter's
    finalization)."""
    from rmkernels_train.utils import exit_process

    try:
        status = main()
        sys.stdout.flush()
    except BrokenPipeError:  # `rmkernels-train --help | head -1`: the reader left; no traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so the exit's flush cannot fail again
        status = 141  # 128 + SIGPIPE, as a shell tool killed by it
    exit_process(status)


if __name__ == "__main__":
    entry()
