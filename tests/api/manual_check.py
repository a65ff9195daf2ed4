#!/usr/bin/env python3
"""The manual against --help (ctest "manual: ..."): each generated page renders without a groff
warning, and lists exactly the options, config keys and commands the built binaries' --help
lists, with each command's flags as `qbrokerctl help COMMAND` gives them.

    manual_check.py QBROKERD QBROKERCTL MAN_DIR
"""
import os
import re
import subprocess
import sys


def run(*argv, env=None):
    p = subprocess.run(argv, capture_output=True, text=True, env=env)
    return p.returncode, p.stdout, p.stderr


def render(page):
    """The page as `man` shows it at 80 columns; any groff warning fails the test."""
    env = dict(os.environ, MANWIDTH="80", LC_ALL="C.UTF-8", MAN_KEEP_FORMATTING="0")
    rc, out, err = run("man", "--warnings", "-l", "-P", "cat", page, env=env)
    if rc != 0 or err.strip():
        fail(f"{page}: man --warnings says:\n{err}")
    rc, _, err = run("groff", "-man", "-ww", "-z", "-Tutf8", page)
    if rc != 0 or err.strip():
        fail(f"{page}: groff -ww says:\n{err}")
    return re.sub(".\b", "", out)  # overstrike bold and underline, should a pager keep them


def plain(roff):
    """A line of roff source as text: escapes and font changes dropped."""
    roff = re.sub(r"^\.[A-Z]+ ", "", roff).replace("\\-", "-").replace("\\e", "\\")
    return re.sub(r"\\f[BIRP]", "", roff)


def tags(page, name, pattern, shown):
    """What the .TP tags of section `name` in the page's source match; each must also be in the
    page as `man` shows it (`shown`), within that section."""
    with open(page) as f:
        source = f.read()
    m = re.search(rf"^\.SH {name}\n(.*?)(?=^\.SH |\Z)", source, re.M | re.S)
    if not m:
        fail(f"{page}: no {name} section")
    lines = m.group(1).splitlines()
    out = [plain(lines[i + 1]) for i, line in enumerate(lines[:-1]) if line == ".TP"]
    found = [t.group(1) for tag in out if (t := re.match(pattern, tag))]
    text = shown.split(f"\n{name}\n")[1] if f"\n{name}\n" in shown else ""
    text = re.split(r"\n[A-Z][A-Z .]*\n", text)[0]
    for f in found:
        if not re.search(rf"^ {{7}}(\S+ )?{re.escape(f)}(\s|$)", text, re.M):
            fail(f"{page}: '{f}' is in the source of {name} but not in what man shows")
    return found


def same(what, page, help_):
    if sorted(page) != sorted(help_):
        fail(f"{what}: the page and --help differ\n  only on the page: "
             f"{sorted(set(page) - set(help_))}\n  only in --help: {sorted(set(help_) - set(page))}"
             f"\n  (twice on the page: {sorted({x for x in page if page.count(x) > 1})})")


def fail(message):
    print(f"manual: FAILED: {message}", file=sys.stderr)
    sys.exit(1)


def help_options(text):
    return re.findall(r"^ +(?:-h, )?(--[a-z][a-z-]*)", text, re.M)


def check_qbrokerd(qbrokerd, man_dir):
    _, usage, _ = run(qbrokerd, "--help")
    flags = help_options(usage)
    if len(flags) < 10:
        fail(f"qbrokerd --help lists only {flags}")
    page = f"{man_dir}/qbrokerd.8"
    same("qbrokerd.8 OPTIONS", tags(page, "OPTIONS", r"(?:-h, )?(--[a-z-]+)", render(page)), flags)
    keys = [f[2:] for f in flags if f not in ("--config", "--help", "--version")]
    page = f"{man_dir}/qbrokerd.json.5"
    same("qbrokerd.json.5 KEYS", tags(page, "KEYS", r"([a-z][a-z-]*)$", render(page)), keys)


def check_qbrokerctl(qbrokerctl, man_dir):
    _, usage, _ = run(qbrokerctl, "--help")
    options = usage.split("\noptions:\n")[1].split("\n\n")[0]
    commands = usage.split("\ncommands:\n")[1].split("\n\n")[0]
    flags = help_options(options)
    words = [m for m in re.findall(r"^  ([a-z]+(?: [a-z]+)?)  ", commands, re.M) if m != "help"]
    if len(words) < 10:
        fail(f"qbrokerctl --help lists only {words}")
    page = f"{man_dir}/qbrokerctl.1"
    shown = render(page)
    same("qbrokerctl.1 OPTIONS", tags(page, "OPTIONS", r"(--[a-z-]+)", shown), flags)
    same("qbrokerctl.1 COMMANDS", tags(page, "COMMANDS", r"([a-z]+(?: [a-z]+)?)(?: [A-Z\[]|$)", shown),
         words)
    # Each command's synopsis: the flags `help COMMAND` shows are those on the page.
    with open(f"{man_dir}/qbrokerctl.1") as f:
        source = f.read().replace("\\-", "-")
    for w in words:
        _, text, _ = run(qbrokerctl, "help", *w.split())
        m = re.search(rf"^\.B {re.escape(w)}(?: \\fR(.*))?$", source, re.M)
        if not m:
            fail(f"qbrokerctl.1 has no entry for '{w}'")
        # The usage runs over lines indented 7; the summary after it is indented 2.
        usage_line = re.split(r"\n  (?=\S)", text)[0]
        same(f"qbrokerctl.1 '{w}' flags", re.findall(r"--[a-z-]+", m.group(1) or ""),
             re.findall(r"--[a-z-]+", usage_line))


def main():
    qbrokerd, qbrokerctl, man_dir = sys.argv[1:4]
    check_qbrokerd(qbrokerd, man_dir)
    check_qbrokerctl(qbrokerctl, man_dir)
    print("manual: the pages render without warnings and match --help")


main()
