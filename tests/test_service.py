"""contrib/udp-timecheck.service: systemd takes it, rates its exposure OK, and the server it starts
needs no privilege at all."""

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile

from conftest import LISTENING, ROOT, needs_linux_machine, require_programs, run

UNIT = ROOT / "contrib" / "udp-timecheck.service"


def unit_settings():
    """[Service] settings of the unit: {name: [values, in order]}."""
    settings, section = {}, None
    for line in UNIT.read_text().splitlines():
        if line.startswith("["):
            section = line.strip("[]")
        elif "=" in line and not line.startswith("#") and section == "Service":
            name, value = line.split("=", 1)
            settings.setdefault(name, []).append(value)
    return settings


def test_systemd_analyze_verifies_the_unit():
    require_programs("systemd-analyze")
    result = run(["systemd-analyze", "verify", str(UNIT)])
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_systemd_rates_its_exposure_ok():
    require_programs("systemd-analyze")
    result = run(["systemd-analyze", "security", "--offline=yes", "--no-pager", str(UNIT)])
    exposure = float(re.search(r"Overall exposure level for udp-timecheck\.service: ([\d.]+) (\w+)",
                               result.stdout).group(1))
    assert exposure <= 3.0, result.stdout


def test_the_unit_runs_a_dynamic_user_with_no_capabilities_on_a_read_only_system():
    settings = unit_settings()
    assert settings["DynamicUser"] == ["yes"] and settings["CapabilityBoundingSet"] == [""]
    assert settings["AmbientCapabilities"] == [""] and settings["NoNewPrivileges"] == ["yes"]
    assert settings["ProtectSystem"] == ["strict"] and "ReadWritePaths" not in settings
    argv = shlex.split(settings["ExecStart"][0])
    assert argv[1:4] == ["/opt/udp-timecheck/udp_timecheck.py", "server", "0.0.0.0"]


@needs_linux_machine("setpriv drops every capability, as the unit does")
def test_its_command_serves_with_no_privilege(processes):
    """The unit's own command, with its own interpreter, as nobody, with no capability and no new
    privileges, on port 0, from a copy of the program that anyone may read (as /opt's is)."""
    require_programs("setpriv")
    argv = shlex.split(unit_settings()["ExecStart"][0])
    require_programs(argv[0])
    with tempfile.TemporaryDirectory(dir="/tmp") as where:
        os.chmod(where, 0o755)
        program = shutil.copy(str(ROOT / "udp_timecheck.py"), where)
        os.chmod(program, 0o644)
        command = [argv[0], program] + argv[2:]
        command[command.index("1060")] = "0"
        command[command.index("0.0.0.0")] = "127.0.0.1"  # tests send to loopback only
        server = processes(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--no-new-privs",
                            "--bounding-set=-all", "--inh-caps=-all"] + command)
        port = server.stdout.expect(LISTENING).group(1)
        client = subprocess.run([sys.executable, str(ROOT / "udp_timecheck.py"), "client", "127.0.0.1", port,
                                 "-c", "2", "-i", "0", "--json"], stdout=subprocess.PIPE, timeout=60)
        assert client.returncode == 0 and json.loads(client.stdout.decode())["received"] == 2
