#!/usr/bin/env python3
"""The manual page documents every command and flag the program offers.

Runs `./ipop --help`, then `./ipop CMD --help` for every command it lists
(`ca init`, `cert issue`, `ca revoke` as two words), and takes from those
texts every command name (the words after `ipop` on each usage line:
`dht get`, `route add|del`, ...) and every flag (`--long` and `-S`).  Each
must be in docs/ipop.1, read as roff (`\\-\\-shortcut\\-pps`,
`\\fB\\-\\-out\\fR`, `.BR "dht get"` all count):

  * a command: in the SYNOPSIS, and as a `.TP` entry of COMMANDS;
  * a flag: in its command's SYNOPSIS, and in the text outside the
    SYNOPSIS (where its meaning is given);
  * a config-file key (the `cli_flags` rows of ipop.c marked as such): in
    the CONFIGURATION FILE section's list of keys;

and groff renders the page without warnings (when groff is installed).

Fast, no root, no network.  Prints PASS/FAIL lines naming what is
missing; exits 1 on any failure."""
import os
import re
import shutil
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IPOP = os.path.abspath(os.environ.get("IPOP", os.path.join(ROOT, "ipop")))
MAN = os.environ.get("IPOP_MAN", os.path.join(ROOT, "docs", "ipop.1"))   # a man page to check
SRC = os.path.join(ROOT, "ipop.c")
results = []


def report(ok, msg):
    results.append(ok)
    print("%s: %s" % ("PASS" if ok else "FAIL", msg), flush=True)
    return ok


def run(*args):
    p = subprocess.run([IPOP] + list(args), capture_output=True, text=True, timeout=10,
                       stdin=subprocess.DEVNULL)
    return p.returncode, p.stdout + p.stderr


# ---------------------------------------------------------------- the program's side

LONG = re.compile(r"(?<![\w-])--[a-z][a-z0-9-]*[a-z0-9]")
SHORT = re.compile(r"(?<![\w-])-[A-Za-z](?![\w-])")


def commands():
    """The commands `ipop --help` lists, each as its words: ['up'], ['ca', 'init'], ..."""
    rc, out = run("--help")
    if rc != 0 or "commands:" not in out:
        raise RuntimeError("`ipop --help` exited %d without a command list" % rc)
    cmds = []
    for line in out.split("commands:", 1)[1].splitlines():
        m = re.match(r"  (\w+)(?: (\w+))?", line)
        if not m:
            if cmds and not line.strip():
                break
            continue
        # "cert issue  issue a ..." or "simulate run N ...": a second word is
        # part of the name only when the first alone needs a subcommand
        first = m.group(1)
        rc, _ = run(first, "--help")
        cmds.append([first] if rc == 0 or not m.group(2) else [first, m.group(2)])
    return cmds


def usage_names(text):
    """Command names on the usage lines: 'ipop dht put KEY' -> dht put;
    'ipop route add|del A.B.C.D/N' -> route add, route del."""
    names = []
    for m in re.finditer(r"^(?:usage:)?\s*ipop ((?:[a-z]+(?:\|[a-z]+)* ?)+)", text, re.M):
        words = m.group(1).split()
        alts = [[]]
        for w in words:
            alts = [a + [x] for a in alts for x in w.split("|")]
        names += [" ".join(a) for a in alts]
    return names


def own_flags(text):
    """The flags a --help text offers: those on its usage lines and those
    that begin an option line (not ones its prose mentions, such as the
    --secret-file that genkey's output is for, or ssh's -o)."""
    usage, _, rest = text.partition("\n\n")
    found = set(LONG.findall(usage)) | set(SHORT.findall(usage))
    for line in rest.splitlines():
        m = re.match(r"\s+((?:-[\w-]+,?(?: |$))+)", line)
        if m:
            found |= set(LONG.findall(m.group(1))) | set(SHORT.findall(m.group(1)))
    return found


def help_texts():
    """{command: its --help text} for every listed command."""
    out = {}
    for words in commands():
        rc, text = run(*(words + ["--help"]))
        if rc != 0:
            raise RuntimeError("`ipop %s --help` exited %d: %s" % (" ".join(words), rc, text.strip()[:200]))
        out[" ".join(words)] = text
    return out


def config_keys():
    """The long options ipop.c accepts as config-file keys (cli_flags rows)."""
    src = open(SRC).read()
    rows = re.findall(r'\{ "([a-z-]+)", (?:0|\'\w\'), (?:true|false), (true|false), KEY_', src)
    if not rows:
        raise RuntimeError("no cli_flags rows found in ipop.c")
    return [name for name, in_config in rows if in_config == "true"]


# ---------------------------------------------------------------- the man page's side

def plain(roff):
    """Roff as words: escapes undone, each macro line's macro name dropped."""
    lines = []
    for line in roff.splitlines():
        if line.startswith('.\\"'):
            continue
        for a, b in (("\\-", "-"), ("\\&", ""), ("\\e", "\\"), ("\\(aq", "'"), ("\\(lq", '"'),
                     ("\\(rq", '"'), ("\\(en", "-")):
            line = line.replace(a, b)
        line = re.sub(r"\\f[BIRP]", "", line)
        if line.startswith("."):
            macro, _, rest = line.partition(" ")
            line = (macro + " " + rest.replace('"', "")).rstrip()
        lines.append(line)
    return "\n".join(lines)


def sections(man):
    """{".SH NAME": text} of the plain man page."""
    out, name = {}, ""
    for line in man.splitlines():
        if line.startswith(".SH "):
            name = line[4:].strip()
            out[name] = ""
        else:
            out[name] = out.get(name, "") + line + "\n"
    return out


def synopses(synopsis):
    """The SYNOPSIS's .SY blocks as flat text: 'dht get KEY [ --control PATH ]'."""
    out = []
    for block in re.findall(r"^\.SY ipop\n(.*?)^\.YS", synopsis, re.M | re.S):
        words = []
        for line in block.splitlines():
            words += line.split()[1:] if line.startswith(".") else line.split()
        out.append(" ".join(words))
    return out


def has(text, token):
    return re.search(r"(?<![\w-])%s(?![\w-])" % re.escape(token), text) is not None


def tp_tags(text):
    """The tag lines of .TP entries: the line after each .TP."""
    return [m.group(1).split(" ", 1)[-1] for m in re.finditer(r"^\.TP\n(.*)$", text, re.M)]


# ---------------------------------------------------------------- checks

def main():
    if not os.access(IPOP, os.X_OK):
        print("FAIL: %s not built (make)" % IPOP)
        return 1
    texts = help_texts()
    man = sections(plain(open(MAN).read()))
    for want in ("SYNOPSIS", "COMMANDS", "CONFIGURATION FILE"):
        if not report(want in man, "docs/ipop.1 has a %s section" % want):
            return 1
    syn = synopses(man["SYNOPSIS"])
    body = "\n".join(t for s, t in man.items() if s != "SYNOPSIS")
    tags = tp_tags(man["COMMANDS"])

    names = sorted({n for t in texts.values() for n in usage_names(t)} | set(texts))
    syn_names = {n for s in syn for n in usage_names("ipop " + s.replace(" | ", "|"))}
    no_syn = [n for n in names if not any(s == n or s.startswith(n + " ") for s in syn_names)]
    no_entry = [n for n in names if not any(has(t, n) for t in tags)]
    report(not no_syn, "every command (%d, from the usage lines of `ipop --help` and `ipop CMD --help`) "
           "has a SYNOPSIS line%s" % (len(names), " (missing: %s)" % ", ".join(no_syn) if no_syn else ""))
    report(not no_entry, "every command has a COMMANDS entry%s"
           % (" (missing: %s)" % ", ".join(no_entry) if no_entry else ""))

    flags, no_syn, no_text = 0, [], []
    for cmd, text in sorted(texts.items()):
        mine = [s for s in syn if s == cmd or s.startswith(cmd + " ")]
        for flag in sorted(own_flags(text)):
            flags += 1
            if not any(has(s, flag) for s in mine):
                no_syn.append("%s %s" % (cmd, flag))
            if not has(body, flag):
                no_text.append("%s %s" % (cmd, flag))
    report(flags >= 40, "found %d flags in the --help texts (a parser that finds none checks nothing)" % flags)
    report(not no_syn, "every flag of every command's --help is in that command's SYNOPSIS%s"
           % (" (missing: %s)" % ", ".join(no_syn) if no_syn else ""))
    report(not no_text, "every flag of every command's --help is explained outside the SYNOPSIS%s"
           % (" (missing: %s)" % ", ".join(no_text) if no_text else ""))

    keys = config_keys()
    conf = man["CONFIGURATION FILE"]
    no_key = [k for k in keys if not has(conf, k)]
    report(len(keys) >= 20 and not no_key, "every config-file key of ipop.c (%d) is listed in CONFIGURATION FILE%s"
           % (len(keys), " (missing: %s)" % ", ".join(no_key) if no_key else ""))

    if shutil.which("groff"):
        p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", MAN], capture_output=True, text=True, timeout=30)
        report(p.returncode == 0 and not p.stderr.strip(), "groff renders docs/ipop.1 without warnings%s"
               % (": " + p.stderr.strip()[:300] if p.stderr.strip() else ""))

    bad = results.count(False)
    print("%s: t_docs, %d checks, %d failed" % ("FAIL" if bad else "PASS", len(results), bad))
    return 1 if bad else 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as e:
        print("FAIL: %s" % e)
        sys.exit(1)
