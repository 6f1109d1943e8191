"""A real PostgreSQL server for the tests: Debian's binaries, a fresh cluster in a temporary
directory, loopback only, on a free port; one per test session, a fresh database per test.

PostgreSQL refuses to run as root, so when the tests run as root the cluster belongs to the
`postgres` system user that Debian's package creates, and every server command runs as that user.
`make test` installs the package where it is missing (the Makefile's `postgres` target).
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import subprocess
import uuid
from pathlib import Path

from tests.support import free_port

# Enough for the race tests (200 connections at once) and a stack's pools besides.
MAX_CONNECTIONS = 300


def bindir() -> Path:
    """Where initdb and pg_ctl are: on PATH, else Debian's newest /usr/lib/postgresql/N/bin."""
    if found := shutil.which("pg_ctl"):
        return Path(found).resolve().parent
    versions = sorted(glob.glob("/usr/lib/postgresql/*/bin/pg_ctl"), key=lambda p: int(Path(p).parts[-3]))
    if not versions:
        raise RuntimeError(
            "PostgreSQL is not installed: `make test` installs Debian's package "
            "(apt-get install postgresql), or install it yourself"
        )
    return Path(versions[-1]).parent


class PostgresServer:
    def __init__(self, root: Path):
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self.log = root / "server.log"
        self._bin = bindir()
        self._user = None
        if os.geteuid() == 0:
            try:
                self._user = pwd.getpwnam("postgres")
            except KeyError:
                raise RuntimeError("running as root needs the 'postgres' user (Debian's postgresql package)") from None

    def _run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
        cmd = [str(self._bin / argv[0]), *argv[1:]]
        if self._user is not None:
            cmd = ["runuser", "-u", "postgres", "--", *cmd]
        return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=120)

    def start(self) -> PostgresServer:
        self.root.mkdir(parents=True, exist_ok=True)
        if self._user is not None:
            # The cluster and its log belong to postgres; the temporary directory above is root's.
            os.chmod(self.root, 0o755)
            for parent in self.root.parents:
                if parent == Path("/") or os.stat(parent).st_mode & 0o001:
                    break
                os.chmod(parent, os.stat(parent).st_mode | 0o001)  # traversable, not listable
            os.chown(self.root, self._user.pw_uid, self._user.pw_gid)
        self._run("initdb", "-D", str(self.data), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8")
        conf = self.data / "postgresql.conf"
        with conf.open("a") as f:
            f.write(
                f"\nlisten_addresses = '127.0.0.1'\nport = {self.port}\nunix_socket_directories = ''\n"
                f"max_connections = {MAX_CONNECTIONS}\nshared_buffers = 32MB\n"
            )
        self.pg_ctl("start")
        return self

    def pg_ctl(self, action: str) -> None:
        """start | stop | restart, waiting until it is done (fast shutdown: sessions are cut)."""
        argv = ["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w", "-t", "60"]
        if action in ("stop", "restart"):
            argv += ["-m", "fast"]
        done = self._run(*argv, action, check=False)
        if done.returncode != 0:
            log = self.log.read_text()[-3000:] if self.log.exists() else ""
            raise RuntimeError(f"pg_ctl {action} failed: {done.stdout}{done.stderr}\n{log}")

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self.pg_ctl("stop")

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg

        name = "t_" + uuid.uuid4().hex[:12]
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)
