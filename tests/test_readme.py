"""The README and the pages of docs/: their commands and code, checked against the program they
describe; each test reads the page it checks."""

import json
import re
import shlex
import shutil
import socket
import subprocess
import sys

import pytest

import udp_timecheck as utc
from conftest import ROOT, needs_linux

README = (ROOT / "README.md").read_text()
PAGES = {path.name: path.read_text() for path in sorted((ROOT / "docs").glob("*.md"))}


def page(name):
    return PAGES[name]


def blocks(text, language):
    return [body for kind, body in re.findall(r"```(\w+)\n(.*?)```", text, re.S) if kind == language]


def shell_lines(text):
    for body in blocks(text, "sh"):
        yield from (line.split("  #")[0].strip() for line in body.replace("\\\n", " ").splitlines()
                    if line.strip())


def text_block_after(text, command):
    """The ```text block that follows command."""
    after = text[text.index(command):]
    start = after.index("```text\n") + len("```text\n")
    return after[start:after.index("```", start)].splitlines()


# --- the README: one screen for the job, then the two set-up commands ------------------------------

def test_the_readme_is_one_screen_for_the_job_then_the_set_up():
    lines = README.splitlines()
    assert len(lines) <= 400
    screen = "\n".join(lines[:60])
    for needed in ("scp udp_timecheck.py ec2-user@VM-IP:", "udp_timecheck.py server 0.0.0.0 1060",
                   "UDP port 1060 to your own address only", "python3 udp_timecheck.py client VM-IP 1060",
                   "% loss", "rtt min/avg/max/mdev", "server clock offset", "- **loss**", "- **RTT**",
                   "- **offset**", "- **verdict**: the exit code", "| 0 |", "| 1 |", "| 2 |"):
        assert needed in screen, needed
    assert README.index("| 2 |") < README.index("git clone")


def test_the_two_set_up_commands_come_after_and_ci_runs_the_same_tests():
    lines = list(shell_lines(README))
    clone = lines.index("git clone REPOSITORY-URL udp-timecheck && cd udp-timecheck")
    assert lines[clone + 1] == "python3 udp_timecheck.py demo"
    assert lines[clone + 2] == ("python3 -m venv .venv && .venv/bin/python -m pip install -e '.[test]' "
                                "&& .venv/bin/python -m pytest")
    setup = README[README.index("## Try it here"):README.index("## More")]
    assert "CI" not in setup and "UDP_TIMECHECK_NO_SKIPS" not in setup
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-m pip install --quiet -e '.[test]'" in ci and '"$py" -m pytest' in ci


# The Debian package of each program a test requires: a new program must be named here, and
# .ci/run must install its package, or CI (where a missing program fails its test) goes red.
PACKAGE_OF = {"chronyd": "chrony", "prometheus": "prometheus", "promtool": "prometheus", "ip": "iproute2",
              "unshare": "util-linux", "setpriv": "util-linux", "nft": "nftables", "tshark": "tshark",
              "systemd-analyze": "systemd", "chromium": "chromium", "faketime": "faketime"}


def test_ci_installs_every_program_a_test_requires():
    required = set()
    for path in (ROOT / "tests").glob("*.py"):
        for call in re.findall(r"require_programs\(([^)*]*)\)", path.read_text()):
            required.update(re.findall(r'"([^"]+)"', call))
    assert {"chronyd", "faketime", "tshark"} <= required  # the scan finds the calls
    ci = (ROOT / ".ci" / "run").read_text()
    installed = re.search(r"apt-get install -y[^\n]*\\\n([^>]*)>", ci).group(1).split()
    assert sorted(required - set(PACKAGE_OF)) == [], "name each program's package in PACKAGE_OF"
    assert sorted(PACKAGE_OF[name] for name in required if PACKAGE_OF[name] not in installed) == []


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git, and this checkout to clone")
def test_the_demo_runs_in_a_fresh_clone(tmp_path):
    """The clone and the demo as written, with this repository for REPOSITORY-URL."""
    lines = list(shell_lines(README))
    clone = next(line for line in lines if line.startswith("git clone"))
    demo = lines[lines.index(clone) + 1]
    script = "{} && {}".format(clone.replace("REPOSITORY-URL", shlex.quote(str(ROOT))),
                               demo.replace("python3", shlex.quote(sys.executable), 1))
    result = subprocess.run(["sh", "-c", script], cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "50 probes sent, 50 received" in result.stdout


def shape(line):
    """A line with what varies from run to run masked: numbers and their signs, addresses, the
    time unit, which way an offset lies (inside its bound or out of it)."""
    line = re.sub(r"\(server (level with this machine within \u00b1 [\d.]+ (us|ms)|ahead of this machine|"
                  r"behind this machine);", "(server DIRECTION;", line)
    line = re.sub(r"\b(203\.0\.113\.7|127\.0\.0\.1)(:\d+)?", "ADDRESS", line)
    return re.sub(r"\b(us|ms)\b", "UNIT", re.sub(r"[+-]?\d+(\.\d+)?", "N", line))


@needs_linux("the sample was made there: kernel timestamps and clock state on both ends")
def test_the_readmes_sample_is_what_the_program_prints(start_server, capsys):
    """The sample's lines, those not cut ([...]), in order, as the README's command prints them
    (here at -i 0.01 against a server on loopback: every figure masked)."""
    command = "python3 udp_timecheck.py client VM-IP 1060 -c 5"
    sample = [line for line in text_block_after(README, command) if not line.startswith("[...")]
    server = start_server(log=None)
    argv = shlex.split(command)[2:] + ["-i", "0.01"]
    argv[1:3] = map(str, server.address[:2])
    assert utc.main(argv) == 0
    printed = [shape(line) for line in capsys.readouterr().out.splitlines()]
    position = 0
    for line in map(shape, sample):
        position = printed.index(line, position) + 1  # each in turn, in the program's order


@needs_linux("the example was run there: kernel timestamps and clock state on both ends")
def test_the_reading_pages_example_is_what_the_program_prints(start_server, capsys):
    command = "python3 udp_timecheck.py client 127.0.0.1:1060 --measure-delay -c 5"
    example = text_block_after(page("reading.md"), command)
    server = start_server(log=None)
    argv = shlex.split(command)[2:]
    argv[1] = "{}:{}".format(*server.address[:2])
    assert utc.main(argv) == 0
    printed = capsys.readouterr().out.replace(":{}".format(server.address[1]), ":1060").splitlines()
    rows = example.index("rtt histogram:") + 1
    assert [shape(line) for line in printed[:rows]] == [shape(line) for line in example[:rows]]
    histogram = re.compile(r"^ +[\d.]+ - +[\d.]+ (us|ms) \|#+ +\d+$")
    assert printed[rows:] and all(histogram.match(line) for line in printed[rows:] + example[rows:])


# --- the pages: commands, links, current facts -------------------------------------------------------

def test_every_udp_timecheck_command_parses():
    commands = [line for text in [README, *PAGES.values()] for line in shell_lines(text)
                if "python3 udp_timecheck.py " in line]
    assert len(commands) >= 20
    parser = utc.build_parser()
    for line in commands:
        words = shlex.split(line.replace('"$(cat key)"', "secret").replace("VM-IP", "203.0.113.7")
                            .rstrip(" &"))  # in the background: the same command
        argv = words[words.index("udp_timecheck.py") + 1:]
        args = parser.parse_args(argv)  # raises TimecheckError (exit 2) on anything wrong
        assert args.func.__name__ == "cmd_" + argv[0], line


def anchors(text):
    """The anchors GitHub makes of a page's headings."""
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
            for heading in re.findall(r"^#+ (.*)$", text, re.M)}


def test_every_relative_link_resolves():
    checked = 0
    for where, text in [(ROOT / "README.md", README)] + [(ROOT / "docs" / name, text)
                                                          for name, text in PAGES.items()]:
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"\w+://", target):
                continue
            path, _, anchor = target.partition("#")
            resolved = (where.parent / path).resolve() if path else where
            assert resolved.exists(), "{}: {}".format(where.name, target)
            if anchor:
                assert anchor in anchors(resolved.read_text()), "{}: {}".format(where.name, target)
            checked += 1
    assert checked >= 30


def test_the_readme_links_every_page():
    linked = set(re.findall(r"\(docs/(\w+\.md)[)#]", README))
    assert linked == set(PAGES)


def test_the_pages_say_what_is_not_what_was():
    for name, text in [("README.md", README), *PAGES.items()]:
        for history in ("the round before", "not known yet", "used to be", "is now what", "did before",
                        "PUBLIC-IP"):
            assert history not in text, (name, history)


def test_the_size_minimum_is_the_one_the_program_has():
    assert "from {} (what the longest request needs)".format(utc.MIN_SIZE) in page("usage.md")


def test_key_generation_command_makes_a_usable_key(tmp_path):
    (line,) = [line for line in shell_lines(page("authentication.md")) if "token_hex" in line]
    subprocess.run(line.replace("python3", shlex.quote(sys.executable), 1), shell=True, cwd=tmp_path,
                   check=True, timeout=30)
    key, warnings = utc.load_key(str(tmp_path / "key"))
    assert len(key) == 64 and warnings == []


def test_mac_snippet_verifies_real_datagrams():
    (snippet,) = [body for body in blocks(page("protocol.md"), "python") if "def mac_of" in body]
    namespace = {}
    exec(snippet, namespace)
    mac_of = namespace["mac_of"]
    key = b"the protocol page's key"
    with utc.TimeServer("127.0.0.1", 0, key=key) as server:
        server.start()
        request = utc.encode_request(1234567, "The time is now", 0, pad_to=300, key=key)
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(10)
            sock.connect(server.address)
            sock.send(request)
            reply = sock.recv(65535)
    request_mac = request[-66:-2]
    assert mac_of(key, b"udp-timecheck/1 request\n", request) == request_mac
    assert mac_of(key, b"udp-timecheck/1 reply\n%d\n%b\n" % (1234567, request_mac), reply) == reply[-66:-2]
    assert mac_of(b"another key", b"udp-timecheck/1 request\n", request) != request[-66:-2]


def test_protocol_examples_are_what_the_code_sends():
    text = page("protocol.md")
    request = re.search(r"request  (\d+) bytes  (\[.*\])", text)
    reply = re.search(r"reply    (\d+) bytes  (\[.*\])", text)
    for match in (request, reply):
        assert int(match.group(1)) == len(match.group(2).encode())
        utc.decode_message(match.group(2).encode())
    parsed = utc.parse_request(request.group(2).encode())
    answer = utc.decode_message(reply.group(2).encode())
    assert parsed.options.interleaved and parsed.options.exchange is not None  # the exchange it asks for
    assert answer.message_id == int(parsed.request_id) and answer.ext["xs"] == int(parsed.seq) - 1
    assert int(reply.group(1)) <= int(request.group(1))


def test_the_reading_page_names_every_key_of_the_json_and_of_each_probe(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "2", "-i", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    text = page("reading.md")
    paragraph = text[text.index("`--json` prints the same as one object"):text.index("## Long runs")]
    named = set(re.findall(r"`(\w+)`", paragraph))
    assert set(summary) - named == set() and set(utc.SAMPLE_FIELDS) - named == set()
    assert set(summary["timestamps"]) <= set(re.findall(r"\b(\w+)\b", paragraph))


def test_the_development_pages_api_is_all_of_all_and_its_example_runs(capsys):
    text = page("development.md")
    section = text[text.index("## Python API"):]
    table = section[section.index("| section | names |"):]
    named = set(re.findall(r"`([A-Za-z_]\w*)`", table)) - {"run", "exit_code", "mesh", "client"}
    assert named == set(utc.__all__)
    example = section[section.index("```python\n") + len("```python\n"):section.index("```\n\nThese")]
    exec(compile(example, "docs/development.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("20 ") and "--- 127.0.0.1:" in out[2]
