"""Quickstart: a sandbox, an app inside it, SSH into it, its logs, and its end.

python examples/quickstart.py
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
import tempfile
from pathlib import Path

from jupyter_sandbox import Sandbox


def main() -> None:
    app = Path(tempfile.mkdtemp(prefix="quickstart-app-"))
    (app / "index.html").write_text("<h1>Hello from inside the sandbox</h1>\n")
    try:
        with Sandbox.create(timeout="10m", labels={"example": "quickstart"}) as sb:
            print(f"sandbox {sb.id} is running")
            sb.fs.upload(app, "app")
            web = sb.spawn("python3 -m http.server 8000", cwd="app")
            page = sb.sh(
                "for i in $(seq 50); do curl -sf localhost:8000/ && exit; sleep 0.1; done; exit 1"
            ).stdout
            print(f"the app answers: {page.strip()}")
            print(sb.sh("whoami; hostname; uname -sr").stdout, end="")

            ssh = sb.expose_ssh(ttl="10m")
            print(f"SSH in with:  {ssh.command}   (host key {ssh.host_key_fingerprint})")
            if shutil.which("ssh"):
                known_hosts = app / "known_hosts"
                known_hosts.write_text(ssh.known_hosts_line + "\n")
                out = subprocess.run(
                    [
                        "ssh",
                        "-o",
                        f"UserKnownHostsFile={known_hosts}",
                        "-o",
                        "BatchMode=yes",
                        *shlex.split(ssh.command)[1:],
                        "echo connected over SSH to $(hostname)",
                    ],
                    capture_output=True,
                    text=True,
                    timeout=30,
                )
                print(out.stdout.strip() or out.stderr.strip())

            print("log:")
            for entry in sb.logs(tail=5):
                print(f"  [{entry.source}] {entry.text.rstrip()}")
            web.kill()
        print(f"sandbox {sb.id} is gone, and its SSH access with it")
    finally:
        shutil.rmtree(app, ignore_errors=True)


if __name__ == "__main__":
    main()
