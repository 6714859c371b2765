"""The README's commands and code, checked against the program they describe."""

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
BLOCKS = re.findall(r"```(\w+)\n(.*?)```", README, re.S)


def shell_lines():
    for language, body in BLOCKS:
        if language == "sh":
            yield from (line.split("  #")[0].strip() for line in body.replace("\\\n", " ").splitlines()
                        if line.strip())


def test_the_two_commands_come_first_and_ci_runs_the_same_tests():
    lines = list(shell_lines())
    assert lines[0] == "git clone REPOSITORY-URL udp-timecheck && cd udp-timecheck"
    assert lines[1] == "python3 udp_timecheck.py demo"
    assert lines[2] == ("python3 -m venv .venv && .venv/bin/python -m pip install -e '.[test]' "
                        "&& .venv/bin/python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text()
    assert "-m pip install --quiet -e '.[test]'" in ci and '"$py" -m pytest' in ci


@pytest.mark.skipif(shutil.which("git") is None or not (ROOT / ".git").exists(),
                    reason="needs git, and this checkout to clone")
def test_the_demo_runs_in_a_fresh_clone(tmp_path):
    """The first two commands as written, with this repository for REPOSITORY-URL."""
    clone, demo = list(shell_lines())[:2]
    script = "{} && {}".format(clone.replace("REPOSITORY-URL", shlex.quote(str(ROOT))),
                               demo.replace("python3", shlex.quote(sys.executable), 1))
    result = subprocess.run(["sh", "-c", script], cwd=str(tmp_path), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "50 probes sent, 50 received" in result.stdout


def test_every_udp_timecheck_command_parses():
    commands = [line for line in shell_lines() if "python3 udp_timecheck.py " in line]
    assert len(commands) >= 10
    parser = utc.build_parser()
    for line in commands:
        words = shlex.split(line.replace('"$(cat key)"', "secret").replace("PUBLIC-IP", "203.0.113.7")
                            .rstrip(" &"))  # in the background: the same command
        argv = words[words.index("udp_timecheck.py") + 1:]
        args = parser.parse_args(argv)  # raises TimecheckError (exit 2) on anything wrong
        assert args.func.__name__ == "cmd_" + argv[0], line


def test_key_generation_command_makes_a_usable_key(tmp_path):
    (line,) = [line for line in shell_lines() if "token_hex" in line]
    subprocess.run(line.replace("python3", shlex.quote(sys.executable), 1), shell=True, cwd=tmp_path,
                   check=True, timeout=30)
    key, warnings = utc.load_key(str(tmp_path / "key"))
    assert len(key) == 64 and warnings == []


def test_mac_snippet_verifies_real_datagrams():
    (snippet,) = [body for language, body in BLOCKS if language == "python" and "def mac_of" in body]
    namespace = {}
    exec(snippet, namespace)
    mac_of = namespace["mac_of"]
    key = b"the README's key"
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
    request = re.search(r"request  (\d+) bytes  (\[.*\])", README)
    reply = re.search(r"reply    (\d+) bytes  (\[.*\])", README)
    for match in (request, reply):
        assert int(match.group(1)) == len(match.group(2).encode())
        utc.decode_message(match.group(2).encode())
    request_id, seq, size, clock, options = utc.parse_request(request.group(2).encode())
    assert utc.decode_message(reply.group(2).encode()).message_id == int(request_id)
    assert int(reply.group(1)) <= int(request.group(1))


def shape(line):
    """A line with what varies from run to run masked: numbers and their signs, the time unit,
    which way an offset lies (inside its bound or out of it)."""
    line = re.sub(r"\(server (level with this machine within \u00b1 [\d.]+ ms|ahead of this machine|"
                  r"behind this machine);", "(server DIRECTION;", line)
    return re.sub(r"\b(us|ms)\b", "UNIT", re.sub(r"[+-]?\d+(\.\d+)?", "N", line))


@needs_linux("the README's example was run there: kernel timestamps and clock state on both ends")
def test_the_readmes_measurement_example_is_what_the_program_prints(start_server, capsys):
    command = "python3 udp_timecheck.py client 127.0.0.1:1060 --measure-delay -c 5"
    block = README[README.index(command):]
    start = block.index("```text\n") + len("```text\n")
    example = block[start:block.index("```", start)].splitlines()
    server = start_server(log=None)
    argv = shlex.split(command)[2:]
    argv[1] = "{}:{}".format(*server.address[:2])
    assert utc.main(argv) == 0
    printed = capsys.readouterr().out.replace(":{}".format(server.address[1]), ":1060").splitlines()
    rows = example.index("rtt histogram:") + 1
    assert [shape(line) for line in printed[:rows]] == [shape(line) for line in example[:rows]]
    histogram = re.compile(r"^ +[\d.]+ - +[\d.]+ (us|ms) \|#+ +\d+$")
    assert printed[rows:] and all(histogram.match(line) for line in printed[rows:] + example[rows:])


def test_the_readme_names_every_key_of_the_json_and_of_each_probe(start_server, capsys):
    server = start_server(log=None)
    assert utc.main(["client", *map(str, server.address[:2]), "-c", "2", "-i", "0", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    paragraph = README[README.index("`--json` prints the same as one object"):README.index("### Long runs")]
    named = set(re.findall(r"`(\w+)`", paragraph))
    assert set(summary) - named == set() and set(utc.SAMPLE_FIELDS) - named == set()
    assert set(summary["timestamps"]) <= set(re.findall(r"\b(\w+)\b", paragraph))


def test_the_readmes_api_is_all_of_all_and_its_example_runs(capsys):
    section = README[README.index("## Python API"):README.index("## Development")]
    table = section[section.index("| section | names |"):]
    named = set(re.findall(r"`([A-Za-z_]\w*)`", table)) - {"run", "exit_code", "mesh", "client"}
    assert named == set(utc.__all__)
    example = section[section.index("```python\n") + len("```python\n"):section.index("```\n\nThese")]
    exec(compile(example, "README.md", "exec"), {})
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("20 ") and "--- 127.0.0.1:" in out[2]
